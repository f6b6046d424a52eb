"""The DICOM SCP over real sockets on 127.0.0.1: storage of real (compressed,
enhanced, SEG, SR) files from dcmtk and pynetdicom, C-ECHO, access control,
malformed instances, re-sends, concurrent associations, oversized PDUs and the
``echo``/``send`` commands.

Every test starts its own node (``run_node``) on a free port in ``tmp_path``.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import select

from pacs_lab.synthetic import make_series, write_series
from pacs_node.app.service import Node
from pacs_node.common.dicomnet import VERIFICATION
from pacs_node.config import Settings
from pacs_node.deliver.scu import echo, send_files
from storage.models import Instance, Series
from tests.conftest import require_program, wait_for

AET = "PACSNODE"  # the node's default AE title (dicom.ae_title)

#: Real files from pydicom / pydicom-data, one per transfer syntax or kind of
#: object, each with its own SOP Instance UID; value: (its transfer syntax,
#: the storescu option that proposes it).
REAL_FILES: dict[str, tuple[str, str]] = {
    "CT_small.dcm": (ExplicitVRLittleEndian, "-xe"),
    "SC_rgb_jpeg_dcmtk.dcm": (JPEGBaseline8Bit, "-xy"),
    "JPEG-lossy.dcm": (JPEGExtended12Bit, "-xx"),
    "JPEG-LL.dcm": (JPEGLosslessSV1, "-xs"),
    "MR_small_jpeg_ls_lossless.dcm": (JPEGLSLossless, "-xt"),
    "JPEG2000.dcm": (JPEG2000, "-xw"),
    "emri_small_jpeg_2k_lossless.dcm": (JPEG2000Lossless, "-xv"),  # enhanced MR, 10 frames
    "SC_rgb_rle.dcm": (RLELossless, "-xr"),
    "image_dfl.dcm": (DeflatedExplicitVRLittleEndian, "-xd"),
    "ExplVR_BigEnd.dcm": (ExplicitVRBigEndian, "-xb"),
    "liver.dcm": (ExplicitVRLittleEndian, "-xe"),  # Segmentation Storage, 3 frames
    "test-SR.dcm": (ExplicitVRLittleEndian, "-xe"),  # Comprehensive SR
}

FAILURE_STATUSES = (0xA000, 0xC000)  # high nibble of 'Refused' (0xA7xx, 0xA9xx) and 'Error' (0xCxxx)


# -- fixtures and helpers ---------------------------------------------------------------------------------------------


@pytest.fixture
def node(make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node]) -> Node:
    """A node with default settings on a free port."""
    return run_node(make_settings())


def _ae(title: str = "TESTSCU", *contexts: tuple[str, str]) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    return ae


def _associate(port: int, *contexts: tuple[str, str], calling: str = "TESTSCU", called: str = AET) -> Association:
    """An established association (CT storage and Verification unless ``contexts`` say otherwise)."""
    contexts = contexts or ((CTImageStorage, ExplicitVRLittleEndian), (VERIFICATION, ExplicitVRLittleEndian))
    assoc = _ae(calling, *contexts).associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"association {calling} -> {called} on port {port} not established"
    # As storescu with TCP_NODELAY=1: without it each C-STORE waits ~40 ms for a delayed ACK.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def _store_ok(node: Node, ds: Dataset) -> None:
    """One C-STORE over a new association, answered Success."""
    assoc = _associate(node.scp.port)
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def _instances(node: Node) -> dict[str, dict[str, Any]]:
    """Every Instance row (after the indexer caught up), keyed by SOP Instance UID."""
    assert node.indexer.flush(30), "indexer did not catch up within 30 s"
    with node.db.session() as session:
        return {
            i.sop_uid: {
                "path": i.path,
                "ts": i.transfer_syntax_uid,
                "receive_count": i.receive_count,
                "series_uid": i.series.series_uid,
                "calling_ae": i.calling_ae,
            }
            for i in session.scalars(select(Instance))
        }


def _series(node: Node, series_uid: str) -> tuple[int, int]:
    """(instance_count, frames_received) of a series."""
    with node.db.session() as session:
        s = session.scalars(select(Series).where(Series.series_uid == series_uid)).one()
        return s.instance_count, s.frames_received


def _logged(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    """A warning or worse from pacs_node.receive.scp containing every one of ``words``."""
    return any(
        r.name in ("pacs_node.receive.scp", "pacs_node.common.dul")
        and r.levelno >= logging.WARNING
        and all(w in r.getMessage() for w in words)
        for r in caplog.records
    )


def _dcm_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and p.suffix == ".dcm"}


def _synthetic(n: int = 1, **kw: Any) -> list[Dataset]:
    return list(make_series(n, rows=64, cols=64, **kw))


def _encode(ds: Dataset) -> bytes:
    """A data set encoded as Explicit VR Little Endian, without file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


