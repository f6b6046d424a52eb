"""pynetdicom's transport, bounded and event-driven (pynetdicom 3.0.x, pinned in setup.cfg).

Two changes to pynetdicom's behaviour, both on the receive path of every association:

* **Bounded PDUs.** pynetdicom buffers whatever length a peer announces. :class:`NodeDUL`
  refuses a PDU longer than the maximum we negotiated (or, for the PDUs that carry no
  data, :data:`MAX_CONTROL_PDU`) by aborting the association, so memory stays bounded
  whatever a peer sends. It reads each PDU with ``recv_into`` into one buffer, where
  pynetdicom reads 4 KiB at a time (128 system calls and copies for a 512 KiB PDU).

* **No polling on the critical path.** pynetdicom's DUL thread sleeps 1 ms whenever a
  pass found nothing to do, and the acceptor's reactor sleeps 1 ms before each look at
  the DIMSE queue. A sender such as ``storescu`` waits for each C-STORE response before
  it sends the next instance, so those sleeps sit in series with every instance: about
  2 ms of the ~5 ms pynetdicom needs per 512 KiB instance here. :class:`NodeDUL` waits in
  ``select()`` on the socket and on a wake-up socket that :meth:`NodeDUL.send_pdu` and
  :meth:`NodeDUL.kill_dul` write to; :class:`NodeAssociation` blocks on the DIMSE
  message queue. Timers (ARTIM, the network idle timeout, release and abort requests)
  are still looked at every :data:`IDLE_TICK_S` when nothing happens.

* **C-STORE on a short path.** When the AE names a store callable (``pacs_node_store``),
  a C-STORE-RQ whose command arrives whole in one P-DATA-TF PDU, on an accepted storage
  context, is received by :class:`_FastStore` in the DUL thread itself: its fragments go
  straight from the PDU buffer to the temporary file, the callable runs when the last one
  is written, and the C-STORE-RSP is encoded and sent from the same thread. pynetdicom's
  DIMSE layer (a DIMSE message object, pydicom-built file meta, events, two queues and two
  thread hand-offs per instance) costs ~2.5 ms of Python per instance otherwise, half of
  what a 512 KiB instance takes in all. Everything else (other DIMSE services, a command
  split over several PDVs, one whose UIDs or Message ID pynetdicom would refuse, a
  non-storage SOP class, association control) goes through pynetdicom unchanged, and the
  file written is the same Part 10 file pynetdicom's chunked receive writes. It works on
  TLS sockets alike. A C-STORE taken this way fires none of pynetdicom's PDU, DIMSE or
  C-STORE events: what the node does per instance is in the store callable, which the
  SCP's own EVT_C_STORE handler calls too.

* **A reactor pause that holds.** pynetdicom's ``send_*()`` pause the association's reactor
  (``_reactor_checkpoint.clear()``, then wait until ``_is_paused``) so that it does not take
  their response off the DIMSE queue. A reactor woken by the previous call's ``set()`` still
  looks at the queue once even when the next call has cleared the checkpoint meanwhile, and
  with a peer that answers fast (this node's short path does) it takes that response: the
  caller logs "Received unexpected C-... service message" and waits out the DIMSE timeout.
  :class:`_Checkpoint` only lets the reactor through while the checkpoint is still set.

The chunked receive (``STORE_RECV_CHUNKED_DATASET``) writes its temporary files in the
folder the association's AE names (``pacs_node_incoming_dir``: the store's own
``.incoming``), so that acknowledging an instance is a rename, not a copy.

:func:`install` applies all of it, once per process; it affects every association of the
process, the node's own SCU associations (dispatch, ``pacs-node send``) included.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, dimse_messages, evt
from pynetdicom import association as _association
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import RequestHandler

from pacs_node.errors import IngestError, OutOfResources
from storage.errors import InvalidUID
from storage.filestore import validate_uid

logger = logging.getLogger(__name__)

#: PDUs other than P-DATA carry no pixel data; an A-ASSOCIATE-RQ with a few
#: hundred presentation contexts is well under this.
MAX_CONTROL_PDU = 1 << 20

#: how long an idle reactor waits before it looks at its timers again
IDLE_TICK_S = 0.01

#: how long :meth:`NodeAssociation.kill` lets the transport wind down before it shuts the connection under it
KILL_GRACE_S = 5.0

_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
_DATA_TRANSFER = frozenset(("Sta6", "Sta7"))  # established (Sta7: awaiting A-RELEASE-RP)

# The DUL thread of each association records where its AE wants chunked
# receives written; pynetdicom creates the temporary file from that thread.
_incoming = threading.local()


def printable(value: object, limit: int = 80) -> str:
    """``value`` as one line of printable text for a log line: newlines, escapes and other unprintable
    characters written as escapes (``\\n``, ``\\x1b``), cut to ``limit`` characters.

    What a peer sends (its AE title, a value in its data) must not forge or garble the node's log.
    """
    text = repr(str(value))[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_peer(assoc: Any) -> str:
    """``address:port`` of an association's peer, with its AE title once it is known (printable)."""
    try:
        peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        where = f"{peer.address}:{peer.port}"
    except Exception:  # no address yet
        return "an unknown peer"
    primitive = getattr(peer, "primitive", None)
    ae = getattr(primitive, "calling_ae_title" if assoc.is_acceptor else "called_ae_title", None)
    return f"{where} (AE {printable(ae, 32)})" if ae else where


