"""Ingest benchmark: C-STORE throughput of pacs-node against two floors.

Run from the repository root with the project's virtual environment::

    .venv/bin/python benchmarks/ingest.py [--count 300] [--repeat 1] [--node-processes 1] [--keep]

What is sent
    ``--count`` synthetic CT instances of 512x512 int16 pixels (one series, about
    0.5 MB each: 300 make about 157 MB), made once per run with
    :func:`pacs_lab.synthetic.make_series` and written as Part 10 files to a temp
    dir, plus a separate 10-instance warm-up series. Everything is deleted at the
    end unless ``--keep``.

Who sends
    dcmtk ``storescu -aet BENCH -aec <AE> 127.0.0.1 PORT files...`` with
    ``TCP_NODELAY=1`` (without it dcmtk stalls on delayed ACKs). Two cases:

    * ``1-assoc``: one storescu, one association, all instances;
    * ``4-assoc``: the instances split into 4 contiguous groups, 4 storescu
      processes started together, timed until the last one exits.

    Every storescu must exit 0 and the receiver must then hold exactly the
    instances sent (plus the warm-up), or the benchmark fails.

Who receives (each listens on 127.0.0.1 only, on a free port)
    * ``node``: ``pacs-node --config CFG serve`` as in production: fsync of every
      instance before its Success, SQLite index, ``log_level: WARNING``,
      ``routing.series_quiet_s: 30``, ``storage.min_free_mb: 0``, max PDU the
      default (262144), ``dicom.processes`` from ``--node-processes`` (and
      ``--node-processes-4`` for the 4-assoc case; SO_REUSEPORT). Two figures:
      ``node_ips`` = instances / storescu wall time (what the sender sees; every
      Success is already fsynced) and ``node_indexed_ips`` = instances / time from
      the start of storescu until ``SELECT count(*) FROM instance`` in
      ``<data_dir>/pacs-node.db`` shows all of them (polled every 10 ms after the
      senders exit, with a deadline).
    * ``bare``: pynetdicom's own floor, this file run as ``_bare-scp``: an AE
      accepting every storage SOP class (explicit and implicit VR little endian)
      with ``maximum_pdu_size`` = pacs-node's default (262144), whose C-STORE
      handler only puts the bytes in a file (no fsync, no index, no header read),
      in two modes: ``default`` writes ``event.encoded_dataset()`` (preamble +
      file meta + dataset); ``chunked`` sets ``_config.STORE_RECV_CHUNKED_DATASET``
      and renames ``event.dataset_path`` (temp files on the same filesystem, as
      pacs-node does). Both are printed; the floor (``bare_ips``) is the faster.
      A third mode, ``transport``, is ``chunked`` on pacs-node's own transport
      (``pacs_node.common.dul``: event-driven reactors instead of pynetdicom's 1 ms
      polling, one ``recv_into`` per PDU, and the C-STORE short path that
      bypasses pynetdicom's DIMSE layer). It is not part of the floor: it shows
      what the node's durability and indexing cost over the transport it runs on
      (``ratio_transport``), where ``ratio`` also credits the transport.
    * ``dcmtk``: ``storescp -od DIR -pdu 131072`` (131072 is dcmtk's largest
      receive PDU; its default is 16384). dcmtk 3.6.7's storescp cannot bind to
      one address, so this script listens on 127.0.0.1 itself and starts one
      ``storescp --inetd`` per accepted connection (the socket as its
      stdin/stdout): one process per association, as ``--fork`` would do, in both
      cases. Default format conversion (no ``+B``), no fsync.

Method
    Every run of a (receiver, case) pair gets a fresh server and a fresh, empty
    directory (for the node a fresh ``data_dir`` and database), so runs are
    independent. A server counts as started once it listens (the node: with all
    of its SCP processes) and its processes have gone quiet (under 5% of a core
    for half a second: the node's worker processes are done importing).
    Before the timed send each fresh server receives the 10-instance
    warm-up series the same way (1 or 4 associations) and stores it fully; then
    ``sync`` flushes dirty pages so that no receiver pays for another's
    write-back (the page cache cannot be dropped without root). The order of the
    receivers rotates from one (case, repeat) to the next so that none always
    goes first or last. With ``--repeat N`` each figure is the median of its N
    runs. Only one benchmark should run on the machine at a time; on a small
    shared machine the figures move by 20-30% from run to run, so compare with
    ``--repeat 3`` or more.

    Where /proc exists the CPU time (user + system) that the server's process
    group spent during the timed send is reported per instance (``node_cpu_ms``,
    ``bare_cpu_ms``): steadier than throughput when the machine is noisy.

Output
    One line per run, a table of instances/s per receiver and case (the node's
    two figures, both bare modes, the floor, dcmtk and the ratios), then one
    JSON line per case::

        {"benchmark": "ingest", "case": "1-assoc", "node_ips": ..., "bare_ips": ...,
         "dcmtk_ips": ..., "ratio": node/bare, "ratio_dcmtk": node/dcmtk, ...}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

# Run as a script, this folder is sys.path[0], where benchmarks/inference.py would
# shadow the ``inference`` package: put the repository root first instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "benchmarks")]

CASES: dict[str, int] = {"1-assoc": 1, "4-assoc": 4}
BARE_FLOOR_MODES = ("default", "chunked")
#: ``transport``: the write-only handler on pacs-node's own transport (pacs_node.common.dul), not part of the floor
BARE_MODES = (*BARE_FLOOR_MODES, "transport")
DCMTK_MAX_PDU = 131_072  # storescp accepts 4096..131072
WARMUP_COUNT = 10
POLL_S = 0.01
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
DCMTK_ENV = {"TCP_NODELAY": "1"}
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchmarkError(RuntimeError):
    """The benchmark could not produce a valid figure."""


# ---------------------------------------------------------------------------
# the bare pynetdicom SCP (runs in its own process: `ingest.py _bare-scp ...`)
# ---------------------------------------------------------------------------
def bare_scp_main(argv: Sequence[str]) -> int:
    """A C-STORE SCP that only writes what it receives to a file."""
    parser = argparse.ArgumentParser(prog="ingest.py _bare-scp")
    parser.add_argument("port", type=int)
    parser.add_argument("out_dir")
    parser.add_argument("--mode", choices=BARE_MODES, default="default")
    parser.add_argument("--pdu", type=int, required=True)
    parser.add_argument("--ae-title", default="BARESCP")
    args = parser.parse_args(argv)

    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config, evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.presentation import AllStoragePresentationContexts

    out = args.out_dir

    def _sop(event: evt.Event) -> str:
        return str(cast(C_STORE, event.request).AffectedSOPInstanceUID)

    if args.mode == "transport":
        # pacs-node's transport: event-driven reactors, PDU reader and C-STORE
        # short path, with its temporary files in $TMPDIR (see below).
        from pacs_node.common.dul import install

        install()
    if args.mode in ("chunked", "transport"):
        # Temporary files go to $TMPDIR, which the benchmark points at a folder
        # on the same filesystem as out_dir, so that storing is a rename.
        _config.STORE_RECV_CHUNKED_DATASET = True

        def store(path: Path, assoc: object, sop: str) -> int:
            os.replace(path, os.path.join(out, f"{sop}.dcm"))
            return 0x0000

        def on_store(event: evt.Event) -> int:
            return store(event.dataset_path, event.assoc, _sop(event))

    else:

        def on_store(event: evt.Event) -> int:
            with open(os.path.join(out, f"{_sop(event)}.dcm"), "wb") as f:
                f.write(event.encoded_dataset())
            return 0x0000

    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = args.pdu
    ae.maximum_associations = 16
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context("1.2.840.10008.1.1", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.mode == "transport":
        from pynetdicom.transport import ThreadedAssociationServer

        from pacs_node.common.dul import NodeRequestHandler

        # The node's C-STORE short path: temporary files in $TMPDIR, then the same rename.
        ae.pacs_node_incoming_dir = os.environ.get("TMPDIR") or tempfile.gettempdir()  # type: ignore[attr-defined]
        ae.pacs_node_store = store  # type: ignore[attr-defined]

        server = ae.make_server(
            ("127.0.0.1", args.port),
            evt_handlers=[(evt.EVT_C_STORE, on_store)],
            server_class=ThreadedAssociationServer,
            request_handler=NodeRequestHandler,
        )
        server.serve_forever()
        return 0
    ae.start_server(("127.0.0.1", args.port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return 0


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listeners(port: int) -> int:
    """Number of sockets listening on 127.0.0.1:port (Linux /proc/net/tcp), -1 if unknown."""
    try:
        text = Path("/proc/net/tcp").read_text()
    except OSError:
        return -1
    want = f"0100007F:{port:04X}"
    return sum(1 for line in text.splitlines()[1:] if line.split()[1:2] == [want] and line.split()[3] == "0A")


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, then SIGKILL the process group the benchmark started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    try:  # children left over (node SCP processes, storescp); each server has its own group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, alive: Callable[[], None] | None = None
) -> float:
    """Poll ``predicate`` until true; returns the perf_counter time it was seen true."""
    deadline = time.perf_counter() + timeout
    while True:
        if predicate():
            return time.perf_counter()
        if alive is not None:
            alive()
        if time.perf_counter() > deadline:
            raise BenchmarkError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def group_cpu_s(pgid: int) -> float | None:
    """CPU seconds (user + system) used so far by the live processes of a process group; None without /proc."""
    total = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def wait_quiet(pgid: int, timeout: float, what: str) -> None:
    """Wait until a process group uses under 5% of a core over half a second (start-up finished)."""
    deadline = time.perf_counter() + timeout
    last = group_cpu_s(pgid)
    while last is not None:
        time.sleep(0.5)
        now = group_cpu_s(pgid)
        if now is None or now - last < 0.025:
            return
        if time.perf_counter() > deadline:
            raise BenchmarkError(f"{what} still busy after {timeout:.0f} s")
        last = now


def count_files(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.is_file())
    except FileNotFoundError:
        return 0


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def tool_version(cmd: str) -> str:
    try:
        out = subprocess.run([cmd, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.split()[2] if out.count(" ") >= 2 else out.strip()


# ---------------------------------------------------------------------------
# receivers
# ---------------------------------------------------------------------------
class Receiver:
    """One kind of C-STORE SCP, started fresh for each run."""

    name = "?"
    ae_title = "ANY-SCP"

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    def start(self, run_dir: Path, case: str) -> None:
        raise NotImplementedError

    def received(self) -> int:
        """Instances stored (node: indexed)."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchmarkError(f"{self.name} exited with status {self.proc.returncode}")

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None, listening: int = 1) -> None:
        self.log = log
        with log.open("wb") as f:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        port = self.port
        if listeners(port) < 0:  # no /proc: fall back to connecting

            def up() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    return True
                except OSError:
                    return False

        else:

            def up() -> bool:
                return listeners(port) >= listening

        wait_until(up, START_TIMEOUT_S, f"{self.name} to listen on 127.0.0.1:{port}", self.check_alive)
        # Child processes (the node's workers, extra SCPs) may still be importing.
        wait_quiet(self.proc.pid, START_TIMEOUT_S, f"{self.name} start-up")
        self.check_alive()

    def cpu_s(self) -> float | None:
        """CPU seconds used so far by the server's processes (None when unknown)."""
        return group_cpu_s(self.proc.pid) if self.proc is not None else None