@contextmanager
def _reactor_paused(assoc: Association) -> Iterator[None]:
    """Keep the SCU's own reactor from taking the responses to hand-made requests, as its send_*() do.

    A following send_*() must not lose its response to a reactor woken by this set():
    pacs_node.common.dul's checkpoint sees to that (pynetdicom's own let it through once).
    """
    assoc._reactor_checkpoint.clear()
    wait_for(lambda: assoc._is_paused, 5, what="the SCU's reactor to pause", interval=0.001)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def raw_c_store(
    assoc: Association,
    payload: bytes,
    *,
    sop_uid: str = "1.2.3.4",
    sop_class: str = CTImageStorage,
    context_sop_class: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> int:
    """Send a C-STORE whose data set is ``payload`` byte for byte; return the status.

    Mirrors pynetdicom 3.0's ``send_c_store`` (pinned in setup.cfg) minus the
    encoding, so that a data set pynetdicom would refuse to build can be sent; the
    command names ``sop_class``, sent on the context of ``context_sop_class``
    (default: the same) in ``transfer_syntax``.
    """
    abstract = context_sop_class or sop_class
    cx = next(
        c for c in assoc.accepted_contexts if c.abstract_syntax == abstract and c.transfer_syntax[0] == transfer_syntax
    )
    req = C_STORE()
    req.MessageID = 7
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_uid
    req.DataSet = BytesIO(payload)
    with _reactor_paused(assoc):
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    assert rsp is not None, "no C-STORE response (DIMSE timeout)"
    return int(rsp.Status)


def assert_same_dataset(sent: Path | str, stored: Path) -> None:
    """The stored file holds the sent data set: same elements, same values, same PixelData bytes."""
    a = dcmread(sent)
    b = dcmread(stored)
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    # Data Set Trailing Padding and group lengths are the sender's encoding
    # choices (dcmtk drops them), not content.
    for ds in (a, b):
        for tag in [el.tag for el in ds if el.tag == 0xFFFCFFFC or el.tag.element == 0]:
            del ds[tag]
    assert [el.tag for el in b] == [el.tag for el in a], f"{stored.name}: different elements"
    # Values, not VRs: dcmtk corrects e.g. an encapsulated PixelData marked OW to OB.
    diffs = [str(el.tag) for el in a if el.value != b[el.tag].value]
    assert not diffs, f"{stored.name}: element values differ: {diffs}"
    if "PixelData" in a:
        assert b.PixelData == a.PixelData, f"{stored.name}: PixelData bytes differ"


def check_real_files_stored(node: Node, paths: dict[str, str], results: dict[str, int]) -> None:
    """Each real file has an Instance row with its own transfer syntax and path, and an identical stored file."""
    rows = _instances(node)
    assert len(rows) == len(paths)
    for name, path in paths.items():
        header = dcmread(path, stop_before_pixels=True)
        sop = str(header.SOPInstanceUID)
        assert results[sop] == 0x0000, f"{name}: status 0x{results[sop]:04X}"
        row = rows[sop]
        assert row["ts"] == REAL_FILES[name][0], f"{name}: stored with {row['ts']}"
        assert row["path"] == f"{header.StudyInstanceUID}/{header.SeriesInstanceUID}/{sop}.dcm"
        stored = node.store.root / row["path"]
        assert stored.is_file(), f"{name}: {stored} missing"
        assert_same_dataset(path, stored)
    assert not list(node.store.incoming_dir.iterdir()), "temporary files left in .incoming"
    assert not list(node.store.acked_dir.iterdir()), "files left in the journal after indexing"


@pytest.fixture
def real_files(testdata: Callable[[str], str]) -> dict[str, str]:
    paths = {name: testdata(name) for name in REAL_FILES}
    sops = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths.values()]
    assert len(set(sops)) == len(sops), "test files must have distinct SOP Instance UIDs"
    return paths