def _peer(dul: DULServiceProvider) -> str:
    return describe_peer(dul.assoc)


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None) -> tuple[int, bool]:
    """Fill ``view`` from ``sock`` by ``deadline`` (``time.monotonic()``; None: no deadline).

    Returns how many bytes arrived (``len(view)`` when all did, fewer when the
    connection ended or failed first) and whether the deadline passed first.
    """
    got, n = 0, len(view)
    timeout = sock.gettimeout()
    try:
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return got, True
                if timeout is None or left < timeout:
                    sock.settimeout(left)  # only near the deadline: settimeout costs a system call
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                return got, False
            got += k
    except TimeoutError:
        return got, True
    except OSError:
        return got, False
    finally:
        if deadline is not None and sock.gettimeout() != timeout:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
    return got, False


#: ``store(path, assoc, sop_instance_uid) -> status``: what the node does with a received file; for an instance
#: refused while it streamed in, ``store(None, assoc, sop_instance_uid, refusal)`` (too large, disk full, ...)
StoreCallable = Callable[..., int]

#: ``guard(bytes_written)``: raises :class:`~pacs_node.errors.IngestError` to refuse an instance while it streams in
Guard = Callable[[int], None]

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101
_PROCESSING_FAILURE = 0xC211


class _ProtocolError(Exception):
    """The peer broke the DIMSE protocol in the middle of a C-STORE; the association is aborted."""


