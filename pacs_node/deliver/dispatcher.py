"""The dispatcher: sends stored results to their destinations and keeps score.

Rows, not calls: :func:`create_deliveries` adds one ``Delivery`` per output and
destination when a job's outputs are stored; the :class:`Dispatcher` loop

1. returns deliveries whose lease expired (a dispatcher that crashed or hung)
   to PENDING, and renews the leases of its own,
2. claims due PENDING deliveries of one destination atomically (``FOR UPDATE
   SKIP LOCKED`` on PostgreSQL; a conditional UPDATE that only one process wins
   on both databases), up to ``dispatch.batch_size``,
3. sends each batch over ONE association (C-STORE) or ONE STOW-RS request,
   checking every returned status, and
4. records each delivery's outcome: delivered (success or warning), retried
   after an exponential backoff with full jitter (transient), or failed for
   good (dead letter) with the reason.

Outputs carry deterministic SOP Instance UIDs, so a re-send after a crash or an
operator's retry replaces the destination's copy instead of adding another.

:func:`send_dimse` and :func:`send_stow` are plain functions (a destination and
files in, one :class:`Outcome` per delivery out); the loop is glue around them.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_node.common.dicomnet import client_ssl_context
from pacs_node.common.dul import install as install_transport
from pacs_node.config import (
    RETURN_TO_SENDER,
    DicomwebDestination,
    DimseDestination,
    DispatchSettings,
    ReturnToSender,
    Settings,
)
from pacs_node.errors import ConfigError
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Delivery, DeliveryState, Job, Output, OutputKind, Series, utcnow

logger = logging.getLogger(__name__)

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"

#: C-STORE warnings that still mean "stored" (PS3.4 B.2.3, PS3.7 C).
WARNING_TEXT = {
    0x0001: "warning",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
#: Failures that may pass: out of resources, resource limitation, processing failure, cancelled.
TRANSIENT_FAILURE_TEXT = {
    0x0110: "processing failure",
    0x0213: "resource limitation",
    0xFE00: "cancelled",
}


# -- outcomes -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one delivery in one attempt.

    Attributes:
        delivered: the destination holds the instance (success or warning).
        status: the DICOM status (C-STORE) or HTTP status (STOW-RS), when one came back.
        message: why it failed, or the warning it was stored with.
        permanent: the destination refused it in a way that retrying is unlikely to change.
        final: retrying cannot help at all (configuration, missing file): dead letter at once.
        attempted: False when it was never offered (the dispatcher was stopping); not counted.
        retry_after_s: the peer asked to wait at least this long (HTTP Retry-After).
        peer_text: what the peer said in its own words (DICOM ErrorComment, HTTP body): kept in
            ``last_error`` for the operator but logged at DEBUG only, since a peer may echo patient data.
    """

    delivered: bool
    status: int | None = None
    message: str | None = None
    permanent: bool = False
    final: bool = False
    attempted: bool = True
    retry_after_s: float | None = None
    peer_text: str | None = None

    @property
    def error_text(self) -> str | None:
        """``message`` plus the peer's own words, for ``last_error``."""
        if self.peer_text and self.message:
            return f"{self.message} (peer said: {self.peer_text})"
        return self.message


def _ok(status: int | None = None, warning: str | None = None) -> Outcome:
    return Outcome(True, status, warning)


def _transient(message: str, status: int | None = None, retry_after_s: float | None = None) -> Outcome:
    return Outcome(False, status, message, retry_after_s=retry_after_s)


def _permanent(message: str, status: int | None = None, *, final: bool = False) -> Outcome:
    return Outcome(False, status, message, permanent=True, final=final)


NOT_ATTEMPTED = Outcome(False, None, "not offered: the dispatcher was stopping", attempted=False)


