"""One bad peer cannot stop the node (issue 14, the DIMSE receive path).

Real sockets on 127.0.0.1 against the node's real SCP (``run_node``): peers that
stall before or inside an association, floods of connections, deflate bombs,
instances cut short, too large or contradicting their command, a SOP instance
re-sent under another study, AE titles that would forge log lines. Each refusal
has its DIMSE status (0xA700 out of resources, 0xA900 does not match, 0xC210
cannot understand) and a log line that names the peer and the reason, and the
node keeps serving. A second source address (127.0.0.2, ...: the whole 127/8 is
loopback) stands for "another host".
"""

from __future__ import annotations

import copy
import logging
import shutil
import socket
import struct
import subprocess
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom.association import Association

from pacs_node.app.service import Node
from pacs_node.common.dicomnet import VERIFICATION
from pacs_node.config import Settings
from pacs_node.deliver.scu import echo
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import IngestLimits
from pacs_node.receive.scp import NodeAssociationServer
from tests.conftest import wait_for
from tests.http_support import http_node, multipart_body, node_settings
from tests.test_scp import (
    AET,
    _associate,
    _encode,
    _instances,
    _reactor_paused,
    _response,
    _store_ok,
    _synthetic,
    _try_associate,
    associate_rq_pdu,
    p_data_pdu,
    pdv,
    raw_c_store,
    store_command,
)

MIB = 2**20

# -- helpers -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[Callable[..., socket.socket]]:
    """Raw TCP connections to the node (optionally from another loopback address), all closed at teardown."""
    opened: list[socket.socket] = []

    def connect(port: int, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        opened.append(s)
        return s

    yield connect
    for s in opened:
        s.close()


@pytest.fixture
def node_fixture(make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node]) -> Node:
    """A node on defaults."""
    return run_node(make_settings())


def _server(node: Node) -> NodeAssociationServer:
    server = node.scp._server
    assert server is not None
    return server


