"""Frames and bulk data out of stored files, reading only what is asked for.

Native (uncompressed) pixel data of a little endian file is read by seeking to
the frame's offset; encapsulated frames are located through the basic offset
table or the fragments, without loading the other frames. Decoding (for a
client that wants native bytes of a compressed instance) goes through
pydicom's pixel decoders.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames, get_frame
from pydicom.pixels import iter_pixels, pixel_array
from pydicom.uid import ExplicitVRLittleEndian

from pacs_node.errors import PacsNodeError
from pacs_node.web.dicomfile import dcmread_bounded
from pacs_node.web.media import EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, NATIVE_SYNTAXES

logger = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010


class FrameError(PacsNodeError):
    """A frame or bulk data element that does not exist (HTTP 404)."""


@dataclass(frozen=True)
class PixelInfo:
    """What locating frames needs from a file's header."""

    transfer_syntax: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int
    raw: RawDataElement | None

    @property
    def native(self) -> bool:
        """Pixel data is not encapsulated."""
        return self.transfer_syntax in NATIVE_SYNTAXES

    @property
    def frame_bits(self) -> int:
        """Bits of one native frame."""
        return self.rows * self.columns * self.samples * self.bits_allocated


def _header(path: Path) -> tuple[Dataset, PixelInfo]:
    try:
        ds = dcmread_bounded(path, defer_size=1024)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many kinds for malformed files
        raise FrameError(f"{path.name} is not a readable DICOM file: {exc}") from exc
    if PIXEL_DATA not in ds:
        raise FrameError("the instance has no Pixel Data")
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    try:
        info = PixelInfo(
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            samples=int(ds.get("SamplesPerPixel", 1) or 1),
            bits_allocated=int(ds.BitsAllocated),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            raw=raw if isinstance(raw, RawDataElement) else None,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise FrameError(f"the image pixel description of {path.name} is incomplete: {exc}") from exc
    return ds, info


def _check_numbers(numbers: list[int], info: PixelInfo) -> None:
    for n in numbers:
        if n < 1 or n > info.frames:
            raise FrameError(f"frame {n} does not exist: the instance has {info.frames} frame(s), numbered from 1")


def _seekable(info: PixelInfo) -> bool:
    raw = info.raw
    return (
        raw is not None
        and raw.value is None
        and raw.value_tell is not None
        and info.transfer_syntax in (IMPLICIT_LE, EXPLICIT_LE)
    )


def _native_pixels(path: Path, info: PixelInfo) -> bytes:
    """All native pixel data, little endian."""
    ds = dcmread_bounded(path)
    data = bytes(ds.PixelData)
    if info.transfer_syntax == EXPLICIT_BE and info.bits_allocated in (16, 32, 64):
        dtype = np.dtype(f">u{info.bits_allocated // 8}")
        data = np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes()
    return data


def _bits_slice(data: bytes, start_bit: int, n_bits: int) -> bytes:
    """``n_bits`` bits from ``start_bit`` of bit-packed data, repacked from bit 0 (little bit order)."""
    first = start_bit // 8
    last = (start_bit + n_bits + 7) // 8
    bits = np.unpackbits(np.frombuffer(data[first:last], dtype=np.uint8), bitorder="little")
    offset = start_bit - first * 8
    return np.packbits(bits[offset : offset + n_bits], bitorder="little").tobytes()


def native_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:
    """Native frames of an uncompressed instance (little endian bytes, 1-bit frames packed from bit 0).

    Raises:
        FrameError: no pixel data, compressed pixel data, or a frame number out of range.
    """
    _ds, info = _header(path)
    if not info.native:
        raise FrameError("the instance is compressed; use encapsulated_frames or decoded_frames")
    _check_numbers(numbers, info)
    bits = info.frame_bits
    if _seekable(info):
        assert info.raw is not None and info.raw.value_tell is not None
        base = info.raw.value_tell
        with open(path, "rb") as fh:
            for n in numbers:
                start = (n - 1) * bits
                if start % 8 == 0 and bits % 8 == 0:
                    fh.seek(base + start // 8)
                    yield fh.read(bits // 8)
                else:
                    fh.seek(base + start // 8)
                    chunk = fh.read((bits + 15) // 8)
                    yield _bits_slice(chunk, start % 8, bits)
        return
    data = _native_pixels(path, info)
    for n in numbers:
        start = (n - 1) * bits
        if start % 8 == 0 and bits % 8 == 0:
            yield data[start // 8 : (start + bits) // 8]
        else:
            yield _bits_slice(data, start, bits)


def _encapsulated_source(path: Path, info: PixelInfo, fh: BinaryIO) -> Any:
    raw = info.raw
    if raw is not None and raw.value is None and raw.value_tell is not None:
        fh.seek(raw.value_tell)
        return fh
    ds = dcmread_bounded(path)
    return bytes(ds.PixelData)


def encapsulated_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:
    """Frames of a compressed instance as stored (one codestream each).

    Raises:
        FrameError: no pixel data, native pixel data, or a frame number out of range.
    """
    _ds, info = _header(path)
    if info.native:
        raise FrameError("the instance is not compressed; use native_frames")
    _check_numbers(numbers, info)
    with open(path, "rb") as fh:
        for n in numbers:
            src = _encapsulated_source(path, info, fh)
            yield get_frame(src, n - 1, number_of_frames=info.frames)


def decoded_frames(path: Path, numbers: list[int]) -> Iterator[bytes]:
    """Frames of a compressed instance decoded to native little endian bytes.

    Raises:
        FrameError: no pixel data, a frame number out of range, or no decoder for the syntax.
    """
    _ds, info = _header(path)
    _check_numbers(numbers, info)
    for n in numbers:
        try:
            arr = pixel_array(str(path), index=n - 1)
        except Exception as exc:  # decoders raise many kinds
            raise FrameError(f"cannot decode frame {n} ({info.transfer_syntax}): {exc}") from exc
        yield np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).tobytes()


def all_encapsulated_frames(path: Path) -> Iterator[bytes]:
    """Every frame of a compressed instance as stored."""
    _ds, info = _header(path)
    with open(path, "rb") as fh:
        src = _encapsulated_source(path, info, fh)
        buffer = src.read() if hasattr(src, "read") else src
    yield from generate_frames(buffer, number_of_frames=info.frames)


def all_decoded_pixels(path: Path) -> bytes:
    """The whole Pixel Data as native little endian bytes: the element's value for
    uncompressed instances (1-bit frames stay packed back to back), every frame
    decoded and concatenated for compressed ones."""
    _ds, info = _header(path)
    if info.native:
        if _seekable(info):
            assert info.raw is not None and info.raw.value_tell is not None
            with open(path, "rb") as fh:
                fh.seek(info.raw.value_tell)
                return fh.read(info.raw.length)
        return _native_pixels(path, info)
    parts = []
    for arr in iter_pixels(str(path)):
        parts.append(np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).tobytes())
    return b"".join(parts)


def frame_count(path: Path) -> int:
    """Number of frames of an instance with pixel data.

    Raises:
        FrameError: the file has no pixel data or is not DICOM.
    """
    _ds, info = _header(path)
    return info.frames


def pixel_syntax(path: Path) -> str:
    """The transfer syntax a file is stored in.

    Raises:
        FrameError: the file has no pixel data or is not DICOM.
    """
    _ds, info = _header(path)
    return info.transfer_syntax


def bulk_value(path: Path, tag: int) -> bytes:
    """The value of a top-level binary element other than Pixel Data.

    Raises:
        FrameError: the element is absent or not binary.
    """
    try:
        ds = dcmread_bounded(path, defer_size=1024)
    except Exception as exc:  # pydicom raises many kinds for malformed files
        raise FrameError(f"{path.name} is not a readable DICOM file: {exc}") from exc
    if tag not in ds:
        raise FrameError(f"the instance has no element ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    elem = ds[tag]
    if elem.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        raise FrameError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is not bulk data (VR {elem.VR})")
    return bytes(elem.value or b"")


def transcode_to_explicit_le(path: Path) -> bytes:
    """The file re-encoded in Explicit VR Little Endian (decompressing when needed).

    Raises:
        FrameError: the pixel data cannot be decoded or the file not re-encoded
            (Explicit VR Big Endian files are sent only as stored).
    """
    try:
        ds = dcmread_bounded(path)
        ts = ds.file_meta.TransferSyntaxUID
        if ts == EXPLICIT_BE:
            raise FrameError("Explicit VR Big Endian instances are sent only as stored (transfer-syntax=*)")
        if ts.is_compressed:
            ds.decompress()
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    except FrameError:
        raise
    except Exception as exc:  # decoders and the writer raise many kinds
        raise FrameError(f"cannot re-encode {path.name} in Explicit VR Little Endian: {exc}") from exc
