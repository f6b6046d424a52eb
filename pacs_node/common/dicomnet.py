"""DICOM networking pieces the receive and deliver stages share: the Verification
SOP class, TCP_NODELAY, and the TLS contexts of DICOM TLS (server and client).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from pacs_node.config import DicomTlsSettings, TlsClientSettings
from pacs_node.errors import ConfigError

VERIFICATION = "1.2.840.10008.1.1"


def nodelay(sock: socket.socket | None) -> None:
    """Set TCP_NODELAY: without it each small DIMSE response can wait for a delayed ACK."""
    # Without TCP_NODELAY each small DIMSE response can wait for a delayed ACK.
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, where: str) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        missing = "cert_file" if not cert.exists() else "key_file"
        raise ConfigError(f"{where}.{missing}: no such file {exc.filename}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}.cert_file/key_file: cannot load the certificate {cert} with the key {key}: {exc}"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path, where: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.ca_file: cannot load CA certificates from {ca}: {exc}") from exc


def server_ssl_context(tls: DicomTlsSettings, *, where: str = "dicom.tls") -> ssl.SSLContext:
    """The SCP's TLS context: TLS 1.2+, our certificate, client certificates checked against ``ca_file``.

    Raises:
        ConfigError: a file cannot be read or does not hold what it should (names the key).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, tls.cert_file, tls.key_file, where)
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file, where)
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_ssl_context(tls: TlsClientSettings, *, where: str) -> ssl.SSLContext:
    """A TLS 1.2+ client context for a DIMSE peer: server verified unless ``verify`` is off.

    Args:
        tls: the destination's ``tls`` section.
        where: the settings key, for messages (``destinations.NAME.tls``).

    Raises:
        ConfigError: a file cannot be read or does not hold what it should (names the key).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_ca(ctx, tls.ca_file, where)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None and tls.key_file is not None:
        _load_chain(ctx, tls.cert_file, tls.key_file, where)
    return ctx
