"""Abuse benchmark: one bad peer cannot stop the node (issue 14).

Run from the repository root with the project's virtual environment::

    .venv/bin/python benchmarks/abuse.py [--quick] [--pg postgresql://postgres@127.0.0.1:5432/test]
                                         [--outage-s 60] [--flood 200] [--stalls 24] [--keep]

The node
    ``pacs-node --config CFG serve`` as a child process on 127.0.0.1 (a free
    port), as in production but for what the run does not need (no HTTP, no
    inference workers, no dispatcher): fsync on, ``routing.series_quiet_s: 5``,
    its own defaults for every limit and timeout. Its database is a fresh
    PostgreSQL database reached through a TCP proxy on 127.0.0.1
    (:class:`pacs_lab.abuse.TcpProxy`) that this script controls.

Normal load, throughout
    A PACS at 127.0.0.1 (pynetdicom's SCU) sends synthetic 64x64 CT series of
    20 instances, one association per series, at about ``--rate`` instances/s.
    A monitor at 127.0.0.2 opens a new association, sends a C-ECHO and
    releases, every 0.25 s (5 s timeout), with a minimal hand-made DICOM client
    so that the time is the node's, not a busy client's; these round trips
    (association and release included) give ``echo_p99_ms``, and one that
    fails counts against the target. The node's resident memory is read from
    /proc every 0.5 s and its peak (``VmHWM``) at the end gives ``max_rss_mb``.

The abuse, one bad peer per kind, each from its own loopback address, in turn
    * ``stall`` (127.0.0.10-13, held open until the malformed phase ends):
      connections that send nothing, half an A-ASSOCIATE-RQ, an association and
      then nothing, and an association with a C-STORE whose data set stops
      half way (a P-DATA-TF PDU cut short);
    * ``bombs`` (127.0.0.20): a deflate bomb (3 MB that inflate to 3 GiB), an
      image whose header claims 65535 x 65535 x 4096 pixels and holds four
      bytes, and a data set whose last element claims 4 GiB: each as a C-STORE
      over a hand-made association, answer and time recorded;
    * ``flood`` (127.0.0.30): ``--flood`` connections at once, each sending an
      A-ASSOCIATE-RQ, held 5 s, then dropped;
    * ``malformed`` (127.0.0.40, four at a time): the C-STORE of each of
      ``--files`` pydicom / pydicom-data test files, spoiled in twelve ways
      (:func:`pacs_lab.abuse.malformed_pdus`: cut short, lengths that lie, PDU
      types that do not exist, commands for other contexts, random bytes, an
      abort half way, garbage), of files whose SOP class and transfer syntax
      the node accepts, so that every case reaches the data set;
    * ``outage``: the proxy resets every database connection and refuses new
      ones for ``--outage-s`` seconds while the load goes on;
    * ``drain``: the load stops; the run waits (at most ``--drain-s``) until
      every instance the node acknowledged (status 0x0000, from any sender) is
      a row in the database, read directly, not through the proxy.

Counts
    ``instances_sent``: C-STOREs sent (the load, the bombs, the malformed
    cases whose association was accepted); ``instances_acked``: distinct SOP
    instances answered 0x0000 by the node, from any sender;
    ``instances_lost``: those of them not in the index after the drain.

Targets
    0 instances lost (acknowledged and not indexed after the drain), RSS under
    1 GiB, every C-ECHO answered within 1 s throughout (p99 and failures).
    ``findings`` lists every target missed (empty when all hold); the phase
    details (bomb answers, how many flood connections the node closed, how
    many stalled peers it dropped, echo figures per phase) are printed too.

Output
    A summary, then one JSON line::

        {"benchmark": "abuse", "instances_sent": ..., "instances_acked": ..., "instances_lost": ...,
         "max_rss_mb": ..., "echo_p99_ms": ..., "findings": [...], "details": {...}}

``--quick``: a 10 s outage, 50 flood connections, 8 stalled peers, 3 test files
(about 1.5 minutes in all, for a smoke run). The full run takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# Run as a script, this folder is sys.path[0], where benchmarks/inference.py would
# shadow the ``inference`` package: put the repository root first instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "benchmarks")]

import yaml  # noqa: E402
from pynetdicom import AE  # noqa: E402

from pacs_lab.abuse import (  # noqa: E402
    RELEASE_RQ,
    RawPeer,
    TcpProxy,
    associate_rq,
    c_echo_rq,
    c_store_pdus,
    deflate_bomb,
    length_lie,
    malformed_pdus,
    p_data_tf,
    pixel_claim_bomb,
    response_status,
    sample_files,
    split_part10,
)
from pacs_lab.synthetic import make_series, write_series  # noqa: E402
from pacs_node.receive.scp import TRANSFER_SYNTAXES, storage_sop_classes  # noqa: E402

AET = "PACSNODE"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
PACS, MONITOR, STALLER, BOMBER, FLOODER, FUZZER = (
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.10",
    "127.0.0.20",
    "127.0.0.30",
    "127.0.0.40",
)
ECHO_EVERY_S = 0.25
ECHO_TARGET_MS = 1000.0
RSS_LIMIT_MB = 1024.0
START_TIMEOUT_S = 90.0


# -- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the run saw, shared by its threads."""

    phase: str = "start"
    sent: int = 0
    acked: set[str] = field(default_factory=set)
    refused: dict[int, int] = field(default_factory=dict)
    load_errors: list[str] = field(default_factory=list)
    echoes: list[tuple[str, float | None]] = field(default_factory=list)  # (phase, ms or None if unanswered)
    rss_mb: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def count_sent(self) -> None:
        with self.lock:
            self.sent += 1

    def ack(self, sop: str, status: int) -> None:
        with self.lock:
            if status == 0:
                self.acked.add(sop)
            else:
                self.refused[status] = self.refused.get(status, 0) + 1