def classify_dimse_status(status: int, *, comment: str | None = None) -> Outcome:
    """Map a C-STORE response status (or a STOW-RS FailureReason) to an outcome.

    Success 0x0000 and warnings (0xB000, 0xB006, 0xB007, 0x0107, 0x0116, 0x0001)
    are delivered. 0x0111 "duplicate SOP instance" is delivered with a warning:
    the peer holds that UID already (and kept its copy). Out of resources
    (0xA7xx), resource limitation (0x0213), processing failure (0x0110) and
    cancel (0xFE00) are transient; everything else (0xA9xx, 0xCxxx, 0x0122
    SOP class not supported, 0x0124 not authorised, ...) is permanent.
    """
    outcome = _classify_status(status)
    return replace(outcome, peer_text=comment or None)


def _classify_status(status: int) -> Outcome:
    if status == 0x0000:
        return _ok(status)
    if status in WARNING_TEXT or 0xB000 <= status <= 0xBFFF:
        return _ok(status, f"stored with warning 0x{status:04X} {WARNING_TEXT.get(status, 'warning')}")
    if status == 0x0111:
        return _ok(
            status,
            "peer reported 0x0111 duplicate SOP instance: it already holds this UID and kept its copy",
        )
    if 0xA700 <= status <= 0xA7FF:
        return _transient(f"refused 0x{status:04X}: out of resources", status)
    if status in TRANSIENT_FAILURE_TEXT:
        return _transient(f"failed 0x{status:04X}: {TRANSIENT_FAILURE_TEXT[status]}", status)
    if 0xA900 <= status <= 0xA9FF:
        return _permanent(f"refused 0x{status:04X}: data set does not match SOP class", status)
    if 0xC000 <= status <= 0xCFFF:
        return _permanent(f"failed 0x{status:04X}: cannot understand", status)
    if status == 0x0122:
        return _permanent("refused 0x0122: SOP class not supported", status)
    if status == 0x0124:
        return _permanent("refused 0x0124: not authorised", status)
    return _permanent(f"failed with status 0x{status:04X}", status)


def backoff_delay(
    attempts: int, settings: DispatchSettings, rng: random.Random | None = None, *, fraction: float | None = None
) -> float:
    """Seconds to wait after ``attempts`` failed attempts: full jitter over a capped exponential.

    ``fraction`` (0 to 1) replaces the random draw: the deliveries of one batch
    share it, so that they stay together and are retried in one association.
    """
    cap = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** max(0, attempts - 1))
    u = (rng or random).random() if fraction is None else fraction
    return u * cap


# -- what is sent where -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One claimed delivery with what sending it needs."""

    delivery_id: int
    path: Path
    sop_class_uid: str
    sop_uid: str
    kind: OutputKind


@dataclass(frozen=True)
class Target:
    """A resolved peer: a configured destination, or the sender of a job's series."""

    name: str  # the destination name (RETURN_TO_SENDER for return to sender)
    where: str  # the settings key, for messages
    destination: DimseDestination | DicomwebDestination

    @property
    def label(self) -> str:
        d = self.destination
        if isinstance(d, DimseDestination):
            return f"{self.name} ({d.ae_title}@{d.host}:{d.port}{' TLS' if d.tls else ''})"
        return f"{self.name} ({d.url})"


def resolve_sender(session: Session, settings: Settings, job_id: int) -> Target:
    """The DIMSE peer that sent a job's triggering series, for ``return_to_sender``.

    Raises:
        ConfigError: the route no longer asks for it, or the series arrived without a calling AE and
            address (over STOW-RS, or before they were recorded).
    """
    job = session.get(Job, job_id)
    if job is None:
        raise ConfigError(f"job {job_id} no longer exists")
    route = next((r for r in settings.routes if r.name == job.route), None)
    rts: ReturnToSender | None = route.return_to_sender if route is not None else None
    if rts is None:
        raise ConfigError(f"route {job.route!r} no longer has return_to_sender configured")
    series = None
    if job.trigger_series_uid:
        series = session.scalar(select(Series).where(Series.series_uid == job.trigger_series_uid))
    if series is None or not series.calling_ae or not series.source_address:
        raise ConfigError(
            f"return to sender: the series of job {job_id} did not arrive over DIMSE with a calling AE title "
            "and address, so there is no sender to return to"
        )
    try:
        dest = DimseDestination(
            type="dimse",
            host=series.source_address,
            port=rts.port,
            ae_title=series.calling_ae,
            calling_ae=None,
            seg_type=rts.seg_type,
            tls=rts.tls,
        )
    except ValueError as exc:
        raise ConfigError(f"return to sender: the recorded sender cannot be called: {exc}") from exc
    where = f"routes[{settings.routes.index(route)}].return_to_sender" if route is not None else "return_to_sender"
    return Target(RETURN_TO_SENDER, where, dest)