class NodeReceiver(Receiver):
    """pacs-node as configured for production."""

    name = "node"
    ae_title = "PACSNODE"

    def __init__(self, command: list[str], processes: dict[str, int]) -> None:
        super().__init__()
        self.command = command
        self.processes = processes
        self.db: Path | None = None
        self._conn: sqlite3.Connection | None = None

    def start(self, run_dir: Path, case: str) -> None:
        import yaml

        data_dir = run_dir / "node"
        self.port = free_port()
        config = {
            "data_dir": str(data_dir),
            "log_level": "WARNING",
            "dicom": {
                "host": "127.0.0.1",
                "port": self.port,
                "ae_title": self.ae_title,
                "processes": self.processes[case],
            },
            "storage": {"min_free_mb": 0},
            "routing": {"series_quiet_s": 30},
        }
        cfg = run_dir / "pacs-node.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
        self._spawn([*self.command, "--config", str(cfg), "serve"], run_dir / "node.log", env, self.processes[case])
        self.db = data_dir / "pacs-node.db"

    def received(self) -> int:
        if self._conn is None:
            if self.db is None or not self.db.exists():
                return 0
            self._conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return int(self._conn.execute("SELECT count(*) FROM instance").fetchone()[0])
        except sqlite3.OperationalError:  # schema not there yet, or busy
            return 0

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        super().stop()


