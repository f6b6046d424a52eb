"""Plain, JSON-serialisable summaries of DICOM headers.

The router, the rule engine and the database work on a ``dict`` of
``keyword -> value`` rather than on pydicom datasets: it is cheap to store, easy
to test and safe to log at DEBUG. :func:`header_from_dataset` builds it from the
top-level elements of a dataset:

* text VRs become ``str`` (PN through ``str()``), truncated to
  :data:`MAX_TEXT` characters; a UT longer than that is left out;
* IS/DS/US/SS/UL/SL/UV/SV/FL/FD become ``int`` / ``float``;
* a value with VM > 1 becomes a ``list`` (more than :data:`MAX_VALUES` values:
  left out);
* sequences (SQ), bulk and binary data (OB/OW/OF/OD/OL/OV/UN), private and
  unknown tags (no keyword), group lengths and empty values are left out;
* a value that cannot be converted (malformed in the file) is left out and
  logged at DEBUG; building a header never raises for a bad value.

:func:`read_part10` reads what the receive path needs of a Part 10 file with
memory bounded whatever the file holds: the header (pixel data and values over
:data:`DEFER_BYTES` never loaded, at most :data:`MAX_HEADER_BYTES` read), the
layout of the whole data set (every element's value present in full, so a file
cut short is seen), and a Deflated Explicit VR Little Endian data set inflated
as a stream and refused beyond a size, where pydicom would inflate all of it
into memory first.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from pacs_node.errors import PacsNodeError

logger = logging.getLogger(__name__)

MAX_TEXT = 256
"""Strings are truncated to this many characters (a longer UT is left out)."""

MAX_VALUES = 256
"""Elements with more values than this are left out of the header."""

_SKIP_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "OW or OB"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
_INT_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV", "US or SS", "US or SS or OW"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})


class HeaderError(PacsNodeError):
    """A file's DICOM header cannot be read (unreadable or malformed file)."""


class NotDicomError(HeaderError):
    """The file is not a DICOM file (no DICM preamble and no readable dataset)."""


class MalformedDataset(HeaderError):
    """The data set's structure is broken: an element claims more bytes than the file holds, a sequence is
    never closed, a deflated stream is corrupt."""


class DatasetTooLarge(HeaderError):
    """The data set (inflated, when deflated) or its header is larger than the reader allows."""


class _SkipElementError(Exception):
    """Internal: leave this element out of the header."""


