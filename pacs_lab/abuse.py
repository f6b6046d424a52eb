"""Tools for abusing a DICOM node on purpose: a cuttable TCP proxy, bombs, hand-made PDUs.

Used by ``benchmarks/abuse.py`` and the tests of the node's robustness. Plain
sockets, zlib and pydicom only: nothing here knows the node (``pacs_lab`` never
imports ``pacs_node`` or ``storage``).

- :class:`TcpProxy` sits in front of a server (PostgreSQL, say) on 127.0.0.1;
  :meth:`TcpProxy.cut` resets every connection through it and refuses new ones
  until :meth:`TcpProxy.restore`: an outage the caller controls.
- :func:`deflate_bomb` is a Part 10 file in Deflated Explicit VR Little Endian
  whose few megabytes inflate to gigabytes.
- :func:`associate_rq`, :func:`p_data_tf`, :func:`c_store_pdus` build the PDUs of
  an association by hand, and :func:`malformed_pdus` spoils them in the ways a
  broken or hostile peer does; :class:`RawPeer` sends them from any loopback
  source address.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1453."  # the project's test-data root (as pacs_lab.synthetic)
VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = UID_ROOT + "9.1"
_CHUNK = 1 << 16


# -- the proxy ---------------------------------------------------------------------------------------------


class TcpProxy:
    """A TCP proxy on ``host`` (a free port unless given) in front of ``upstream``.

    :meth:`cut` resets every connection through it and closes its listening
    socket, so that new connections are refused (as from a server that is down);
    :meth:`restore` listens again on the same port. Threads are daemons and end
    with :meth:`stop`.

    Args:
        upstream: ``(host, port)`` of the real server.
        host: where the proxy listens.
        port: its port (0: a free one, kept across cuts).
    """

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self.host = host
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.accepted = 0
        self.cut_connections = 0
        self.port = port
        self._listen()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def down(self) -> bool:
        """Whether connections are refused now."""
        return self._listener is None

    @property
    def open_connections(self) -> int:
        """Connections relayed now."""
        with self._lock:
            return len(self._pairs)

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._listener = sock
        thread = threading.Thread(target=self._accept, args=(sock,), name=f"proxy-{self.port}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set() and self._listener is listener:
            try:
                ready, _, _ = select.select([listener], [], [], 0.2)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                return  # closed by cut() or stop()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _reset(client)
                    server.close()
                    return
                self._pairs.add((client, server))
                self.accepted += 1
            thread = threading.Thread(target=self._relay, args=(client, server), daemon=True)
            thread.start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        other = {client: server, server: client}
        try:
            while not self._stopped.is_set():
                with self._lock:
                    if (client, server) not in self._pairs:
                        return
                try:
                    ready, _, _ = select.select([client, server], [], [], 0.2)
                    for sock in ready:
                        data = sock.recv(_CHUNK)
                        if not data:
                            return
                        other[sock].sendall(data)
                except (OSError, ValueError):
                    return
        finally:
            with self._lock:
                self._pairs.discard((client, server))
            _reset(client)
            server.close()

    def cut(self) -> int:
        """Reset every relayed connection and refuse new ones; returns how many were cut."""
        with self._lock:
            listener, self._listener = self._listener, None
            pairs = list(self._pairs)
            self._pairs.clear()
        if listener is not None:
            listener.close()
        for client, server in pairs:
            _reset(client)
            _reset(server)
        self.cut_connections += len(pairs)
        return len(pairs)

    def restore(self) -> None:
        """Accept connections again, on the same port.

        Raises:
            OSError: the port was taken meanwhile.
        """
        if self._listener is None and not self._stopped.is_set():
            self._listen()

    def stop(self) -> None:
        """Cut everything and end the threads."""
        self._stopped.set()
        self.cut()
        for thread in self._threads:
            thread.join(2)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed or rebooted server's kernel would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# -- datasets and bombs ------------------------------------------------------------------------------------


def _header(sop_class: str, sop_instance: str, study: str | None = None, series: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = study or str(generate_uid(prefix=UID_ROOT))
    ds.SeriesInstanceUID = series or str(generate_uid(prefix=UID_ROOT))
    ds.Modality = "OT"
    ds.PatientID = "ABUSE"
    ds.PatientName = "Abuse^Bomb"
    ds.SeriesDescription = "abuse: bomb"
    return ds


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    meta = Dataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return bytes(buf.getvalue())


def encode_dataset(ds: Dataset, *, implicit: bool = False) -> bytes:
    """``ds`` encoded in (explicit or implicit VR) little endian, without file meta."""
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return bytes(buf.getvalue())


@dataclass(frozen=True)
class Bomb:
    """A crafted Part 10 file and what it claims."""

    label: str
    data: bytes  #: the whole file as sent
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    inflated_bytes: int  #: what its data set becomes once inflated (or claims to hold)

    @property
    def dataset(self) -> bytes:
        """The data set as it travels in P-DATA (after the file meta)."""
        return self.data[_meta_end(self.data) :]


def _meta_end(part10: bytes) -> int:
    (group_length,) = struct.unpack_from("<L", part10, 132 + 8)
    return 132 + 12 + group_length


def deflate_bomb(inflated_bytes: int = 3 << 30, *, label: str = "deflate bomb") -> Bomb:
    """A Deflated Explicit VR Little Endian file whose data set inflates to about ``inflated_bytes``.

    A valid header (UIDs, patient, modality) is followed by one private OB
    element of zeros. The same sync-flushed deflate block of zeros is repeated,
    so a 3 GiB bomb takes about 3 MB and no time to make.
    """
    sop = str(generate_uid(prefix=UID_ROOT))
    ds = _header(CTImageStorage, sop)
    ds.add_new(0x00090010, "LO", "PACSLAB ABUSE")
    head = encode_dataset(ds)
    payload = max(inflated_bytes - len(head) - 12, 0) & ~1
    payload = min(payload, 0xFFFFFFFE)
    mib = 1 << 20
    whole, rest = divmod(payload, mib)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [comp.compress(head + struct.pack("<HH2sHL", 0x0009, 0x1010, b"OB", 0, payload))]
    parts.append(comp.flush(zlib.Z_SYNC_FLUSH))
    if whole:
        parts.append(comp.compress(bytes(mib)) + comp.flush(zlib.Z_SYNC_FLUSH))  # its window still holds the header
        if whole > 1:
            block = comp.compress(bytes(mib)) + comp.flush(zlib.Z_SYNC_FLUSH)  # window all zeros: repeatable
            parts.extend([block] * (whole - 1))
    parts.append(comp.compress(bytes(rest)) + comp.flush(zlib.Z_FINISH))
    body = b"".join(parts)
    data = _file_meta(CTImageStorage, sop, DeflatedExplicitVRLittleEndian) + body
    return Bomb(label, data, CTImageStorage, sop, DeflatedExplicitVRLittleEndian, len(head) + 12 + payload)


def inflated_size(bomb: Bomb, *, limit: int | None = None) -> int:
    """Bytes the bomb's data set inflates to (streamed; stops past ``limit``)."""
    d = zlib.decompressobj(-15)
    total = 0
    view = bomb.dataset
    for i in range(0, len(view), _CHUNK):
        total += len(d.decompress(view[i : i + _CHUNK]))
        while d.unconsumed_tail:
            total += len(d.decompress(d.unconsumed_tail))
        if limit is not None and total > limit:
            break
    return total


