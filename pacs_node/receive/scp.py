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
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node.common.dicomnet import VERIFICATION, nodelay, server_ssl_context
from pacs_node.common.dul import NodeRequestHandler
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


class NodeAssociationServer(ThreadedAssociationServer):
    """The association server: TCP_NODELAY on every connection; TLS handshakes off the accept thread."""

    reuse_port = False
    #: set by :class:`StorageSCP` when ``dicom.tls`` is configured
    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0

    def server_bind(self) -> None:
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT") and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        nodelay(sock)
        if self.tls_context is not None:
            # Wrapping is instant; the handshake waits for the connection's thread.
            sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
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
                return
            logger.info(
                "TLS connection from %s (%s, client %s)", address, request.version(), _subject(request.getpeercert())
            )
        super().finish_request(request, client_address)


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
        self.stored = 0
        self.refused = 0
        install_transport()
        self.ae = self._build_ae()
        self.ae.pacs_node_incoming_dir = str(ingestor.store.incoming_dir)  # type: ignore[attr-defined]
        self.ae.pacs_node_store = self.store_file  # type: ignore[attr-defined]  # dul.py's C-STORE short path

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_size
        ae.maximum_associations = s.max_associations
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
            server_class=ReusePortServer if self.reuse_port else NodeAssociationServer,
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

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        address = assoc.requestor.address
        if not self._allowed_address(address):
            logger.warning(
                "rejecting association from %s (calling AE %s): address not in dicom.allowed_hosts",
                address,
                assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else "?",
            )
            # Rejected (permanent), service-user, no reason given; kill() lets the
            # DUL send the A-ASSOCIATE-RJ before the socket closes, as
            # pynetdicom's own rejection path does.
            assoc.acse.send_reject(0x01, 0x01, 0x01)
            assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        logger.warning(
            "association rejected: calling AE %r called AE %r from %s:%s",
            rq.ae_title,
            rq.primitive.called_ae_title if rq.primitive else None,
            rq.address,
            rq.port,
        )

    def _on_accepted(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        logger.info("association accepted: %s from %s:%s", rq.ae_title, rq.address, rq.port)

    def _on_aborted(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        logger.warning("association with %s from %s aborted", rq.ae_title, rq.address)

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        return self.store_file(
            event.dataset_path, event.assoc, str(getattr(event.request, "AffectedSOPInstanceUID", "?"))
        )

    def store_file(self, path: Path, assoc: Association, sop_uid: str) -> int:
        """Hand one received file to the receive path; returns the C-STORE status.

        Called by pynetdicom's C-STORE event and by the transport's short path
        (:mod:`pacs_node.common.dul`), so both answer alike.
        """
        try:
            self.ingestor.receive_file(
                path,
                calling_ae=assoc.requestor.ae_title,
                called_ae=assoc.acceptor.ae_title,
                address=assoc.requestor.address,
            )
        except IngestError as exc:
            self.refused += 1
            logger.warning(
                "refused instance %s from %s with status 0x%04X: %s",
                sop_uid,
                assoc.requestor.ae_title,
                exc.status,
                exc,
            )
            return exc.status
        self.stored += 1
        return 0x0000
