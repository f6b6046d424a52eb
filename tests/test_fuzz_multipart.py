"""Fuzzing the STOW-RS multipart parser (pacs_node/web/multipart.py) with hypothesis.

Whatever a peer sends, in whatever chunks the socket delivers it, the parser
raises nothing but its own MultipartError, emits no more events than the body
has bytes, and never holds more than one chunk plus a bounded look-ahead (the
longest part headers it accepts, a delimiter): a body cannot make it loop or
grow without bound. Well-formed bodies come out part for part, byte for byte,
however they are cut. Bounded (a fixed number of examples, derandomized, a
deadline per example) so that the file runs in a few seconds.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs_node.web.multipart import (
    MAX_HEADER_BYTES,
    MultipartError,
    MultipartParser,
    PartEnd,
    PartStart,
    parse_accept,
    parse_media_type,
)

FUZZ = settings(
    max_examples=150,
    deadline=timedelta(milliseconds=500),
    derandomize=True,
    database=None,  # nothing written under .hypothesis/ in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=?"
boundaries = st.text(alphabet=BCHARS, min_size=1, max_size=70)
# bytes that look like multipart more often than random ones do
fragments = st.sampled_from([b"\r\n", b"--", b"\r\n\r\n", b"Content-Type: application/dicom", b":", b" ", b"\x00"])


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


def _held(parser: MultipartParser) -> int:
    """Bytes the parser keeps between feeds (its look-ahead buffer): what a body could make grow."""
    return len(parser._buf)


def _run(boundary: str, chunks: list[bytes]) -> list[PartStart | bytes | PartEnd]:
    """Feed every chunk, then close; checks the bounds on the way. Raises only MultipartError."""
    parser = MultipartParser(boundary)
    delimiter = len(boundary) + 4
    events: list[PartStart | bytes | PartEnd] = []
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        for event in parser.feed(chunk):
            events.append(event)
            assert len(events) <= 2 * fed + 2, "more events than bytes: the parser loops"
        assert _held(parser) <= len(chunk) + MAX_HEADER_BYTES + delimiter + 1024 + 2, "the look-ahead grows"
    parser.close()
    return events


@FUZZ
@given(
    boundary=boundaries,
    body=st.lists(st.one_of(st.binary(max_size=64), fragments), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    with_boundary=st.booleans(),
)
def test_any_body_in_any_chunks_raises_only_multipart_error(
    boundary: str, body: bytes, cuts: list[int], with_boundary: bool
) -> None:
    if with_boundary:  # bodies that hold the real delimiter reach the header and body states
        body = f"--{boundary}\r\n".encode() + body + f"\r\n--{boundary}".encode() + body[:3]
    try:
        events = _run(boundary, _chunked(body, cuts))
    except MultipartError:
        return
    data = sum(len(e) for e in events if isinstance(e, bytes))
    assert data <= len(body), "the parser made up bytes"


@FUZZ
@given(
    boundary=boundaries,
    parts=st.lists(
        st.tuples(st.sampled_from([None, "application/dicom", "text/plain; charset=x"]), st.binary(max_size=300)),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
    preamble=st.binary(max_size=20),
)
def test_well_formed_bodies_come_out_part_for_part(
    boundary: str, parts: list[tuple[str | None, bytes]], cuts: list[int], preamble: bytes
) -> None:
    delimiter = f"\r\n--{boundary}".encode()
    body = bytearray(preamble + b"\r\n" if preamble else b"")  # a preamble ends with the CRLF of the delimiter
    for ctype, content in parts:
        # a part's content never holds the delimiter (the sender picks the boundary so)
        content = content.replace(delimiter, b"")
        while delimiter in content:  # pragma: no cover - replace() may join two halves
            content = content.replace(delimiter, b"")
        body += f"--{boundary}\r\n".encode()
        body += (f"Content-Type: {ctype}\r\n" if ctype else "").encode() + b"\r\n" + content + b"\r\n"
    body += f"--{boundary}--\r\nepilogue".encode()
    events = _run(boundary, _chunked(bytes(body), cuts))
    got: list[tuple[str | None, bytes]] = []
    for event in events:
        if isinstance(event, PartStart):
            got.append((event.content_type, b""))
        elif isinstance(event, bytes):
            got[-1] = (got[-1][0], got[-1][1] + event)
    expected = [(ctype, content.replace(delimiter, b"")) for ctype, content in parts]
    assert [c for c, _ in got] == [c for c, _ in expected]
    assert [d for _, d in got] == [d for _, d in expected]
    assert sum(isinstance(e, PartEnd) for e in events) == len(parts)


@FUZZ
@given(st.text(max_size=300))
def test_media_types_and_accept_headers_of_any_text(value: str) -> None:
    try:
        media = parse_media_type(value)
        assert "/" in media.type
    except MultipartError:
        pass
    for media, q in parse_accept(value):
        assert q > 0 and media.type


def test_a_huge_body_in_small_chunks_is_held_in_bounded_memory() -> None:
    """64 MiB of one part's content, fed 64 KiB at a time: the look-ahead stays under a chunk plus a delimiter."""
    boundary = "b" * 70
    parser = MultipartParser(boundary)
    seen = 0
    list(parser.feed(f"--{boundary}\r\n\r\n".encode()))
    chunk = b"\r\n--" + b"b" * 69 + bytes(64 * 1024 - 73)  # almost a delimiter at every chunk's start
    for _ in range(1024):
        for event in parser.feed(chunk):
            seen += len(event) if isinstance(event, bytes) else 0
        assert _held(parser) < len(boundary) + 4
    for event in parser.feed(f"\r\n--{boundary}--".encode()):
        seen += len(event) if isinstance(event, bytes) else 0
    parser.close()
    assert seen == 1024 * len(chunk)