def _scu(calling: str, timeout: float) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def echo_ms(port: int, *, source: str = MONITOR, timeout: float = 5.0) -> float | None:
    """Milliseconds for a new association, a C-ECHO and its release; None when any step failed.

    A minimal DICOM client (:class:`pacs_lab.abuse.RawPeer`), so that the figure
    is the node's and not the client's: pynetdicom's SCU adds 50-100 ms of its
    own on a busy machine.
    """
    t0 = time.perf_counter()
    try:
        peer = RawPeer(("127.0.0.1", port), source=source, timeout=timeout)
    except OSError:
        return None
    try:
        if not peer.associate(called_ae=AET, calling_ae="MONITOR"):
            return None
        if not peer.send(p_data_tf([(1, 0x03, c_echo_rq())])):
            return None
        answer = response_status(peer.read_pdu())
        if answer is None or answer[0] != 0:
            return None
        peer.send(RELEASE_RQ)
        reply = peer.read_pdu()
        if reply is None or reply[0] != 0x06:
            return None
    finally:
        peer.close()
    return (time.perf_counter() - t0) * 1000


def _monitor(run: Run, port: int) -> None:
    while not run.stop.is_set():
        t0 = time.monotonic()
        ms = echo_ms(port)
        with run.lock:
            run.echoes.append((run.phase, ms))
        run.stop.wait(max(ECHO_EVERY_S - (time.monotonic() - t0), 0.0))


