"""DICOM JSON (PS3.18 Annex F): from the index's header summaries and from files.

:func:`element` turns one ``keyword -> value`` pair of a ``Series.header``
summary into a DICOM JSON attribute; :func:`instance_metadata` reads a stored
file's header (bulk values are never read: they become ``BulkDataURI`` links)
and :class:`MetadataCache` keeps the encoded result of recently read files.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pacs_node.web.dicomfile import dcmread_bounded

logger = logging.getLogger(__name__)

#: Top-level binary values longer than this are given as BulkDataURI.
BULK_THRESHOLD = 1024
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "OW or OB"})
_NUMBER_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "US or SS"})
_INT_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "UV", "SV", "US or SS"})
AVAILABLE_TRANSFER_SYNTAX = "00083002"
#: Pixel Data, Float Pixel Data, Double Float Pixel Data: always given as BulkDataURI.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class UnknownAttribute(ValueError):
    """A name that is neither a DICOM keyword nor a tag."""


def attribute_tag(name: str) -> int:
    """The tag of a keyword (``PatientName``) or hex tag (``00100010``, ``0010,0010``).

    Raises:
        UnknownAttribute: neither a keyword of the dictionary nor a tag.
    """
    text = name.strip()
    tag = tag_for_keyword(text)
    if tag is not None:
        return int(tag)
    hex_text = text.replace(",", "").replace("(", "").replace(")", "")
    if len(hex_text) == 8:
        try:
            return int(hex_text, 16)
        except ValueError:
            pass
    raise UnknownAttribute(f"{name!r} is not a DICOM keyword or tag")


def tag_key(tag: int) -> str:
    """The DICOM JSON key of a tag (``"0020000D"``)."""
    return f"{tag:08X}"


def keyword(tag: int) -> str | None:
    """The keyword of a tag, ``None`` for private or unknown tags."""
    return keyword_for_tag(tag) or None


def _vr_of(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    if " or " in vr:
        vr = vr.split(" or ")[0]
    return vr


def _one(value: Any, vr: str) -> Any:
    if vr == "PN":
        return {"Alphabetic": str(value)}
    if vr in _NUMBER_VRS:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        try:
            number = float(str(value).strip())
        except ValueError:
            return str(value)
        return int(number) if vr in _INT_VRS and number == int(number) else number
    return str(value)


def element(name_or_tag: str | int, value: Any) -> tuple[str, dict[str, Any]]:
    """One DICOM JSON attribute from a header summary value.

    ``value`` is what :func:`pacs_node.common.header.header_from_dataset` stores: a
    string, number or list of those; ``None`` or ``""`` gives an empty attribute.

    Raises:
        UnknownAttribute: the name is not a keyword or tag.
    """
    tag = name_or_tag if isinstance(name_or_tag, int) else attribute_tag(name_or_tag)
    vr = _vr_of(tag)
    out: dict[str, Any] = {"vr": vr}
    if value is None or value == "" or value == []:
        return tag_key(tag), out
    values = value if isinstance(value, list) else [value]
    if vr in _BINARY_VRS or vr == "SQ":
        return tag_key(tag), out  # summaries never hold these; leave the attribute empty
    out["Value"] = [_one(v, vr) for v in values]
    return tag_key(tag), out


def attributes(items: Iterable[tuple[str | int, Any]]) -> dict[str, dict[str, Any]]:
    """A DICOM JSON object from ``(keyword or tag, value)`` pairs, in tag order."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in items:
        key, attr = element(name, value)
        out[key] = attr
    return dict(sorted(out.items()))


def from_header(header: Mapping[str, Any], tags: Iterable[int] | None = None) -> dict[str, dict[str, Any]]:
    """DICOM JSON of a header summary, optionally only ``tags`` (absent ones are skipped)."""
    if tags is None:
        pairs = [(k, v) for k, v in header.items() if tag_for_keyword(k) is not None]
    else:
        pairs = []
        for tag in tags:
            kw = keyword(tag)
            if kw and kw in header:
                pairs.append((kw, header[kw]))
    return attributes(pairs)


# -- files -------------------------------------------------------------------------------------------------------------


