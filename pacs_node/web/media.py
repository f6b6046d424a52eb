"""Content negotiation for DICOMweb (PS3.18 8.7): which representation of an
instance or frame a client's Accept header allows.

Plain functions on strings, so the rules are tested without a server.
"""

from __future__ import annotations

from dataclasses import dataclass

from pacs_node.errors import PacsNodeError
from pacs_node.web.multipart import MediaType, parse_accept

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
#: Transfer syntaxes whose pixel data is not encapsulated.
NATIVE_SYNTAXES = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE})

#: Media type of a compressed frame by transfer syntax (PS3.18 Table 8.7.3-5).
FRAME_MEDIA: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}

DICOM_JSON = "application/dicom+json"


class NotAcceptable(PacsNodeError):
    """No representation we can send matches the Accept header (HTTP 406)."""


def _is_any(media: MediaType) -> bool:
    return media.type in ("*/*", "multipart/*")


@dataclass(frozen=True)
class DicomChoice:
    """How to send whole instances: as multipart or one bare body, and in which syntaxes."""

    multipart: bool
    any_syntax: bool
    syntaxes: frozenset[str]

    def send_as(self, stored: str | None) -> str | None:
        """The transfer syntax to send a file stored in ``stored`` in (the stored
        one means unchanged bytes); ``None`` when the client accepts neither."""
        if self.any_syntax or (stored is not None and stored in self.syntaxes):
            return stored or EXPLICIT_LE
        if EXPLICIT_LE in self.syntaxes:
            return EXPLICIT_LE
        return None


def negotiate_dicom(accept: str | None, *, single_ok: bool = False) -> DicomChoice:
    """Representation of whole instances the client accepts.

    ``multipart/related; type="application/dicom"`` without a transfer-syntax
    parameter means Explicit VR Little Endian (PS3.18 8.7.3.5.2);
    ``transfer-syntax=*`` or ``*/*`` means the stored bytes as they are. A bare
    ``application/dicom`` is a single-part answer, allowed for one instance only.

    Raises:
        NotAcceptable: nothing acceptable, with the ranges that would be.
    """
    choices: list[tuple[bool, str]] = []  # (multipart, syntax or "*")
    for media, _q in parse_accept(accept):
        if _is_any(media) or media.type == "application/*":
            choices.append((True, "*"))
        elif media.type == "multipart/related":
            part = (media.param("type") or "application/dicom").lower()
            if part in ("application/dicom", "*/*", "application/*"):
                choices.append(
                    (True, media.param("transfer-syntax") or ("*" if part != "application/dicom" else EXPLICIT_LE))
                )
        elif media.type == "application/dicom" and single_ok:
            choices.append((False, media.param("transfer-syntax") or EXPLICIT_LE))
    if not choices:
        raise NotAcceptable(
            f"cannot answer Accept: {accept!r}; this resource is sent as "
            'multipart/related; type="application/dicom" (optionally with transfer-syntax=* for the stored encoding)'
            + (" or as application/dicom" if single_ok else "")
        )
    multipart = choices[0][0]
    syntaxes = {ts for mp, ts in choices if mp == multipart}
    return DicomChoice(multipart, "*" in syntaxes, frozenset(syntaxes - {"*"}))


@dataclass(frozen=True)
class FrameChoice:
    """How to send frames: their stored (compressed) bytes or decoded native bytes."""

    original: bool
    content_type: str


def negotiate_frames(accept: str | None, stored: str) -> FrameChoice:
    """Representation of frames of an instance stored in transfer syntax ``stored``.

    Native pixel data is always sent as little endian
    ``application/octet-stream``. Compressed frames are sent as stored when the
    client accepts their media type, ``transfer-syntax=*`` or ``*/*``, and
    decoded to native bytes when it asks for ``application/octet-stream``
    without a transfer syntax (or with Explicit VR Little Endian).

    Raises:
        NotAcceptable: nothing acceptable.
    """
    native = stored in NATIVE_SYNTAXES
    octet = f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    own = FRAME_MEDIA.get(stored, "application/octet-stream")
    for media, _q in parse_accept(accept):
        if media.type == "multipart/related":
            part = (media.param("type") or "application/octet-stream").lower()
            ts = media.param("transfer-syntax")
        else:
            part, ts = media.type, media.param("transfer-syntax")
        if part in ("*/*", "multipart/*"):
            if native:
                return FrameChoice(True, octet)
            return FrameChoice(True, f"{own}; transfer-syntax={stored}")
        if part == "application/octet-stream":
            if native:
                if ts in (None, "*", EXPLICIT_LE):
                    return FrameChoice(True, octet)
                continue
            if ts in ("*", stored):
                return FrameChoice(True, f"application/octet-stream; transfer-syntax={stored}")
            if ts in (None, EXPLICIT_LE):
                return FrameChoice(False, octet)
            continue
        if not native and (part == own or part == own.split("/")[0] + "/*") and ts in (None, "*", stored):
            return FrameChoice(True, f"{own}; transfer-syntax={stored}")
    offered = ["application/octet-stream"] + ([own] if not native else [])
    raise NotAcceptable(
        f"cannot answer Accept: {accept!r} for frames stored in {stored}; offered: "
        + ", ".join(f'multipart/related; type="{m}"' for m in offered)
    )


def accepts_json(accept: str | None) -> bool:
    """Whether the client takes application/dicom+json (or plain JSON)."""
    for media, _q in parse_accept(accept):
        if media.type in ("*/*", "application/*", DICOM_JSON, "application/json"):
            return True
    return False