def _text(value: Any, vr: str) -> str:
    if isinstance(value, bytes | bytearray):
        raise _SkipElementError("undecoded bytes")
    text = str(value)  # PersonName, DA/DT/TM and UID all give their DICOM string
    text = text.rstrip("\x00 ")
    if len(text) > MAX_TEXT:
        if vr == "UT":
            raise _SkipElementError(f"UT longer than {MAX_TEXT} characters")
        text = text[:MAX_TEXT]
    return text


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise _SkipElementError(f"not an integer: {type(value).__name__}")
    if isinstance(value, str):
        value = float(value.strip())
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise _SkipElementError(f"not an integer: {value!r}")
    return int(number)


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise _SkipElementError(f"not a number: {type(value).__name__}")
    number = float(value.strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(number):
        raise _SkipElementError(f"not a finite number: {value!r}")
    return number


def _convert_one(value: Any, vr: str) -> str | int | float:
    if vr in _TEXT_VRS:
        return _text(value, vr)
    if vr in _INT_VRS:
        return _int(value)
    if vr in _FLOAT_VRS:
        return _float(value)
    if vr == "AT":
        if isinstance(value, BaseTag | int):
            return str(Tag(value))
        raise _SkipElementError("unreadable AT value")
    raise _SkipElementError(f"unsupported VR {vr}")


def _element_value(elem: DataElement) -> str | int | float | list[str | int | float] | None:
    """The header value of one element, ``None`` when it is empty.

    Raises:
        _SkipElementError: the element is left out of the header (with the reason).
    """
    vr = str(elem.VR)
    if vr in _SKIP_VRS:
        raise _SkipElementError(f"VR {vr} is not summarised")
    value = elem.value
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        items = list(value)
        if len(items) > MAX_VALUES:
            raise _SkipElementError(f"{len(items)} values (more than {MAX_VALUES})")
        if not items:
            return None
        converted = [_convert_one(item, vr) for item in items]
        if all(item == "" for item in converted):
            return None
        if len(converted) == 1:
            return converted[0]
        return converted
    if isinstance(value, str | bytes) and len(value) == 0:
        return None
    one = _convert_one(value, vr)
    return None if one == "" else one


def _elements(ds: pydicom.Dataset) -> Iterable[tuple[Any, DataElement | None, Exception | None]]:
    for tag in list(ds.keys()):
        try:
            yield tag, ds[tag], None
        except Exception as exc:  # broad on purpose: a malformed raw element must not stop the header
            yield tag, None, exc


def header_from_dataset(ds: pydicom.Dataset) -> dict[str, Any]:
    """Summarise the top-level elements of ``ds`` as a JSON-serialisable dict.

    Works on a full dataset, on one read with ``stop_before_pixels=True`` and on
    one without file meta (file meta elements are never included). See the module
    docstring for what is kept and how values are converted.

    Args:
        ds: the dataset to summarise; it is not modified.

    Returns:
        ``{keyword: value}`` where a value is ``str``, ``int``, ``float`` or a list
        of those, in tag order.

    Raises:
        Nothing for malformed values: an element that cannot be converted is left
        out and logged at DEBUG.
    """
    header: dict[str, Any] = {}
    for tag, elem, error in _elements(ds):
        tag = Tag(tag)
        if tag.is_private or tag.element == 0 or tag.group <= 0x0002:
            continue
        if elem is None:
            logger.debug("header: element %s left out: cannot be decoded (%s)", tag, error)
            continue
        keyword = elem.keyword
        if not keyword:
            continue
        try:
            value = _element_value(elem)
        except _SkipElementError as exc:
            logger.debug("header: %s %s left out: %s", keyword, tag, exc)
            continue
        except Exception as exc:  # broad on purpose: never raise for a malformed value
            logger.debug("header: %s %s left out: cannot convert (%s)", keyword, tag, exc)
            continue
        if value is not None:
            header[keyword] = value
    return header


def header_from_file(path: str | os.PathLike[str], *, max_dataset_bytes: int | None = 2 * 2**30) -> dict[str, Any]:
    """Read the header of a DICOM file (pixel data is not read) and summarise it.

    A Part 10 file is read by :func:`read_part10` (memory bounded, a deflated one
    inflated as a stream; a file cut short still gives the header it holds). A file
    without the ``DICM`` preamble is accepted when it still parses as a dataset
    with SOPClassUID and SOPInstanceUID (some archives write raw datasets).

    Args:
        path: the file to read.
        max_dataset_bytes: refuse a data set larger than this (inflated, for a deflated one).

    Returns:
        The header dict built by :func:`header_from_dataset`.

    Raises:
        NotDicomError: the file is not DICOM.
        DatasetTooLarge: the data set, or its header, is larger than allowed.
        HeaderError: the file cannot be read, or its header is corrupt.
    """
    path = Path(path)
    try:
        ds: pydicom.Dataset = read_part10(path, max_dataset_bytes=max_dataset_bytes, strict=False).header
    except NotDicomError:
        ds = _read_raw_dataset(path)
    return header_from_dataset(ds)


def _read_raw_dataset(path: Path) -> pydicom.Dataset:
    """Read a DICOM dataset without preamble, or say the file is not DICOM.

    Raises:
        NotDicomError: the file does not parse as a DICOM dataset.
        HeaderError: the file cannot be read.
    """
    not_dicom = NotDicomError(f"{path}: not a DICOM file (no 'DICM' preamble and no readable dataset)")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        sop_class = ds.get("SOPClassUID")
        sop_instance = ds.get("SOPInstanceUID")
    except OSError as exc:
        raise HeaderError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    except Exception as exc:  # arbitrary bytes make pydicom fail in many ways
        raise not_dicom from exc
    if not sop_class or not sop_instance:
        raise not_dicom
    return ds


# -- Part 10 files with bounded memory ---------------------------------------------------------------------------------

MAX_HEADER_BYTES = 64 * 2**20
"""A data set whose header (the elements before its pixel data, values over :data:`DEFER_BYTES` left
out) is larger than this is refused rather than read into memory."""

DEFER_BYTES = 2**20
"""Values longer than this are not loaded into the header (reading them later raises ``OSError``)."""

DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, PIXEL_DATA))  # where pydicom's stop_before_pixels stops

_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 32  # sequences nested deeper are refused (a recursion bomb otherwise)
_CHUNK = 1 << 16
_REWIND = 1 << 12  # how far back pydicom may seek in an inflated stream (it rewinds a tag or two)
_VR_32 = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # VRs with a 4-byte length (PS3.5 7.1.2)
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


