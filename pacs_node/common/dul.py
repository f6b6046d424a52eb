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
from tempfile import NamedTemporaryFile
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, dimse_messages, evt
from pynetdicom import association as _association
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import RequestHandler

from storage.errors import InvalidUID
from storage.filestore import validate_uid

logger = logging.getLogger(__name__)

#: PDUs other than P-DATA carry no pixel data; an A-ASSOCIATE-RQ with a few
#: hundred presentation contexts is well under this.
MAX_CONTROL_PDU = 1 << 20

#: how long an idle reactor waits before it looks at its timers again
IDLE_TICK_S = 0.01

_PDU_TYPES = frozenset((0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07))
_DATA_TRANSFER = frozenset(("Sta6", "Sta7"))  # established (Sta7: awaiting A-RELEASE-RP)

# The DUL thread of each association records where its AE wants chunked
# receives written; pynetdicom creates the temporary file from that thread.
_incoming = threading.local()


def _peer(dul: DULServiceProvider) -> str:
    try:
        return f"{dul.assoc.requestor.address}:{dul.assoc.requestor.port}"
    except Exception:
        return "peer"


def _recv_into(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock`` (blocking); False when the connection ends or fails first."""
    got, n = 0, len(view)
    try:
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                return False
            got += k
    except (OSError, TimeoutError):
        return False
    return True


#: ``store(path, assoc, sop_instance_uid) -> status``: what the node does with a received file
StoreCallable = Callable[[Path, Any, str], int]

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATASET = 0x0101
_PROCESSING_FAILURE = 0xC211
_OUT_OF_RESOURCES = 0xA700


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


class _FastStore:
    """One C-STORE being received on the short path (see the module's docstring)."""

    def __init__(
        self, context_id: int, message_id: int, sop_class: str, sop_instance: str, transfer_syntax: str
    ) -> None:
        self.context_id = context_id
        self.message_id = message_id
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.failure: str | None = None
        self.path: Path | None = None
        self.file: Any = None
        try:
            fd, name = tempfile.mkstemp(suffix=".dcm", dir=getattr(_incoming, "folder", None))
        except OSError as exc:  # no inode, no descriptor, no folder: answered 0xA700 at the end
            self.failure = exc.strerror or str(exc)
            return
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.write(_file_meta(sop_class, sop_instance, transfer_syntax))

    def write(self, data: bytes | memoryview) -> None:
        if self.failure is not None:
            return  # the rest of the dataset is read and dropped; the answer is a failure
        try:
            self.file.write(data)
        except OSError as exc:
            self.failure = exc.strerror or str(exc)
            self.discard()

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            try:
                self.file.close()
            except OSError as exc:
                self.failure = self.failure or exc.strerror or str(exc)

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("could not remove the temporary file %s: %s", self.path, exc)


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
    _fast: _FastStore | None = None
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
        if _incoming.folder is not None and self.assoc.is_acceptor:
            self._store = getattr(self.assoc.ae, "pacs_node_store", None)
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
                self._fast.discard()
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

    def _read_pdu_data(self) -> None:
        raw = self.socket.socket if self.socket is not None else None
        if raw is None:
            return super()._read_pdu_data()
        head = bytearray(6)
        if not _recv_into(raw, memoryview(head)):
            self.event_queue.put("Evt17")  # connection closed
            return
        pdu_type, _, length = struct.unpack(">BBL", head)
        if pdu_type not in _PDU_TYPES:
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
        if length and not _recv_into(raw, memoryview(data)[6:]):
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04 and self._store is not None and self._fast_p_data(data):
            return
        if self._fast is not None:  # another PDU in the middle of a C-STORE's dataset
            self._fast.discard()
            self._fast = None
        try:
            pdu, event = self._decode_pdu(data)
        except Exception:
            logger.exception("undecodable PDU from %s", _peer(self))
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    # -- C-STORE on the short path ---------------------------------------------------------------
    def _fast_p_data(self, pdu: bytearray) -> bool:
        """Receive a P-DATA-TF PDU on the short path; False leaves it to pynetdicom (untouched)."""
        if self._fast is not None and self.state_machine.current_state not in _DATA_TRANSFER:
            self._fast.discard()  # the association is ending (an abort of ours): pynetdicom ignores data now
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
            fast.write(value)
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
        self._fast = _FastStore(context_id, message_id, sop_class, sop_instance, str(context.transfer_syntax[0]))
        return True

    def _finish_store(self, fast: _FastStore) -> None:
        self._fast = None
        fast.close()
        sop = fast.sop_instance
        if self.state_machine.current_state not in _DATA_TRANSFER:
            fast.discard()  # aborted meanwhile: nothing is stored or answered
            return
        if fast.failure is not None or fast.path is None:
            logger.warning("could not write instance %s to disk: %s; answering out of resources", sop, fast.failure)
            status = _OUT_OF_RESOURCES
        else:
            assert self._store is not None
            self._idle_timer.restart()  # the peer waits for us now, not the other way round
            try:
                status = int(self._store(fast.path, self.assoc, sop))
            except Exception:
                logger.exception("storing instance %s failed", sop)
                status = _PROCESSING_FAILURE
            if not 0 <= status <= 0xFFFF:
                logger.error("the store answered %r for instance %s, not a status; answering 0xC211", status, sop)
                status = _PROCESSING_FAILURE
        fast.discard()  # the file is still there only when the store refused it
        self.fast_stores += 1
        assert self.socket is not None
        self.socket.send(
            _store_response(fast.context_id, fast.sop_class.encode(), fast.message_id, status, sop.encode())
        )


class NodeAssociation(Association):
    """An acceptor whose reactor blocks on the DIMSE message queue instead of sleeping 1 ms a pass."""

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
                logger.error("network timeout reached on the association with %s", self.requestor.address)
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
    """pynetdicom's request handler, making a :class:`NodeAssociation` for each connection."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom builds the Association itself (its constructor takes no class); the
        # subclass adds no state, only the reactor loop, so switching the class is safe.
        assoc.__class__ = NodeAssociation
        return assoc


def _incoming_temp_file(*args: Any, **kwargs: Any) -> Any:
    folder = getattr(_incoming, "folder", None)
    if folder is not None:
        kwargs.setdefault("dir", folder)
    return NamedTemporaryFile(*args, **kwargs)


_install_lock = threading.Lock()
_installed = False


def install() -> None:
    """Chunked receive into each AE's store folder, :class:`NodeDUL` and a :class:`_Checkpoint` for every
    association (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = _incoming_temp_file  # type: ignore[assignment]
        _association.DULServiceProvider = NodeDUL  # type: ignore[misc]
        Association.__init__ = _init_association  # type: ignore[method-assign]
        _installed = True