class BareReceiver(Receiver):
    """pynetdicom with a handler that only writes the bytes."""

    ae_title = "BARESCP"

    def __init__(self, mode: str, pdu: int) -> None:
        super().__init__()
        self.mode = mode
        self.pdu = pdu
        self.name = f"bare-{mode}"
        self.out: Path | None = None

    def start(self, run_dir: Path, case: str) -> None:
        self.out = run_dir / "out"
        incoming = run_dir / "incoming"
        self.out.mkdir()
        incoming.mkdir()
        self.port = free_port()
        env = dict(os.environ, TMPDIR=str(incoming))
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "_bare-scp", str(self.port), str(self.out)]
        cmd += ["--mode", self.mode, "--pdu", str(self.pdu), "--ae-title", self.ae_title]
        self._spawn(cmd, run_dir / f"{self.name}.log", env)

    def received(self) -> int:
        return count_files(self.out) if self.out else 0


class DcmtkReceiver(Receiver):
    """dcmtk storescp, one ``--inetd`` process per association accepted on 127.0.0.1."""

    name = "dcmtk"
    ae_title = "STORESCP"

    def __init__(self) -> None:
        super().__init__()
        self.out: Path | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._children: list[subprocess.Popen[bytes]] = []
        self._error: BaseException | None = None

    def start(self, run_dir: Path, case: str) -> None:
        self.out = run_dir / "out"
        self.out.mkdir()
        self.log = run_dir / "storescp.log"
        self._stop.clear()
        self._children = []
        self._error = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.settimeout(0.1)
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        cmd = ["storescp", "--inetd", "-od", str(self.out), "-aet", self.ae_title, "-pdu", str(DCMTK_MAX_PDU)]
        env = dict(os.environ, **DCMTK_ENV)
        self._thread = threading.Thread(target=self._serve, args=(cmd, env), name="storescp-inetd", daemon=True)
        self._thread.start()

    def _serve(self, cmd: list[str], env: dict[str, str]) -> None:
        assert self._sock is not None and self.log is not None
        with self.log.open("ab") as log:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if not self._stop.is_set():
                        self._error = exc
                    return
                try:
                    conn.setblocking(True)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._children.append(
                        subprocess.Popen(cmd, stdin=conn.fileno(), stdout=conn.fileno(), stderr=log, env=env)
                    )
                except OSError as exc:
                    self._error = exc
                    return
                finally:
                    conn.close()

    def check_alive(self) -> None:
        if self._error is not None:
            raise BenchmarkError(f"storescp acceptor failed: {self._error}")

    def received(self) -> int:
        return count_files(self.out) if self.out else 0

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for child in self._children:
            if child.poll() is None:
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(10)
        self._children = []