def _pdvs(pdu: bytearray) -> list[tuple[int, int, memoryview]] | None:
    """The (context ID, message control header, value) items of a P-DATA-TF PDU, or None if malformed."""
    items = []
    view = memoryview(pdu)
    pos, end = 6, len(pdu)
    while pos < end:
        if pos + 6 > end:
            return None
        (length,) = struct.unpack_from(">L", pdu, pos)
        if length < 2 or pos + 4 + length > end:
            return None
        items.append((pdu[pos + 4], pdu[pos + 5], view[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return items


def _command(value: memoryview) -> dict[int, bytes] | None:
    """A command set's elements (implicit VR little endian) by element number, or None if malformed."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(value)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHL", value, pos)
        if group != 0x0000 or pos + 8 + length > end:
            return None
        out[element] = bytes(value[pos + 8 : pos + 8 + length])
        pos += 8 + length
    return out


def _us(raw: bytes | None) -> int | None:
    return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None


def _ui(raw: bytes | None) -> str:
    return raw.decode("ascii", "replace").rstrip("\x00 ") if raw else ""


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information, as pynetdicom's chunked receive writes them."""

    def short(element: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value

    body = (
        struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2)
        + b"\x00\x01"
        + short(0x0002, b"UI", _even(sop_class.encode("ascii"), b"\x00"))
        + short(0x0003, b"UI", _even(sop_instance.encode("ascii"), b"\x00"))
        + short(0x0010, b"UI", _even(transfer_syntax.encode("ascii"), b"\x00"))
        + short(0x0012, b"UI", _even(str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"), b"\x00"))
        + short(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" "))
    )
    return b"\x00" * 128 + b"DICM" + short(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _store_response(context_id: int, sop_class: bytes, message_id: int, status: int, sop_instance: bytes) -> bytes:
    """A C-STORE-RSP as one P-DATA-TF PDU (command set in implicit VR little endian)."""

    def elem(element: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0x0000, element, len(value)) + value

    body = (
        elem(0x0002, _even(sop_class, b"\x00"))
        + elem(0x0100, struct.pack("<H", _C_STORE_RSP))
        + elem(0x0120, struct.pack("<H", message_id))
        + elem(0x0800, struct.pack("<H", _NO_DATASET))
        + elem(0x0900, struct.pack("<H", status))
        + elem(0x1000, _even(sop_instance, b"\x00"))
    )
    command = elem(0x0000, struct.pack("<L", len(body))) + body
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


class _IncomingFile:
    """A temporary file in the store's incoming folder that one instance streams into, checked as it grows.

    After each write the AE's guard (``pacs_node_guard``) looks at the size so far
    and at free space. Once refused (by the guard, or a write that failed) the
    file is emptied and what still arrives is dropped: the answer will be the
    refusal. pynetdicom's chunked receive takes it for its NamedTemporaryFile
    (``name``, ``write``, ``file.flush()``, ``close``); the short path writes to it too.
    """

    def __init__(self, guard: Guard | None) -> None:
        self.refusal: IngestError | None = None
        self.written = 0
        self._guard = guard
        self.name = ""
        self.file: Any = io.BytesIO()  # stands in when no file could be made
        try:
            fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=getattr(_incoming, "folder", None))
        except OSError as exc:  # no inode, no descriptor, no folder
            self.refusal = OutOfResources(f"cannot create a temporary file: {exc.strerror or exc}")
            return
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes | memoryview) -> int:
        n = len(data)
        if self.refusal is None:
            try:
                self.file.write(data)
                self.written += n
                if self._guard is not None:
                    self._guard(self.written)
            except OSError as exc:
                self._refuse(OutOfResources(f"cannot write the instance to disk: {exc.strerror or exc}"))
            except IngestError as exc:
                self._refuse(exc)
        return n

    def _refuse(self, refusal: IngestError) -> None:
        self.refusal = refusal
        try:
            self.file.truncate(0)  # its disk space comes back now, not when the peer is done sending
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        if not self.file.closed:
            try:
                self.file.close()
            except OSError as exc:
                if self.refusal is None:
                    self.refusal = OutOfResources(f"cannot write the instance to disk: {exc.strerror or exc}")

    def discard(self) -> None:
        self.close()
        if self.name:
            try:
                Path(self.name).unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("could not remove the temporary file %s: %s", self.name, exc)


class _FastStore:
    """One C-STORE being received on the short path (see the module's docstring)."""

    def __init__(
        self,
        context_id: int,
        message_id: int,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        guard: Guard | None,
    ) -> None:
        self.context_id = context_id
        self.message_id = message_id
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.incoming = _IncomingFile(guard)
        self.incoming.write(_file_meta(sop_class, sop_instance, transfer_syntax))


class _Checkpoint(threading.Event):
    """An event whose wait() returns True only if it is still set when the waiter runs again."""

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not super().wait(left):
                return False
            if self.is_set():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False


_association_init = Association.__init__


def _init_association(self: Association, *args: Any, **kwargs: Any) -> None:
    _association_init(self, *args, **kwargs)
    checkpoint = _Checkpoint()
    checkpoint.set()
    self._reactor_checkpoint = checkpoint


class NodeDUL(DULServiceProvider):
    """pynetdicom's DUL provider with a bounded PDU reader and an event-driven loop."""

    _wake_r: socket.socket | None = None
    _wake_w: socket.socket | None = None
    _store: StoreCallable | None = None
    _guard: Guard | None = None
    _fast: _FastStore | None = None
    _message_bytes = 0  # of the DIMSE message pynetdicom is assembling in memory
    fast_stores = 0  # C-STOREs received on the short path (logged when the association ends)

    # -- waking the loop ------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:  # closed (the reactor ended) or full (a wake-up is pending anyway)
                pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wait_for_work(self) -> None:
        """Sleep until the socket has data, a primitive is queued to send, or the tick passes."""
        if not self.to_provider_queue.empty() or not self.event_queue.empty():
            return
        raw = self.socket.socket if self.socket is not None else None
        if raw is None or self._wake_r is None or raw.fileno() < 0:
            time.sleep(self._run_loop_delay)  # not connected (yet): pynetdicom's own pace
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes already buffered: select() would not see them
        try:
            ready, _, _ = select.select([raw, self._wake_r], [], [], IDLE_TICK_S)
        except (OSError, ValueError):  # closed meanwhile
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (3.0.4), waiting in :meth:`_wait_for_work` instead of sleeping."""
        _incoming.folder = getattr(self.assoc.ae, "pacs_node_incoming_dir", None)
        _incoming.guard = None
        if _incoming.folder is not None and self.assoc.is_acceptor:
            self._store = getattr(self.assoc.ae, "pacs_node_store", None)
            self._guard = _incoming.guard = getattr(self.assoc.ae, "pacs_node_guard", None)
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_r, self._wake_w = r, w
        try:
            self._loop()
        finally:
            self._wake_r = self._wake_w = None
            r.close()
            w.close()
            if self._fast is not None:  # the association ended in the middle of a C-STORE
                self._fast.incoming.discard()
                self._fast = None
            if self.fast_stores:
                logger.debug("%d C-STORE(s) from %s received on the short path", self.fast_stores, _peer(self))

    def _loop(self) -> None:
        self._idle_timer.start()
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait_for_work()
            if self._kill_thread:
                break
            # the ARTIM timer first, so that its event is queued ahead of any other of this pass
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # one of: encode and send a primitive, or receive and decode a PDU
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                logger.error("error in the DUL reactor of the association with %s; aborting: %s", _peer(self), exc)
                logger.debug("DUL reactor error", exc_info=True)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                try:
                    if self.socket is not None:
                        self.socket.send(abort_pdu.encode())
                finally:
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            idle = False

    # -- reading PDUs ---------------------------------------------------------------------------
    def _max_pdu(self, pdu_type: int) -> int:
        if pdu_type != 0x04:  # not P-DATA-TF
            return MAX_CONTROL_PDU
        assoc = self.assoc
        local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
        limit = int(local.maximum_length or 0)
        # 0 means 'unlimited' to pynetdicom; we never agree to that.
        return limit + 6 if limit else MAX_CONTROL_PDU * 16

    def _pdu_deadline(self) -> tuple[float | None, str]:
        """By when the PDU now arriving must be whole, and which timeout says so."""
        ours = self.assoc.is_acceptor  # the node's SCP: name its settings
        limits: list[tuple[float, str]] = []
        if self.network_timeout:
            limits.append((float(self.network_timeout), "dicom.network_timeout_s" if ours else "network timeout"))
        if self.state_machine.current_state in ("Sta1", "Sta2", "Sta13"):
            # the ARTIM timer runs (Sta1: a connection's first PDU can come before the DUL has moved to Sta2)
            limits.append((max(self.artim_timer.remaining, 0.0), "dicom.acse_timeout_s" if ours else "ACSE timeout"))
        if not limits:
            return None, ""
        left, which = min(limits)
        return time.monotonic() + left, which

    def _drop_stalled(self, what: str, got: int, expected: int, since: float, which: str) -> None:
        """The peer went quiet in the middle of a PDU: close the connection (pynetdicom then ends the association)."""
        logger.warning(
            "%s sent %d of the %d bytes of %s and then nothing for %.1f s (%s); closing the connection",
            _peer(self),
            got,
            expected,
            what,
            time.monotonic() - since,
            which,
        )
        self.shut_transport()
        self.event_queue.put("Evt17")  # transport closed: A-P-ABORT in an association, idle before one

    def shut_transport(self) -> None:
        """Shut the connection down under this DUL (a read or a send blocked on it returns at once)."""
        raw = self.socket.socket if self.socket is not None else None
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop_dul(self) -> bool:
        """pynetdicom's (3.0.4), which in Sta1 waits without end for the DUL thread to leave its loop: a thread
        blocked in a read from a quiet peer never does. After :data:`KILL_GRACE_S` the connection is shut."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        deadline: float | None = time.monotonic() + KILL_GRACE_S
        while self.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                deadline = None
                logger.warning("the transport of %s did not stop within %g s; shutting it", _peer(self), KILL_GRACE_S)
                self.shut_transport()
            time.sleep(self._run_loop_delay)
        return True

    def _held_in_memory(self, length: int) -> bool:
        """Count a P-DATA-TF PDU for pynetdicom's message in memory; True once that passes :data:`MAX_CONTROL_PDU`.

        pynetdicom keeps a message's command and any data set that is not a C-STORE's (those go to a file,
        guarded there) in memory until the last fragment: without this a peer could send fragments forever.
        """
        message = self.assoc.dimse.message
        if message is None:
            self._message_bytes = 0
        elif getattr(message, "_data_set_file", None) is not None:
            return False
        self._message_bytes += length
        return self._message_bytes > MAX_CONTROL_PDU

    def _read_pdu_data(self) -> None:
        raw = self.socket.socket if self.socket is not None else None
        if raw is None:
            return super()._read_pdu_data()
        since = time.monotonic()
        deadline, which = self._pdu_deadline()
        head = bytearray(6)
        got, stalled = _recv_into(raw, memoryview(head), deadline)
        if stalled:
            self._drop_stalled("its next PDU header", got, 6, since, which)
            return
        if got < 6:
            self.event_queue.put("Evt17")  # connection closed
            return
        pdu_type, _, length = struct.unpack(">BBL", head)
        if pdu_type not in _PDU_NAMES:
            logger.error("unknown PDU type 0x%02X from %s; aborting", pdu_type, _peer(self))
            self.event_queue.put("Evt19")
            return
        limit = self._max_pdu(pdu_type)
        if length > limit:
            logger.error(
                "PDU of %d bytes from %s exceeds the negotiated maximum of %d; aborting the association",
                length,
                _peer(self),
                limit,
            )
            self.event_queue.put("Evt19")  # invalid PDU -> A-ABORT (AA-8)
            return
        data = bytearray(6 + length)
        data[:6] = head
        if length:
            got, stalled = _recv_into(raw, memoryview(data)[6:], deadline)
            if stalled:
                self._drop_stalled(f"its {_PDU_NAMES[pdu_type]} PDU", 6 + got, 6 + length, since, which)
                return
            if got < length:
                self.event_queue.put("Evt17")
                return
        if pdu_type == 0x01 and self.assoc.is_acceptor and self._rejected_ae_titles(data):
            return
        if pdu_type == 0x04 and self._store is not None and self._fast_p_data(data):
            return
        if self._fast is not None:  # another PDU in the middle of a C-STORE's dataset
            self._fast.incoming.discard()
            self._fast = None
        if pdu_type == 0x04 and self.assoc.is_acceptor and self._held_in_memory(length):
            logger.error(
                "%s sent a DIMSE message of more than %d MiB that would be held in memory; aborting the association",
                _peer(self),
                MAX_CONTROL_PDU // 2**20,
            )
            self.event_queue.put("Evt19")
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:
            # the exception may quote the peer's bytes: printable only, the traceback at DEBUG
            logger.error("undecodable %s PDU from %s; aborting: %s", _PDU_NAMES[pdu_type], _peer(self), printable(exc))
            logger.debug("undecodable PDU", exc_info=True)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _rejected_ae_titles(self, pdu: bytearray) -> bool:
        """Reject an A-ASSOCIATE-RQ whose called or calling AE title is not one (PS3.5 6.2: ASCII, no control
        characters, no backslash, not all spaces) with an A-ASSOCIATE-RJ and a printable log line.

        pynetdicom would refuse it too, but by logging the raw title (a newline in it forges a log line) and
        aborting.
        """
        if len(pdu) < 42:
            return False  # too short to decode: pynetdicom aborts
        for offset, which, reason in ((26, "calling", 0x03), (10, "called", 0x07)):
            title = bytes(pdu[offset : offset + 16]).strip(b" ")
            if title and all(0x20 <= b <= 0x7E and b != 0x5C for b in title):
                continue
            logger.warning(
                "rejecting the association requested by %s: %s AE title '%s' is not an AE title "
                "(ASCII without control characters or backslash)",
                _peer(self),
                which,
                printable(title.decode("latin-1"), 40),
            )
            # rejected (permanent), by the service user, calling (3) or called (7) AE title not recognised
            if self.socket is not None:
                self.socket.send(struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x01, 0x01, reason))
            self.shut_transport()
            self.event_queue.put("Evt17")
            return True
        return False

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """pynetdicom's, but a wait ends once this DUL's thread has ended, since nothing can arrive then.

        pynetdicom's acceptor waits the whole ACSE timeout for the association
        request of a connection that closed at once, and its thread (and place
        among the server's connections) with it.
        """
        if not wait:
            return super().receive_pdu(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            step = 0.1 if left is None else max(0.0, min(left, 0.1))
            primitive = super().receive_pdu(wait=True, timeout=step)
            if primitive is not None:
                return primitive
            if self.ident is not None and not self.is_alive():
                return super().receive_pdu(wait=False)
            if left is not None and left <= step:
                return None

    # -- C-STORE on the short path ---------------------------------------------------------------
    def _fast_p_data(self, pdu: bytearray) -> bool:
        """Receive a P-DATA-TF PDU on the short path; False leaves it to pynetdicom (untouched)."""
        if self._fast is not None and self.state_machine.current_state not in _DATA_TRANSFER:
            self._fast.incoming.discard()  # the association is ending (an abort of ours): pynetdicom ignores data
            self._fast = None
            return False
        if self._fast is None and (
            self.state_machine.current_state != "Sta6"
            or self.assoc.dimse.message is not None
            or not self._recv_pdu.empty()
        ):
            return False  # not established, or pynetdicom is in the middle of a message
        items = _pdvs(pdu)
        if not items:
            if self._fast is not None:
                raise _ProtocolError("malformed P-DATA-TF PDU in the middle of a C-STORE dataset")
            return False
        if self._fast is None:
            context_id, header, value = items[0]
            if header & 0x03 != 0x03 or not self._start_store(context_id, value):
                return False  # not a whole C-STORE-RQ command: pynetdicom's business
            items = items[1:]
        fast = self._fast
        assert fast is not None
        for i, (context_id, header, value) in enumerate(items):
            if header & 0x01 or context_id != fast.context_id:
                raise _ProtocolError(
                    f"a command or another context's data (context {context_id}) inside the dataset "
                    f"of the C-STORE of {fast.sop_instance}"
                )
            fast.incoming.write(value)
            if header & 0x02:
                if i != len(items) - 1:
                    extra = len(items) - 1 - i
                    raise _ProtocolError(
                        f"{extra} PDV(s) after the last fragment of the C-STORE of {fast.sop_instance}"
                    )
                self._finish_store(fast)
        return True

    def _start_store(self, context_id: int, value: memoryview) -> bool:
        command = _command(value)
        if command is None or _us(command.get(0x0100)) != _C_STORE_RQ:
            return False
        message_id = _us(command.get(0x0110))
        if _us(command.get(0x0800)) in (None, _NO_DATASET) or message_id is None:
            return False  # no data set, or no Message ID: pynetdicom answers or aborts
        try:
            sop_class = validate_uid(_ui(command.get(0x0002)))
            sop_instance = validate_uid(_ui(command.get(0x1000)))
        except InvalidUID:
            return False  # pynetdicom refuses UIDs it cannot use
        context = self.assoc._accepted_cx.get(context_id)
        if context is None or context.abstract_syntax != sop_class or not context.transfer_syntax:
            return False  # pynetdicom refuses it with the right status
        if uid_to_service_class(sop_class) is not StorageServiceClass:
            return False  # a C-STORE on, say, the Verification context is not ours to store
        self._fast = _FastStore(
            context_id, message_id, sop_class, sop_instance, str(context.transfer_syntax[0]), self._guard
        )
        return True

    def _finish_store(self, fast: _FastStore) -> None:
        self._fast = None
        incoming = fast.incoming
        incoming.close()
        sop = fast.sop_instance
        if self.state_machine.current_state not in _DATA_TRANSFER:
            incoming.discard()  # aborted meanwhile: nothing is stored or answered
            return
        assert self._store is not None
        refusal = incoming.refusal
        self._idle_timer.restart()  # the peer waits for us now, not the other way round
        try:
            if refusal is None:
                status = int(self._store(Path(incoming.name), self.assoc, sop))
            else:
                status = int(self._store(None, self.assoc, sop, refusal))
        except Exception:
            logger.exception("storing instance %s failed", sop)
            status = _PROCESSING_FAILURE
        if not 0 <= status <= 0xFFFF:
            logger.error("the store answered %r for instance %s, not a status; answering 0xC211", status, sop)
            status = _PROCESSING_FAILURE
        incoming.discard()  # the file is still there only when the store refused it
        self.fast_stores += 1
        assert self.socket is not None
        self.socket.send(
            _store_response(fast.context_id, fast.sop_class.encode(), fast.message_id, status, sop.encode())
        )


class NodeAssociation(Association):
    """An acceptor whose reactor blocks on the DIMSE message queue instead of sleeping 1 ms a pass, whose
    :meth:`kill` always ends, and which gives its connection's place back to the server when its thread ends."""

    #: gives this connection's place among the server's counted connections back (set by the server)
    release_slot: Callable[[], None] | None = None

    def run(self) -> None:
        try:
            super().run()
        finally:
            release, self.release_slot = self.release_slot, None
            if release is not None:
                release()

    def kill(self) -> None:
        """pynetdicom's kill waits, without end, for its DUL to reach Sta1; a DUL stuck in a read or a send to
        a peer that went quiet never does. After :data:`KILL_GRACE_S` this one shuts the connection under it
        (:meth:`NodeDUL.stop_dul` does the same in Sta1)."""
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        deadline: float | None = time.monotonic() + KILL_GRACE_S
        while self.dul.is_alive() and not self.dul.stop_dul():
            if deadline is not None and time.monotonic() > deadline:
                deadline = None
                logger.warning(
                    "the transport of the association with %s did not stop within %g s; shutting it",
                    describe_peer(self),
                    KILL_GRACE_S,
                )
                if isinstance(self.dul, NodeDUL):
                    self.dul.shut_transport()
                self.dul.kill_dul()
            time.sleep(0.01)

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (3.0.4) with the sleep replaced by a wait on the DIMSE queue."""
        self._is_paused = False
        while not self._kill:
            # pynetdicom lets the acceptor pause the reactor to use the send_*() methods itself
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=IDLE_TICK_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, int(context_id or 0))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logger.debug("association released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                logger.warning(
                    "%s sent nothing for %g s (dicom.network_timeout_s); aborting the association",
                    describe_peer(self),
                    self.network_timeout,
                )
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, making a :class:`NodeAssociation` for each connection, which holds the
    connection's place among the server's counted connections (``take_slot(request)``) until its thread ends."""

    def handle(self) -> None:
        """pynetdicom's (3.0.4): create the association, then start its thread."""
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        try:
            assoc.start()
        except BaseException:
            release, assoc.release_slot = assoc.release_slot, None
            if release is not None:
                release()
            raise

    def _create_association(self) -> NodeAssociation:
        assoc = super()._create_association()
        # pynetdicom builds the Association itself (its constructor takes no class); the
        # subclass adds no state but a class attribute, so switching the class is safe.
        assoc.__class__ = NodeAssociation
        assert isinstance(assoc, NodeAssociation)
        take = getattr(self.server, "take_slot", None)
        assoc.release_slot = take(self.request) if take is not None else None
        return assoc


def _incoming_temp_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile for a chunked C-STORE data set (``delete=False``, ``mode="wb"``): an
    :class:`_IncomingFile` in the folder the association's AE names, guarded as the short path's are."""
    return _IncomingFile(getattr(_incoming, "guard", None))


def streaming_refusal(request: Any) -> IngestError | None:
    """Why the data set of a C-STORE received by pynetdicom (``event.request``) was refused while it streamed
    in, or None."""
    return getattr(getattr(request, "_dataset_file", None), "refusal", None)


class _PrintableRecords(logging.Filter):
    """Makes pynetdicom's log lines printable: it quotes what peers send (AE titles, UIDs) as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = printable(message, 4000), None
        return True


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Chunked receive into each AE's store folder, :class:`NodeDUL` and a :class:`_Checkpoint` for every
    association, printable pynetdicom log lines (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _config.STORE_RECV_CHUNKED_DATASET = True
        quoting = _PrintableRecords()
        for name in [n for n in logging.Logger.manager.loggerDict if n.split(".")[0] == "pynetdicom"]:
            logging.getLogger(name).addFilter(quoting)  # a logger's filters do not reach its children
        dimse_messages.NamedTemporaryFile = _incoming_temp_file  # type: ignore[assignment]
        _association.DULServiceProvider = NodeDUL  # type: ignore[misc]
        Association.__init__ = _init_association  # type: ignore[method-assign]
        _installed = True
