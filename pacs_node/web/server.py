"""Runs the HTTP application with uvicorn in a background thread of ``serve``.

The listening socket is bound in :meth:`HttpServer.start` itself, so that a
port in use is reported there (naming ``http.port``) and the bound port is
known at once (``http.port: 0`` picks a free one, for tests).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Mapping

import uvicorn

from pacs_node.config import Settings
from pacs_node.errors import ConfigError, PacsNodeError
from pacs_node.receive.ingest import Ingestor
from pacs_node.web.app import create_app
from pacs_node.web.auth import check_bind, load_token
from pacs_node.web.context import HttpContext
from storage.db import Database
from storage.filestore import FileStore

logger = logging.getLogger(__name__)


class HttpServer:
    """DICOMweb, the JSON API, /healthz, /metrics and /conformance over HTTP.

    Args:
        settings: the node's settings (the ``http`` section says where and how).
        db: the database.
        store: the file store.
        ingestor: the receive path STOW-RS feeds (the same one as the SCP's).
        environ: where ``http.token_env`` is looked up (default ``os.environ``).

    Raises:
        ConfigError: the token cannot be read, or a non-loopback ``http.host``
            without a token and without ``http.allow_remote_without_token``.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: FileStore,
        ingestor: Ingestor,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        token = load_token(settings.http, environ)
        check_bind(settings.http, token)
        self.context = HttpContext(settings, db, store, ingestor, token=token)
        self.app = create_app(self.context)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the free one picked when ``http.port`` is 0).

        Raises:
            RuntimeError: not started.
        """
        if self._port is None:
            raise RuntimeError("HTTP server not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server (loopback when bound to all addresses)."""
        host = self.settings.http.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _bind(self) -> socket.socket:
        http = self.settings.http
        try:
            infos = socket.getaddrinfo(http.host, http.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(f"http.host: cannot resolve {http.host!r}: {exc}") from exc
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"http.host/http.port: cannot listen on {http.host}:{http.port}: {exc.strerror}") from exc
        sock.setblocking(False)
        return sock

    def start(self, timeout: float = 30.0) -> None:
        """Bind, then serve in a background thread; returns once requests are answered.

        Raises:
            ConfigError: the address cannot be bound.
            PacsNodeError: the server did not come up within ``timeout`` seconds.
        """
        if self._thread is not None:
            return
        sock = self._bind()
        self._socket = sock
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_config=None,  # only main() configures logging
            access_log=False,  # request lines carry query strings, which may name patients
            lifespan="off",
            server_header=False,
            forwarded_allow_ips="127.0.0.1,::1",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                self._cleanup()
                raise PacsNodeError("the HTTP server stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise PacsNodeError(f"the HTTP server did not start within {timeout:g} s")
            time.sleep(0.01)
        http = self.settings.http
        logger.info(
            "HTTP server on %s:%d (DICOMweb at %s/dicom-web), %s",
            http.host,
            self._port,
            (http.public_url or self.url).rstrip("/"),
            "bearer token required"
            if self.context.token
            else "no token (loopback only)"
            if not http.allow_remote_without_token
            else "no token (http.allow_remote_without_token)",
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let running requests finish (5 s at most), then return."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the HTTP server thread did not stop within %g s", 2 * timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            except OSError:
                pass
        self._socket = None
        self._thread = None
        self._server = None