def _closed_within(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Seconds until the node closed the connection, and what it sent first (read with a deadline)."""
    start = time.monotonic()
    received = b""
    sock.settimeout(0.1)
    while time.monotonic() - start < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    else:
        raise AssertionError(f"the node did not close the connection within {timeout} s")
    return time.monotonic() - start, received


def _raw_associate(sock: socket.socket, calling: str = "RAWSCU") -> None:
    """A-ASSOCIATE-RQ (Verification) on a raw socket; read the A-ASSOCIATE-AC."""
    sock.sendall(associate_rq_pdu(AET, calling))
    head = sock.recv(6)
    assert head[:1] == b"\x02", f"expected A-ASSOCIATE-AC, got {head!r}"
    left = struct.unpack(">I", head[2:6])[0]
    while left:
        left -= len(sock.recv(left))


def _connections_settle(node: Node, count: int, timeout: float = 10) -> None:
    wait_for(
        lambda: _server(node).open_connections == count,
        timeout,
        what=f"the node to hold {count} connections",
        details=lambda: f"{_server(node).open_connections} held",
    )


def _no_association_threads(node: Node, timeout: float = 10) -> None:
    wait_for(lambda: not _server(node).active_associations, timeout, what="every association thread to end")


def _warning(caplog: pytest.LogCaptureFixture, *words: str) -> bool:
    """A warning or worse from the receive path (SCP, transport, ingest) containing every one of ``words``."""
    return any(
        r.name.startswith(("pacs_node.receive", "pacs_node.common.dul"))
        and r.levelno >= logging.WARNING
        and all(w in r.getMessage() for w in words)
        for r in caplog.records
    )


def _deflated(inflated_mib: int) -> tuple[Dataset, bytes, bytes]:
    """A valid CT instance whose native Pixel Data (zeros) is ``inflated_mib`` MiB, in Deflated Explicit VR Little
    Endian: (its header, the deflated data set as a C-STORE carries it, the Part 10 file). It deflates ~1000:1."""
    ds = _synthetic()[0]
    del ds.PixelData
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.NumberOfFrames = inflated_mib // 2
    length = 1024 * 1024 * 2 * int(ds.NumberOfFrames)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(_encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))]
    zeros = bytes(MIB)
    parts += [z.compress(zeros) for _ in range(length // MIB)]
    parts.append(z.flush())
    dataset = b"".join(parts)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta)
    return ds, dataset, b"\0" * 128 + b"DICM" + buf.getvalue() + dataset


def _part10(ds: Dataset, dataset: bytes) -> bytes:
    """A Part 10 file (Explicit VR Little Endian) around an encoded data set, written by hand."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + dataset


class _PeakMemory:
    """The peak of Python allocations (every thread: the node runs in this process) over a block."""

    def __enter__(self) -> _PeakMemory:
        tracemalloc.start()
        tracemalloc.reset_peak()
        self._base = tracemalloc.get_traced_memory()[0]
        self.peak_mib = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = (tracemalloc.get_traced_memory()[1] - self._base) / MIB
        tracemalloc.stop()


def _nothing_stored(node: Node) -> None:
    assert _instances(node) == {}
    assert not list(node.store.incoming_dir.iterdir()), "temporary files left in .incoming"
    assert not list(node.store.acked_dir.iterdir()), "a refused instance reached the journal"


def _still_serving(node: Node) -> None:
    assert echo("127.0.0.1", node.scp.port, called_ae=AET, timeout=10) == 0
    good = _synthetic(seed=77)[0]
    _store_ok(node, good)
    assert good.SOPInstanceUID in _instances(node)


# -- peers that stall --------------------------------------------------------------------------------------------------


def test_a_peer_that_stalls_in_its_association_request_is_dropped_after_the_acse_timeout(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sockets: Callable[..., socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    node = run_node(make_settings(dicom={"acse_timeout_s": 1.0, "network_timeout_s": 30.0}))
    sock = sockets(node.scp.port)
    sock.sendall(associate_rq_pdu(AET, "STALLER")[:20])  # the PDU header and a little of its body, then nothing
    took, _ = _closed_within(sock, 10)
    assert 0.8 <= took <= 4, f"dropped after {took:.1f} s (dicom.acse_timeout_s is 1 s)"
    assert _warning(caplog, "127.0.0.1:", "A-ASSOCIATE-RQ", "dicom.acse_timeout_s", "closing the connection")
    _connections_settle(node, 0)
    _no_association_threads(node)
    _still_serving(node)


def test_a_peer_that_stalls_inside_a_pdu_of_its_association_is_dropped_after_the_network_timeout(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sockets: Callable[..., socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    node = run_node(make_settings(dicom={"acse_timeout_s": 30.0, "network_timeout_s": 1.0}))
    sock = sockets(node.scp.port)
    _raw_associate(sock, "STALLER")
    sock.sendall(struct.pack(">BBI", 0x04, 0, 1000) + bytes(10))  # a P-DATA-TF of 1000 bytes: 10 come
    took, _ = _closed_within(sock, 10)
    assert 0.8 <= took <= 4, f"dropped after {took:.1f} s (dicom.network_timeout_s is 1 s)"
    assert _warning(caplog, "(AE STALLER)", "16 of the 1006 bytes of its P-DATA-TF PDU", "dicom.network_timeout_s")
    wait_for(lambda: _warning(caplog, "STALLER", "aborted"), 5, what="the association's end to be logged")
    _connections_settle(node, 0)
    _no_association_threads(node)
    _still_serving(node)


def test_a_silent_association_is_aborted_and_its_connection_closed(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sockets: Callable[..., socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    node = run_node(make_settings(dicom={"network_timeout_s": 1.0}))
    sock = sockets(node.scp.port)
    _raw_associate(sock, "SILENT")
    took, received = _closed_within(sock, 10)
    assert received[:1] == b"\x07", f"expected an A-ABORT before the close, got {received[:10]!r}"
    assert 0.8 <= took <= 4, f"closed after {took:.1f} s (dicom.network_timeout_s is 1 s)"
    assert _warning(caplog, "(AE SILENT)", "sent nothing for", "dicom.network_timeout_s")
    _connections_settle(node, 0)
    _no_association_threads(node)


# -- floods ------------------------------------------------------------------------------------------------------------


def test_one_peer_flooding_stalled_connections_does_not_stop_ingest(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sockets: Callable[..., socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's reproduction: 16 connections that send a PDU header and stall (defaults: ACSE timeout 30 s)."""
    caplog.set_level(logging.WARNING)
    node = run_node(make_settings())
    assert node.settings.dicom.max_connections_per_host == 8
    flood = []
    for _ in range(16):
        s = sockets(node.scp.port, "127.0.0.2")
        try:
            s.sendall(associate_rq_pdu(AET, "FLOOD")[:6])
        except OSError:  # closed at accept already
            pass
        flood.append(s)
    _connections_settle(node, 8)
    start = time.monotonic()
    assert echo("127.0.0.1", node.scp.port, called_ae=AET, timeout=10) == 0
    good = _synthetic(seed=3)[0]
    _store_ok(node, good)
    assert time.monotonic() - start < 5, "ingest from another host waited on the flood"
    assert good.SOPInstanceUID in _instances(node)
    assert _warning(caplog, "closed a connection from 127.0.0.2 at accept", "dicom.max_connections_per_host")


def test_hosts_outside_allowed_hosts_take_no_association_slot(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sockets: Callable[..., socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    node = run_node(
        make_settings(dicom={"allowed_hosts": ["127.0.0.1/32"], "max_associations": 2, "max_connections": 16})
    )
    for _ in range(4):  # stalled before their request
        sockets(node.scp.port, "127.0.0.2").sendall(associate_rq_pdu(AET, "OUTSIDER")[:6])
    rejected = sockets(node.scp.port, "127.0.0.3")
    rejected.sendall(associate_rq_pdu(AET, "OUTSIDER"))  # a whole request from outside: rejected, not counted
    _, answer = _closed_within(rejected, 10)
    assert answer[:1] == b"\x03", f"expected A-ASSOCIATE-RJ, got {answer[:10]!r}"
    assert _warning(caplog, "127.0.0.3:", "(AE OUTSIDER)", "dicom.allowed_hosts")
    _connections_settle(node, 4)
    both = [_associate(node.scp.port, calling=f"INSIDE{i}") for i in range(2)]  # both slots are free
    try:
        for assoc in both:
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        for assoc in both:
            assoc.release()


def test_associations_count_once_requested_and_a_third_is_rejected(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    node = run_node(make_settings(dicom={"max_associations": 2}))
    first, second = (_associate(node.scp.port, calling=f"SCU{i}") for i in range(2))
    try:
        third = _try_associate(node.scp.port, "SCU3")
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, local limit exceeded
        wait_for(lambda: _warning(caplog, "(AE SCU3)", "dicom.max_associations"), 5, what="the rejection's log line")
    finally:
        first.release()
    fourth = _associate(node.scp.port, calling="SCU4")  # a slot came free
    assert fourth.send_c_echo().Status == 0x0000
    fourth.release()
    second.release()


def test_idle_connections_cost_bounded_threads_and_closed_ones_are_given_back_at_once(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sockets: Callable[..., socket.socket],
) -> None:
    """200 idle connections from 25 addresses: at most dicom.max_connections are held (two threads each)."""
    node = run_node(make_settings())  # defaults: 32 connections, 8 per host, ACSE timeout 30 s
    limit = node.settings.dicom.connection_limit
    assert limit == 32
    base = threading.active_count()
    conns = [sockets(node.scp.port, f"127.0.0.{2 + i // 8}") for i in range(200)]
    _connections_settle(node, limit)
    grown = threading.active_count() - base
    assert grown <= 2 * limit + 4, f"{grown} more threads for {limit} connections held"
    for c in conns:
        c.close()
    start = time.monotonic()
    _connections_settle(node, 0, timeout=5)  # the ACSE timeout is 30 s: closing gives the place back
    assert time.monotonic() - start < 3
    assert echo("127.0.0.1", node.scp.port, called_ae=AET, timeout=10) == 0
    wait_for(lambda: threading.active_count() <= base + 2, 10, what="the connections' threads to end")


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) shows a listening socket's backlog")
def test_the_listen_backlog_is_the_configured_one(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node]
) -> None:
    node = run_node(make_settings(dicom={"listen_backlog": 77}))
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{node.scp.port}"], capture_output=True, text=True, timeout=10, check=True
    ).stdout.split()
    assert out[:3] == ["LISTEN", "0", "77"], out  # for a listening socket ss shows the backlog as Send-Q


# -- deflate bombs -----------------------------------------------------------------------------------------------------


def test_a_deflate_bomb_is_refused_without_being_inflated_into_memory(
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    node = run_node(make_settings(storage={"max_instance_mb": 16}))
    ds, dataset, _ = _deflated(64)  # ~70 KiB on the wire, 64 MiB inflated
    assoc = _associate(node.scp.port, (CTImageStorage, DeflatedExplicitVRLittleEndian))
    try:
        with _PeakMemory() as mem:
            status = raw_c_store(
                assoc, dataset, sop_uid=ds.SOPInstanceUID, transfer_syntax=DeflatedExplicitVRLittleEndian
            )
    finally:
        assoc.release()
    assert status == 0xA700, f"status 0x{status:04X}"
    assert mem.peak_mib < 8, f"{mem.peak_mib:.0f} MiB allocated to refuse a 64 MiB bomb"
    assert _warning(caplog, "refused instance", "(AE TESTSCU)", "0xA700", "inflates to more than 16 MiB")
    _nothing_stored(node)
    _still_serving(node)


def test_a_deflated_instance_within_the_limit_is_stored_with_memory_bounded(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node]
) -> None:
    node = run_node(make_settings())
    ds, dataset, _ = _deflated(48)
    assoc = _associate(node.scp.port, (CTImageStorage, DeflatedExplicitVRLittleEndian))
    try:
        with _PeakMemory() as mem:
            status = raw_c_store(
                assoc, dataset, sop_uid=ds.SOPInstanceUID, transfer_syntax=DeflatedExplicitVRLittleEndian
            )
    finally:
        assoc.release()
    assert status == 0x0000
    assert mem.peak_mib < 16, f"{mem.peak_mib:.0f} MiB allocated to receive 48 MiB deflated"
    stored = node.store.root / _instances(node)[ds.SOPInstanceUID]["path"]
    assert stored.read_bytes().endswith(dataset), "the deflated data set is stored as sent"


def test_stow_and_recovery_read_deflated_and_cut_short_instances_with_memory_bounded(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """STOW-RS and crash recovery go through the same reader as C-STORE (pacs_node/receive/ingest.py)."""
    bomb_ds, _, bomb = _deflated(64)
    cut = _part10(_synthetic(seed=5)[0], _encode(_synthetic(seed=5)[0])[:-1000])
    with http_node(node_settings(make_settings)) as node:
        node.ingestor.limits = IngestLimits(max_instance_bytes=16 * MIB, max_pixel_bytes=2048 * MIB)
        ctype, body = multipart_body([("application/dicom", bomb), ("application/dicom", cut)])
        with _PeakMemory() as mem:
            r = httpx.post(node.dicomweb + "/studies", content=body, headers={"Content-Type": ctype}, timeout=60)
        assert mem.peak_mib < 8 + len(body) * 4 / MIB, f"{mem.peak_mib:.0f} MiB allocated for a 64 MiB bomb"
        assert r.status_code == 409, r.text
        reasons = [item["00081197"]["Value"][0] for item in r.json()["00081198"]["Value"]]
        assert reasons == [0xA700, 0xC210]
        assert not list(node.store.acked_dir.iterdir())

        # An instance acknowledged (by an earlier version) and left in the journal by a crash: recovery reads
        # its header without inflating it whole, and indexes it.
        ds, _, part10 = _deflated(48)
        (node.store.acked_dir / f"{time.time_ns():020d}-{ds.SOPInstanceUID}.dcm").write_bytes(part10)
        with _PeakMemory() as mem:
            assert Indexer(node.db, node.store).recover() == 1
        assert mem.peak_mib < 16, f"{mem.peak_mib:.0f} MiB allocated to recover a 48 MiB deflated instance"
    assert bomb_ds.SOPInstanceUID != ds.SOPInstanceUID


# -- instances cut short, too large, or contradicting their command ----------------------------------------------------


def test_pixel_data_shorter_than_its_declared_length_is_refused(
    node_fixture: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    node = node_fixture
    ds = _synthetic()[0]
    data = _encode(ds)
    assoc = _associate(node.scp.port)
    try:
        status = raw_c_store(assoc, data[:-1000], sop_uid=ds.SOPInstanceUID)  # 1000 bytes of its pixels missing
        assert assoc.send_c_echo().Status == 0x0000  # the association goes on
    finally:
        assoc.release()
    assert status == 0xC210
    assert _warning(caplog, "refused instance", "0xC210", "(7FE0,0010) declares 8192 bytes", "after 7192")
    _nothing_stored(node)
    _still_serving(node)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the values we set
@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("native pixel data shorter than its image", 0xA900, "Pixel Data holds 4000 bytes"),
        ("an image too large to decode", 0xA700, "storage.max_pixel_mb"),
        ("command names another SOP instance", 0xA900, "SOP Instance UID"),
        ("data set of another SOP class", 0xA900, "is not the file meta's"),
        ("command of another class than its context", 0xA900, "presentation context's"),
    ],
)
def test_an_instance_that_contradicts_itself_or_its_command_is_refused(
    case: str, status: int, words: str, node_fixture: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    node = node_fixture
    ds = _synthetic()[0]
    sop, sop_class, context = ds.SOPInstanceUID, CTImageStorage, None
    if case == "native pixel data shorter than its image":
        ds.PixelData = bytes(4000)  # 64 x 64 x 16 bits need 8192
    elif case == "an image too large to decode":
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 1000
    elif case == "command names another SOP instance":
        sop = generate_uid()
    elif case == "data set of another SOP class":
        ds.SOPClassUID = MRImageStorage
    else:
        ds.SOPClassUID = sop_class = MRImageStorage  # on the CT context: pynetdicom's path takes it
        context = CTImageStorage
    contexts = [(CTImageStorage, ExplicitVRLittleEndian), (MRImageStorage, ExplicitVRLittleEndian)]
    assoc = _associate(node.scp.port, *contexts)
    try:
        got = raw_c_store(assoc, _encode(ds), sop_uid=sop, sop_class=sop_class, context_sop_class=context)
    finally:
        assoc.release()
    assert got == status, f"{case}: status 0x{got:04X}"
    assert _warning(caplog, "refused instance", f"0x{status:04X}", "(AE TESTSCU)", words), caplog.text
    _nothing_stored(node)
    _still_serving(node)


def _stream(assoc: Association, ds: Dataset, data: bytes, cid: int, *, split_command: bool) -> Callable[..., None]:
    """Send a C-STORE's command and then, call by call, fragments of ``data`` (the last one marked last)."""
    sock = assoc.dul.socket.socket
    cmd = store_command(CTImageStorage, ds.SOPInstanceUID, 9)
    if split_command:  # a command over two PDVs: pynetdicom's chunked receive takes it, not the short path
        sock.sendall(p_data_pdu(pdv(cid, 0x01, cmd[:20]), pdv(cid, 0x03, cmd[20:])))
    else:
        sock.sendall(p_data_pdu(pdv(cid, 0x03, cmd)))
    sent = [0]

    def more(n: int, *, last: bool = False) -> None:
        chunk = data[sent[0] : sent[0] + n]
        sent[0] += len(chunk)
        for i in range(0, len(chunk), 200_000):
            piece = chunk[i : i + 200_000]
            final = last and i + 200_000 >= len(chunk)
            sock.sendall(p_data_pdu(pdv(cid, 0x02 if final else 0x00, piece)))

    return more


def _incoming_bytes(node: Node) -> int:
    return sum(p.stat().st_size for p in node.store.incoming_dir.iterdir() if p.is_file())


@pytest.mark.parametrize("path", ["short path", "pynetdicom's path"])
@pytest.mark.parametrize("limit", ["storage.max_instance_mb", "storage.min_free_mb"])
def test_an_instance_is_refused_while_it_streams_in_and_its_bytes_given_back(
    limit: str,
    path: str,
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    node = run_node(make_settings(storage={"max_instance_mb": 2}))
    ds = _synthetic()[0]
    ds.Rows, ds.Columns = 1536, 1024
    ds.PixelData = bytes(3 * MIB)  # over storage.max_instance_mb (2)
    data = _encode(ds)
    assoc = _associate(node.scp.port)
    [cx] = [c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage]
    try:
        with _reactor_paused(assoc):
            more = _stream(assoc, ds, data, cx.context_id, split_command=path != "short path")
            more(MIB)  # within every limit: written to disk
            wait_for(lambda: _incoming_bytes(node) >= MIB // 2, 10, what="the instance's first MiB on disk")
            if limit == "storage.min_free_mb":
                node.store.min_free_bytes = 1 << 60  # the disk fills up meanwhile
                node.store._space_checked = 0.0
            more(MIB + MIB // 2)  # past 2 MiB; the disk was full from its first byte
            # refused: the file is emptied now, not when the peer is done sending
            wait_for(lambda: _incoming_bytes(node) == 0, 10, what="the refused instance's bytes to be given back")
            more(len(data), last=True)  # the rest, 0.5 MiB
            rsp = _response(assoc)
        assert rsp.Status == 0xA700, f"status 0x{rsp.Status:04X}"
        node.store.min_free_bytes = 0
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert _warning(caplog, "refused instance", "0xA700", "(AE TESTSCU)", limit)
    _nothing_stored(node)
    _still_serving(node)


def test_a_message_pynetdicom_would_hold_in_memory_is_bounded(
    node_fixture: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    node = node_fixture
    assoc = _associate(node.scp.port)
    [cx] = [c for c in assoc.accepted_contexts if c.abstract_syntax == VERIFICATION]

    def el(element: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0, element, len(value)) + value

    body = el(0x0002, VERIFICATION.encode() + b"\0") + el(0x0100, struct.pack("<H", 0x0030))
    body += el(0x0110, struct.pack("<H", 1)) + el(0x0800, struct.pack("<H", 0))  # "a data set follows"
    cmd = el(0x0000, struct.pack("<L", len(body))) + body
    sock = assoc.dul.socket.socket
    with _reactor_paused(assoc):
        sock.sendall(p_data_pdu(pdv(cx.context_id, 0x03, cmd)))
        try:
            for _ in range(8):  # 1.6 MiB of a C-ECHO's "data set", never its last fragment
                sock.sendall(p_data_pdu(pdv(cx.context_id, 0x00, bytes(200_000))))
        except OSError:
            pass  # aborted already
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 10, what="the node to abort the association")
    assert _warning(caplog, "(AE TESTSCU)", "held in memory")
    _still_serving(node)


# -- re-sends under another study --------------------------------------------------------------------------------------


@pytest.mark.parametrize("moved", ["another study", "another series of the same study"])
def test_a_sop_instance_re_sent_under_another_study_or_series_is_refused_and_the_stored_one_kept(
    moved: str, node_fixture: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    node = node_fixture
    first = _synthetic(seed=11)[0]
    _store_ok(node, first)
    stored = node.store.root / _instances(node)[first.SOPInstanceUID]["path"]
    before = stored.read_bytes()
    again = copy.deepcopy(first)
    again.SeriesInstanceUID = generate_uid()
    if moved == "another study":
        again.StudyInstanceUID = generate_uid()
    assoc = _associate(node.scp.port)
    try:
        assert assoc.send_c_store(again).Status == 0xA900
    finally:
        assoc.release()
    assert _warning(caplog, "refused instance", "0xA900", first.StudyInstanceUID, again.SeriesInstanceUID)
    rows = _instances(node)
    assert list(rows) == [first.SOPInstanceUID] and rows[first.SOPInstanceUID]["receive_count"] == 1
    assert stored.read_bytes() == before
    assert {p for p in node.store.root.rglob("*.dcm")} == {stored}, "a copy was written elsewhere"
    _store_ok(node, first)  # the same study and series: a re-send replaces
    assert _instances(node)[first.SOPInstanceUID]["receive_count"] == 2


# -- log lines a peer cannot forge -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("calling", "called", "reason"), [("EVIL\nFORGED", AET, 3), ("GOOD", "PACS\x1b[2J", 7)])
def test_an_ae_title_with_control_characters_is_rejected_and_logged_escaped(
    calling: str,
    called: str,
    reason: int,
    node_fixture: Node,
    sockets: Callable[..., socket.socket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    node = node_fixture
    sock = sockets(node.scp.port)
    sock.sendall(associate_rq_pdu(called, calling))
    _, answer = _closed_within(sock, 10)
    assert answer[:1] == b"\x03", f"expected A-ASSOCIATE-RJ, got {answer[:10]!r}"
    assert answer[7:10] == bytes([1, 1, reason])  # rejected permanent, by the service user, AE not recognised
    escaped = repr(calling if reason == 3 else called)[1:-1]
    wait_for(lambda: _warning(caplog, "rejecting the association", escaped), 5, what="the rejection's log line")
    receive = [r.getMessage() for r in caplog.records if r.name.startswith("pacs_node")]
    assert not [m for m in receive if "\n" in m or "\x1b" in m], "a peer's bytes reached the log unescaped"
    assert echo("127.0.0.1", node.scp.port, called_ae=AET, timeout=10) == 0
