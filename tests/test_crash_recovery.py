"""Crash recovery of ``pacs-node serve`` as a real process.

The node is killed with SIGKILL in the middle of a transfer and restarted:
every instance it acknowledged (status 0x0000) must be on disk in its final
place and in the database, and no temporary file of an interrupted transfer may
remain. Files left in the journal (``<store>/.acked``) are indexed at start;
unreadable ones are quarantined with a reason, and the node still starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from pacs_lab.synthetic import make_series
from pacs_node.deliver.scu import echo
from storage.db import Database
from storage.models import Instance, Series
from tests.conftest import free_port, wait_for

AET = "PACSNODE"


class NodeProcess:
    """``python -m pacs_node --config CFG serve`` as a child process, logging to a file."""

    def __init__(self, config: Path, port: int, log_dir: Path) -> None:
        self.config = config
        self.port = port
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"node-{self.runs}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pacs_node", "--config", str(self.config), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.log_dir,
            )
        wait_for(self._serving, timeout, 0.1, f"the node to answer C-ECHO on port {self.port}")

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the node exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return echo("127.0.0.1", self.port, calling_ae="PROBE", called_ae=AET, timeout=2) == 0
        except ConnectionError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL if it does not stop)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)


@pytest.fixture
def node_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "data_dir": str(tmp_path / "data"),
        "log_level": "INFO",
        "dicom": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"min_free_mb": 0},
        "routing": {"series_quiet_s": 1.0, "poll_interval_s": 0.2},
        "retention": {"inputs_days": None},
        "worker": {"processes": 0},
    }


@pytest.fixture
def node_process(tmp_path: Path, node_config: dict[str, Any]) -> Iterator[NodeProcess]:
    """The node as a process (not started); killed at teardown whatever happened."""
    config = tmp_path / "pacs-node.yaml"
    config.write_text(yaml.safe_dump(node_config))
    node = NodeProcess(config, node_config["dicom"]["port"], tmp_path)
    try:
        yield node
    finally:
        node.kill()


def _store(node_config: dict[str, Any]) -> Path:
    return Path(node_config["data_dir"]).resolve() / "store"


def _rows(node_config: dict[str, Any]) -> dict[str, str]:
    """SOP Instance UID -> store-relative path of every Instance row."""
    db = Database(f"sqlite:///{Path(node_config['data_dir']).resolve() / 'pacs-node.db'}")
    try:
        with db.session() as session:
            return {i.sop_uid: i.path for i in session.scalars(select(Instance))}
    finally:
        db.dispose()


def _series_counts(node_config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Series UID -> (instance_count, number of Instance rows)."""
    db = Database(f"sqlite:///{Path(node_config['data_dir']).resolve() / 'pacs-node.db'}")
    try:
        with db.session() as session:
            return {s.series_uid: (s.instance_count, len(s.instances)) for s in session.scalars(select(Series))}
    finally:
        db.dispose()


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(
    node_process: NodeProcess, node_config: dict[str, Any]
) -> None:
    node_process.start()
    datasets = list(make_series(400, rows=64, cols=64))
    series_uid = datasets[0].SeriesInstanceUID
    study_uid = datasets[0].StudyInstanceUID
    acked: list[str] = []
    sent: list[str] = []
    ended = threading.Event()
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            ae = AE(ae_title="CRASHSCU")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", node_process.port, ae_title=AET)
            assert assoc.is_established
            # Like storescu with TCP_NODELAY=1: no Nagle delay between the command and data set PDUs.
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for ds in datasets:
                if not assoc.is_established:
                    break
                sent.append(ds.SOPInstanceUID)
                try:
                    status = assoc.send_c_store(ds)
                except Exception:  # the peer vanished mid-request
                    break
                if status and int(status.Status) == 0x0000:
                    acked.append(ds.SOPInstanceUID)
            if assoc.is_established:
                assoc.release()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
        finally:
            ended.set()

    thread = threading.Thread(target=sender, name="crash-sender", daemon=True)
    thread.start()
    wait_for(lambda: len(acked) >= 50 or ended.is_set(), 60, 0.001, "50 acknowledged instances")
    assert not errors, errors
    node_process.kill()  # SIGKILL while the sender keeps going
    killed_at = len(acked)

    store = _store(node_config)
    # A transfer interrupted while being written leaves its temporary file.
    (store / ".incoming" / "interrupted.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    pending = sorted(p.name for p in (store / ".acked").iterdir())

    node_process.start()  # meanwhile the sender notices (at the latest at its DIMSE timeout)
    assert ended.wait(30), "the sender did not notice the node was gone"
    thread.join(5)
    assert not errors, errors
    assert 50 <= killed_at <= len(acked) < len(datasets), (killed_at, len(acked), len(sent))

    # Recovery runs before the SCP listens; the indexer may still be catching up
    # with what it received in between, so poll.
    wait_for(lambda: set(acked) <= set(_rows(node_config)), 30, 0.2, "every acknowledged instance indexed")
    rows = _rows(node_config)
    for uid in acked:
        assert rows[uid] == f"{study_uid}/{series_uid}/{uid}.dcm"
        path = store / rows[uid]
        assert path.is_file(), f"acknowledged instance {uid} has no file"
        assert dcmread(path, stop_before_pixels=True).SOPInstanceUID == uid
    # Nothing beyond what was sent, and nothing half-written was indexed.
    assert set(rows) <= set(sent)
    for uid, rel in rows.items():
        assert (store / rel).is_file(), f"row without file: {uid}"
    assert list((store / ".incoming").iterdir()) == [], "stale temporary files remain"
    wait_for(lambda: not list((store / ".acked").iterdir()), 10, 0.1, "the journal to be empty")
    assert list((store / ".quarantine").iterdir()) == []
    counts = _series_counts(node_config)
    assert counts[series_uid][0] == counts[series_uid][1] == len(rows)
    if pending:
        assert "recovery" in node_process.log(), node_process.log()

    # The restarted node serves, and stops cleanly.
    ae = AE(ae_title="AFTERSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node_process.port, ae_title=AET)
    assert assoc.is_established
    try:
        last = datasets[-1]
        assert assoc.send_c_store(last).Status == 0x0000
    finally:
        assoc.release()
    assert node_process.stop() == 0, node_process.log()
    assert last.SOPInstanceUID in _rows(node_config)


def test_journal_left_at_stop_is_indexed_at_start_and_junk_is_quarantined(
    node_process: NodeProcess, node_config: dict[str, Any], testdata: Callable[[str], str]
) -> None:
    store = _store(node_config)
    journal = store / ".acked"
    journal.mkdir(parents=True)
    source = testdata("CT_small.dcm")
    header = dcmread(source, stop_before_pixels=True)
    sop = str(header.SOPInstanceUID)
    shutil.copyfile(source, journal / f"00000000000000000001-{sop}.dcm")
    junk = journal / "00000000000000000002-1.2.3.4.5.dcm"
    junk.write_bytes(b"this is not a DICOM file\n" * 20)

    node_process.start()  # recovery runs before the SCP answers C-ECHO

    rows = _rows(node_config)
    assert rows == {sop: f"{header.StudyInstanceUID}/{header.SeriesInstanceUID}/{sop}.dcm"}
    final = store / rows[sop]
    assert final.read_bytes() == Path(source).read_bytes()
    assert list(journal.iterdir()) == []
    quarantined = store / ".quarantine" / junk.name
    assert quarantined.read_bytes() == b"this is not a DICOM file\n" * 20
    reason = store / ".quarantine" / "00000000000000000002-1.2.3.4.5.reason.txt"
    assert reason.is_file()
    assert reason.read_text().strip(), "empty quarantine reason"
    assert sorted(p.name for p in (store / ".quarantine").iterdir()) == sorted([quarantined.name, reason.name])
    assert "quarantined" in node_process.log()
    assert node_process.stop() == 0, node_process.log()