# -- DIMSE --------------------------------------------------------------------------------------------------------


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


def _split_missing(items: Sequence[Item]) -> tuple[dict[int, Outcome], list[Item]]:
    """(final failures for items whose file left the store, the items still to send)."""
    out: dict[int, Outcome] = {}
    todo: list[Item] = []
    for item in items:
        if not item.path.is_file():
            out[item.delivery_id] = _permanent(f"file {item.path} is missing from the store", final=True)
        else:
            todo.append(item)
    return out, todo


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

    dest = target.destination
    if not isinstance(dest, DimseDestination):
        raise TypeError(f"send_dimse needs a DIMSE destination, not {type(dest).__name__}")
    out, todo = _split_missing(items)
    if not todo:
        return out
    tls_args = None
    if dest.tls is not None:
        try:
            ctx = client_ssl_context(dest.tls, where=f"{target.where}.tls")
        except ConfigError as exc:
            return out | {i.delivery_id: _permanent(str(exc)) for i in todo}
        tls_args = (ctx, dest.tls.server_name or dest.host)

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
            outcome = _permanent(text) if prim.result == 0x01 else _transient(text)
        elif connected.is_set():
            hint = (
                " (over TLS this is how a peer refuses our client certificate, or the lack of one)" if tls_args else ""
            )
            outcome = _transient(f"association with {target.label} aborted during negotiation{hint}")
        else:
            why = diagnose_connect(dest.host, dest.port, tls_args, timeout_s)
            outcome = _transient(f"cannot connect to {target.label}: {why}")
        return out | {i.delivery_id: outcome for i in todo}
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for item in todo:
            if stop is not None and stop.is_set():
                out[item.delivery_id] = NOT_ATTEMPTED
                continue
            if not assoc.is_established:
                out[item.delivery_id] = _transient(f"association with {target.label} ended before this instance")
                continue
            if item.sop_class_uid not in accepted:
                out[item.delivery_id] = _permanent(
                    f"{target.label} accepted no presentation context for SOP class {item.sop_class_uid} "
                    f"({item.kind.value})"
                )
                continue
            try:
                status = assoc.send_c_store(str(item.path))
            except (InvalidDicomError, OSError) as exc:
                out[item.delivery_id] = _permanent(f"file {item.path} cannot be read: {exc}", final=True)
                continue
            except (ValueError, AttributeError) as exc:
                out[item.delivery_id] = _permanent(f"cannot send to {target.label}: {exc}")
                continue
            except RuntimeError as exc:
                out[item.delivery_id] = _transient(f"association with {target.label} lost: {exc}")
                continue
            if not status or "Status" not in status:
                out[item.delivery_id] = _transient(
                    f"no C-STORE response from {target.label} within {timeout_s:g} s or the association was aborted"
                )
                continue
            comment = str(status.ErrorComment) if "ErrorComment" in status else None
            out[item.delivery_id] = classify_dimse_status(int(status.Status), comment=comment)
    finally:
        if assoc.is_established:
            assoc.release()
    return out


# -- STOW-RS ------------------------------------------------------------------------------------------------------