@dataclass(frozen=True, slots=True)
class Part10:
    """What :func:`read_part10` found in a Part 10 file.

    Attributes:
        header: the data set without its pixel data (and without values over
            :data:`DEFER_BYTES`), with its file meta.
        transfer_syntax: the file meta's Transfer Syntax UID ('' when absent).
        dataset_bytes: length of the data set after the file meta (inflated, for a deflated one).
        pixel_data_length: the declared length of the top-level Pixel Data, ``None`` without one,
            :data:`UNDEFINED_LENGTH` when encapsulated.
        problem: what is broken in the data set's structure (read with ``strict=False``), or None.
    """

    header: FileDataset
    transfer_syntax: str
    dataset_bytes: int
    pixel_data_length: int | None
    problem: str | None = None


UNDEFINED_LENGTH = _UNDEFINED


class _Plain:
    """A data set in a file, from ``start`` on; positions are relative to ``start``."""

    def __init__(self, fh: IO[bytes], start: int, size: int) -> None:
        self._fh, self._start, self.size = fh, start, size
        self._fh.seek(start)
        self._pos = 0  # kept here: a buffered file's tell() asks the kernel

    def read(self, n: int = -1) -> bytes:
        out = self._fh.read(n)
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = max(offset + (self._pos if whence == 1 else 0), 0)
        self._fh.seek(self._start + target)
        self._pos = target
        return target

    def skip(self, n: int) -> int:
        """Move ``n`` bytes on; returns how many the data set still held."""
        got = min(n, max(self.size - self._pos, 0))
        self._fh.seek(got, 1)
        self._pos += got
        return got


