"""DIMSE destinations: C-STORE SCU with status classification, for the dispatcher.

:func:`send_dimse` sends a batch over one association (presentation contexts
per SOP class, in Explicit and Implicit VR Little Endian and the file's own
transfer syntax); :func:`diagnose_connect` says in words why a connection
failed; :class:`DimseSender` is the :class:`~pacs_node.deliver.base.Sender`
for destinations of ``type: dimse`` and for return to sender. The plain SCU
tools of the CLI are in :mod:`pacs_node.deliver.scu`.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from pathlib import Path

from pacs_node.common.dicomnet import client_ssl_context
from pacs_node.common.dul import install as install_transport
from pacs_node.config import DimseDestination
from pacs_node.deliver.base import (
    NOT_ATTEMPTED,
    DestinationSettings,
    Item,
    Outcome,
    Sender,
    SendOptions,
    Target,
    classify_dimse_status,
    permanent,
    split_missing,
    transient,
)
from pacs_node.errors import ConfigError

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


def _dimse(destination: DestinationSettings) -> DimseDestination:
    if not isinstance(destination, DimseDestination):
        raise TypeError(f"a DIMSE sender needs a DIMSE destination, not {type(destination).__name__}")
    return destination


def _tls_args(target: Target, dest: DimseDestination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a destination: its client context and the name to verify; None for plain TCP.

    Raises:
        ConfigError: a TLS file cannot be loaded (names the key).
    """
    if dest.tls is None:
        return None
    return client_ssl_context(dest.tls, where=f"{target.where}.tls"), dest.tls.server_name or dest.host


def _file_transfer_syntax(path: Path) -> str | None:
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).TransferSyntaxUID)
    except Exception:
        return None


def diagnose_connect(host: str, port: int, tls_args: tuple[ssl.SSLContext, str] | None, timeout_s: float) -> str:
    """Why a connection to a peer fails, in words (a second, plain attempt made only after a failure)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if tls_args is None:
                return "the connection closed before the association was negotiated"
            ctx, name = tls_args
            with ctx.wrap_socket(sock, server_hostname=name):
                return "the connection closed before the association was negotiated"
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the peer's certificate is not trusted: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except ConnectionRefusedError:
        return "connection refused (is the peer running and listening on this port?)"
    except OSError as exc:
        return exc.strerror or str(exc)


def send_dimse(
    target: Target,
    items: Sequence[Item],
    *,
    calling_ae: str,
    timeout_s: float,
    stop: threading.Event | None = None,
) -> dict[int, Outcome]:
    """C-STORE ``items`` to a DIMSE peer over one association; one outcome per delivery id.

    Presentation contexts: one per SOP class among the items, proposing Explicit
    VR Little Endian, Implicit VR Little Endian and the file's own syntax when
    it is another (pynetdicom converts between the uncompressed ones).
    """
    from pydicom.errors import InvalidDicomError
    from pynetdicom import AE, evt

    dest = _dimse(target.destination)
    out, todo = split_missing(items)
    if not todo:
        return out
    try:
        tls_args = _tls_args(target, dest)
    except ConfigError as exc:
        return out | {i.delivery_id: permanent(str(exc)) for i in todo}

    syntaxes: dict[str, list[str]] = {}
    for item in todo:
        ts = syntaxes.setdefault(item.sop_class_uid, [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])
        own = _file_transfer_syntax(item.path)
        if own and own not in ts:
            ts.append(own)
    install_transport()  # among others, a reactor pause that holds between consecutive C-STOREs
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, ts in syntaxes.items():
        ae.add_requested_context(sop_class, ts)
    connected = threading.Event()
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        tls_args=tls_args,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.set())],
    )
    if not assoc.is_established:
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            prim = assoc.acceptor.primitive
            text = f"association rejected by {target.label}: {prim.result_str}, {prim.source_str}, {prim.reason_str}"
            outcome = permanent(text) if prim.result == 0x01 else transient(text)
        elif connected.is_set():
            hint = (
                " (over TLS this is how a peer refuses our client certificate, or the lack of one)" if tls_args else ""
            )
            outcome = transient(f"association with {target.label} aborted during negotiation{hint}")
        else:
            why = diagnose_connect(dest.host, dest.port, tls_args, timeout_s)
            outcome = transient(f"cannot connect to {target.label}: {why}")
        return out | {i.delivery_id: outcome for i in todo}
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for item in todo:
            if stop is not None and stop.is_set():
                out[item.delivery_id] = NOT_ATTEMPTED
                continue
            if not assoc.is_established:
                out[item.delivery_id] = transient(f"association with {target.label} ended before this instance")
                continue
            if item.sop_class_uid not in accepted:
                out[item.delivery_id] = permanent(
                    f"{target.label} accepted no presentation context for SOP class {item.sop_class_uid} "
                    f"({item.kind.value})"
                )
                continue
            try:
                status = assoc.send_c_store(str(item.path))
            except (InvalidDicomError, OSError) as exc:
                out[item.delivery_id] = permanent(f"file {item.path} cannot be read: {exc}", final=True)
                continue
            except (ValueError, AttributeError) as exc:
                out[item.delivery_id] = permanent(f"cannot send to {target.label}: {exc}")
                continue
            except RuntimeError as exc:
                out[item.delivery_id] = transient(f"association with {target.label} lost: {exc}")
                continue
            if not status or "Status" not in status:
                out[item.delivery_id] = transient(
                    f"no C-STORE response from {target.label} within {timeout_s:g} s or the association was aborted"
                )
                continue
            comment = str(status.ErrorComment) if "ErrorComment" in status else None
            out[item.delivery_id] = classify_dimse_status(int(status.Status), comment=comment)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


class DimseSender(Sender):
    """C-STORE SCU: one association per batch (``type: dimse``, and return to sender)."""

    def label(self, target: Target) -> str:
        d = _dimse(target.destination)
        return f"{target.name} ({d.ae_title}@{d.host}:{d.port}{' TLS' if d.tls else ''})"

    def describe(self, destination: DestinationSettings) -> tuple[str, str]:
        d = _dimse(destination)
        return "C-STORE SCU" + (" over TLS" if d.tls is not None else ""), f"`{d.ae_title}` at {d.host}:{d.port}"

    def check(self, target: Target) -> None:
        _tls_args(target, _dimse(target.destination))

    def send(self, target: Target, items: Sequence[Item], options: SendOptions) -> dict[int, Outcome]:
        calling_ae = _dimse(target.destination).calling_ae or options.ae_title
        return send_dimse(target, items, calling_ae=calling_ae, timeout_s=options.timeout_s, stop=options.stop)
