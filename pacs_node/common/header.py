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
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.errors import InvalidDicomError
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


def header_from_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the header of a DICOM file (pixel data is not read) and summarise it.

    A file without the ``DICM`` preamble is accepted when it still parses as a
    dataset with SOPClassUID and SOPInstanceUID (some archives write raw datasets).

    Args:
        path: the file to read.

    Returns:
        The header dict built by :func:`header_from_dataset`.

    Raises:
        NotDicomError: the file is not DICOM.
        HeaderError: the file cannot be read, or its header is corrupt.
    """
    path = Path(path)
    ds: pydicom.Dataset
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        ds = _read_raw_dataset(path)
    except OSError as exc:
        raise HeaderError(f"{path}: cannot read file: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom raises many kinds for corrupt files
        raise HeaderError(f"{path}: corrupt DICOM header: {exc}") from exc
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