def _binary_vr(raw: RawDataElement, bits_allocated: int | None) -> str:
    vr = str(raw.VR) if raw.VR else _vr_of(int(raw.tag))
    if " or " in vr or vr == "":
        vr = "OW" if (bits_allocated or 8) > 8 else "OB"
    return vr


def instance_metadata(path: Path, bulk_base: str | None) -> dict[str, Any]:
    """The DICOM JSON of a stored file without its bulk data.

    Top-level binary values longer than :data:`BULK_THRESHOLD` bytes (pixel
    data above all) are not read: they become ``BulkDataURI`` links to
    ``{bulk_base}/bulk/{tag}``, or are left out when ``bulk_base`` is None.
    Available Transfer Syntax UID (0008,3002) says how the file is encoded.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not DICOM.
    """
    try:
        ds = dcmread_bounded(path, defer_size=BULK_THRESHOLD)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many kinds for malformed files
        raise ValueError(f"{path.name}: not a readable DICOM file: {exc}") from exc
    out: dict[str, Any] = {}
    bits = None
    try:
        bits = int(ds.get("BitsAllocated") or 0) or None
    except Exception:
        bits = None
    for tag in list(ds.keys()):
        tag = Tag(tag)
        try:
            raw = ds.get_item(tag, keep_deferred=True)
            if isinstance(raw, RawDataElement):
                deferred = raw.value is None
                vr = (
                    _binary_vr(raw, bits)
                    if (raw.VR in _BINARY_VRS or (not raw.VR and _vr_of(tag) in _BINARY_VRS))
                    else None
                )
                length = raw.length if deferred else len(raw.value or b"")
                if vr is not None and (deferred or length > BULK_THRESHOLD or tag in PIXEL_TAGS):
                    if bulk_base is not None:
                        out[tag_key(tag)] = {"vr": vr, "BulkDataURI": f"{bulk_base}/bulk/{tag_key(tag)}"}
                    continue
            elem = ds[tag]
            if elem.VR in _BINARY_VRS and not elem.is_empty and (len(elem.value) > BULK_THRESHOLD or tag in PIXEL_TAGS):
                if bulk_base is not None:
                    out[tag_key(tag)] = {"vr": str(elem.VR), "BulkDataURI": f"{bulk_base}/bulk/{tag_key(tag)}"}
                continue
            if elem.VR in _BINARY_VRS:
                attr: dict[str, Any] = {"vr": str(elem.VR)}
                if not elem.is_empty:
                    attr["InlineBinary"] = base64.b64encode(elem.value).decode("ascii")
                out[tag_key(tag)] = attr
                continue
            out[tag_key(tag)] = elem.to_json_dict(None, BULK_THRESHOLD)
        except Exception as exc:  # a malformed element must not hide the rest
            logger.debug("metadata of %s: element %s left out (%s)", path.name, tag, exc)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        out[AVAILABLE_TRANSFER_SYNTAX] = {"vr": "UI", "Value": [str(meta.TransferSyntaxUID)]}
    return dict(sorted(out.items()))


class MetadataCache:
    """Encoded :func:`instance_metadata` of recently read files (LRU, thread-safe).

    Entries are keyed by path, size and modification time, so that a file
    replaced in the store (a re-sent instance, a re-run's output) is read again.

    Args:
        max_entries: most files remembered.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int, int, str | None], bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, path: Path, bulk_base: str | None) -> bytes:
        """The metadata of ``path`` as encoded JSON (an object).

        Raises:
            OSError: the file cannot be read.
            ValueError: the file is not DICOM.
        """
        st = os.stat(path)
        key = (str(path), st.st_mtime_ns, st.st_size, bulk_base)
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        data = json.dumps(instance_metadata(path, bulk_base), ensure_ascii=False, separators=(",", ":")).encode()
        with self._lock:
            self._entries[key] = data
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return data

    def get_dict(self, path: Path, bulk_base: str | None) -> dict[str, Any]:
        """The metadata of ``path`` decoded (a fresh dict the caller may change)."""
        result: dict[str, Any] = json.loads(self.get(path, bulk_base))
        return result