def _rss(run: Run, pid: int) -> None:
    while not run.stop.is_set():
        rss = _status_mb(pid, "VmRSS")
        if rss is not None:
            run.rss_mb.append(rss)
        run.stop.wait(0.5)


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _load(run: Run, port: int, work: Path, rate: float, done: threading.Event) -> None:
    """Send 20-instance CT series, one association each, at about ``rate`` instances/s, until ``done``."""
    n = 0
    while not done.is_set():
        folder = work / f"load-{n}"
        files = write_series(folder, make_series(20, rows=64, cols=64, seed=n, SeriesDescription=f"load {n}"))
        n += 1
        ae = _scu("PACS", 30)
        ae.add_requested_context(CT, EXPLICIT)
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title=AET, bind_address=(PACS, 0))
            if not assoc.is_established:
                run.load_errors.append(f"{run.phase}: association refused or failed")
                done.wait(1.0)
                continue
            try:
                for path in files:
                    if done.is_set():
                        break
                    t0 = time.monotonic()
                    status = assoc.send_c_store(path)
                    run.count_sent()
                    if status is None or "Status" not in status:
                        run.load_errors.append(f"{run.phase}: no C-STORE response")
                        break
                    run.ack(str(path.stem), int(status.Status))
                    done.wait(max(1.0 / rate - (time.monotonic() - t0), 0.0))
            finally:
                if assoc.is_established:
                    assoc.release()
        except Exception as exc:  # recorded: the load must go on
            run.load_errors.append(f"{run.phase}: {type(exc).__name__}: {exc}")
            done.wait(1.0)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# -- the abuse -----------------------------------------------------------------------------------------------


def _peer(port: int, source: str, timeout: float = 5.0) -> RawPeer | None:
    try:
        return RawPeer(("127.0.0.1", port), source=source, timeout=timeout)
    except OSError:
        return None


