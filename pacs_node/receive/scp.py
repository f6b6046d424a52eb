"""The DICOM SCP: C-ECHO and C-STORE for every storage SOP class.

The C-STORE handler is a thin adapter: pynetdicom has already written the
received bytes in chunks to a temporary file on the store's filesystem
(``STORE_RECV_CHUNKED_DATASET``), the handler hands that file to the
:class:`~pacs_node.receive.ingest.Ingestor` (header read, UIDs validated, fsync,
rename into the journal) and returns a status. pynetdicom sends the response
only after the handler returns, so Success means the instance is on disk.

pynetdicom's transport is adjusted in :mod:`pacs_node.common.dul` (pinned 3.0.x): chunked
receives land in the store's ``.incoming`` folder (acknowledging is a rename, not
a copy), a PDU longer than the negotiated maximum aborts the association, and the
reactors wait on their socket and queues instead of polling every millisecond.

With ``dicom.tls`` the port speaks DICOM TLS (TLS 1.2 or later). pynetdicom
would run each TLS handshake on its accept thread, where one slow client holds
up every other; the handshake runs on the connection's own thread instead,
within ``dicom.tls.handshake_timeout_s``.

One bad peer cannot stop the node. Connections are counted when accepted
(``dicom.max_connections``, ``dicom.max_connections_per_host``; one more is
closed at once, before it costs a thread) and each has a socket timeout; the
transport drops a peer that goes quiet in the middle of a PDU or before its
association request (:mod:`pacs_node.common.dul`). Only associations requested
from an allowed address count toward ``dicom.max_associations``. Every refusal
is logged with the peer's address and AE title (made printable) and the reason.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import ssl
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node.common.dicomnet import VERIFICATION, nodelay, server_ssl_context
from pacs_node.common.dul import NodeRequestHandler, describe_peer, printable, streaming_refusal
from pacs_node.common.dul import install as install_transport
from pacs_node.config import DicomSettings
from pacs_node.errors import IngestError
from pacs_node.receive.ingest import Ingestor

logger = logging.getLogger(__name__)

#: Transfer syntaxes accepted for storage, preferred first.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (CT, MR, enhanced, SEG, SR, SC, ...)."""
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


def _subject(cert: dict[str, Any] | None) -> str:
    if not cert:
        return "no certificate"
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
    parts = [f"{short.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or "empty subject"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How many connections the server holds, and how long a socket call may block (the ``dicom`` settings)."""

    total: int
    per_host: int
    backlog: int
    socket_timeout_s: float

    @classmethod
    def from_settings(cls, s: DicomSettings) -> ConnectionLimits:
        return cls(s.connection_limit, s.max_connections_per_host, s.listen_backlog, s.network_timeout_s)


#: a closed-at-accept line per source address at most this often (a flood would fill the log otherwise)
REFUSAL_LOG_EVERY_S = 10.0


class NodeAssociationServer(ThreadedAssociationServer):
    """The association server: connections counted at accept, a socket timeout and TCP_NODELAY on each,
    TLS handshakes off the accept thread.

    Args:
        limits: the connection limits (keyword; the other arguments are pynetdicom's).
    """

    reuse_port = False
    #: set by :class:`StorageSCP` when ``dicom.tls`` is configured
    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        self.limits = limits
        self.request_queue_size = limits.backlog  # listen() reads it while the base class binds
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()  # connections held, by source address
        self._pending: dict[Any, str] = {}  # accepted sockets whose association has not taken them yet
        self._quiet: dict[str, tuple[float, int]] = {}  # address -> (last refusal logged, refusals not logged)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT") and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def open_connections(self) -> int:
        """Connections held now (accepted, not yet ended)."""
        with self._lock:
            return sum(self._open.values())

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        nodelay(sock)
        # No socket call on this connection blocks longer (pynetdicom leaves accepted sockets without a timeout).
        sock.settimeout(self.limits.socket_timeout_s)
        if self.tls_context is not None:
            # Wrapping is instant; the handshake waits for the connection's thread.
            sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Count the connection in, or refuse it (closed at once) when the server or its source holds too many."""
        host = str(client_address[0])
        with self._lock:
            total, mine = sum(self._open.values()), self._open[host]
            if total >= self.limits.total:
                reason = f"{total} connections are open (dicom.max_connections)"
            elif mine >= self.limits.per_host:
                reason = f"it holds {mine} connections already (dicom.max_connections_per_host)"
            else:
                self._open[host] += 1
                self._pending[request] = host
                return True
        self._log_refusal(host, reason)
        return False

    def _log_refusal(self, host: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, quiet = self._quiet.get(host, (-REFUSAL_LOG_EVERY_S, 0))
            if now - last < REFUSAL_LOG_EVERY_S:
                self._quiet[host] = (last, quiet + 1)
                return
            if len(self._quiet) > 1024:
                self._quiet.clear()
            self._quiet[host] = (now, 0)
        more = f" ({quiet} more closed since the last such line)" if quiet else ""
        logger.warning("closed a connection from %s at accept: %s%s", host, reason, more)

    def take_slot(self, request: Any) -> Any:
        """Hand an accepted connection's place to its association: the callable it returns gives it back."""
        with self._lock:
            host = self._pending.pop(request, None)
        if host is None:
            return None
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                self._release(host)

        return release

    def _release(self, host: str) -> None:
        with self._lock:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]

    def _release_pending(self, request: Any) -> None:
        """Give back the place of a connection that ended before an association took it."""
        with self._lock:
            host = self._pending.pop(request, None)
        if host is not None:
            self._release(host)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it (the base class then closes the socket)
            self._release_pending(request)
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
                return
            super().finish_request(request, client_address)
        finally:
            self._release_pending(request)

    def _handshake(self, request: ssl.SSLSocket, client_address: Any) -> bool:
        address = client_address[0] if isinstance(client_address, tuple) else client_address
        previous = request.gettimeout()
        try:
            request.settimeout(self.handshake_timeout_s)
            request.do_handshake()
            request.settimeout(previous)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
            logger.warning("TLS handshake with %s failed; connection closed: %s", address, reason)
            # pynetdicom's server closes a request only when finishing it raises.
            self.shutdown_request(request)
            return False
        logger.info(
            "TLS connection from %s (%s, client %s)", address, request.version(), _subject(request.getpeercert())
        )
        return True