# ---------------------------------------------------------------------------
# sending
# ---------------------------------------------------------------------------
def split(items: Sequence[Path], groups: int) -> list[list[Path]]:
    """``groups`` contiguous, near-equal slices."""
    size, extra = divmod(len(items), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (1 if g < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return [g for g in out if g]


def send(
    files: Sequence[Path], groups: int, port: int, ae_title: str, log_dir: Path, tag: str, timeout: float
) -> float:
    """Run ``groups`` storescu processes at once; returns the wall time until all exited.

    Raises:
        BenchmarkError: a storescu failed or ran past ``timeout``.
    """
    env = dict(os.environ, **DCMTK_ENV)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    chunks = split(files, groups)
    logs = [log_dir / f"storescu-{tag}-{i}.log" for i in range(len(chunks))]
    handles = [p.open("wb") for p in logs]
    try:
        base = ["storescu", "-aet", "BENCH", "-aec", ae_title, "127.0.0.1", str(port)]
        t0 = time.perf_counter()
        for chunk, log, handle in zip(chunks, logs, handles, strict=True):
            cmd = base + [str(p) for p in chunk]
            procs.append((subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=handle, stderr=handle, env=env), log))
        deadline = t0 + timeout
        failed = []
        for proc, log in procs:
            try:
                rc = proc.wait(max(deadline - time.perf_counter(), 0.01))
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                failed.append((proc, log, rc))
        elapsed = time.perf_counter() - t0
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for handle in handles:
            handle.close()
    if failed:
        msgs = [f"storescu {'timed out' if rc is None else f'exited {rc}'}:\n{tail(log)}" for _, log, rc in failed]
        raise BenchmarkError(f"{tag}: " + "\n".join(msgs))
    return elapsed


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------
@dataclass
class Sample:
    sent_ips: float
    indexed_ips: float | None = None
    cpu_ms: float | None = None  # server CPU per instance over the timed send


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, case: str, receiver: str, sample: Sample) -> None:
        self.samples.setdefault((case, receiver), []).append(sample)

    def median(self, case: str, receiver: str, what: str = "sent_ips") -> float | None:
        values = [getattr(s, what) for s in self.samples[(case, receiver)]]
        known = [v for v in values if v is not None]
        return float(statistics.median(known)) if known else None


