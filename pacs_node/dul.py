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

The chunked receive (``STORE_RECV_CHUNKED_DATASET``) writes its temporary files in the
folder the association's AE names (``pacs_node_incoming_dir``: the store's own
``.incoming``), so that acknowledging an instance is a rename, not a copy.

:func:`install` applies all of it, once per process; it affects every association of the
process, the node's own SCU associations (dispatch, ``pacs-node send``) included.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from tempfile import NamedTemporaryFile
from typing import Any

from pynetdicom import _config, dimse_messages, evt
from pynetdicom import association as _association
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler

logger = logging.getLogger(__name__)

#: PDUs other than P-DATA carry no pixel data; an A-ASSOCIATE-RQ with a few
#: hundred presentation contexts is well under this.
MAX_CONTROL_PDU = 1 << 20

#: how long an idle reactor waits before it looks at its timers again
IDLE_TICK_S = 0.01

_PDU_TYPES = frozenset((0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07))

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


class NodeDUL(DULServiceProvider):
    """pynetdicom's DUL provider with a bounded PDU reader and an event-driven loop."""

    _wake_r: socket.socket | None = None
    _wake_w: socket.socket | None = None

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
        try:
            pdu, event = self._decode_pdu(data)
        except Exception:
            logger.exception("undecodable PDU from %s", _peer(self))
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


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
    """Chunked receive into each AE's store folder, and :class:`NodeDUL` for every association (idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = _incoming_temp_file  # type: ignore[assignment]
        _association.DULServiceProvider = NodeDUL  # type: ignore[misc]
        _installed = True
