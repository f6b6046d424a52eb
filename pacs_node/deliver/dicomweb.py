"""DICOMweb destinations: STOW-RS user agent with per-instance outcomes, for the dispatcher.

:func:`send_stow` POSTs a batch as one multipart/related request (streamed
from the files, Content-Length known in advance) and reads each instance's
fate from the DICOM JSON response (:func:`parse_stow_response`), honouring
Retry-After on 408/425/429/5xx; :func:`stow_ssl` builds the TLS verification
from the destination's settings; :class:`StowSender` is the
:class:`~pacs_node.deliver.base.Sender` for destinations of ``type: dicomweb``.
"""

from __future__ import annotations

import email.utils
import json
import ssl
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import timezone
from typing import Any

from pacs_node.config import DicomwebDestination
from pacs_node.deliver.base import (
    DestinationSettings,
    Item,
    Outcome,
    Sender,
    SendOptions,
    Target,
    classify_dimse_status,
    ok,
    permanent,
    split_missing,
    transient,
)
from pacs_node.errors import ConfigError
from storage.models import utcnow


def _dicomweb(destination: DestinationSettings) -> DicomwebDestination:
    if not isinstance(destination, DicomwebDestination):
        raise TypeError(f"a STOW-RS sender needs a DICOMweb destination, not {type(destination).__name__}")
    return destination


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


def _credentials(target: Target, dest: DicomwebDestination) -> tuple[str | None, ssl.SSLContext | bool]:
    """(the password or token, httpx's ``verify``) for a request to ``dest``.

    Raises:
        ConfigError: the secret or ``ca_file`` cannot be read (names the key).
    """
    return dest.secret(target.name), stow_ssl(dest, target.where)


def send_stow(target: Target, items: Sequence[Item], *, timeout_s: float) -> dict[int, Outcome]:
    """POST ``items`` to ``url/studies`` in one multipart/related STOW-RS request; one outcome per delivery id.

    The response's ReferencedSOPSequence and FailedSOPSequence decide each
    instance. HTTP 408, 429 and 5xx are transient (honouring Retry-After);
    other 4xx, 409 included, are permanent.
    """
    import httpx

    dest = _dicomweb(target.destination)
    out, todo = split_missing(items)
    if not todo:
        return out

    def all_(outcome: Outcome) -> dict[int, Outcome]:
        return out | {i.delivery_id: outcome for i in todo}

    try:
        secret, verify = _credentials(target, dest)
    except ConfigError as exc:
        return all_(permanent(str(exc)))
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
        return all_(transient(f"STOW-RS to {target.label}: no response within {timeout_s:g} s"))
    except httpx.HTTPError as exc:
        return all_(transient(f"STOW-RS to {target.label} failed: {str(exc) or type(exc).__name__}"))
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
                out[item.delivery_id] = ok(code, text)
            elif code == 409:
                out[item.delivery_id] = permanent(f"STOW-RS {where} (conflict): the server stored none", code)
            else:
                detail = "not listed in the response" if parsed else "unreadable response"
                out[item.delivery_id] = transient(f"STOW-RS {where}: instance {detail}", code)
        return out
    said = " ".join(response.text.split())[:200] or None
    detail = f"STOW-RS {where}"
    if code in (408, 425, 429) or code >= 500:
        outcome = transient(detail, code, _retry_after(response.headers.get("Retry-After")))
    elif code in (401, 403):
        outcome = permanent(f"{detail} (check destinations.{target.name}.auth and its secret)", code)
    elif code == 413:
        outcome = permanent(f"{detail} (request too large: lower dispatch.batch_size)", code)
    elif 300 <= code < 400:
        location = response.headers.get("Location", "?")
        outcome = permanent(f"{detail}: redirected to {location}; set destinations.{target.name}.url", code)
    elif 200 <= code < 300:
        outcome = ok(code, f"{detail} (unexpected success status)")
    else:
        outcome = permanent(detail, code)
    return all_(replace(outcome, peer_text=said))


class StowSender(Sender):
    """STOW-RS: one request per batch (``type: dicomweb``)."""

    def label(self, target: Target) -> str:
        return f"{target.name} ({_dicomweb(target.destination).url})"

    def describe(self, destination: DestinationSettings) -> tuple[str, str]:
        d = _dicomweb(destination)
        return "STOW-RS" + (f" ({d.auth} auth)" if d.auth != "none" else ""), d.url

    def check(self, target: Target) -> None:
        _credentials(target, _dicomweb(target.destination))

    def send(self, target: Target, items: Sequence[Item], options: SendOptions) -> dict[int, Outcome]:
        return send_stow(target, items, timeout_s=options.timeout_s)