class ReusePortServer(NodeAssociationServer):
    """An association server whose port several processes may share (SO_REUSEPORT)."""

    reuse_port = True


class StorageSCP:
    """The node's DIMSE acceptor.

    Args:
        settings: the ``dicom`` section of the settings.
        ingestor: the receive path the C-STORE handler calls.
        reuse_port: allow other processes to bind the same port.
    """

    def __init__(self, settings: DicomSettings, ingestor: Ingestor, *, reuse_port: bool = False) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.reuse_port = reuse_port
        self._networks = [ipaddress.ip_network(h, strict=False) for h in settings.allowed_hosts]
        self._server: NodeAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._tls = server_ssl_context(settings.tls) if settings.tls is not None else None
        self._admitted: weakref.WeakSet[Association] = weakref.WeakSet()  # associations past EVT_REQUESTED
        self._admit_lock = threading.Lock()
        self.stored = 0
        self.refused = 0
        install_transport()
        self.ae = self._build_ae()
        # what pacs_node.common.dul reads from the AE: where chunked receives go, the store callable of its
        # C-STORE short path, and the guard that checks an instance while it streams in
        self.ae.pacs_node_incoming_dir = str(ingestor.store.incoming_dir)  # type: ignore[attr-defined]
        self.ae.pacs_node_store = self.store_file  # type: ignore[attr-defined]
        self.ae.pacs_node_guard = ingestor.guard  # type: ignore[attr-defined]

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_size
        # pynetdicom counts every connection's thread, requested or not; _on_requested counts associations
        ae.maximum_associations = s.connection_limit
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.require_called_aet = s.require_called_ae
        if s.allowed_calling_aes:
            ae.require_calling_aet = list(s.allowed_calling_aes)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("SCP not started")
        return int(self._server.server_address[1])

    def handlers(self) -> list[Any]:
        """The pynetdicom event handlers this SCP binds."""
        return [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
        ]

    def start(self) -> None:
        """Bind and serve in background threads."""
        s = self.settings
        server = self.ae.make_server(
            (s.host, s.port),
            evt_handlers=self.handlers(),
            server_class=functools.partial(  # type: ignore[arg-type]  # a factory: pynetdicom only calls it
                ReusePortServer if self.reuse_port else NodeAssociationServer, limits=ConnectionLimits.from_settings(s)
            ),
            request_handler=NodeRequestHandler,
        )
        self._server = cast(NodeAssociationServer, server)
        if self._tls is not None and s.tls is not None:
            self._server.tls_context = self._tls
            self._server.handshake_timeout_s = s.tls.handshake_timeout_s
        self.ae._servers.append(self._server)  # so that ae.shutdown() stops it
        self._thread = threading.Thread(target=self._server.serve_forever, name="scp-accept", daemon=True)
        self._thread.start()
        logger.info(
            "DICOM SCP %s listening on %s:%d%s",
            s.ae_title,
            s.host,
            self.port,
            " (DICOM TLS" + (", client certificates required)" if s.tls.require_client_cert else ")") if s.tls else "",
        )
        if not s.allowed_calling_aes:
            logger.warning(
                "dicom.allowed_calling_aes is empty: any calling AE may store to %s on port %d", s.ae_title, self.port
            )

    def stop(self) -> None:
        """Stop accepting and close running associations."""
        self.ae.shutdown()  # stops the server and aborts running associations
        self._server = None

    # -- handlers (thin) -----------------------------------------------------------
    def _allowed_address(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def _rejection(self, assoc: Association) -> tuple[tuple[int, int, int], str] | None:
        """Why an association request is rejected ((result, source, reason), words), or None: admitted.

        Checked when the request has arrived, before pynetdicom's own checks of the
        AE titles (AE titles that are not ones never get here: the transport rejects
        them): the source address, then the number of associations (only admitted
        ones count).
        """
        if not self._allowed_address(assoc.requestor.address):
            # rejected (permanent), by the service user, no reason given
            return (0x01, 0x01, 0x01), "address not in dicom.allowed_hosts"
        with self._admit_lock:
            running = sum(1 for a in list(self._admitted) if a.is_alive())
            if running >= self.settings.max_associations:
                # rejected (transient), by the service provider (presentation), local limit exceeded
                return (0x02, 0x03, 0x02), f"{running} associations are running (dicom.max_associations)"
            self._admitted.add(assoc)
        return None

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rejection = self._rejection(assoc)
        if rejection is None:
            return
        (result, source, reason), why = rejection
        logger.warning("rejecting the association requested by %s: %s", describe_peer(assoc), why)
        # kill() lets the DUL send the A-ASSOCIATE-RJ before the socket closes, as pynetdicom's own rejection
        # path does.
        assoc.acse.send_reject(result, source, reason)
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        logger.warning(
            "association rejected: calling AE '%s' called AE '%s' from %s",
            printable(rq.calling_ae_title if rq else None),
            printable(rq.called_ae_title if rq else None),
            describe_peer(assoc),
        )

    def _on_accepted(self, event: evt.Event) -> None:
        logger.info("association accepted: %s", describe_peer(event.assoc))

    def _on_aborted(self, event: evt.Event) -> None:
        logger.warning("association with %s aborted", describe_peer(event.assoc))

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        return self.store_file(
            event.dataset_path,
            event.assoc,
            str(getattr(request, "AffectedSOPInstanceUID", "?")),
            streaming_refusal(request),
            context_sop_class=str(event.context.abstract_syntax),
        )

    def store_file(
        self,
        path: Path | None,
        assoc: Association,
        sop_uid: str,
        refusal: IngestError | None = None,
        *,
        context_sop_class: str | None = None,
    ) -> int:
        """Hand one received file to the receive path; returns the C-STORE status.

        Called by pynetdicom's C-STORE event and by the transport's short path
        (:mod:`pacs_node.common.dul`), so both answer alike. ``refusal``: the
        instance was refused while it streamed in (``path`` is then None);
        ``context_sop_class``: the presentation context's, when the command's may differ.
        """
        try:
            if refusal is not None:
                raise refusal
            if path is None:
                raise IngestError("no file was received", 0xA700)
            self.ingestor.receive_file(
                path,
                calling_ae=assoc.requestor.ae_title,
                called_ae=assoc.acceptor.ae_title,
                address=assoc.requestor.address,
                context_sop_class=context_sop_class,
            )
        except IngestError as exc:
            self.refused += 1
            logger.warning(
                "refused instance %s from %s with status 0x%04X: %s",
                printable(sop_uid, 64),
                describe_peer(assoc),
                exc.status,
                printable(exc, 400),
            )
            return exc.status
        self.stored += 1
        return 0x0000