def _dicom_json_sequence(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = body.get(tag) or {}
    value = element.get("Value") or []
    return [v for v in value if isinstance(v, dict)]


def _dicom_json_value(item: dict[str, Any], tag: str) -> Any:
    value = (item.get(tag) or {}).get("Value") or [None]
    return value[0]


def parse_stow_response(text: str) -> tuple[dict[str, int | None], dict[str, int], bool]:
    """Referenced (uid -> WarningReason or None) and failed (uid -> FailureReason) SOP instances of a
    STOW-RS response in DICOM JSON; the last value says whether it could be parsed."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}, {}, False
    body = data[0] if isinstance(data, list) and data else data
    if not isinstance(body, dict):
        return {}, {}, False
    stored: dict[str, int | None] = {}
    failed: dict[str, int] = {}
    for item in _dicom_json_sequence(body, "00081199"):  # ReferencedSOPSequence
        uid = _dicom_json_value(item, "00081155")
        if uid:
            warning = _dicom_json_value(item, "00081196")  # WarningReason
            stored[str(uid)] = int(warning) if warning is not None else None
    for item in _dicom_json_sequence(body, "00081198"):  # FailedSOPSequence
        uid = _dicom_json_value(item, "00081155")
        if uid:
            reason = _dicom_json_value(item, "00081197")  # FailureReason
            failed[str(uid)] = int(reason) if reason is not None else 0x0110
    return stored, failed, True


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - utcnow()).total_seconds())


def _multipart(items: Sequence[Item], boundary: str) -> tuple[int, Iterator[bytes]]:
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    tail = f"--{boundary}--\r\n".encode("ascii")
    sizes = [item.path.stat().st_size for item in items]
    length = sum(len(head) + size + 2 for size in sizes) + len(tail)

    def body() -> Iterator[bytes]:
        for item in items:
            yield head
            with item.path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield tail

    return length, body()


def stow_ssl(dest: DicomwebDestination, where: str) -> ssl.SSLContext | bool:
    """The ``verify`` argument for httpx: a context trusting ``ca_file``, the system's, or off.

    Raises:
        ConfigError: ``ca_file`` cannot be loaded (names the key).
    """
    if not dest.verify:
        return False
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(dest.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.ca_file: cannot load CA certificates from {dest.ca_file}: {exc}") from exc
    return ctx


def send_stow(target: Target, items: Sequence[Item], *, timeout_s: float) -> dict[int, Outcome]:
    """POST ``items`` to ``url/studies`` in one multipart/related STOW-RS request; one outcome per delivery id.

    The response's ReferencedSOPSequence and FailedSOPSequence decide each
    instance. HTTP 408, 429 and 5xx are transient (honouring Retry-After);
    other 4xx, 409 included, are permanent.
    """
    import httpx

    dest = target.destination
    if not isinstance(dest, DicomwebDestination):
        raise TypeError(f"send_stow needs a DICOMweb destination, not {type(dest).__name__}")
    out, todo = _split_missing(items)
    if not todo:
        return out

    def all_(outcome: Outcome) -> dict[int, Outcome]:
        return out | {i.delivery_id: outcome for i in todo}

    try:
        secret = dest.secret(target.name)
        verify = stow_ssl(dest, target.where)
    except ConfigError as exc:
        return all_(_permanent(str(exc)))
    boundary = uuid.uuid4().hex
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    auth: httpx.Auth | None = None
    if dest.auth == "bearer" and secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    elif dest.auth == "basic" and secret is not None:
        auth = httpx.BasicAuth(dest.username or "", secret)
    length, body = _multipart(todo, boundary)
    headers["Content-Length"] = str(length)
    url = f"{dest.url}/studies"
    try:
        # trust_env off: no proxy, netrc or CA bundle from the environment; the settings say everything.
        with httpx.Client(
            verify=verify, timeout=timeout_s, follow_redirects=False, auth=auth, trust_env=False
        ) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        return all_(_transient(f"STOW-RS to {target.label}: no response within {timeout_s:g} s"))
    except httpx.HTTPError as exc:
        return all_(_transient(f"STOW-RS to {target.label} failed: {str(exc) or type(exc).__name__}"))
    code = response.status_code
    stored, failed, parsed = parse_stow_response(response.text)
    where = f"{target.label}: HTTP {code}"
    if code in (200, 202, 409):
        for item in todo:
            if item.sop_uid in failed:
                reason = failed[item.sop_uid]
                cls = classify_dimse_status(reason)
                message = f"STOW-RS {where}, FailureReason 0x{reason:04X}: {cls.message}"
                out[item.delivery_id] = replace(cls, status=code, message=message, delivered=False)
            elif item.sop_uid in stored or (code == 200 and not failed):
                warning = stored.get(item.sop_uid)
                text = f"STOW-RS {where}, WarningReason 0x{warning:04X}" if warning is not None else None
                out[item.delivery_id] = _ok(code, text)
            elif code == 409:
                out[item.delivery_id] = _permanent(f"STOW-RS {where} (conflict): the server stored none", code)
            else:
                detail = "not listed in the response" if parsed else "unreadable response"
                out[item.delivery_id] = _transient(f"STOW-RS {where}: instance {detail}", code)
        return out
    said = " ".join(response.text.split())[:200] or None
    detail = f"STOW-RS {where}"
    if code in (408, 425, 429) or code >= 500:
        outcome = _transient(detail, code, _retry_after(response.headers.get("Retry-After")))
    elif code in (401, 403):
        outcome = _permanent(f"{detail} (check destinations.{target.name}.auth and its secret)", code)
    elif code == 413:
        outcome = _permanent(f"{detail} (request too large: lower dispatch.batch_size)", code)
    elif 300 <= code < 400:
        location = response.headers.get("Location", "?")
        outcome = _permanent(f"{detail}: redirected to {location}; set destinations.{target.name}.url", code)
    elif 200 <= code < 300:
        outcome = _ok(code, f"{detail} (unexpected success status)")
    else:
        outcome = _permanent(detail, code)
    return all_(replace(outcome, peer_text=said))


# -- claiming, recording ------------------------------------------------------------------------------------------


def _due(now: datetime) -> Any:
    return (Delivery.state == DeliveryState.PENDING) & (
        Delivery.next_attempt_at.is_(None) | (Delivery.next_attempt_at <= now)
    )


def due_destinations(db: Database, now: datetime | None = None) -> list[str]:
    """Destinations with at least one due PENDING delivery."""
    now = now or utcnow()
    with db.session() as session:
        return sorted(session.scalars(select(Delivery.destination).where(_due(now)).distinct()))


def claim(
    db: Database, destination: str, worker_id: str, *, limit: int, lease_s: float, now: datetime | None = None
) -> list[int]:
    """Move up to ``limit`` due PENDING deliveries of ``destination`` to IN_PROGRESS for ``worker_id``.

    Oldest first. Safe with several dispatchers on SQLite or PostgreSQL: rows
    locked by another claimer are skipped (PostgreSQL), and the conditional
    UPDATE re-checks the state, so a row is claimed by one dispatcher only.
    Each claim counts as an attempt.
    """
    now = now or utcnow()
    with db.session() as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(_due(now), Delivery.destination == destination)
                .order_by(Delivery.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return []
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.PENDING)
            .values(
                state=DeliveryState.IN_PROGRESS,
                worker_id=worker_id,
                lease_until=now + timedelta(seconds=lease_s),
                started_at=now,
                attempts=Delivery.attempts + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.id.in_(ids),
                    Delivery.state == DeliveryState.IN_PROGRESS,
                    Delivery.worker_id == worker_id,
                    Delivery.started_at == now,
                )
                .order_by(Delivery.id)
            )
        )


def reap_expired_leases(db: Database, settings: DispatchSettings, now: datetime | None = None) -> int:
    """IN_PROGRESS deliveries whose lease expired go back to PENDING (or fail past ``max_attempts``).

    A dispatcher renews its leases every poll; an expired lease means it
    crashed, hung or lost the database. Returns the number of rows changed.
    """
    now = now or utcnow()
    n = 0
    with db.session() as session:
        rows = session.scalars(
            select(Delivery)
            .where(Delivery.state == DeliveryState.IN_PROGRESS, Delivery.lease_until < now)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            owner = row.worker_id
            row.worker_id = None
            row.lease_until = None
            row.updated_at = now
            if row.attempts >= settings.max_attempts:
                row.state = DeliveryState.FAILED
                row.next_attempt_at = None
                row.last_error = (
                    f"its dispatcher ({owner}) stopped during attempt {row.attempts}; "
                    "not retried again (dispatch.max_attempts)"
                )
                logger.warning("delivery %d to %s FAILED: %s", row.id, row.destination, row.last_error)
            else:
                row.state = DeliveryState.PENDING
                row.next_attempt_at = now
                row.last_error = f"lease of dispatcher {owner} expired during attempt {row.attempts}; re-queued"
                logger.warning("delivery %d to %s re-queued: %s", row.id, row.destination, row.last_error)
            n += 1
    return n


def renew_leases(db: Database, worker_id: str, lease_s: float, now: datetime | None = None) -> int:
    """Extend the leases of every delivery ``worker_id`` holds; returns how many."""
    now = now or utcnow()
    with db.session() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.state == DeliveryState.IN_PROGRESS, Delivery.worker_id == worker_id)
            .values(lease_until=now + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def release(db: Database, worker_id: str) -> int:
    """Return every delivery ``worker_id`` holds to PENDING, due now, the attempt not counted."""
    now = utcnow()
    with db.session() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.state == DeliveryState.IN_PROGRESS, Delivery.worker_id == worker_id)
            .values(
                state=DeliveryState.PENDING,
                worker_id=None,
                lease_until=None,
                next_attempt_at=now,
                attempts=Delivery.attempts - 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def record(
    db: Database,
    outcomes: dict[int, Outcome],
    worker_id: str,
    settings: DispatchSettings,
    *,
    label: str = "",
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> dict[int, DeliveryState]:
    """Write the outcomes of one batch; returns each delivery's new state.

    Only rows still held by ``worker_id`` change (a lease that expired and was
    reclaimed by another dispatcher is left to it).
    """
    now = now or utcnow()
    states: dict[int, DeliveryState] = {}
    if not outcomes:
        return states
    with db.session() as session:
        rows = session.scalars(
            select(Delivery)
            .where(
                Delivery.id.in_(list(outcomes)),
                Delivery.state == DeliveryState.IN_PROGRESS,
                Delivery.worker_id == worker_id,
            )
            .with_for_update()
        ).all()
        held = {row.id for row in rows}
        fraction = (rng or random).random()  # one draw per batch: its deliveries are retried together
        for lost in sorted(set(outcomes) - held):
            logger.warning("delivery %d: outcome not recorded, its lease was taken over (%s)", lost, outcomes[lost])
        for row in rows:
            oc = outcomes[row.id]
            _apply(row, oc, settings, now, fraction)
            states[row.id] = row.state
            if oc.peer_text:
                logger.debug("delivery %d: %s said: %s", row.id, label or row.destination, oc.peer_text)
            if row.state is DeliveryState.DELIVERED and oc.message:
                logger.warning("delivery %d to %s delivered, %s", row.id, label or row.destination, oc.message)
            elif row.state is DeliveryState.FAILED:
                logger.warning("delivery %d to %s FAILED: %s", row.id, label or row.destination, verdict_of(row, oc))
            elif row.state is DeliveryState.PENDING and oc.attempted:
                logger.info(
                    "delivery %d to %s attempt %d failed (%s): %s; next attempt at %s",
                    row.id,
                    label or row.destination,
                    row.attempts,
                    "permanent" if oc.permanent else "transient",
                    oc.message,
                    row.next_attempt_at.isoformat(timespec="seconds") if row.next_attempt_at else "?",
                )
    return states


def _apply(row: Delivery, oc: Outcome, settings: DispatchSettings, now: datetime, fraction: float) -> None:
    row.worker_id = None
    row.lease_until = None
    row.updated_at = now
    if not oc.attempted:
        row.state = DeliveryState.PENDING
        row.attempts = max(0, row.attempts - 1)
        row.next_attempt_at = now
        return
    row.last_status = oc.status
    row.permanent = oc.permanent
    if oc.delivered:
        row.state = DeliveryState.DELIVERED
        row.delivered_at = now
        row.next_attempt_at = None
        row.last_error = oc.error_text  # the warning, if any
        return
    age = (now - row.created_at).total_seconds()
    if oc.final:
        verdict = "not retried: retrying cannot help"
    elif oc.permanent and row.attempts >= settings.permanent_max_attempts:
        verdict = f"refused permanently {row.attempts} times (dispatch.permanent_max_attempts)"
    elif row.attempts >= settings.max_attempts:
        verdict = f"gave up after {row.attempts} attempts (dispatch.max_attempts)"
    elif age >= settings.max_age_s:
        verdict = f"gave up: older than dispatch.max_age_s ({settings.max_age_s:g} s) after {row.attempts} attempts"
    else:
        delay = backoff_delay(row.attempts, settings, fraction=fraction)
        if oc.retry_after_s is not None:
            delay = min(max(delay, oc.retry_after_s), settings.backoff_max_s)
        row.state = DeliveryState.PENDING
        row.next_attempt_at = now + timedelta(seconds=delay)
        row.last_error = oc.error_text
        return
    row.state = DeliveryState.FAILED
    row.next_attempt_at = None
    row.last_error = f"{oc.error_text}; {verdict}"


def verdict_of(row: Delivery, oc: Outcome) -> str:
    """A failed delivery's reason without the peer's own words (for logs above DEBUG)."""
    text = row.last_error or ""
    if oc.peer_text and oc.error_text and text.startswith(oc.error_text):
        return f"{oc.message}{text[len(oc.error_text) :]}"
    return text


def load_items(session: Session, store: FileStore, ids: Sequence[int]) -> list[tuple[Item, int]]:
    """The claimed deliveries with their files, and each one's job id."""
    rows = session.execute(
        select(Delivery.id, Delivery.job_id, Output.path, Output.sop_class_uid, Output.sop_uid, Output.kind)
        .join(Output, Output.id == Delivery.output_id)
        .where(Delivery.id.in_(list(ids)))
        .order_by(Delivery.id)
    ).all()
    return [(Item(r[0], store.path(r[2]), r[3], r[4], r[5]), r[1]) for r in rows]


# -- the loop -----------------------------------------------------------------------------------------------------


class Dispatcher:
    """Claims due deliveries and sends them, one batch per destination at a time.

    Args:
        settings: the node's settings (``dispatch``, ``destinations``, ``routes``, ``dicom.ae_title``).
        db: the database.
        store: the file store the outputs are in.
        worker_id: this dispatcher's lease owner name (default: host, process id and a random tag,
            so that a restarted process never mistakes an old lease for its own).
    """

    def __init__(self, settings: Settings, db: Database, store: FileStore, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:dispatch:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the destinations' secrets and TLS files (errors are logged), then poll in a thread."""
        if self._thread is not None:
            return
        for line in self.check_destinations():
            logger.error("%s", line)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()
        logger.info(
            "dispatcher %s started: %d destinations, batches of %d, up to %d in parallel",
            self.worker_id,
            len(self.settings.destinations),
            self.settings.dispatch.batch_size,
            self.settings.dispatch.concurrency,
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running batches finish their current instance, release what is left.

        Waits at most ``timeout`` seconds (default ``dispatch.timeout_s`` + 5) for running batches.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        limit = self.settings.dispatch.timeout_s + 5 if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            running = list(self._inflight.values())
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("dispatcher stopping: %s did not finish within %g s", thread.name, limit)
        try:
            n = release(self.db, self.worker_id)
            if n:
                logger.info("dispatcher stopping: %d deliveries returned to the queue", n)
        except Exception:
            logger.exception("could not release held deliveries; their leases will expire")

    def wake(self) -> None:
        """Poll now (new deliveries were queued)."""
        self._wake.set()

    def check_destinations(self) -> list[str]:
        """Problems with the destinations' secrets and TLS files, one line each (empty when all is well)."""

        problems: list[str] = []
        for name, dest in self.settings.destinations.items():
            where = f"destinations.{name}"
            try:
                if isinstance(dest, DimseDestination):
                    if dest.tls is not None:
                        client_ssl_context(dest.tls, where=f"{where}.tls")
                else:
                    dest.secret(name)
                    stow_ssl(dest, where)
            except ConfigError as exc:
                problems.append(f"destination {name} cannot be used until this is fixed: {exc}")
        for i, route in enumerate(self.settings.routes):
            if route.return_to_sender is not None and route.return_to_sender.tls is not None:
                try:
                    client_ssl_context(route.return_to_sender.tls, where=f"routes[{i}].return_to_sender.tls")
                except ConfigError as exc:
                    problems.append(f"route {route.name} cannot return results to senders: {exc}")
        return problems

    # -- one pass -------------------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """One synchronous pass: reap, then send one batch for each destination with due deliveries.

        Returns the number of deliveries attempted.
        """
        reap_expired_leases(self.db, self.settings.dispatch)
        n = 0
        for destination in due_destinations(self.db):
            n += self.process(destination)
        return n

    def process(self, destination: str) -> int:
        """Claim one batch of ``destination`` and send it; returns how many deliveries were in it."""
        ds = self.settings.dispatch
        ids = claim(self.db, destination, self.worker_id, limit=ds.batch_size, lease_s=ds.lease_s)
        if not ids:
            return 0
        try:
            self._send_batch(destination, ids)
        except Exception:
            logger.exception("dispatching %d deliveries to %s failed unexpectedly", len(ids), destination)
            outcomes = {i: _transient("internal error in the dispatcher; see the node's log") for i in ids}
            record(self.db, outcomes, self.worker_id, ds, label=destination)
        return len(ids)

    def _send_batch(self, destination: str, ids: list[int]) -> None:
        ds = self.settings.dispatch
        groups: dict[str, tuple[Target | None, list[Item], str]] = {}
        with self.db.session() as session:
            for item, job_id in load_items(session, self.store, ids):
                if destination == RETURN_TO_SENDER:
                    try:
                        target: Target | None = resolve_sender(session, self.settings, job_id)
                        problem = ""
                    except ConfigError as exc:
                        target, problem = None, str(exc)
                else:
                    dest = self.settings.destinations.get(destination)
                    target = Target(destination, f"destinations.{destination}", dest) if dest is not None else None
                    problem = "" if dest is not None else f"destination {destination!r} is no longer configured"
                key = target.label if target is not None else f"unresolved: {problem}"
                groups.setdefault(key, (target, [], problem))[1].append(item)
        for _key, (target, items, problem) in groups.items():
            if target is None:
                outcomes = {i.delivery_id: _permanent(problem, final=True) for i in items}
                record(self.db, outcomes, self.worker_id, ds, label=destination)
                continue
            if isinstance(target.destination, DimseDestination):
                outcomes = send_dimse(
                    target,
                    items,
                    calling_ae=target.destination.calling_ae or self.settings.dicom.ae_title,
                    timeout_s=ds.timeout_s,
                    stop=self._stop,
                )
            else:
                outcomes = send_stow(target, items, timeout_s=ds.timeout_s)
            states = record(self.db, outcomes, self.worker_id, ds, label=target.label)
            done = sum(1 for s in states.values() if s is DeliveryState.DELIVERED)
            log = logger.info if done == len(items) else logger.warning
            log("sent %d instances to %s: %d delivered", len(items), target.label, done)
            for item in items:
                logger.debug("delivery %d: %s %s -> %s", item.delivery_id, item.kind.value, item.sop_uid, target.name)

    def _run(self) -> None:
        ds = self.settings.dispatch
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("dispatcher pass failed; will try again")
            self._wake.wait(ds.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        """One pass of the loop: reap and renew leases, start a batch thread for each idle destination with work."""
        ds = self.settings.dispatch
        reap_expired_leases(self.db, ds)
        with self._lock:
            self._inflight = {k: t for k, t in self._inflight.items() if t.is_alive()}
            busy = set(self._inflight)
        if busy:
            renew_leases(self.db, self.worker_id, ds.lease_s)
        for destination in due_destinations(self.db):
            if self._stop.is_set():
                return
            with self._lock:
                if destination in self._inflight or len(self._inflight) >= ds.concurrency:
                    continue
                thread = threading.Thread(
                    target=self._batch_thread, args=(destination,), name=f"dispatch-{destination}", daemon=True
                )
                self._inflight[destination] = thread
            thread.start()

    def _batch_thread(self, destination: str) -> None:
        try:
            while not self._stop.is_set() and self.process(destination) > 0:
                pass  # keep draining this destination while it has due work
        except Exception:
            logger.exception("dispatcher batch for %s failed", destination)
        finally:
            self._wake.set()
