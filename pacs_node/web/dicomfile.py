"""A first look at a DICOM file's bytes before pydicom parses it, so that what is not DICOM, or a
deflated data set that would inflate beyond reason, is refused for the price of a few reads.

pydicom parses whatever it is given: a megabyte of zeros after ``DICM`` costs
it seconds of CPU, and a Deflated Explicit VR Little Endian file is inflated
whole in memory (``zlib.decompress``) before any element is read, so a small
upload can ask for gigabytes. :func:`read_file_meta` reads the File Meta
Information from the first bytes of a Part 10 file (preamble, ``DICM``, group
0002 in Explicit VR Little Endian) and :func:`check_inflated_size` inflates a
deflated data set in slices, counting, and stops at :data:`MAX_INFLATED_BYTES`.
STOW-RS, the rule tester and WADO-RS call them before pydicom does.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread

PREAMBLE_LENGTH = 128
#: Where the File Meta Information starts in a Part 10 file: after the preamble and ``DICM``.
META_START = PREAMBLE_LENGTH + 4
#: How much of a file's start :func:`read_file_meta` is given (a File Meta group is a few hundred bytes).
HEAD_BYTES = 64 * 1024
#: Largest size a deflated data set may inflate to (the node refuses it beyond: a decompression bomb).
MAX_INFLATED_BYTES = 256 * 2**20
DEFLATED_EXPLICIT_LE = "1.2.840.10008.1.2.1.99"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_CHUNK = 256 * 1024
_OUT_CHUNK = 1 << 20


class NotDicomFile(ValueError):
    """The bytes are not a DICOM Part 10 file (the message says what is missing)."""


class InflateLimitError(ValueError):
    """A deflated data set inflates beyond :data:`MAX_INFLATED_BYTES`."""


@dataclass(frozen=True)
class FileMeta:
    """What :func:`read_file_meta` found.

    Attributes:
        transfer_syntax: the Transfer Syntax UID (0002,0010), or None when the bytes given end before it.
        end: where the data set starts, or None when the bytes given end inside the File Meta group.
    """

    transfer_syntax: str | None
    end: int | None

    @property
    def deflated(self) -> bool:
        """Whether the data set is deflated (Deflated Explicit VR Little Endian)."""
        return self.transfer_syntax == DEFLATED_EXPLICIT_LE


def read_file_meta(head: bytes) -> FileMeta:
    """The File Meta Information of a Part 10 file from its first bytes (any number of them).

    Args:
        head: the file's first bytes, preamble included.

    Raises:
        NotDicomFile: no ``DICM`` after the 128-byte preamble, no group 0002 after it, an element without an
            explicit VR, or a group without a Transfer Syntax UID.
    """
    if len(head) < META_START or head[PREAMBLE_LENGTH:META_START] != b"DICM":
        raise NotDicomFile("no 'DICM' after the 128-byte preamble")
    pos = META_START
    syntax: str | None = None
    seen = 0
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            if not seen:
                raise NotDicomFile("no File Meta Information (group 0002) after 'DICM'")
            if syntax is None:
                raise NotDicomFile("the File Meta Information has no Transfer Syntax UID (0002,0010)")
            return FileMeta(syntax, pos)
        vr = head[pos + 4 : pos + 6]
        if not (vr.isalpha() and vr.isupper()):
            raise NotDicomFile(f"File Meta element (0002,{elem:04X}) has no explicit VR")
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            value_at, length = pos + 12, struct.unpack_from("<I", head, pos + 8)[0]
            if length == 0xFFFFFFFF:
                raise NotDicomFile(f"File Meta element (0002,{elem:04X}) has an undefined length")
        else:
            value_at, length = pos + 8, struct.unpack_from("<H", head, pos + 6)[0]
        if elem == 0x0010 and value_at + length <= len(head):
            syntax = head[value_at : value_at + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = value_at + length
        seen += 1
    return FileMeta(syntax, None)


def exceeds_inflated(fh: BinaryIO, limit: int = MAX_INFLATED_BYTES) -> bool:
    """Whether the raw deflate stream from ``fh``'s position inflates to more than ``limit`` bytes.

    The stream is inflated a slice at a time and the output thrown away, so memory stays at a few
    megabytes whatever the stream holds. A stream that is not valid deflate data counts as not
    exceeding (pydicom reports it when it reads the file).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while chunk := fh.read(_CHUNK):
            data = chunk
            while True:
                out = inflater.decompress(data, _OUT_CHUNK)
                total += len(out)
                if total > limit:
                    return True
                data = inflater.unconsumed_tail
                if inflater.eof or (not data and len(out) < _OUT_CHUNK):
                    break
            if inflater.eof:
                break
    except zlib.error:
        return False
    return False


def check_inflated_size(path: Path, limit: int = MAX_INFLATED_BYTES) -> FileMeta | None:
    """Refuse a deflated file that inflates beyond ``limit``; anything else passes untouched.

    Returns:
        The file's meta information, or None when it has none (not a Part 10 file: pydicom decides).

    Raises:
        InflateLimitError: the data set is deflated and inflates beyond ``limit``.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
        try:
            meta = read_file_meta(head)
        except NotDicomFile:
            return None
        if meta.deflated and meta.end is not None:
            fh.seek(meta.end)
            if exceeds_inflated(fh, limit):
                raise InflateLimitError(_too_large(limit))
    return meta


def dcmread_bounded(path: Path, **kwargs: Any) -> Dataset:
    """``pydicom.dcmread(path, **kwargs)`` after :func:`check_inflated_size`.

    Raises:
        InflateLimitError: a deflated data set inflates beyond :data:`MAX_INFLATED_BYTES`.
        OSError: the file cannot be read.
        Exception: whatever pydicom raises for a malformed file.
    """
    check_inflated_size(path)
    return dcmread(path, **kwargs)


def check_upload(data: bytes, limit: int = MAX_INFLATED_BYTES) -> None:
    """Refuse, before pydicom sees it, an uploaded file that is not DICOM at all, or whose deflated data set
    inflates beyond ``limit``. A Part 10 file, File Meta Information without the preamble, or a bare data
    set (group 0008 first, as some archives write them) passes on to pydicom.

    Raises:
        NotDicomFile: neither of those.
        InflateLimitError: the data set is deflated and inflates beyond ``limit``.
    """
    if data[PREAMBLE_LENGTH:META_START] == b"DICM":
        prefix = b""
    elif data[:2] == b"\x02\x00":  # File Meta Information without the preamble: pydicom reads it with force
        prefix = bytes(PREAMBLE_LENGTH) + b"DICM"
    elif data[:2] == b"\x08\x00":
        return
    else:
        raise NotDicomFile("no 'DICM' after the 128-byte preamble and no DICOM data set at the start")
    meta = read_file_meta(prefix + data[:HEAD_BYTES])
    if meta.deflated and meta.end is not None:
        stream = io.BytesIO(data)
        stream.seek(meta.end - len(prefix))
        if exceeds_inflated(stream, limit):
            raise InflateLimitError(_too_large(limit))


def _too_large(limit: int) -> str:
    return f"its deflated data set inflates to more than {limit // 2**20} MiB; the node does not read it"