class _Inflated:
    """A raw-deflate data set inflated as it is read: forward reads and skips, rewinds of at most
    :data:`_REWIND` bytes (all pydicom does), and never more than ``limit`` bytes inflated.

    Raises (from read, seek and skip):
        DatasetTooLarge: the stream inflates to more than ``limit`` bytes.
        MalformedDataset: the stream is not valid deflate data.
    """

    def __init__(self, fh: IO[bytes], start: int, limit: int) -> None:
        self._fh, self._limit = fh, limit
        self._fh.seek(start)
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()  # inflated bytes from position self._base on
        self._base = 0
        self._pos = 0
        self._eof = False

    @property
    def inflated(self) -> int:
        return self._base + len(self._buf)

    def _more(self) -> bool:
        """Inflate the next chunk into the buffer; False at the end of the stream."""
        while not self._eof:
            data = self._z.unconsumed_tail or self._fh.read(_CHUNK)
            try:
                out = self._z.decompress(data, _CHUNK) if data else self._z.flush()
            except zlib.error as exc:
                raise MalformedDataset(f"the deflated data set is corrupt: {exc}") from exc
            if not data or self._z.eof:
                self._eof = True
            if out:
                if self.inflated + len(out) > self._limit:
                    raise DatasetTooLarge(f"the deflated data set inflates to more than {self._limit // 2**20} MiB")
                # keep only what a rewind may still need
                drop = max(0, min(self._pos, self.inflated) - _REWIND - self._base)
                if drop:
                    del self._buf[:drop]
                    self._base += drop
                self._buf += out
                return True
        return False

    def _fill(self, end: int) -> None:
        while self.inflated < end and self._more():
            pass

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            while self._more():
                pass
            end = self.inflated
        else:
            end = self._pos + n
            self._fill(end)
        start = self._pos - self._base
        out = bytes(self._buf[start : end - self._base])
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset + (self._pos if whence == 1 else 0)
        if target < self._base:
            raise OSError(f"cannot seek back to {target} in an inflated stream (kept from {self._base})")
        while self.inflated < target:
            self._pos = self.inflated  # what lies between is skipped: the buffer need not keep it
            if not self._more():
                break
        self._pos = min(target, self.inflated)
        return self._pos

    def skip(self, n: int) -> int:
        here = self._pos
        return self.seek(here + n) - here


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Scanner:
    """Goes through a data set's elements, values skipped, over large reads of the stream."""

    def __init__(self, stream: _Plain | _Inflated, little: bool) -> None:
        self._stream = stream
        self._buf = b""
        self._off = 0
        #: bytes pydicom loads when it reads the header: the elements before the pixel data, but for
        #: values over DEFER_BYTES, which it skips
        self.header_bytes = 0
        e = "<" if little else ">"
        self._tag_vr_short = struct.Struct(e + "HH2sH").unpack_from
        self._tag_long = struct.Struct(e + "HHL").unpack_from
        self._long = struct.Struct(e + "L").unpack_from

    def _have(self, n: int) -> bool:
        """Whether ``n`` more bytes are buffered, reading on as needed."""
        if len(self._buf) - self._off >= n:
            return True
        self._buf = self._buf[self._off :] + self._stream.read(max(_CHUNK, n))
        self._off = 0
        return len(self._buf) >= n

    def _skip(self, n: int) -> int:
        avail = len(self._buf) - self._off
        if n <= avail:
            self._off += n
            return n
        self._buf, self._off = b"", 0
        return avail + self._stream.skip(n - avail)

    def _pos(self) -> int:
        return self._stream.tell() - (len(self._buf) - self._off)

    def walk(self, implicit: bool, depth: int = 0) -> int | None:
        """Go through a data set up to its end (or its item delimiter); return the top-level Pixel Data's length.

        Raises:
            MalformedDataset: an element or item claims more bytes than there are, or a sequence is never closed.
        """
        pixel_length: int | None = None
        in_header = depth == 0
        while True:
            if not self._have(8):
                if len(self._buf) == self._off and not depth:
                    return pixel_length
                raise MalformedDataset(
                    "the data set ends inside a sequence item" if depth else "the data set ends inside an element"
                )
            group, element, vr, short = self._tag_vr_short(self._buf, self._off)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and depth:
                    self._off += 8
                    return pixel_length
                raise MalformedDataset(f"item tag {_tag_text(tag)} where an element belongs")
            if implicit or (vr not in _VRS and not b"AA" <= vr <= b"ZZ"):  # pydicom reads the latter as implicit
                vr, (length,) = b"", self._long(self._buf, self._off + 4)
                self._off += 8
            elif vr in _VR_32:
                if not self._have(12):
                    raise MalformedDataset("the data set ends inside an element's header")
                (length,) = self._long(self._buf, self._off + 8)
                self._off += 12
            else:
                length = short
                self._off += 8
            if in_header and tag in _PIXEL_TAGS:
                in_header = False
            if depth == 0 and tag == PIXEL_DATA:
                pixel_length = length
            if length == _UNDEFINED:
                begin = self._pos()
                # UN of undefined length holds implicit VR little endian items (PS3.5 6.2.2)
                self.items(implicit or vr == b"UN", depth + 1, tag)
                if in_header:
                    self.header_bytes += self._pos() - begin
                continue
            if in_header and length <= DEFER_BYTES:
                self.header_bytes += length
            got = self._skip(length)
            if got < length:
                raise MalformedDataset(
                    f"element {_tag_text(tag)} declares {length} bytes but the data set ends after {got} of them"
                )

    def items(self, implicit: bool, depth: int, owner: int) -> None:
        """Go through the items of a sequence (or of encapsulated pixel data) up to its delimiter."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset(f"sequences nested more than {_MAX_DEPTH} deep")
        while True:
            if not self._have(8):
                raise MalformedDataset(f"the data set ends inside {_tag_text(owner)}, before its sequence delimiter")
            group, element, length = self._tag_long(self._buf, self._off)
            self._off += 8
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise MalformedDataset(f"{_tag_text(tag)} inside {_tag_text(owner)}, where an item belongs")
            if length == _UNDEFINED:
                self.walk(implicit, depth)
                continue
            got = self._skip(length)
            if got < length:
                raise MalformedDataset(
                    f"an item of {_tag_text(owner)} declares {length} bytes but the data set ends after {got} of them"
                )


def _file_meta(fh: IO[bytes], path: Path) -> tuple[bytes, FileMetaDataset, int]:
    """The preamble, the File Meta Information and the offset of the data set after it.

    Raises:
        NotDicomError: no 'DICM' prefix.
        MalformedDataset: the File Meta Information is cut short or unreadable.
    """
    preamble = fh.read(128)
    if len(preamble) < 128 or fh.read(4) != b"DICM":
        raise NotDicomError(f"{path.name}: not a DICOM Part 10 file (no 'DICM' prefix)")
    raw = bytearray()
    while True:  # group 0002 is always explicit VR little endian (PS3.10 7.1)
        head = fh.read(8)
        if len(head) < 8 or struct.unpack("<H", head[:2])[0] != 0x0002:
            break
        if head[4:6] in _VR_32:
            extra = fh.read(4)
            (length,) = struct.unpack("<L", extra) if len(extra) == 4 else (_UNDEFINED,)
            head += extra
        else:
            (length,) = struct.unpack("<H", head[6:])
        if length > DEFER_BYTES:
            raise MalformedDataset(f"{path.name}: a File Meta Information element of {length} bytes")
        value = fh.read(length)
        if len(value) < length:
            raise MalformedDataset(f"{path.name}: the File Meta Information is cut short")
        raw += head + value
    start = 132 + len(raw)
    try:
        meta = FileMetaDataset(read_dataset(io.BytesIO(bytes(raw)), False, True))
        for _ in meta:  # convert every element now: a malformed one raises here, not where it is used
            pass
    except Exception as exc:  # pydicom raises many kinds for corrupt data
        raise MalformedDataset(f"{path.name}: unreadable File Meta Information: {exc}") from exc
    return preamble, meta, start


def read_part10(path: str | os.PathLike[str], *, max_dataset_bytes: int | None, strict: bool = True) -> Part10:
    """Read a Part 10 file's header and check its structure, with memory bounded whatever it holds.

    Every element of the data set is gone through (values skipped, not read), so a
    value cut short anywhere, the pixel data included, is found; the header is then
    read by pydicom up to the pixel data, values over :data:`DEFER_BYTES` skipped.
    A deflated data set is inflated as a stream, twice (structure, then header) but
    never held whole.

    Args:
        path: the file.
        max_dataset_bytes: refuse a data set (inflated, for a deflated one) larger than this; None: no limit
            (memory stays bounded; a deflated one takes the time its inflating takes).
        strict: a broken structure raises; otherwise the header is read anyway (as far as
            it goes) and the problem noted in :attr:`Part10.problem`.

    Raises:
        NotDicomError: no 'DICM' prefix.
        MalformedDataset: the data set is cut short or its structure broken.
        DatasetTooLarge: the data set, or its header, is larger than allowed.
        HeaderError: the file cannot be read, or pydicom cannot parse the header.
    """
    path = Path(path)
    limit = max_dataset_bytes if max_dataset_bytes is not None else 1 << 62
    try:
        with open(path, "rb") as fh:
            preamble, meta, start = _file_meta(fh, path)
            ts = str(meta.get("TransferSyntaxUID", "") or "").rstrip("\0 ")
            implicit = ts == _IMPLICIT_VR_LITTLE_ENDIAN
            little = ts != _EXPLICIT_VR_BIG_ENDIAN

            def stream() -> _Plain | _Inflated:
                if ts == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                    return _Inflated(fh, start, limit)
                return _Plain(fh, start, os.fstat(fh.fileno()).st_size - start)

            layout = stream()
            if isinstance(layout, _Plain) and layout.size > limit:
                raise DatasetTooLarge(f"the data set is larger than {limit // 2**20} MiB")
            scanner = _Scanner(layout, little)
            problem = None
            try:
                pixel_length = scanner.walk(implicit)
            except MalformedDataset as exc:
                if strict:
                    raise
                pixel_length, problem = None, str(exc)
            size = layout.size if isinstance(layout, _Plain) else layout.tell()
            if scanner.header_bytes > MAX_HEADER_BYTES:
                raise DatasetTooLarge(
                    f"the data set holds {scanner.header_bytes // 2**20} MiB before its pixel data "
                    f"(at most {MAX_HEADER_BYTES // 2**20} MiB are read)"
                )
            source: Any = stream()  # read, seek and tell are all pydicom uses of it
            if isinstance(source, _Plain):
                fh.seek(start)
                source = fh  # pydicom reads a file faster than through a wrapper
            try:
                dataset = read_dataset(
                    source,
                    implicit,
                    little,
                    stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS,
                    defer_size=DEFER_BYTES,
                )
            except HeaderError:
                raise
            except Exception as exc:  # pydicom raises many kinds for corrupt data
                raise HeaderError(f"{path.name}: corrupt DICOM header: {exc}") from exc
    except OSError as exc:
        raise HeaderError(f"{path.name}: cannot read file: {exc.strerror or exc}") from exc
    header = FileDataset(str(path), dataset, preamble, meta, implicit, little)
    header.set_original_encoding(implicit, little, dataset._character_set)
    # Values left out (over DEFER_BYTES) stay out: without a source, reading one raises OSError
    # instead of re-reading a file that moves on (or, deflated, cannot be read at an offset).
    header.filename = None
    header.buffer = None
    return Part10(
        header=header, transfer_syntax=ts, dataset_bytes=size, pixel_data_length=pixel_length, problem=problem
    )