# -- storage of real files --------------------------------------------------------------------------------------------
def test_storescu_stores_real_compressed_files_in_their_own_transfer_syntax(
    node: Node, real_files: dict[str, str]
) -> None:
    storescu = require_program("storescu")
    by_option: dict[str, list[str]] = {}
    for name, path in real_files.items():
        by_option.setdefault(REAL_FILES[name][1], []).append(path)
    results: dict[str, int] = {}
    for option, paths in by_option.items():
        # -R: only the contexts these files need, each proposed in the file's own
        # transfer syntax (option) besides the uncompressed ones.
        proc = subprocess.run(
            [storescu, "-R", option, "-nh", "-v", "-aet", "DCMTKSCU", "-aec", AET, "127.0.0.1", str(node.scp.port)]
            + paths,
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert output.count("Received Store Response (Success)") == len(paths), output
        assert "unable to convert" not in output, output
        for p in paths:
            results[str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = 0x0000
    check_real_files_stored(node, real_files, results)
    assert {r["calling_ae"] for r in _instances(node).values()} == {"DCMTKSCU"}


def test_pynetdicom_scu_stores_real_compressed_files_in_their_own_transfer_syntax(
    node: Node, real_files: dict[str, str]
) -> None:
    results = send_files("127.0.0.1", node.scp.port, list(real_files.values()), calling_ae="PYSCU", called_ae=AET)
    check_real_files_stored(node, real_files, results)
    assert node.scp.stored == len(real_files)


# -- verification ------------------------------------------------------------------------------------------------------
def test_c_echo_with_pynetdicom_and_echoscu(node: Node) -> None:
    assert echo("127.0.0.1", node.scp.port, calling_ae="ECHOSCU", called_ae=AET) == 0x0000
    echoscu = require_program("echoscu")
    proc = subprocess.run(
        [echoscu, "-v", "-aec", AET, "127.0.0.1", str(node.scp.port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Received Echo Response (Success)" in proc.stdout + proc.stderr


# -- access control ----------------------------------------------------------------------------------------------------
def _try_associate(port: int, calling: str, called: str = AET) -> Association:
    ae = _ae(calling, (VERIFICATION, ExplicitVRLittleEndian), (CTImageStorage, ExplicitVRLittleEndian))
    return ae.associate("127.0.0.1", port, ae_title=called)


def _reject_reason(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "expected an A-ASSOCIATE-RJ"
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def test_calling_ae_not_allowed_is_rejected_and_logged(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pacs_node.receive.scp")
    node = run_node(make_settings(dicom={"allowed_calling_aes": ["GOODAE"]}))
    port = node.scp.port

    evil = _try_associate(port, "EVILAE")
    assert not evil.is_established
    # Rejected permanent (1), by the service user (1), calling AE title not recognised (3).
    assert _reject_reason(evil) == (1, 1, 3)
    # EVT_REJECTED fires once the A-ASSOCIATE-RJ is sent: the log line may follow the peer's view by a moment.
    wait_for(lambda: _logged(caplog, "rejected", "EVILAE"), 5, what="the rejection of EVILAE to be logged")

    good = _try_associate(port, "GOODAE")
    try:
        assert good.is_established
        assert good.send_c_echo().Status == 0x0000
        assert good.send_c_store(_synthetic()[0]).Status == 0x0000
    finally:
        good.release()
    assert len(_instances(node)) == 1

    # A wrong called AE title: rejected with reason 7 (called AE title not recognised).
    caplog.clear()
    wrong = _try_associate(port, "GOODAE", called="NOTTHENODE")
    assert _reject_reason(wrong) == (1, 1, 7)
    wait_for(lambda: _logged(caplog, "rejected", "NOTTHENODE"), 5, what="the rejection of NOTTHENODE to be logged")


def test_address_outside_allowed_hosts_gets_no_association_and_is_logged(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pacs_node.receive.scp")
    node = run_node(make_settings(dicom={"allowed_hosts": ["10.0.0.0/8"]}))
    assoc = _try_associate(node.scp.port, "GOODAE")
    assert not assoc.is_established
    wait_for(lambda: _logged(caplog, "allowed_hosts", "127.0.0.1"), 5, what="the rejection to be logged")
    with pytest.raises(ConnectionError):
        echo("127.0.0.1", node.scp.port, calling_ae="GOODAE", called_ae=AET, timeout=5)
    assert node.scp.stored == 0


def test_address_outside_allowed_hosts_receives_a_reject_pdu(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node]
) -> None:
    node = run_node(make_settings(dicom={"allowed_hosts": ["10.0.0.0/8"]}))
    for _ in range(3):
        assoc = _try_associate(node.scp.port, "GOODAE")
        # Rejected permanent (1), by the service user (1), no reason given (1).
        assert _reject_reason(assoc) == (1, 1, 1)


# -- malformed instances -----------------------------------------------------------------------------------------------
def _without(keyword: str) -> bytes:
    ds = _synthetic()[0]
    delattr(ds, keyword)
    return _encode(ds)


def _with_uid(keyword: str, value: str) -> bytes:
    ds = _synthetic()[0]
    setattr(ds, keyword, value)
    return _encode(ds)


def _truncated() -> bytes:
    data = _encode(_synthetic()[0])
    # Cut inside the header, well before the pixel data, then announce a long UI element.
    return data[:200] + struct.pack("<HH2sH", 0x0020, 0x000D, b"UI", 0x4000) + b"1.2.3"


MALFORMED: dict[str, tuple[Callable[[], bytes], int | None]] = {
    "no SOPInstanceUID": (lambda: _without("SOPInstanceUID"), 0xC210),
    "no StudyInstanceUID": (lambda: _without("StudyInstanceUID"), 0xC210),
    "no SeriesInstanceUID": (lambda: _without("SeriesInstanceUID"), 0xC210),
    "SOP UID with path characters": (lambda: _with_uid("SOPInstanceUID", "1.2.3/../../x"), 0xC210),
    "study UID climbing out": (lambda: _with_uid("StudyInstanceUID", "../etc"), 0xC210),
    "series UID absolute path": (lambda: _with_uid("SeriesInstanceUID", "/tmp/x"), 0xC210),
    "random bytes": (lambda: os.urandom(4096), None),
    "truncated element": (_truncated, None),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the invalid values we send
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_instance_is_refused_and_the_node_keeps_serving(
    case: str, node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pacs_node.receive.scp")
    make_payload, expected = MALFORMED[case]
    absolute = Path("/tmp/x")  # where "series UID absolute path" would lead
    existed = absolute.exists()
    assoc = _associate(node.scp.port)
    try:
        status = raw_c_store(assoc, make_payload())
        if expected is not None:
            assert status == expected, f"{case}: status 0x{status:04X}"
        else:
            assert status & 0xF000 in FAILURE_STATUSES, f"{case}: status 0x{status:04X} is not a failure"
        # The same association still works.
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
    assert node.scp.refused == 1
    assert _logged(caplog, "refused instance", f"0x{status:04X}"), caplog.text
    assert _instances(node) == {}
    # Nothing written anywhere: no temporary file, nothing in the journal, no
    # instance file inside or outside the store.
    assert not list(node.store.incoming_dir.iterdir())
    assert not list(node.store.acked_dir.iterdir())
    assert not list(node.store.quarantine_dir.iterdir())
    assert _dcm_files(tmp_path) == set()
    assert existed or not absolute.exists()

    # A good instance over a new association is stored.
    good = _synthetic()[0]
    _store_ok(node, good)
    rows = _instances(node)
    assert set(rows) == {good.SOPInstanceUID}
    assert (node.store.root / rows[good.SOPInstanceUID]["path"]).is_file()
    assert _dcm_files(tmp_path) == {node.store.root / rows[good.SOPInstanceUID]["path"]}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_path_characters_in_the_command_uid_write_nothing_outside_the_store(node: Node, tmp_path: Path) -> None:
    # pynetdicom's own send_c_store: the command's Affected SOP Instance UID and the data set's agree.
    outside = tmp_path / "data" / "etc.dcm"
    for bad in ("../etc", "../../etc", "../../../etc", "1.2.3/../../../etc"):
        ds = _synthetic()[0]
        ds.SOPInstanceUID = bad
        ds.file_meta.MediaStorageSOPInstanceUID = bad
        assoc = _associate(node.scp.port)
        try:
            assert assoc.send_c_store(ds).Status == 0xC210
        finally:
            assoc.release()
    assert _instances(node) == {}
    assert not outside.exists()
    assert _dcm_files(tmp_path) == set()
    assert not list(node.store.incoming_dir.iterdir())
    assert echo("127.0.0.1", node.scp.port, called_ae=AET) == 0


def test_free_space_below_watermark_refuses_with_out_of_resources(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pacs_node.receive.scp")
    node = run_node(make_settings(storage={"min_free_mb": 10_000_000}))
    first, second = _synthetic(2)
    assoc = _associate(node.scp.port)
    try:
        assert assoc.send_c_store(first).Status == 0xA700
        assert assoc.send_c_store(second).Status == 0xA700
    finally:
        assoc.release()
    assert _instances(node) == {}
    assert not list(node.store.incoming_dir.iterdir())
    assert not list(node.store.acked_dir.iterdir())
    assert _logged(caplog, "refused instance", "0xA700", "storage.min_free_mb"), caplog.text

    # Space comes back (here: the watermark is lowered): a new association stores again.
    node.store.min_free_bytes = 0
    _store_ok(node, first)
    assert set(_instances(node)) == {first.SOPInstanceUID}


# -- re-sends ---------------------------------------------------------------------------------------------------------
def test_resent_instance_replaces_the_stored_one_and_is_counted_once(node: Node) -> None:
    v1 = _synthetic(seed=1, SeriesDescription="first version")[0]
    v2 = copy.deepcopy(v1)
    v2.SeriesDescription = "second version"
    v2.PixelData = bytes(reversed(v1.PixelData))
    assert v2.PixelData != v1.PixelData
    for ds in (v1, v2):
        _store_ok(node, ds)
        assert node.indexer.flush(30)
    rows = _instances(node)
    assert list(rows) == [v1.SOPInstanceUID]
    assert rows[v1.SOPInstanceUID]["receive_count"] == 2
    assert _series(node, v1.SeriesInstanceUID) == (1, 1)
    stored = node.store.root / rows[v1.SOPInstanceUID]["path"]
    assert _dcm_files(node.store.root) == {stored}
    back = dcmread(stored)
    assert back.SeriesDescription == "second version"
    assert back.PixelData == v2.PixelData


def _send_twice_in_one_batch(node: Node) -> tuple[Dataset, Dataset]:
    """Send two versions of one instance back to back, indexed in one batch."""
    v1 = _synthetic(seed=2)[0]
    v2 = copy.deepcopy(v1)
    v2.PixelData = bytes(len(v1.PixelData))
    node.indexer.linger_s = 1.0  # the indexer waits for more records after the first
    assoc = _associate(node.scp.port)
    try:
        assert assoc.send_c_store(v1).Status == 0x0000
        assert assoc.send_c_store(v2).Status == 0x0000
    finally:
        assoc.release()
    assert node.indexer.flush(30)
    return v1, v2


def test_resent_instance_within_one_indexer_batch_keeps_the_last_copy(node: Node) -> None:
    v1, v2 = _send_twice_in_one_batch(node)
    rows = _instances(node)
    assert list(rows) == [v1.SOPInstanceUID]
    assert _series(node, v1.SeriesInstanceUID) == (1, 1)
    stored = node.store.root / rows[v1.SOPInstanceUID]["path"]
    assert _dcm_files(node.store.root) == {stored}
    assert dcmread(stored).PixelData == v2.PixelData
    assert not list(node.store.acked_dir.iterdir())


def test_resent_instance_within_one_indexer_batch_is_counted_as_two_receipts(node: Node) -> None:
    v1, _ = _send_twice_in_one_batch(node)
    assert _instances(node)[v1.SOPInstanceUID]["receive_count"] == 2


# -- concurrency ------------------------------------------------------------------------------------------------------
def test_four_concurrent_associations_of_100_instances_each(node: Node) -> None:
    study = _synthetic()[0].StudyInstanceUID
    series = _synthetic()[0].SeriesInstanceUID
    datasets = _synthetic(400, study_uid=study, series_uid=series)
    chunks = [datasets[i::4] for i in range(4)]
    statuses: list[list[int]] = [[] for _ in chunks]
    errors: list[BaseException] = []
    start = threading.Barrier(len(chunks))

    def sender(i: int) -> None:
        try:
            assoc = _associate(node.scp.port, calling=f"SCU{i}")
            try:
                start.wait(10)
                for ds in chunks[i]:
                    statuses[i].append(int(assoc.send_c_store(ds).Status))
            finally:
                assoc.release()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(i,), name=f"sender-{i}") for i in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a sender did not finish within 120 s"
    assert not errors, errors
    assert [len(s) for s in statuses] == [100] * 4
    assert all(st == 0x0000 for s in statuses for st in s)

    rows = _instances(node)
    assert set(rows) == {ds.SOPInstanceUID for ds in datasets}
    files = _dcm_files(node.store.root)
    assert len(files) == 400
    assert files == {node.store.root / r["path"] for r in rows.values()}
    assert _series(node, series) == (400, 400)
    assert {r["calling_ae"] for r in rows.values()} == {"SCU0", "SCU1", "SCU2", "SCU3"}


# -- oversized PDU ----------------------------------------------------------------------------------------------------
def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq_pdu(called: str, calling: str, *, max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian (PS3.8 9.3.2)."""
    app_context = _item(0x10, b"1.2.840.10008.3.1.1.1")
    pres_context = _item(
        0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) + _item(0x40, b"1.2.840.10008.1.2")
    )
    user_info = _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.10.1453.9"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + app_context
        + pres_context
        + user_info
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def raw_socket() -> Iterator[Callable[[int], socket.socket]]:
    socks: list[socket.socket] = []

    def connect(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
        return s

    yield connect
    for s in socks:
        s.close()


def test_pdu_longer_than_negotiated_maximum_aborts_the_association(
    node: Node, raw_socket: Callable[[int], socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pacs_node.common.dul")
    sock = raw_socket(node.scp.port)
    sock.sendall(associate_rq_pdu(AET, "RAWSCU"))
    head = _recv_exact(sock, 6)
    assert head[:1] == b"\x02", f"expected A-ASSOCIATE-AC, got {head!r}"
    ac = _recv_exact(sock, struct.unpack(">I", head[2:6])[0])
    assert len(ac) == struct.unpack(">I", head[2:6])[0]

    # A P-DATA-TF announcing 100 MB; the node agreed to dicom.max_pdu_size (256 KiB).
    sock.sendall(struct.pack(">BBI", 0x04, 0, 100 * 2**20))
    t0 = time.monotonic()
    sock.settimeout(10)
    try:
        reply = _recv_exact(sock, 10)
    except ConnectionResetError:
        reply = b""
    elapsed = time.monotonic() - t0
    # A-ABORT (0x07) or the connection closed, at once, not after a network timeout.
    assert reply[:1] in (b"\x07", b""), f"expected A-ABORT or close, got {reply!r}"
    assert elapsed < 5, f"the node took {elapsed:.1f} s to react"
    if reply:
        assert struct.unpack(">BBI", reply[:6])[2] == 4  # A-ABORT PDU length
        # The connection is then closed.
        assert _recv_exact(sock, 1) == b""
    wait_for(lambda: _logged(caplog, "exceeds the negotiated maximum"), 5, what="the oversized PDU to be logged")

    # The node keeps serving.
    assert echo("127.0.0.1", node.scp.port, called_ae=AET) == 0
    ds = _synthetic()[0]
    _store_ok(node, ds)
    assert set(_instances(node)) == {ds.SOPInstanceUID}


def test_oversized_pdu_within_an_established_pynetdicom_association(node: Node) -> None:
    assoc = _associate(node.scp.port)
    try:
        assoc.dul.socket.socket.sendall(struct.pack(">BBI", 0x04, 0, 100 * 2**20))
        wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 5, what="the node to abort the association")
    finally:
        if assoc.is_established:
            assoc.abort()
    assert echo("127.0.0.1", node.scp.port, called_ae=AET) == 0


# -- the C-STORE short path (pacs_node.common.dul) -----------------------------------------------------------------
def pdv(context_id: int, header: int, value: bytes) -> bytes:
    return struct.pack(">LBB", len(value) + 2, context_id, header) + value


def p_data_pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def store_command(sop_class: str, sop_uid: str, message_id: int) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, PS3.7 9.3.1.1), a data set to follow."""

    def el(element: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0x0000, element, len(value)) + value

    def ui(uid: str) -> bytes:
        raw = uid.encode()
        return raw + b"\0" * (len(raw) % 2)

    body = (
        el(0x0002, ui(sop_class))
        + el(0x0100, struct.pack("<H", 0x0001))
        + el(0x0110, struct.pack("<H", message_id))
        + el(0x0700, struct.pack("<H", 0))
        + el(0x0800, struct.pack("<H", 0x0000))
        + el(0x1000, ui(sop_uid))
    )
    return el(0x0000, struct.pack("<L", len(body))) + body


def _response(assoc: Association) -> Any:
    context_id, msg = assoc.dimse.get_msg(block=True)
    assert msg is not None, "no C-STORE-RSP within the DIMSE timeout"
    return msg


def _short_path_count(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        int(r.getMessage().split()[0])
        for r in caplog.records
        if r.name == "pacs_node.common.dul" and "received on the short path" in r.getMessage()
    )


def test_the_file_stored_is_the_same_whichever_path_received_it(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    """A whole command in one PDV takes the short path; a command split over two PDVs takes pynetdicom's.

    Both answer Success to the message they were sent, and leave the same bytes on disk."""
    caplog.set_level(logging.DEBUG, logger="pacs_node.common.dul")
    ds = _synthetic()[0]
    data = _encode(ds)
    cmd = store_command(CTImageStorage, ds.SOPInstanceUID, message_id=7)
    assoc = _associate(node.scp.port)
    try:
        [cx] = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
        sock, cid, half = assoc.dul.socket.socket, cx.context_id, len(data) // 2
        with _reactor_paused(assoc):
            # the command and the first fragment in one PDU, the last fragment in the next
            sock.sendall(
                p_data_pdu(pdv(cid, 0x03, cmd), pdv(cid, 0x00, data[:half])) + p_data_pdu(pdv(cid, 0x02, data[half:]))
            )
            rsp = _response(assoc)
        assert (rsp.Status, rsp.MessageIDBeingRespondedTo, rsp.AffectedSOPInstanceUID) == (0, 7, ds.SOPInstanceUID)
        assert rsp.AffectedSOPClassUID == CTImageStorage
        path = node.store.root / _instances(node)[ds.SOPInstanceUID]["path"]
        short = path.read_bytes()
        cmd = store_command(CTImageStorage, ds.SOPInstanceUID, message_id=8)
        with _reactor_paused(assoc):
            sock.sendall(
                p_data_pdu(pdv(cid, 0x01, cmd[:20]), pdv(cid, 0x03, cmd[20:])) + p_data_pdu(pdv(cid, 0x02, data))
            )
            rsp = _response(assoc)
        assert (rsp.Status, rsp.MessageIDBeingRespondedTo) == (0, 8)
        # and an ordinary C-STORE from pynetdicom's SCU after both
        assert assoc.send_c_store(_synthetic(seed=5)[0]).Status == 0x0000
    finally:
        assoc.release()
    rows = _instances(node)
    assert rows[ds.SOPInstanceUID]["receive_count"] == 2 and len(rows) == 2
    assert path.read_bytes() == short  # pynetdicom's chunked receive wrote the same file
    assert dcmread(path) == dcmread(BytesIO(short)) and dcmread(path).PixelData == ds.PixelData
    wait_for(lambda: _short_path_count(caplog) == 2, 5, what="the association's short-path count in the log")


@pytest.mark.parametrize("breach", ["a command inside the dataset", "an abort inside the dataset", "a closed socket"])
def test_a_c_store_broken_off_in_its_dataset_leaves_nothing_behind(node: Node, breach: str) -> None:
    ds = _synthetic()[0]
    data = _encode(ds)
    assoc = _associate(node.scp.port)
    [cx] = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
    sock, cid = assoc.dul.socket.socket, cx.context_id
    sock.sendall(p_data_pdu(pdv(cid, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID, 3))))
    sock.sendall(p_data_pdu(pdv(cid, 0x00, data[:1000])))
    wait_for(lambda: any(node.store.incoming_dir.iterdir()), 5, what="the dataset's temporary file")
    if breach == "a command inside the dataset":
        sock.sendall(p_data_pdu(pdv(cid, 0x03, store_command(CTImageStorage, ds.SOPInstanceUID, 4))))
        wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 5, what="the node to abort the association")
    elif breach == "an abort inside the dataset":
        assoc.abort()
    else:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    wait_for(lambda: not any(node.store.incoming_dir.iterdir()), 10, what="the temporary file to be removed")
    if assoc.is_established:
        assoc.abort()
    assert _instances(node) == {}
    # the node keeps serving
    other = _synthetic(seed=9)[0]
    _store_ok(node, other)
    assert set(_instances(node)) == {other.SOPInstanceUID}


def test_a_temporary_file_that_cannot_be_made_answers_out_of_resources(node: Node) -> None:
    ds, other = _synthetic(2)
    node.store.incoming_dir.rmdir()  # as when the store's file system lost it
    try:
        assoc = _associate(node.scp.port)
        try:
            assert assoc.send_c_store(ds).Status == 0xA700
            assert assoc.send_c_echo().Status == 0x0000  # the association carries on
        finally:
            assoc.release()
    finally:
        node.store.incoming_dir.mkdir()
    _store_ok(node, other)
    assert set(_instances(node)) == {other.SOPInstanceUID}


def test_a_store_that_raises_answers_processing_failure_and_keeps_nothing(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the receive path broke")

    ds = _synthetic()[0]
    monkeypatch.setattr(node.scp.ingestor, "receive_file", broken)
    assoc = _associate(node.scp.port)
    try:
        assert assoc.send_c_store(ds).Status == 0xC211
    finally:
        assoc.release()
    monkeypatch.undo()
    assert not any(node.store.incoming_dir.iterdir())
    assert _instances(node) == {}
    _store_ok(node, ds)
    assert set(_instances(node)) == {ds.SOPInstanceUID}


# -- command line -----------------------------------------------------------------------------------------------------
def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
    return subprocess.run(
        [sys.executable, "-m", "pacs_node", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_echo_and_send_against_the_running_node(node: Node, tmp_path: Path) -> None:
    port = str(node.scp.port)
    proc = _cli(["echo", "127.0.0.1", port, "--aec", AET, "--aet", "CLIECHO"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "success" in proc.stdout and "0x0000" in proc.stdout

    folder = tmp_path / "to-send"
    paths = write_series(folder, _synthetic(5))
    (folder / "README.txt").write_text("not DICOM")
    proc = _cli(["send", "127.0.0.1", port, str(folder), "--aec", AET, "--aet", "CLISEND"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sent 5 instances" in proc.stdout and "5 stored" in proc.stdout, proc.stdout
    rows = _instances(node)
    assert set(rows) == {p.stem for p in paths}
    assert {r["calling_ae"] for r in rows.values()} == {"CLISEND"}