def run_one(
    rx: Receiver,
    case: str,
    files: Sequence[Path],
    warmup: Sequence[Path],
    run_dir: Path,
    timeout: float,
) -> Sample:
    """One fresh server, warm-up, timed send, verified."""
    groups = CASES[case]
    run_dir.mkdir(parents=True)
    try:
        rx.start(run_dir, case)
        send(warmup, groups, rx.port, rx.ae_title, run_dir, "warmup", timeout)
        wait_until(lambda: rx.received() >= len(warmup), timeout, f"{rx.name} to store the warm-up", rx.check_alive)
        os.sync()
        expected = len(warmup) + len(files)
        cpu0 = rx.cpu_s()
        t0 = time.perf_counter()
        sent = send(files, groups, rx.port, rx.ae_title, run_dir, "timed", timeout)
        t_done = wait_until(
            lambda: rx.received() >= expected, timeout, f"{rx.name} to hold {expected} instances", rx.check_alive
        )
        cpu1 = rx.cpu_s()
        got = rx.received()
        if got != expected:
            raise BenchmarkError(f"{rx.name} holds {got} instances, expected {expected}")
        rx.check_alive()
        indexed = len(files) / (t_done - t0) if isinstance(rx, NodeReceiver) else None
        cpu_ms = 1000 * (cpu1 - cpu0) / len(files) if cpu0 is not None and cpu1 is not None else None
        return Sample(len(files) / sent, indexed, cpu_ms)
    except BenchmarkError as exc:
        log = f"\n--- {rx.name} log ---\n{tail(rx.log)}" if rx.log else ""
        raise BenchmarkError(f"{rx.name} {case}: {exc}{log}") from None
    finally:
        rx.stop()