def open_stalls(port: int, count: int) -> list[tuple[str, RawPeer]]:
    """Peers that start and stop half way, four kinds, each kind from its own address."""
    kinds = ("silent", "half an A-ASSOCIATE-RQ", "associated, then silent", "C-STORE cut half way")
    out: list[tuple[str, RawPeer]] = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        source = f"127.0.0.{10 + i % len(kinds)}"
        peer = _peer(port, source)
        if peer is None:
            continue
        if kind == "half an A-ASSOCIATE-RQ":
            peer.send(associate_rq(called_ae=AET)[:20])
        elif kind == "associated, then silent":
            peer.associate(called_ae=AET)
        elif kind == "C-STORE cut half way":
            ctx = peer.associate(called_ae=AET, contexts=((1, CT, (EXPLICIT,)),))
            if ctx:
                pdus = c_store_pdus(b"\0" * 8192, CT, "1.2.826.0.1.3680043.10.1453.99.1", max_pdu=16384)
                peer.send(pdus[0] + pdus[1][: len(pdus[1]) // 2])
        out.append((kind, peer))
    return out


def close_stalls(stalls: list[tuple[str, RawPeer]], held_s: float) -> dict[str, str]:
    """Count, per kind, the stalled peers the node had dropped by now; close the rest."""
    dropped: dict[str, list[int]] = {}
    for kind, peer in stalls:
        counts = dropped.setdefault(kind, [0, 0])
        counts[1] += 1
        if peer.closed_by_peer(0.0):
            counts[0] += 1
        peer.close()
    return {kind: f"{d} of {n} dropped by the node within {held_s:.0f} s" for kind, (d, n) in dropped.items()}


def send_raw(
    port: int,
    source: str,
    sop_class: str,
    syntax: str,
    pdus: list[bytes],
    wait_s: float,
    sent: Callable[[], None] | None = None,
) -> str:
    """Associate, send ``pdus`` (``sent()`` is called once the association is up), say what came back."""
    peer = _peer(port, source, timeout=wait_s)
    if peer is None:
        return "connection refused"
    try:
        ctx = peer.associate(called_ae=AET, contexts=((1, sop_class, (syntax,)),))
        if ctx is None:
            return "association not accepted"
        if 1 not in ctx:
            return "context refused"
        if sent is not None:
            sent()
        for pdu in pdus:
            if not peer.send(pdu):
                return "closed by the node while sending"
        reply = peer.read_pdu()
        if reply is None:
            return "closed by the node" if peer.closed_by_peer(0.0) else f"no answer within {wait_s:g} s"
        answer = response_status(reply)
        if answer is not None:
            return f"status 0x{answer[0]:04X}"
        return {0x07: "A-ABORT", 0x06: "A-RELEASE-RP"}.get(reply[0], f"PDU 0x{reply[0]:02X}")
    finally:
        peer.close()


def bombs(run: Run, port: int, rounds: int) -> dict[str, list[str]]:
    made = [deflate_bomb(), pixel_claim_bomb(), length_lie()]
    out: dict[str, list[str]] = {}
    for _ in range(rounds):
        for template in made:
            # a fresh SOP Instance UID each round would need a fresh bomb; the same one again is a re-send
            bomb = template
            t0 = time.monotonic()
            pdus = c_store_pdus(bomb.dataset, bomb.sop_class, bomb.sop_instance, max_pdu=16384)
            answer = send_raw(port, BOMBER, bomb.sop_class, bomb.transfer_syntax, pdus, 120, run.count_sent)
            if answer == "status 0x0000":
                run.ack(bomb.sop_instance, 0)
            out.setdefault(bomb.label, []).append(f"{answer} after {time.monotonic() - t0:.1f} s")
    return out


def flood(port: int, count: int, hold_s: float) -> dict[str, int]:
    """``count`` connections from one address at once, each sending an A-ASSOCIATE-RQ; held, then dropped."""
    rq = associate_rq(called_ae=AET)
    peers: list[RawPeer] = []
    refused = 0
    deadline = time.monotonic() + 30.0
    for _ in range(count):
        if time.monotonic() > deadline:
            refused += 1
            continue
        peer = _peer(port, FLOODER, timeout=2.0)
        if peer is None:
            refused += 1
            continue
        peer.send(rq)
        peers.append(peer)
    time.sleep(hold_s)
    accepted = closed = 0
    for peer in peers:
        peer.sock.settimeout(0.05)
        reply = peer.read_pdu()
        if reply is not None and reply[0] == 0x02:
            accepted += 1
        elif peer.closed_by_peer(0.0):
            closed += 1
        peer.close()
    return {
        "connections": count,
        "refused_at_connect": refused,
        "associated": accepted,
        "closed_by_node": closed,
        "left_waiting": len(peers) - accepted - closed,
    }


def malformed(run: Run, port: int, files: int, seed: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [p for p in (split_part10(f) for f in sample_files(limit_bytes=512 << 10)) if p is not None]
    accepted = set(storage_sop_classes())  # files the node takes, so that each case reaches the data set
    parts = [p for p in parts if p.sop_class in accepted and p.transfer_syntax in TRANSFER_SYNTAXES]
    rng = random.Random(seed)
    chosen = rng.sample(parts, min(files, len(parts)))
    cases = [(part, label, pdus) for part in chosen for label, pdus in malformed_pdus(part, rng)]
    answers: dict[str, int] = {}

    def one(case: tuple[Any, str, list[bytes]]) -> None:
        part, label, pdus = case
        answer = send_raw(port, FUZZER, part.sop_class, part.transfer_syntax, pdus, 2.0, run.count_sent)
        if answer == "status 0x0000":
            run.ack(part.sop_instance, 0)
        key = f"{label}: {answer if not answer.startswith('status') else 'status ' + answer[7:]}"
        with run.lock:
            answers[key] = answers.get(key, 0) + 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, cases))
    return {"files": [p.path.name for p in chosen], "cases": len(cases), "answers": dict(sorted(answers.items()))}


# -- the node and its database -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def database(admin_url: str, keep: bool) -> Iterator[str]:
    import psycopg

    name = f"pacs_node_abuse_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        if not keep:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                    "AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def _through(url: str, port: int) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


def indexed(url: str, sops: set[str]) -> set[str]:
    """Which of ``sops`` are rows in the database (read directly)."""
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT sop_uid FROM instance").fetchall()
    return sops & {r[0] for r in rows}


def start_node(work: Path, db_url: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = _free_port()
    config = {
        "data_dir": str(work / "data"),
        "database_url": db_url,
        "log_level": "INFO",
        "dicom": {"host": "127.0.0.1", "port": port, "ae_title": AET},
        "http": {"enabled": False},
        "storage": {"min_free_mb": 0},
        "routing": {"series_quiet_s": 5},
        "worker": {"processes": 0},
        "dispatch": {"enabled": False},
    }
    cfg = work / "node.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = work / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_node", "--config", str(cfg), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=_ROOT,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while echo_ms(port, timeout=2) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the node did not start; its log:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)
    return proc, port, log


def stop_node(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# -- the run -------------------------------------------------------------------------------------------------


def _p99(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def _phase(run: Run, name: str) -> None:
    with run.lock:
        run.phase = name
    print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)


def abuse(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    run = Run()
    pg = urlsplit(args.pg)
    with database(args.pg, args.keep) as url, TcpProxy((pg.hostname or "127.0.0.1", pg.port or 5432)) as proxy:
        proc, port, log = start_node(work, _through(url, proxy.port))
        load_done = threading.Event()
        threads = [
            threading.Thread(target=_monitor, args=(run, port), daemon=True),
            threading.Thread(target=_rss, args=(run, proc.pid), daemon=True),
            threading.Thread(target=_load, args=(run, port, work, args.rate, load_done), daemon=True),
        ]
        for t in threads:
            t.start()
        t_start = time.monotonic()
        try:
            _phase(run, "baseline")
            time.sleep(args.baseline_s)

            _phase(run, "stall")
            stalled_at = time.monotonic()
            stalls = open_stalls(port, args.stalls)
            time.sleep(args.baseline_s)

            _phase(run, "bombs")
            run.details["bombs"] = bombs(run, port, rounds=1 if args.quick else 2)

            _phase(run, "flood")
            run.details["flood"] = flood(port, args.flood, hold_s=5.0)

            _phase(run, "malformed")
            run.details["malformed"] = malformed(run, port, args.files, args.seed)
            run.details["stall"] = close_stalls(stalls, time.monotonic() - stalled_at)

            _phase(run, "outage")
            proxy.cut()
            time.sleep(args.outage_s)
            proxy.restore()

            _phase(run, "after the outage")
            time.sleep(args.baseline_s)
            load_done.set()
            threads[2].join(60)

            _phase(run, "drain")
            with run.lock:
                acked = set(run.acked)
            deadline = time.monotonic() + args.drain_s
            found: set[str] = set()
            while time.monotonic() < deadline:
                found = indexed(url, acked)
                if found == acked:
                    break
                time.sleep(1.0)
            run.details["drain_s"] = round(args.drain_s - max(deadline - time.monotonic(), 0), 1)
        finally:
            load_done.set()
            alive = proc.poll() is None
            peak = _status_mb(proc.pid, "VmHWM")
            run.stop.set()
            code = stop_node(proc)
        run.details["duration_s"] = round(time.monotonic() - t_start, 1)
        run.details["node_alive_at_end"] = alive
        run.details["node_exit_code"] = code
        run.details["proxy_cut_connections"] = proxy.cut_connections
        lines = log.read_text(errors="replace").splitlines()
        run.details["node_log_lines"] = len(lines)
        run.details["node_log_outage"] = [
            ln.split(" ", 2)[-1][:300] for ln in lines if "database unreachable" in ln or "reachable again" in ln
        ]
        return report(run, acked, found, peak, alive)


def report(run: Run, acked: set[str], found: set[str], peak: float | None, alive: bool) -> dict[str, Any]:
    answered = [ms for _, ms in run.echoes if ms is not None]
    failures: dict[str, int] = {}
    per_phase: dict[str, dict[str, Any]] = {}
    for phase, ms in run.echoes:
        entry = per_phase.setdefault(phase, {"echoes": 0, "unanswered": 0, "values": []})
        entry["echoes"] += 1
        if ms is None:
            entry["unanswered"] += 1
            failures[phase] = failures.get(phase, 0) + 1
        else:
            entry["values"].append(ms)
    for entry in per_phase.values():
        values = entry.pop("values")
        entry["p99_ms"] = round(_p99(values), 1) if values else None
        entry["max_ms"] = round(max(values), 1) if values else None
        entry["median_ms"] = round(statistics.median(values), 1) if values else None
    max_rss = max([*run.rss_mb, peak or 0.0])
    p99 = _p99(answered)
    lost = len(acked - found)
    findings = []
    if not alive:
        findings.append("the node was not running at the end")
    if lost:
        findings.append(f"{lost} acknowledged instances were not indexed after the drain")
    if not acked:
        findings.append("no instance was acknowledged")
    if max_rss >= RSS_LIMIT_MB:
        findings.append(f"peak RSS {max_rss:.0f} MB, over {RSS_LIMIT_MB:.0f} MB")
    if not answered or p99 > ECHO_TARGET_MS:
        findings.append(f"C-ECHO p99 {p99:.0f} ms, over {ECHO_TARGET_MS:.0f} ms")
    slow = {p: e["max_ms"] for p, e in per_phase.items() if e["max_ms"] is not None and e["max_ms"] > ECHO_TARGET_MS}
    if slow:
        findings.append("C-ECHO slower than 1 s in " + ", ".join(f"{p} (max {ms:.0f} ms)" for p, ms in slow.items()))
    if failures:
        findings.append(
            "C-ECHO unanswered in " + ", ".join(f"{p} ({n} of {per_phase[p]['echoes']})" for p, n in failures.items())
        )
    details = dict(run.details)
    details["echo"] = per_phase
    details["refused_statuses"] = {f"0x{k:04X}": v for k, v in sorted(run.refused.items())}
    details["load_errors"] = run.load_errors[:20]
    details["load_errors_total"] = len(run.load_errors)
    return {
        "benchmark": "abuse",
        "instances_sent": run.sent,
        "instances_acked": len(acked),
        "instances_lost": lost,
        "max_rss_mb": round(max_rss, 1),
        "echo_p99_ms": round(p99, 1),
        "findings": findings,
        "details": details,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (10 s outage, 50 connections)")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test", help="PostgreSQL admin URL")
    parser.add_argument("--outage-s", type=float, default=None, help="database outage (default 60; quick 10)")
    parser.add_argument("--flood", type=int, default=None, help="flood connections (default 200; quick 50)")
    parser.add_argument("--stalls", type=int, default=None, help="stalled peers (default 24; quick 8)")
    parser.add_argument("--files", type=int, default=None, help="test files spoiled (default 16; quick 3)")
    parser.add_argument("--rate", type=float, default=25.0, help="normal load, instances/s")
    parser.add_argument("--drain-s", type=float, default=180.0, help="longest wait for the index after the load")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the database")
    args = parser.parse_args(argv)
    quick = args.quick
    args.outage_s = args.outage_s if args.outage_s is not None else (10.0 if quick else 60.0)
    args.flood = args.flood if args.flood is not None else (50 if quick else 200)
    args.stalls = args.stalls if args.stalls is not None else (8 if quick else 24)
    args.files = args.files if args.files is not None else (3 if quick else 16)
    args.baseline_s = 3.0 if quick else 8.0
    work = Path(tempfile.mkdtemp(prefix="pacs-node-abuse-"))
    try:
        result = abuse(args, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"sent {result['instances_sent']}, acked {result['instances_acked']}, lost {result['instances_lost']}; "
        f"peak RSS {result['max_rss_mb']} MB; C-ECHO p99 {result['echo_p99_ms']} ms"
    )
    for finding in result["findings"]:
        print(f"FINDING: {finding}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
