"""multipart/related (RFC 2387) for DICOMweb: an incremental parser for
request bodies and a writer for responses.

:class:`MultipartParser` is sans-I/O: feed it the body in chunks as they come
off the socket and it yields events (:class:`PartStart`, data, :class:`PartEnd`)
without ever holding more than one chunk plus a delimiter's length of a part in
memory, so that STOW-RS can write each part straight to a file.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from pacs_node.errors import PacsNodeError

MAX_HEADER_BYTES = 16 * 1024
"""Longest header block of one part we accept."""


class MultipartError(PacsNodeError):
    """The body is not well-formed multipart (missing boundary, truncated, ...)."""


@dataclass(frozen=True)
class MediaType:
    """A media type with its parameters (names lower-cased, values unquoted)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        """A parameter's value, ``None`` when absent."""
        return self.params.get(name.lower())


def _split_top_level(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    out: list[str] = []
    buf: list[str] = []
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
            continue
        if ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
            continue
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    out.append("".join(buf))
    return out


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_media_type(value: str) -> MediaType:
    """Parse ``type/subtype; name=value; ...`` (quoted values allowed).

    Raises:
        MultipartError: there is no ``type/subtype``.
    """
    parts = _split_top_level(value, ";")
    mtype = parts[0].strip().lower()
    if "/" not in mtype:
        raise MultipartError(f"not a media type: {value!r}")
    params: dict[str, str] = {}
    for item in parts[1:]:
        if not item.strip():
            continue
        name, _, raw = item.partition("=")
        params[name.strip().lower()] = _unquote(raw)
    return MediaType(mtype, params)


def parse_accept(value: str | None) -> list[tuple[MediaType, float]]:
    """The media ranges of an Accept header with their q-values, best first.

    A missing or empty header is ``*/*``. Ranges with ``q=0`` are dropped.
    """
    if not value or not value.strip():
        return [(MediaType("*/*"), 1.0)]
    out: list[tuple[int, MediaType, float]] = []
    for i, item in enumerate(_split_top_level(value, ",")):
        if not item.strip():
            continue
        try:
            media = parse_media_type(item)
        except MultipartError:
            continue
        q = 1.0
        if "q" in media.params:
            try:
                q = float(media.params.pop("q"))
            except ValueError:
                q = 1.0
        if q > 0:
            out.append((i, media, q))
    out.sort(key=lambda t: (-t[2], t[0]))
    return [(m, q) for _, m, q in out]


# -- parsing -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartStart:
    """A part begins; ``headers`` are lower-cased names to values."""

    index: int
    headers: dict[str, str]

    @property
    def content_type(self) -> str | None:
        """The part's Content-Type header, if any."""
        return self.headers.get("content-type")


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete."""

    index: int


Event = PartStart | bytes | PartEnd

_PREAMBLE, _HEADERS, _BODY, _AFTER_DELIMITER, _EPILOGUE = range(5)


class MultipartParser:
    """Incremental multipart body parser.

    Args:
        boundary: the ``boundary`` parameter of the Content-Type.

    Raises:
        MultipartError: an empty or over-long boundary.
    """

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("the multipart boundary must be 1 to 200 characters long")
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        # The first boundary may open the body without a preceding CRLF.
        self._buf = bytearray(b"\r\n")
        self._state = _PREAMBLE
        self._index = -1

    @property
    def done(self) -> bool:
        """The closing delimiter has been seen."""
        return self._state == _EPILOGUE

    def feed(self, data: bytes) -> Iterator[Event]:
        """Consume ``data``; yields the events it completes.

        Raises:
            MultipartError: malformed part headers.
        """
        if self._state == _EPILOGUE:
            return  # anything after the closing delimiter is ignored
        self._buf += data
        while True:
            if self._state == _PREAMBLE:
                i = self._buf.find(self._delimiter)
                if i < 0:
                    # keep only what could still be the start of a delimiter
                    keep = len(self._delimiter) - 1
                    if len(self._buf) > keep:
                        del self._buf[: len(self._buf) - keep]
                    return
                del self._buf[: i + len(self._delimiter)]
                self._state = _AFTER_DELIMITER
            elif self._state == _AFTER_DELIMITER:
                if len(self._buf) < 2:
                    return
                if self._buf[:2] == b"--":
                    self._state = _EPILOGUE
                    self._buf.clear()
                    return
                eol = self._buf.find(b"\r\n")
                if eol < 0:
                    if len(self._buf) > 1024:
                        raise MultipartError("garbage after a multipart boundary")
                    return
                if self._buf[:eol].strip(b" \t"):
                    raise MultipartError("garbage after a multipart boundary")
                del self._buf[: eol + 2]
                self._state = _HEADERS
            elif self._state == _HEADERS:
                if self._buf[:2] == b"\r\n":
                    raw = b""
                    del self._buf[:2]
                else:
                    end = self._buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self._buf) > MAX_HEADER_BYTES:
                            raise MultipartError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
                        return
                    raw = bytes(self._buf[:end])
                    del self._buf[: end + 4]
                self._index += 1
                yield PartStart(self._index, _parse_headers(raw))
                self._state = _BODY
            elif self._state == _BODY:
                i = self._buf.find(self._delimiter)
                if i >= 0:
                    if i:
                        yield bytes(self._buf[:i])
                    del self._buf[: i + len(self._delimiter)]
                    yield PartEnd(self._index)
                    self._state = _AFTER_DELIMITER
                    continue
                safe = len(self._buf) - (len(self._delimiter) - 1)
                if safe > 0:
                    yield bytes(self._buf[:safe])
                    del self._buf[:safe]
                return
            else:  # pragma: no cover - _EPILOGUE returns above
                return

    def close(self) -> None:
        """Signal the end of the body.

        Raises:
            MultipartError: the closing delimiter never came (truncated body).
        """
        if self._state == _PREAMBLE:
            raise MultipartError("no multipart boundary found in the body (is the boundary parameter right?)")
        if self._state != _EPILOGUE:
            raise MultipartError("the body ended before the closing multipart boundary (truncated request?)")


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not raw:
        return headers
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes anything
        raise MultipartError("undecodable part headers") from exc
    name = None
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t") and name is not None:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MultipartError(f"malformed part header line {line[:80]!r}")
        name = name.strip().lower()
        headers[name] = value.strip()
    return headers


# -- writing -----------------------------------------------------------------------------------------------------------


def new_boundary() -> str:
    """A boundary that cannot occur in DICOM content by chance."""
    return f"pacs-node-{uuid.uuid4().hex}"


def multipart_content_type(boundary: str, part_type: str) -> str:
    """``multipart/related; type="..."; boundary=...`` for a response."""
    return f'multipart/related; type="{part_type}"; boundary={boundary}'


def part_header(boundary: str, content_type: str, *, location: str | None = None, first: bool = False) -> bytes:
    """The delimiter and headers that open one part."""
    lines = [("" if first else "\r\n") + f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing(boundary: str) -> bytes:
    """The closing delimiter."""
    return f"\r\n--{boundary}--\r\n".encode("latin-1")