def node_command() -> list[str]:
    script = Path(sys.executable).parent / "pacs-node"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pacs_node"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bare-scp"]:
        return bare_scp_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=300, help="instances per timed send (default 300)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per receiver and case; figures are medians")
    parser.add_argument("--node-processes", type=int, default=1, help="pacs-node dicom.processes (default 1)")
    parser.add_argument(
        "--node-processes-4", type=int, default=None, help="dicom.processes for the 4-assoc case only (default: same)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="limit for each wait, seconds (default 300)")
    parser.add_argument("--workdir", default=None, help="parent of the temp dir (default: the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data, received files, logs)")
    args = parser.parse_args(argv)
    if args.count < 4 or args.repeat < 1 or args.node_processes < 1:
        parser.error("--count must be >= 4, --repeat and --node-processes >= 1")
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        raise SystemExit("dcmtk's storescu and storescp must be on PATH (apt-get install dcmtk)")

    import pydicom
    import pynetdicom

    from pacs_lab.synthetic import make_series, write_series
    from pacs_node.config import DicomSettings

    node_pdu = int(DicomSettings.model_fields["max_pdu_size"].default)
    node_procs = {"1-assoc": args.node_processes, "4-assoc": args.node_processes_4 or args.node_processes}

    work = Path(tempfile.mkdtemp(prefix="pacs-node-ingest-bench-", dir=args.workdir))
    receivers: list[Receiver] = [
        NodeReceiver(node_command(), node_procs),
        *(BareReceiver(mode, node_pdu) for mode in BARE_MODES),
        DcmtkReceiver(),
    ]
    results = Results()
    try:
        t = time.perf_counter()
        files = write_series(work / "data", make_series(args.count, rows=512, cols=512, modality="CT"))
        warmup = write_series(work / "warmup", make_series(WARMUP_COUNT, rows=512, cols=512, modality="CT", seed=1))
        os.sync()
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(
            f"generated {len(files)} CT instances 512x512 ({mb:.1f} MB) + {len(warmup)} warm-up "
            f"in {time.perf_counter() - t:.1f} s under {work} ({fs_type(work)})",
            flush=True,
        )
        n_run = 0
        for rep in range(args.repeat):
            for ci, case in enumerate(CASES):
                shift = (rep * len(CASES) + ci) % len(receivers)
                for rx in receivers[shift:] + receivers[:shift]:
                    run_dir = work / "runs" / f"{n_run:03d}-{case}-{rx.name}"
                    sample = run_one(rx, case, files, warmup, run_dir, args.timeout)
                    results.add(case, rx.name, sample)
                    extra = f", indexed {sample.indexed_ips:7.1f}/s" if sample.indexed_ips is not None else ""
                    if sample.cpu_ms is not None:
                        extra += f", server CPU {sample.cpu_ms:5.2f} ms/instance"
                    print(
                        f"  run {rep + 1} {case:8s} {rx.name:13s} {sample.sent_ips:7.1f} instances/s{extra}", flush=True
                    )
                    if not args.keep:
                        shutil.rmtree(run_dir, ignore_errors=True)
                    os.sync()
                    n_run += 1
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for rx in receivers:
            rx.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    stat = f"median of {args.repeat} runs each" if args.repeat > 1 else "one run each"
    print()
    print(
        f"ingest: {args.count} CT 512x512 instances ({mb:.1f} MB) from dcmtk storescu {tool_version('storescu')} "
        f"over 127.0.0.1, instances/s ({stat})"
    )
    print(
        f"  node : pacs-node, fsync + SQLite index, max PDU {node_pdu}, dicom.processes "
        f"{node_procs['1-assoc']} (1-assoc) / {node_procs['4-assoc']} (4-assoc); "
        "acked = storescu done, indexed = all rows in the DB"
    )
    print(
        f"  bare : pynetdicom {pynetdicom.__version__} (pydicom {pydicom.__version__}) write-only handler, "
        f"no fsync, max PDU {node_pdu} (= pacs-node's default); floor = faster of default/chunked; "
        "transport = chunked on pacs-node's own transport (pacs_node.common.dul), not part of the floor"
    )
    print(f"  dcmtk: storescp {tool_version('storescp')} --inetd per association, no fsync, max PDU {DCMTK_MAX_PDU}")
    header = ["case", "node acked", "node indexed", "bare default", "bare chunked", "bare floor", "bare transport"]
    header += ["dcmtk", "node/bare", "node/transport", "node/dcmtk"]
    widths = [max(len(h), 8) for h in header]

    def table_row(cells: list[str]) -> str:
        return "  " + "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(table_row(header))

    def ips(case: str, receiver: str, what: str = "sent_ips") -> float:
        value = results.median(case, receiver, what)
        if value is None:
            raise BenchmarkError(f"no {what} for {receiver} {case}")
        return value

    def cpu(case: str, receiver: str) -> float | None:
        value = results.median(case, receiver, "cpu_ms")
        return None if value is None else round(value, 2)

    lines = []
    cpu_notes = []
    for case in CASES:
        node = ips(case, "node")
        node_idx = ips(case, "node", "indexed_ips")
        bare = {m: ips(case, f"bare-{m}") for m in BARE_MODES}
        floor_mode = max(BARE_FLOOR_MODES, key=lambda m: bare[m])
        dcmtk = ips(case, "dcmtk")
        row = [case, f"{node:.1f}", f"{node_idx:.1f}", f"{bare['default']:.1f}", f"{bare['chunked']:.1f}"]
        row += [f"{bare[floor_mode]:.1f}", f"{bare['transport']:.1f}", f"{dcmtk:.1f}"]
        row += [f"{node / bare[floor_mode]:.3f}", f"{node / bare['transport']:.3f}", f"{node / dcmtk:.3f}"]
        print(table_row(row))
        cpus = {name: cpu(case, name) for name in ("node", *(f"bare-{m}" for m in BARE_MODES))}
        if all(v is not None for v in cpus.values()):
            cpu_notes.append(f"{case}: " + ", ".join(f"{k} {v:.2f}" for k, v in cpus.items()))
        lines.append(
            {
                "benchmark": "ingest",
                "case": case,
                "node_ips": round(node, 1),
                "bare_ips": round(bare[floor_mode], 1),
                "dcmtk_ips": round(dcmtk, 1),
                "ratio": round(node / bare[floor_mode], 3),
                "ratio_dcmtk": round(node / dcmtk, 3),
                "node_indexed_ips": round(node_idx, 1),
                "bare_mode": floor_mode,
                "bare_default_ips": round(bare["default"], 1),
                "bare_chunked_ips": round(bare["chunked"], 1),
                "bare_transport_ips": round(bare["transport"], 1),
                "ratio_transport": round(node / bare["transport"], 3),
                "node_cpu_ms": cpus["node"],
                "bare_cpu_ms": cpus[f"bare-{floor_mode}"],
                "node_processes": node_procs[case],
                "associations": CASES[case],
                "instances": args.count,
                "mb": round(mb, 1),
                "repeat": args.repeat,
                "stat": "median",
            }
        )
    if cpu_notes:
        print("  server CPU ms per instance (user+system, all its processes, timed send): " + "; ".join(cpu_notes))
    print()
    for line in lines:
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