def pixel_claim_bomb(*, rows: int = 65535, columns: int = 65535, frames: int = 4096) -> Bomb:
    """An uncompressed image whose header claims Rows x Columns x Frames far beyond any limit, with 2 pixels."""
    sop = str(generate_uid(prefix=UID_ROOT))
    ds = _header(CTImageStorage, sop)
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, str(frames)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\0\0\0\0"
    ds["PixelData"].VR = "OW"
    claimed = rows * columns * frames * 2
    data = _file_meta(CTImageStorage, sop, ExplicitVRLittleEndian) + encode_dataset(ds)
    return Bomb("pixel claim bomb", data, CTImageStorage, sop, ExplicitVRLittleEndian, claimed)


def length_lie(*, claimed: int = 0xFFFFFFF0) -> Bomb:
    """A file whose last element claims ``claimed`` bytes and holds a few (a peer that lies about lengths)."""
    sop = str(generate_uid(prefix=UID_ROOT))
    head = encode_dataset(_header(CTImageStorage, sop))
    body = head + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, claimed) + b"\0" * 64
    data = _file_meta(CTImageStorage, sop, ExplicitVRLittleEndian) + body
    return Bomb("length lie", data, CTImageStorage, sop, ExplicitVRLittleEndian, claimed)


# -- PDUs by hand ------------------------------------------------------------------------------------------


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16, b" ")


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(
    *,
    calling_ae: str = "ABUSER",
    called_ae: str = "PACSNODE",
    contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, VERIFICATION, (ImplicitVRLittleEndian,)),),
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` (context ID, abstract syntax, transfer syntaxes)."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items += struct.pack(">BBHBBBB", 0x20, 0, 4 + len(sub), cid, 0, 0, 0) + sub
    user = struct.pack(">BBHL", 0x51, 0, 4, max_pdu) + _item(0x52, IMPLEMENTATION_UID.encode())
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + b"\0" * 32 + items
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def accepted_contexts(ac: bytes) -> dict[int, str]:
    """The accepted presentation contexts of an A-ASSOCIATE-AC: context ID -> transfer syntax.

    Raises:
        ValueError: not an A-ASSOCIATE-AC.
    """
    if len(ac) < 74 or ac[0] != 0x02:
        raise ValueError(f"not an A-ASSOCIATE-AC (PDU type 0x{ac[0] if ac else 0:02X})")
    out: dict[int, str] = {}
    pos = 74
    while pos + 4 <= len(ac):
        kind, _, length = struct.unpack_from(">BBH", ac, pos)
        value = ac[pos + 4 : pos + 4 + length]
        if kind == 0x21 and len(value) >= 4 and value[2] == 0:
            ts = value[4:]
            if len(ts) >= 4 and ts[0] == 0x40:
                (n,) = struct.unpack_from(">H", ts, 2)
                out[value[0]] = ts[4 : 4 + n].decode("ascii", "replace").rstrip("\0 ")
        pos += 4 + length
    return out


def p_data_tf(items: Sequence[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, value) items."""
    body = b"".join(struct.pack(">LBB", len(v) + 2, cid, hdr) + v for cid, hdr, v in items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (implicit VR little endian)."""
    body = (
        _command_element(0x0002, _ui(VERIFICATION))
        + _command_element(0x0100, struct.pack("<H", 0x0030))
        + _command_element(0x0110, struct.pack("<H", message_id))
        + _command_element(0x0800, struct.pack("<H", 0x0101))
    )
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian) announcing a data set."""
    body = (
        _command_element(0x0002, _ui(sop_class))
        + _command_element(0x0100, struct.pack("<H", 0x0001))
        + _command_element(0x0110, struct.pack("<H", message_id))
        + _command_element(0x0700, struct.pack("<H", 0))
        + _command_element(0x0800, struct.pack("<H", 0x0000))
        + _command_element(0x1000, _ui(sop_instance))
    )
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


def c_store_pdus(
    dataset: bytes, sop_class: str, sop_instance: str, *, context_id: int = 1, max_pdu: int = 16384, message_id: int = 1
) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ: the command, then the data set in fragments."""
    pdus = [p_data_tf([(context_id, 0x03, c_store_rq(sop_class, sop_instance, message_id))])]
    step = max(max_pdu - 12, 2)
    for i in range(0, max(len(dataset), 1), step):
        last = i + step >= len(dataset)
        pdus.append(p_data_tf([(context_id, 0x02 if last else 0x00, dataset[i : i + step])]))
    return pdus


RELEASE_RQ = struct.pack(">BBL", 0x05, 0, 4) + b"\0" * 4
ABORT = struct.pack(">BBL", 0x07, 0, 4) + b"\0" * 4


@dataclass(frozen=True)
class Part10File:
    """A Part 10 file split for sending: its UIDs, transfer syntax and data set bytes."""

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    dataset: bytes


def split_part10(path: Path) -> Part10File | None:
    """Read a Part 10 file's meta (pydicom) and cut off its data set; None if it has no usable meta."""
    try:
        data = path.read_bytes()
        if data[128:132] != b"DICM":
            return None
        meta = read_file_meta_info(path)
        return Part10File(
            path,
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            data[_meta_end(data) :],
        )
    except Exception:  # pydicom's many errors: a file we cannot split is simply not used
        return None


def sample_files(limit_bytes: int = 4 << 20) -> list[Path]:
    """DICOM test files of pydicom and pydicom-data (when installed), smallest first, up to ``limit_bytes`` each."""
    import importlib.util

    folders = []
    for name, sub in (("pydicom", "data/test_files"), ("data_store", "data")):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            folders.append(Path(spec.origin).parent / sub)
    files = {p.resolve() for f in folders if f.is_dir() for p in f.rglob("*.dcm")}
    return sorted((p for p in files if p.stat().st_size <= limit_bytes), key=lambda p: (p.stat().st_size, p.name))


def malformed_pdus(
    source: Part10File, rng: random.Random, *, context_id: int = 1, max_pdu: int = 16384
) -> Iterator[tuple[str, list[bytes]]]:
    """Ways to spoil the C-STORE of ``source``: (label, PDUs to send after the association is up)."""
    good = c_store_pdus(source.dataset, source.sop_class, source.sop_instance, context_id=context_id, max_pdu=max_pdu)
    first, data = good[0], good[1:]
    yield "data set cut short, then release", [first, *data[:-1], RELEASE_RQ]
    yield "PDU cut short, then silence", [first, _cut(data[0])]
    yield "PDU length larger than sent", [first, _lengthen(data[0], 1 << 20)]
    yield "PDU length over the negotiated maximum", [first, struct.pack(">BBL", 0x04, 0, 0x7FFFFFF0) + b"\0" * 64]
    yield "PDV length past the PDU", [first, _bad_pdv_length(data[0])]
    yield "unknown PDU type", [bytes([rng.choice((0x00, 0x08, 0x7F, 0xFF)), 0, 0, 0, 0, 8]) + b"\0" * 8]
    yield "data before the command", [*data[:1], first]
    yield "command for another context", [p_data_tf([(context_id + 2, 0x03, c_store_rq(source.sop_class, "1.2.3"))])]
    yield "command set with absurd lengths", [p_data_tf([(context_id, 0x03, _absurd_command())])]
    yield "random bytes in the data set", [first, *(_flip(p, rng) for p in data)]
    yield "abort in the middle", [first, data[0], ABORT]
    yield "garbage", [rng.randbytes(rng.randint(1, 512))]


def _cut(pdu: bytes) -> bytes:
    return pdu[: max(len(pdu) // 2, 7)]


def _lengthen(pdu: bytes, extra: int) -> bytes:
    (length,) = struct.unpack_from(">L", pdu, 2)
    return pdu[:2] + struct.pack(">L", length + extra) + pdu[6:]


def _bad_pdv_length(pdu: bytes) -> bytes:
    (length,) = struct.unpack_from(">L", pdu, 6)
    return pdu[:6] + struct.pack(">L", length + 4096) + pdu[10:]


def _absurd_command() -> bytes:
    return struct.pack("<HHL", 0x0000, 0x0000, 0xFFFFFFF0) + struct.pack("<HHL", 0x0000, 0x0100, 0x7FFFFFFF) + b"\1\0"


def _flip(pdu: bytes, rng: random.Random) -> bytes:
    if len(pdu) <= 12:
        return pdu
    raw = bytearray(pdu)
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(12, len(raw))
        raw[pos] = rng.randrange(256)
    return bytes(raw)


class RawPeer:
    """A TCP connection to a DICOM node from ``source`` (any 127.x.y.z address), spoken to byte by byte.

    Args:
        address: the node's ``(host, port)``.
        source: the local address to send from (several loopback addresses are several peers).
        timeout: for connecting and for each read.
    """

    def __init__(self, address: tuple[str, int], *, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.bind((source, 0))
            self.sock.connect(address)
        except OSError:
            self.sock.close()
            raise

    def send(self, data: bytes) -> bool:
        """Send ``data``; False when the node has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_pdu(self) -> bytes | None:
        """The next whole PDU, or None when the connection ends or the read times out."""
        head = self._exactly(6)
        if head is None:
            return None
        (length,) = struct.unpack_from(">L", head, 2)
        if length > 1 << 24:
            return None
        body = self._exactly(length)
        return None if body is None else head + body

    def _exactly(self, n: int) -> bytes | None:
        buf = bytearray()
        try:
            while len(buf) < n:
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    return None
                buf += chunk
        except OSError:
            return None
        return bytes(buf)

    def associate(self, **kwargs: object) -> dict[int, str] | None:
        """Send an A-ASSOCIATE-RQ (``associate_rq`` keywords); the accepted contexts, or None if not accepted."""
        if not self.send(associate_rq(**kwargs)):  # type: ignore[arg-type]
            return None
        reply = self.read_pdu()
        if reply is None or reply[0] != 0x02:
            return None
        return accepted_contexts(reply)

    def closed_by_peer(self, wait_s: float = 0.0) -> bool:
        """Whether the node has closed the connection (waits up to ``wait_s`` for it)."""
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            try:
                ready, _, _ = select.select([self.sock], [], [], max(left, 0))
            except (OSError, ValueError):
                return True
            if ready:
                try:
                    data = self.sock.recv(_CHUNK)
                except OSError:
                    return True
                if not data:
                    return True
                continue  # an A-ABORT or other answer: read on until the close
            if left <= 0:
                return False

    def close(self) -> None:
        _reset(self.sock)


def response_status(pdu: bytes | None) -> tuple[int, str] | None:
    """(Status, Affected SOP Instance UID) of a DIMSE response carried whole in one P-DATA-TF PDU, or None."""
    if pdu is None or len(pdu) < 12 or pdu[0] != 0x04:
        return None
    (length,) = struct.unpack_from(">L", pdu, 6)
    header = pdu[11]
    if not header & 0x01:  # not a command
        return None
    value, elements, pos = pdu[12 : 10 + length], {}, 0
    while pos + 8 <= len(value):
        _, element, n = struct.unpack_from("<HHL", value, pos)
        elements[element] = value[pos + 8 : pos + 8 + n]
        pos += 8 + n
    status = elements.get(0x0900)
    if status is None or len(status) != 2:
        return None
    sop = elements.get(0x1000, b"").decode("ascii", "replace").rstrip("\0 ")
    return struct.unpack("<H", status)[0], sop
