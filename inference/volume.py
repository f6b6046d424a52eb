"""DICOM series -> a 3D volume with its patient-space geometry.

Plain functions on plain data: pydicom datasets in, a :class:`Volume` out (a numpy
array plus origin, spacing and direction in the DICOM patient coordinate system,
LPS: +x towards the patient's left, +y posterior, +z head).

Conventions used throughout this module
---------------------------------------

* ``Volume.array`` is indexed ``[z, y, x]`` = ``[slice, row, column]``; slices are
  in the order of increasing position along the slice normal
  ``n = row_direction x column_direction`` (the cross product of the two
  ImageOrientationPatient triplets), never in InstanceNumber order.
* Index triplets handed to :meth:`Volume.index_to_lps` / returned by
  :meth:`Volume.lps_to_index` are in ``(x, y, z)`` = ``(column, row, slice)``
  order, the order SimpleITK uses: ``array[z, y, x]`` is the voxel at index
  ``(x, y, z)``.
* ``spacing`` is ``(column spacing, row spacing, slice spacing)`` in mm. DICOM's
  PixelSpacing is ``[row spacing, column spacing]``, so ``spacing[0]`` is
  ``PixelSpacing[1]``.
* ``direction`` is a 3x3 matrix whose *columns* are the unit vectors (in LPS) of
  increasing x, y and z index: ``[row_dir, col_dir, n]``. A voxel at index
  ``(i, j, k)`` lies at ``origin + direction @ (spacing * (i, j, k))``.

Series that are not a regular grid are refused with a specific
:class:`~inference.errors.GeometryError` that says what to do: missing slices,
mixed orientations, several images at one position (diffusion b-values, echoes)
and gantry tilt (the last one can be resampled on request).

Diffusion series are split with :func:`split_by_b_value` /
:func:`select_b_value` before they are turned into volumes; other series of the
same study (ADC, FLAIR) are brought onto the DWI grid with :func:`resample_to`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, TypeAlias

import numpy as np
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.pixels import pixel_array as _decode_pixels

from inference.errors import (
    DuplicateSlicesError,
    GantryTiltError,
    GeometryError,
    MissingSlicesError,
    MixedOrientationError,
    NoMatchingBValueError,
    PixelDataError,
)

__all__ = [
    "FrameSelection",
    "Interpolation",
    "SeriesItem",
    "Volume",
    "b_value",
    "is_multiframe",
    "is_trace",
    "number_of_frames",
    "resample_to",
    "select_b_value",
    "split_by_b_value",
    "stack_channels",
    "volume_from_datasets",
]

logger = logging.getLogger(__name__)

#: Default largest difference between ImageOrientationPatient direction cosines
#: that still counts as "the same orientation" (about 0.06 degrees).
ORIENTATION_TOLERANCE = 1e-3

#: Default relative tolerance on slice spacing, gaps and in-plane offsets
#: (1 % of the nominal slice spacing) when ``tolerance_mm`` is not given.
RELATIVE_SPACING_TOLERANCE = 0.01

_SIEMENS_CREATOR = "SIEMENS MR HEADER"  # (0019,xx0C) B_value
_GE_CREATOR = "GEMS_PARM_01"  # (0043,xx39) slop_int_6..9, first value = b-value
_PHILIPS_CREATOR = "Philips Imaging DD 001"  # (2001,xx03) Diffusion B-Factor (FL)
_MAX_LISTED = 5  # how many offending items an error message lists


# --------------------------------------------------------------------------- Volume


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image on a regular grid in DICOM patient space (LPS), with its provenance.

    Attributes:
        array: Voxel values indexed ``[z, y, x]`` (slice, row, column).
            :func:`volume_from_datasets` makes float32 (rescaled) values; label
            maps made with :meth:`with_array` keep their own dtype.
        origin: LPS position in mm of the centre of voxel ``[0, 0, 0]`` (float64, shape (3,)).
        spacing: ``(x, y, z)`` = (column, row, slice) spacing in mm.
        direction: 3x3 float64; its columns are the LPS unit vectors of increasing
            x, y and z index.
        sop_uids: Slice index -> SOP Instance UID that holds that slice (for a
            multi-frame instance the same UID repeats). Empty when the volume does
            not come from DICOM (:meth:`from_sitk` without ``like``).
        frame_numbers: Slice index -> 1-based frame number inside ``sop_uids[k]``
            when the volume comes from multi-frame instances, else ``None``.
        series_uid: Series Instance UID of the source series ("" if unknown).
        frame_of_reference_uid: Frame of Reference UID of the source ("" if unknown).

    Raises:
        GeometryError: On construction, if the array is not 3D, the origin /
            spacing / direction have the wrong shape, a spacing is not positive,
            or ``sop_uids`` / ``frame_numbers`` do not have one entry per slice.
    """

    array: np.ndarray
    origin: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray
    sop_uids: tuple[str, ...] = ()
    frame_numbers: tuple[int, ...] | None = None
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    _inverse: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise GeometryError(f"a Volume needs a 3D array indexed [z, y, x]; got shape {array.shape}")
        origin = np.array(self.origin, dtype=np.float64).reshape(-1)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise GeometryError(f"origin must be 3 finite LPS coordinates in mm; got {self.origin!r}")
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise GeometryError(f"spacing must be 3 positive (x, y, z) values in mm; got {self.spacing!r}")
        direction = np.array(self.direction, dtype=np.float64)
        if direction.shape != (3, 3) or not np.all(np.isfinite(direction)):
            raise GeometryError(f"direction must be a finite 3x3 matrix; got {self.direction!r}")
        if abs(np.linalg.det(direction)) < 1e-6:
            raise GeometryError(f"direction matrix is singular (its axes are not independent): {direction.tolist()}")
        sop_uids = tuple(str(u) for u in self.sop_uids)
        if sop_uids and len(sop_uids) != array.shape[0]:
            raise GeometryError(f"sop_uids has {len(sop_uids)} entries for {array.shape[0]} slices; give one per slice")
        frame_numbers = None if self.frame_numbers is None else tuple(int(f) for f in self.frame_numbers)
        if frame_numbers is not None and len(frame_numbers) != array.shape[0]:
            raise GeometryError(
                f"frame_numbers has {len(frame_numbers)} entries for {array.shape[0]} slices; give one per slice"
            )
        origin.setflags(write=False)
        direction.setflags(write=False)
        inverse = np.linalg.inv(direction)
        inverse.setflags(write=False)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "sop_uids", sop_uids)
        object.__setattr__(self, "frame_numbers", frame_numbers)
        object.__setattr__(self, "_inverse", inverse)

    # -- geometry -----------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)`` = ``(z, y, x)``."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """``(columns, rows, slices)``: the size in SimpleITK's (x, y, z) order."""
        z, y, x = self.shape
        return x, y, z

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm³)."""
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_lps(self, ijk: Any) -> np.ndarray:
        """LPS position (mm) of voxel index/indices ``(x, y, z)`` = (column, row, slice).

        Args:
            ijk: One index triplet (shape (3,)) or an array of them (shape (N, 3)),
                in ``(x, y, z)`` order; fractional indices are allowed.

        Returns:
            float64 array of the same shape with LPS coordinates in mm.

        Raises:
            GeometryError: If the last dimension is not 3.
        """
        idx = np.asarray(ijk, dtype=np.float64)
        if idx.shape[-1:] != (3,):
            raise GeometryError(f"indices must be (x, y, z) triplets; got shape {idx.shape}")
        scaled = idx * np.asarray(self.spacing)
        result: np.ndarray = scaled @ self.direction.T + self.origin
        return result

    def lps_to_index(self, points: Any) -> np.ndarray:
        """Continuous ``(x, y, z)`` index of LPS point(s) in mm; inverse of :meth:`index_to_lps`.

        Round with ``np.rint(...).astype(int)`` for the nearest voxel; that voxel is
        ``array[z, y, x]``.

        Raises:
            GeometryError: If the last dimension is not 3.
        """
        pts = np.asarray(points, dtype=np.float64)
        if pts.shape[-1:] != (3,):
            raise GeometryError(f"points must be LPS triplets; got shape {pts.shape}")
        result: np.ndarray = ((pts - self.origin) @ self._inverse.T) / np.asarray(self.spacing)
        return result

    def corners_lps(self) -> np.ndarray:
        """LPS positions of the centres of the 8 corner voxels, shape (8, 3)."""
        x, y, z = (s - 1 for s in self.size_xyz)
        corners = np.array([(i, j, k) for k in (0, z) for j in (0, y) for i in (0, x)], dtype=np.float64)
        return self.index_to_lps(corners)

    def same_grid(self, other: Volume, *, tolerance_mm: float = 1e-3) -> bool:
        """Whether ``other`` has the same shape and its corner voxels lie within ``tolerance_mm`` of ours."""
        if self.shape != other.shape:
            return False
        return bool(np.max(np.linalg.norm(self.corners_lps() - other.corners_lps(), axis=1)) <= tolerance_mm)

    # -- conversions ------------------------------------------------------------

    def with_array(self, new_array: np.ndarray) -> Volume:
        """The same grid and provenance with other voxel values (a label map, a probability map).

        Raises:
            GeometryError: If ``new_array`` does not have this volume's shape ``(z, y, x)``.
        """
        arr = np.asarray(new_array)
        if arr.shape != self.array.shape:
            raise GeometryError(
                f"array of shape {arr.shape} does not fit the grid of series {self.series_uid or '?'} "
                f"(shape {self.array.shape} as z, y, x); produce it on this grid or use resample_to()"
            )
        return replace(self, array=arr)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with the same voxels and exactly the same geometry.

        SimpleITK's index is ``(x, y, z)``, its spacing ``(x, y, z)`` and its
        direction the row-major flattening of our ``direction`` (columns = axes),
        so ``image.TransformIndexToPhysicalPoint((i, j, k)) == index_to_lps((i, j, k))``.
        Boolean arrays become uint8 and float16 becomes float32 (SimpleITK has neither).
        """
        arr = self.array
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8)
        elif arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, *, like: Volume | None = None, tolerance_mm: float = 1e-3) -> Volume:
        """A Volume from a 3D scalar SimpleITK image.

        Args:
            image: 3D, one component per voxel.
            like: Volume whose provenance (SOP UIDs, frame numbers, series and
                frame of reference UIDs) the result takes over. The image must lie
                on ``like``'s grid, otherwise the slice -> SOP mapping would be wrong.
            tolerance_mm: How far the grids may differ (corner voxel centres) when ``like`` is given.

        Raises:
            GeometryError: If the image is not 3D scalar, or does not lie on ``like``'s grid.
        """
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise GeometryError(
                f"expected a 3D scalar image; got dimension {image.GetDimension()} with "
                f"{image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        sx, sy, sz = image.GetSpacing()
        volume = cls(
            array=sitk.GetArrayFromImage(image),
            origin=np.array(image.GetOrigin()),
            spacing=(float(sx), float(sy), float(sz)),
            direction=np.array(image.GetDirection()).reshape(3, 3),
        )
        if like is None:
            return volume
        if not like.same_grid(volume, tolerance_mm=tolerance_mm):
            raise GeometryError(
                f"image (size {volume.size_xyz}, origin {np.round(volume.origin, 3).tolist()}) is not on the grid of "
                f"series {like.series_uid or '?'} (size {like.size_xyz}, origin {np.round(like.origin, 3).tolist()}); "
                "resample it onto that grid first (resample_to) or call from_sitk without like="
            )
        return replace(
            volume,
            sop_uids=like.sop_uids,
            frame_numbers=like.frame_numbers,
            series_uid=like.series_uid,
            frame_of_reference_uid=like.frame_of_reference_uid,
        )


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class FrameSelection:
    """Some frames of one multi-frame instance, e.g. the b=1000 frames of an enhanced DWI.

    :func:`split_by_b_value` returns these for enhanced instances so that frames are
    selected without copying the dataset; :func:`volume_from_datasets` accepts them
    wherever it accepts a dataset and records the original frame numbers.

    Attributes:
        dataset: The multi-frame instance.
        frame_numbers: 1-based frame numbers (DICOM's numbering), in any order.

    Raises:
        ValueError: If no frame is given or a number is outside 1..NumberOfFrames.
    """

    dataset: Dataset
    frame_numbers: tuple[int, ...]

    def __post_init__(self) -> None:
        numbers = tuple(int(f) for f in self.frame_numbers)
        count = number_of_frames(self.dataset)
        if not numbers or any(f < 1 or f > count for f in numbers):
            raise ValueError(
                f"frame numbers {numbers} are not within 1..{count} for SOP {_sop_uid(self.dataset)}; "
                "frame numbers are 1-based"
            )
        object.__setattr__(self, "frame_numbers", numbers)


SeriesItem: TypeAlias = Dataset | FrameSelection


class Interpolation(str, Enum):
    """How :func:`resample_to` computes values between voxel centres."""

    LINEAR = "linear"  # images
    NEAREST = "nearest"  # label maps


@dataclass(frozen=True, eq=False)
class _FrameRef:
    """One 2D image: a single-frame dataset (frame_number None) or one frame of a multi-frame one."""

    dataset: Dataset
    frame_number: int | None  # 1-based

    @property
    def index(self) -> int:
        return 0 if self.frame_number is None else self.frame_number - 1

    @property
    def label(self) -> str:
        sop = _sop_uid(self.dataset)
        return sop if self.frame_number is None else f"{sop} frame {self.frame_number}"


@dataclass(frozen=True, eq=False)
class _Plane:
    ref: _FrameRef
    position: np.ndarray  # ImagePositionPatient, (3,)
    orientation: np.ndarray  # ImageOrientationPatient, (6,)
    pixel_spacing: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    rows: int
    columns: int


def _sop_uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "") or "<no SOP Instance UID>")


def number_of_frames(ds: Dataset) -> int:
    """Frames in an instance (1 for single-frame or an unreadable value)."""
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def is_multiframe(ds: Dataset) -> bool:
    """True for an instance with functional groups or several frames."""
    return "PerFrameFunctionalGroupsSequence" in ds or number_of_frames(ds) > 1


def _expand(items: Iterable[SeriesItem]) -> list[_FrameRef]:
    """One _FrameRef per 2D image; a repeated (SOP, frame) is kept once."""
    refs: list[_FrameRef] = []
    seen: set[tuple[str, int | None]] = set()
    for item in items:
        if isinstance(item, FrameSelection):
            candidates = [_FrameRef(item.dataset, f) for f in item.frame_numbers]
        elif isinstance(item, Dataset):
            if is_multiframe(item):
                candidates = [_FrameRef(item, f) for f in range(1, number_of_frames(item) + 1)]
            else:
                candidates = [_FrameRef(item, None)]
        else:
            raise TypeError(f"expected pydicom Dataset or FrameSelection items; got {type(item).__name__}")
        for ref in candidates:
            key = (str(ref.dataset.get("SOPInstanceUID", "") or f"id:{id(ref.dataset)}"), ref.frame_number)
            if key in seen:
                logger.warning("SOP %s given more than once; using it once", ref.label)
                continue
            seen.add(key)
            refs.append(ref)
    return refs


def _group_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """Item of functional group macro ``sequence`` for a frame: per-frame overrides shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        seq = per_frame[frame_index].get(sequence)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(sequence)
        if seq:
            return seq[0]
    return None


def _frame_value(ref: _FrameRef, sequence: str, keyword: str) -> Any:
    """``keyword`` from the frame's functional group ``sequence`` (enhanced), else the top level."""
    if ref.frame_number is not None:
        item = _group_item(ref.dataset, ref.index, sequence)
        if item is not None and item.get(keyword) is not None:
            return item.get(keyword)
    return ref.dataset.get(keyword)


def _floats(value: Any, count: int, what: str, ref: _FrameRef) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"SOP {ref.label}: {what} {value!r} is not {count} numbers; the header is damaged") from exc
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"SOP {ref.label}: {what} {value!r} is not {count} finite numbers; the header is damaged")
    return arr


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return hasattr(value, "__len__") and len(value) == 0


def _plane(ref: _FrameRef) -> _Plane:
    ds = ref.dataset
    if ref.frame_number is not None and "PerFrameFunctionalGroupsSequence" not in ds:
        raise GeometryError(
            f"SOP {_sop_uid(ds)} holds {number_of_frames(ds)} frames but no Per-frame Functional Groups, so the "
            "position of each frame is unknown (a legacy multi-frame); send the series as single-frame images "
            "or as an enhanced (functional group) instance"
        )
    position = _frame_value(ref, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _frame_value(ref, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _frame_value(ref, "PixelMeasuresSequence", "PixelSpacing")
    missing = [
        name
        for name, value in (
            ("ImagePositionPatient", position),
            ("ImageOrientationPatient", orientation),
            ("PixelSpacing", spacing),
        )
        if _is_empty(value)
    ]
    if missing:
        where = " (looked in the per-frame and shared functional groups too)" if ref.frame_number else ""
        raise GeometryError(
            f"SOP {ref.label} has no {', '.join(missing)}{where}: without them its position in the patient is "
            "unknown (a secondary capture, screenshot or stripped multi-frame?); send the original image series"
        )
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not rows or not columns:
        raise GeometryError(f"SOP {ref.label} has no Rows/Columns; it is not an image")
    ps = _floats(spacing, 2, "PixelSpacing", ref)
    if np.any(ps <= 0):
        raise GeometryError(f"SOP {ref.label}: PixelSpacing {ps.tolist()} must be positive; the header is damaged")
    return _Plane(
        ref=ref,
        position=_floats(position, 3, "ImagePositionPatient", ref),
        orientation=_floats(orientation, 6, "ImageOrientationPatient", ref),
        pixel_spacing=(float(ps[0]), float(ps[1])),
        rows=int(rows),
        columns=int(columns),
    )


def _axes(orientation: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal row direction, column direction and normal from ImageOrientationPatient."""
    row, col = orientation[:3], orientation[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        raise GeometryError(f"SOP {label}: ImageOrientationPatient {orientation.tolist()} has a zero vector")
    row = row / np.linalg.norm(row)
    col = col - np.dot(col, row) * row
    if np.linalg.norm(col) < 1e-6:
        raise GeometryError(f"SOP {label}: ImageOrientationPatient {orientation.tolist()} has parallel axes")
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


# --------------------------------------------------------------------------- series -> volume


def volume_from_datasets(
    datasets: Sequence[SeriesItem],
    *,
    tolerance_mm: float | None = None,
    orientation_tolerance: float = ORIENTATION_TOLERANCE,
    allow_resample: bool = False,
) -> Volume:
    """Build one :class:`Volume` from the images of one series.

    Single-frame instances, enhanced multi-frame instances (geometry from the
    Plane Position / Plane Orientation / Pixel Measures functional groups, per-frame
    items overriding shared ones) and :class:`FrameSelection` items are accepted.

    Slices are sorted by their position along the slice normal
    ``n = row_dir x col_dir``, ascending (InstanceNumber is ignored). The origin is
    the ImagePositionPatient of the first sorted slice. Pixel data are decoded
    (compressed syntaxes through the pylibjpeg plugins) and rescaled with
    RescaleSlope/RescaleIntercept (for enhanced instances from the Pixel Value
    Transformation functional group) into float32.

    Args:
        datasets: The images of one series (order irrelevant). A SOP Instance UID
            (and frame) given twice is used once.
        tolerance_mm: How far slice positions may deviate from a regular grid,
            in mm. Default: 1 % of the nominal (median) slice spacing, at least 0.001 mm.
            It bounds duplicate detection, spacing uniformity, gaps and tilt.
        orientation_tolerance: Largest difference between direction cosines of
            ImageOrientationPatient that still counts as the same orientation.
        allow_resample: If True, a series acquired with gantry tilt (slices shifted
            in-plane by the same amount from one slice to the next) is resampled
            with SimpleITK, linear interpolation, onto the regular grid that has the
            first slice's origin, in-plane axes and size, and slice axis along the
            slice normal with the along-normal spacing. Output slice k lies in the
            plane of source slice k (so ``sop_uids[k]`` still names the SOP of that
            plane); only the in-plane shift is interpolated. Voxels that no source
            slice covers get the series' minimum value (air on CT). Missing slices,
            irregular spacing and mixed orientations are never resampled.

    Returns:
        The volume; ``frame_numbers`` is set when any input is multi-frame.

    Raises:
        GeometryError: No input; an image without ImagePositionPatient /
            ImageOrientationPatient / PixelSpacing; inputs from several series or
            frames of reference; differing Rows/Columns or PixelSpacing; irregular
            slice spacing or positions that are not on one line.
        MixedOrientationError: Images with different orientations (e.g. a localizer).
        DuplicateSlicesError: Several images at one position (b-values, echoes, phases).
        MissingSlicesError: A gap larger than the nominal slice spacing.
        GantryTiltError: Gantry tilt and ``allow_resample`` is False.
        PixelDataError: Pixel data missing, truncated, corrupt, not grayscale, or not decodable.
        TypeError: If an item is neither a pydicom Dataset nor a FrameSelection.
    """
    refs = _expand(datasets)
    if not refs:
        raise GeometryError("no images given: pass the instances of one series (got an empty list)")
    planes = [_plane(ref) for ref in refs]
    series_uid = _check_same_series(planes)
    for_uid = _check_same_frame_of_reference(planes, series_uid)
    row, col, normal = _check_same_orientation(planes, series_uid, orientation_tolerance)
    _check_same_matrix(planes, series_uid)

    distances = np.array([float(np.dot(p.position, normal)) for p in planes])
    order = sorted(range(len(planes)), key=lambda i: (distances[i], _sop_uid(planes[i].ref.dataset)))
    planes = [planes[i] for i in order]
    distances = distances[order]
    positions = np.stack([p.position for p in planes])

    slice_spacing, tol = _check_spacing(planes, distances, series_uid, tolerance_mm)
    tilt_step = _check_tilt(positions, normal, distances, series_uid, tol, allow_resample, planes)

    array = np.empty((len(planes), planes[0].rows, planes[0].columns), dtype=np.float32)
    # A multi-frame instance most of whose frames are used is decoded once, whole; else frame by frame.
    used = Counter(id(p.ref.dataset) for p in planes if p.ref.frame_number is not None)
    whole = {id(p.ref.dataset) for p in planes if 2 * used[id(p.ref.dataset)] > number_of_frames(p.ref.dataset)}
    decoded: dict[int, np.ndarray] = {}
    for k, plane in enumerate(planes):
        array[k] = _read_frame(plane, whole, decoded)

    row_spacing, col_spacing = planes[0].pixel_spacing
    multiframe = any(p.ref.frame_number is not None for p in planes)
    volume = Volume(
        array=array,
        origin=positions[0],
        spacing=(col_spacing, row_spacing, slice_spacing),
        direction=np.column_stack([row, col, normal]),
        sop_uids=tuple(_sop_uid(p.ref.dataset) for p in planes),
        frame_numbers=tuple(p.ref.frame_number or 1 for p in planes) if multiframe else None,
        series_uid=series_uid,
        frame_of_reference_uid=for_uid,
    )
    if tilt_step is not None:
        volume = _resample_tilted(volume, tilt_step)
    logger.debug(
        "series %s: volume %s (z, y, x), spacing %s mm (x, y, z)",
        series_uid,
        volume.shape,
        tuple(round(s, 4) for s in volume.spacing),
    )
    return volume


def _check_same_series(planes: list[_Plane]) -> str:
    uids = sorted({str(p.ref.dataset.get("SeriesInstanceUID", "") or "") for p in planes})
    if len(uids) > 1:
        raise GeometryError(
            f"images from {len(uids)} series given ({', '.join(uids[:_MAX_LISTED])}); "
            "build one volume per series (group the instances by SeriesInstanceUID)"
        )
    return uids[0]


def _check_same_frame_of_reference(planes: list[_Plane], series_uid: str) -> str:
    uids = sorted({str(p.ref.dataset.get("FrameOfReferenceUID", "") or "") for p in planes})
    if len(uids) > 1:
        raise GeometryError(
            f"series {series_uid}: images use {len(uids)} frames of reference ({', '.join(uids[:_MAX_LISTED])}), "
            "so their positions are not comparable; resend a series acquired in one frame of reference"
        )
    return uids[0]


def _check_same_matrix(planes: list[_Plane], series_uid: str) -> None:
    first = planes[0]
    for p in planes[1:]:
        if (p.rows, p.columns) != (first.rows, first.columns):
            raise GeometryError(
                f"series {series_uid}: SOP {p.ref.label} is {p.rows}x{p.columns} pixels but SOP {first.ref.label} is "
                f"{first.rows}x{first.columns}; the series mixes reconstructions (or a localizer): "
                "send the images of one reconstruction"
            )
        if not np.allclose(p.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise GeometryError(
                f"series {series_uid}: SOP {p.ref.label} has PixelSpacing {list(p.pixel_spacing)} but SOP "
                f"{first.ref.label} has {list(first.pixel_spacing)}; send the images of one reconstruction"
            )


def _check_same_orientation(
    planes: list[_Plane], series_uid: str, tolerance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    groups: list[tuple[np.ndarray, list[_Plane]]] = []
    for p in planes:
        for representative, members in groups:
            if np.max(np.abs(p.orientation - representative)) <= tolerance:
                members.append(p)
                break
        else:
            groups.append((p.orientation, [p]))
    if len(groups) > 1:
        groups.sort(key=lambda g: -len(g[1]))
        described = "; ".join(
            f"{np.round(rep, 4).tolist()} in {len(members)} image(s), e.g. SOP {members[0].ref.label}"
            for rep, members in groups[:_MAX_LISTED]
        )
        raise MixedOrientationError(
            f"series {series_uid} mixes {len(groups)} image orientations (ImageOrientationPatient): {described}. "
            "A localizer or reformat was probably sent with it; send only the images of one orientation "
            "(or split the series by orientation) and retry"
        )
    return _axes(planes[0].orientation, planes[0].ref.label)


def _nominal_spacing(ref: _FrameRef) -> float:
    """Slice spacing of a single-slice volume: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _frame_value(ref, "PixelMeasuresSequence", keyword)
        try:
            spacing = float(value) if value is not None and value != "" else 0.0
        except (TypeError, ValueError):
            spacing = 0.0
        if spacing > 0:
            return spacing
    return 1.0


def _check_spacing(
    planes: list[_Plane], distances: np.ndarray, series_uid: str, tolerance_mm: float | None
) -> tuple[float, float]:
    """Nominal slice spacing and the tolerance in mm, after checking for duplicates, gaps and irregularity."""
    if len(planes) == 1:
        spacing = _nominal_spacing(planes[0].ref)
        return spacing, tolerance_mm if tolerance_mm is not None else RELATIVE_SPACING_TOLERANCE * spacing
    gaps = np.diff(distances)
    positive = gaps[gaps > 1e-3]
    nominal = float(np.median(positive)) if positive.size else 0.0
    tol = float(tolerance_mm) if tolerance_mm is not None else max(RELATIVE_SPACING_TOLERANCE * nominal, 1e-3)

    duplicates = [i for i, g in enumerate(gaps) if g <= tol]
    if duplicates:
        _raise_duplicates(planes, distances, duplicates, series_uid)

    missing = [(i, float(g)) for i, g in enumerate(gaps) if g > nominal + tol and round(g / nominal) >= 2]
    if missing:
        details = "; and ".join(
            f"between positions {distances[i]:.2f} and {distances[i + 1]:.2f} mm (expected spacing "
            f"{nominal:.2f} mm, found gap {g:.2f} mm: about {round(g / nominal) - 1} slice(s))"
            for i, g in missing[:_MAX_LISTED]
        )
        more = f"; and {len(missing) - _MAX_LISTED} more gap(s)" if len(missing) > _MAX_LISTED else ""
        raise MissingSlicesError(
            f"series {series_uid}: slices missing {details}{more}; resend the complete series "
            "(positions are in mm along the slice normal)"
        )
    irregular = [(i, float(g)) for i, g in enumerate(gaps) if abs(g - nominal) > tol]
    if irregular:
        details = "; ".join(
            f"{g:.3f} mm between positions {distances[i]:.2f} and {distances[i + 1]:.2f} mm"
            for i, g in irregular[:_MAX_LISTED]
        )
        raise GeometryError(
            f"series {series_uid}: irregular slice spacing (nominal {nominal:.3f} mm, tolerance {tol:.3f} mm): "
            f"{details}; the series mixes stacks or reconstructions: send one regularly spaced stack"
        )
    return float(np.mean(gaps)), tol


def _raise_duplicates(planes: list[_Plane], distances: np.ndarray, gap_indices: list[int], series_uid: str) -> None:
    clusters: list[list[int]] = []
    for i in gap_indices:
        if clusters and clusters[-1][-1] == i:
            clusters[-1].append(i + 1)
        else:
            clusters.append([i, i + 1])
    described = "; ".join(
        f"{distances[c[0]]:.2f} mm: SOP {', '.join(planes[j].ref.label for j in c[:4])}"
        + (f" (+{len(c) - 4} more)" if len(c) > 4 else "")
        for c in clusters[:3]
    )
    found = (b_value(planes[j].ref.dataset, planes[j].ref.frame_number) for c in clusters for j in c)
    b_values = sorted({b for b in found if b is not None})
    if len(b_values) > 1:
        advice = (
            f"they differ in diffusion b-value ({', '.join(f'{b:g}' for b in b_values)}): split the series with "
            "split_by_b_value() or pick one b-value with select_b_value() first"
        )
    else:
        advice = (
            "the series holds several images per position (echoes, phases, diffusion directions or a repeated "
            "acquisition): pass one image per position"
        )
    raise DuplicateSlicesError(
        f"series {series_uid}: {sum(len(c) for c in clusters)} images share {len(clusters)} position(s) along the "
        f"slice normal ({described}); {advice}"
    )


def _check_tilt(
    positions: np.ndarray,
    normal: np.ndarray,
    distances: np.ndarray,
    series_uid: str,
    tol: float,
    allow_resample: bool,
    planes: list[_Plane],
) -> np.ndarray | None:
    """The per-slice offset vector when the series is tilted (and resampling is allowed), else None."""
    if len(positions) < 2:
        return None
    steps = np.diff(positions, axis=0)
    in_plane = steps - np.outer(steps @ normal, normal)
    if np.max(np.linalg.norm(in_plane, axis=1)) <= tol:
        return None
    mean_step = steps.mean(axis=0)
    mean_in_plane = in_plane.mean(axis=0)
    if np.max(np.linalg.norm(in_plane - mean_in_plane, axis=1)) > tol:
        worst = int(np.argmax(np.linalg.norm(in_plane - mean_in_plane, axis=1)))
        raise GeometryError(
            f"series {series_uid}: slice positions do not lie on one line (SOP {planes[worst].ref.label} to "
            f"SOP {planes[worst + 1].ref.label} is offset {np.round(in_plane[worst], 3).tolist()} mm in-plane); "
            "the series mixes stacks; send one stack"
        )
    angle = math.degrees(math.atan2(float(np.linalg.norm(mean_in_plane)), float(np.mean(np.diff(distances)))))
    if not allow_resample:
        raise GantryTiltError(
            f"series {series_uid}: slices are stacked {angle:.1f} degrees off the slice normal (gantry tilt "
            f"{angle:.1f} deg); pass allow_resample=True to resample onto a regular grid perpendicular to the "
            "slices, or send a reconstruction without tilt"
        )
    logger.warning("series %s: resampling a gantry tilt of %.1f degrees onto a regular grid", series_uid, angle)
    return mean_step


def _resample_tilted(volume: Volume, step: np.ndarray) -> Volume:
    """Resample a sheared stack (slice k at origin + k*step) onto ``volume``'s orthogonal grid."""
    step_length = float(np.linalg.norm(step))
    sheared = replace(
        volume,
        spacing=(volume.spacing[0], volume.spacing[1], step_length),
        direction=np.column_stack([volume.direction[:, 0], volume.direction[:, 1], step / step_length]),
    )
    fill = float(volume.array.min()) if volume.array.size else 0.0
    resampler = _resampler(volume, Interpolation.LINEAR, fill)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return Volume.from_sitk(resampler.Execute(sheared.to_sitk()), like=volume)


# --------------------------------------------------------------------------- pixel data


def _read_frame(plane: _Plane, whole: set[int], decoded: dict[int, np.ndarray]) -> np.ndarray:
    """Decoded, rescaled pixels of one plane as float64, shape (rows, columns).

    Multi-frame instances whose ``id`` is in ``whole`` are decoded once, entirely, into
    ``decoded``; other frames are decoded one by one.
    """
    ref = plane.ref
    ds = ref.dataset
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_name = getattr(transfer_syntax, "name", None) or "unknown transfer syntax"
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise PixelDataError(f"SOP {ref.label} has no Pixel Data; send the image instances, not a header-only copy")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise PixelDataError(
            f"SOP {ref.label} is a colour image (SamplesPerPixel {ds.SamplesPerPixel}); "
            "segmentation needs the original grayscale series"
        )
    if transfer_syntax is None:
        raise PixelDataError(
            f"SOP {ref.label}: no Transfer Syntax UID in the file meta information, so its pixel data cannot be "
            "decoded; read the instance with pydicom.dcmread or set ds.file_meta.TransferSyntaxUID"
        )
    try:
        if ref.frame_number is None:
            pixels = _decode_pixels(ds)
        elif id(ds) in whole:
            if id(ds) not in decoded:
                decoded[id(ds)] = _decode_pixels(ds).reshape(-1, plane.rows, plane.columns)
            pixels = decoded[id(ds)][ref.index]
        else:
            pixels = _decode_pixels(ds, index=ref.index)
    except Exception as exc:  # any decoder failure: convert at the edge
        detail = " ".join(str(exc).split())
        raise PixelDataError(
            f"cannot decode the pixel data of SOP {ref.label} (transfer syntax {syntax_name}): the data is "
            "truncated or corrupt (resend the instance) or uses an encoding no installed decoder reads "
            f"(install the matching pylibjpeg plugin or have the sender transcode it). Decoder: {detail}"
        ) from exc
    if pixels.shape != (plane.rows, plane.columns):
        raise PixelDataError(
            f"SOP {ref.label} (transfer syntax {syntax_name}): decoded pixels have shape {pixels.shape}, "
            f"expected ({plane.rows}, {plane.columns}); the pixel data is inconsistent with its header: resend it"
        )
    slope = _frame_value(ref, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_value(ref, "PixelValueTransformationSequence", "RescaleIntercept")
    try:
        slope_f = float(slope) if slope not in (None, "") else 1.0
        intercept_f = float(intercept) if intercept not in (None, "") else 0.0
    except (TypeError, ValueError) as exc:
        raise PixelDataError(
            f"SOP {ref.label}: RescaleSlope {slope!r} / RescaleIntercept {intercept!r} are not numbers; "
            "the header is damaged"
        ) from exc
    values = pixels.astype(np.float64)
    if slope_f != 1.0 or intercept_f != 0.0:
        values = values * slope_f + intercept_f
    return values


# --------------------------------------------------------------------------- diffusion


def _number(value: Any) -> float | None:
    """First number in a DICOM value (IS/DS/FD, multi-valued, or undecoded bytes)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", errors="ignore").strip("\x00 ")
    if isinstance(value, str):
        value = value.split("\\")[0].strip("\x00 ")
        if not value:
            return None
    elif not isinstance(value, int | float) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _private_value(ds: Dataset, group: int, creator: str, offset: int) -> Any:
    """Value of private element (group, xx<offset>) reserved by ``creator``.

    If no private creator is present in the group at all (some anonymisers strip
    them), the element at the customary block 0x10 is read instead.
    """
    try:
        block = ds.private_block(group, creator)
    except KeyError:
        block = None
    if block is not None:
        try:
            return block[offset].value
        except KeyError:
            return None
    if (group, 0x0010) in ds:  # block 0x10 belongs to another creator
        return None
    element = ds.get((group, 0x1000 + offset))
    return None if element is None else element.value


def b_value(ds: Dataset, frame_number: int | None = None) -> float | None:
    """The diffusion b-value (s/mm²) of an image, or None if it carries none.

    Looked up, in this order:

    1. For a frame of an enhanced instance: DiffusionBValue in its MR Diffusion
       functional group (per-frame, else shared).
    2. Diffusion B-Value (0018,9087) at the top level (also inside a top-level
       MRDiffusionSequence).
    3. Siemens private (0019,xx0C) "B_value" of creator "SIEMENS MR HEADER".
    4. GE private (0043,xx39) of creator "GEMS_PARM_01", first value. GE adds
       large offsets (1,000,000,000) to this value on some software versions; the
       b-value is taken as the value modulo 100,000 (no clinical b-value reaches
       100,000 s/mm²).
    5. Philips private (2001,xx03) "Diffusion B-Factor" of creator
       "Philips Imaging DD 001" (older Philips software).

    Args:
        ds: The instance.
        frame_number: 1-based frame number for multi-frame instances.
    """
    if frame_number is not None:
        item = _group_item(ds, frame_number - 1, "MRDiffusionSequence")
        if item is not None and (value := _number(item.get("DiffusionBValue"))) is not None:
            return value
    value = _number(ds.get("DiffusionBValue"))
    if value is not None:
        return value
    top = ds.get("MRDiffusionSequence")
    if top and (value := _number(top[0].get("DiffusionBValue"))) is not None:
        return value
    value = _number(_private_value(ds, 0x0019, _SIEMENS_CREATOR, 0x0C))
    if value is not None:
        return value
    value = _number(_private_value(ds, 0x0043, _GE_CREATOR, 0x39))
    if value is not None:
        return float(int(value) % 100000)
    value = _number(_private_value(ds, 0x2001, _PHILIPS_CREATOR, 0x03))
    if value is not None:
        return value
    return None


def is_trace(ds: Dataset, frame_number: int | None = None) -> bool:
    """Whether an image is a diffusion trace (isotropic) image.

    True when DiffusionDirectionality (top level, in MRDiffusionSequence, or in the
    frame's MR Diffusion functional group) is ISOTROPIC, or when ImageType (or the
    frame's FrameType) contains TRACEW or TRACE (Siemens, and others).
    """
    directionality: list[Any] = [ds.get("DiffusionDirectionality")]
    top = ds.get("MRDiffusionSequence")
    if top:
        directionality.append(top[0].get("DiffusionDirectionality"))
    types: list[Any] = [ds.get("ImageType")]
    if frame_number is not None:
        item = _group_item(ds, frame_number - 1, "MRDiffusionSequence")
        if item is not None:
            directionality.append(item.get("DiffusionDirectionality"))
        frame_type = _group_item(ds, frame_number - 1, "MRImageFrameTypeSequence")
        if frame_type is not None:
            types.append(frame_type.get("FrameType"))
    if any(str(d or "").strip().upper() == "ISOTROPIC" for d in directionality):
        return True
    for value in types:
        if value is None:
            continue
        words = [value] if isinstance(value, str) else list(value)
        if any(str(w).strip().upper() in ("TRACEW", "TRACE") for w in words):
            return True
    return False


def _regroup(refs: list[_FrameRef]) -> list[SeriesItem]:
    """Single-frame refs as their datasets; the frames of one multi-frame instance as one FrameSelection."""
    entries: list[Dataset | tuple[Dataset, list[int]]] = []
    frames_of: dict[int, list[int]] = {}
    for ref in refs:
        if ref.frame_number is None:
            entries.append(ref.dataset)
            continue
        frames = frames_of.get(id(ref.dataset))
        if frames is None:
            frames = frames_of[id(ref.dataset)] = []
            entries.append((ref.dataset, frames))
        frames.append(ref.frame_number)
    return [e if isinstance(e, Dataset) else FrameSelection(e[0], tuple(e[1])) for e in entries]


def _split_refs(refs: list[_FrameRef], tolerance: float) -> dict[float, list[_FrameRef]]:
    valued: list[tuple[float, _FrameRef]] = []
    without: list[_FrameRef] = []
    for ref in refs:
        b = b_value(ref.dataset, ref.frame_number)
        if b is None:
            without.append(ref)
        else:
            valued.append((b, ref))
    if not valued:
        raise NoMatchingBValueError(
            f"none of the {len(refs)} image(s) carries a diffusion b-value (checked DiffusionBValue, "
            "MRDiffusionSequence, Siemens (0019,xx0C) and GE (0043,xx39)); is this a diffusion (DWI) series? "
            "Route the DWI series, or one whose images record their b-values"
        )
    if without:
        logger.warning(
            "%d image(s) without a b-value left out of the diffusion split, e.g. SOP %s",
            len(without),
            without[0].label,
        )
    valued.sort(key=lambda pair: pair[0])
    clusters: list[list[tuple[float, _FrameRef]]] = []
    for b, ref in valued:
        if clusters and b - clusters[-1][0][0] <= tolerance:
            clusters[-1].append((b, ref))
        else:
            clusters.append([(b, ref)])
    result: dict[float, list[_FrameRef]] = {}
    original_order = {id(r): i for i, r in enumerate(refs)}
    for cluster in clusters:
        key = round(float(np.median([b for b, _ in cluster])), 1)
        result[key] = sorted((r for _, r in cluster), key=lambda r: original_order[id(r)])
    return result


def split_by_b_value(datasets: Sequence[SeriesItem], *, tolerance: float = 5.0) -> dict[float, list[SeriesItem]]:
    """Group the images of a diffusion series by b-value (see :func:`b_value` for where it is read).

    Args:
        datasets: Single-frame instances, enhanced instances or FrameSelections.
        tolerance: b-values within this many s/mm² of the smallest one of a group
            join that group (scanners report slightly different actual b-values per
            direction); the key is the group's median, rounded to 0.1.

    Returns:
        ``{b_value: items}`` in ascending b order. Single-frame instances appear as
        themselves; frames of an enhanced instance as one :class:`FrameSelection`
        per b-value. Images without any b-value are left out (with a warning).

    Raises:
        NoMatchingBValueError: If no image carries a b-value.
    """
    groups = _split_refs(_expand(datasets), tolerance)
    return {b: _regroup(refs) for b, refs in groups.items()}


def _position_key(ref: _FrameRef) -> tuple[float, ...] | str:
    position = _frame_value(ref, "PlanePositionSequence", "ImagePositionPatient")
    try:
        return tuple(round(float(v), 2) for v in position)
    except (TypeError, ValueError):
        return ref.label  # unknown position: let volume_from_datasets report it


def select_b_value(
    datasets: Sequence[SeriesItem],
    target: float = 1000.0,
    *,
    tolerance: float = 250.0,
) -> list[SeriesItem]:
    """The images of the b-value closest to ``target``, one per slice position.

    The b-value closest to ``target`` is chosen (on a tie, the higher one). When
    that b-value has several images per slice position (one per diffusion
    direction), the trace images (see :func:`is_trace`) are returned if there is
    exactly one per position.

    Args:
        datasets: The instances (or FrameSelections) of a diffusion series.
        target: Wanted b-value in s/mm² (1000 for stroke DWI).
        tolerance: Largest accepted difference between ``target`` and the chosen b-value.

    Returns:
        Items ready for :func:`volume_from_datasets`.

    Raises:
        NoMatchingBValueError: If no image carries a b-value, none lies within
            ``tolerance`` of ``target`` (the message lists the b-values found), or
            the chosen b-value has several images per position and no unique trace image.
    """
    groups = _split_refs(_expand(datasets), 5.0)
    found = ", ".join(f"{b:g}" for b in groups)
    chosen = min(groups, key=lambda b: (abs(b - target), -b))
    if abs(chosen - target) > tolerance:
        raise NoMatchingBValueError(
            f"no b-value within {tolerance:g} s/mm² of {target:g}; the series has b = {found}. "
            "Send a diffusion series acquired with the b-value the pipeline needs, or change its b-value setting"
        )
    refs = groups[chosen]
    per_position: dict[tuple[float, ...] | str, list[_FrameRef]] = {}
    for ref in refs:
        per_position.setdefault(_position_key(ref), []).append(ref)
    if all(len(group) == 1 for group in per_position.values()):
        return _regroup(refs)
    traces = [ref for ref in refs if is_trace(ref.dataset, ref.frame_number)]
    trace_positions: dict[tuple[float, ...] | str, int] = {}
    for ref in traces:
        key = _position_key(ref)
        trace_positions[key] = trace_positions.get(key, 0) + 1
    if traces and set(trace_positions) == set(per_position) and all(n == 1 for n in trace_positions.values()):
        logger.info("b=%g: using %d trace image(s) out of %d", chosen, len(traces), len(refs))
        return _regroup(traces)
    most = max(len(group) for group in per_position.values())
    raise NoMatchingBValueError(
        f"b = {chosen:g} has up to {most} images per slice position (diffusion directions; b-values found: {found}) "
        f"and {'no' if not traces else 'no unique'} trace image per position (DiffusionDirectionality ISOTROPIC or "
        "ImageType TRACEW); send the scanner's trace-weighted (TRACEW / isotropic) DWI series"
    )


# --------------------------------------------------------------------------- several volumes


def _resampler(reference: Volume, interpolation: Interpolation, default_value: float) -> sitk.ResampleImageFilter:
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in reference.size_xyz])
    resampler.SetOutputOrigin(tuple(float(v) for v in reference.origin))
    resampler.SetOutputSpacing(tuple(float(v) for v in reference.spacing))
    resampler.SetOutputDirection(tuple(float(v) for v in reference.direction.ravel()))
    resampler.SetTransform(sitk.Transform())  # identity: both volumes are in the same patient space
    resampler.SetInterpolator(sitk.sitkLinear if interpolation is Interpolation.LINEAR else sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(float(default_value))
    return resampler


def resample_to(
    moving: Volume,
    reference: Volume,
    *,
    interpolation: str | Interpolation = Interpolation.LINEAR,
    default_value: float = 0.0,
    check_frame_of_reference: bool = True,
) -> Volume:
    """``moving`` resampled in patient space onto ``reference``'s grid (ADC/FLAIR onto the DWI).

    No registration: both volumes are assumed to be in the same patient space
    (an identity transform), which holds for series of one frame of reference.

    Args:
        moving: The volume to resample.
        reference: The grid (shape, origin, spacing, direction) and provenance
            (SOP UIDs, series and frame of reference) of the result.
        interpolation: ``"linear"`` (images; the result is float32) or ``"nearest"``
            (label maps; the dtype is kept, bool becomes uint8).
        default_value: Value of output voxels that fall outside ``moving``.
        check_frame_of_reference: Refuse volumes whose (non-empty) Frame of
            Reference UIDs differ: their coordinates are not comparable.

    Raises:
        ValueError: If ``interpolation`` is not "linear" or "nearest".
        GeometryError: If the frames of reference differ (and the check is on).
    """
    try:
        mode = Interpolation(interpolation)
    except ValueError:
        choices = ", ".join(m.value for m in Interpolation)
        raise ValueError(f"interpolation must be one of {choices}; got {interpolation!r}") from None
    if (
        check_frame_of_reference
        and moving.frame_of_reference_uid
        and reference.frame_of_reference_uid
        and moving.frame_of_reference_uid != reference.frame_of_reference_uid
    ):
        raise GeometryError(
            f"series {moving.series_uid} (frame of reference {moving.frame_of_reference_uid}) and series "
            f"{reference.series_uid} (frame of reference {reference.frame_of_reference_uid}) do not share a frame "
            "of reference, so their patient coordinates are not comparable; register them first, or pass "
            "check_frame_of_reference=False if you know they are aligned"
        )
    resampler = _resampler(reference, mode, default_value)
    if mode is Interpolation.LINEAR:
        resampler.SetOutputPixelType(sitk.sitkFloat32)
    result = Volume.from_sitk(resampler.Execute(moving.to_sitk()), like=reference)
    logger.debug("resampled series %s onto the grid of series %s", moving.series_uid, reference.series_uid)
    return result


def stack_channels(reference: Volume, others: Sequence[Volume], *, tolerance_mm: float = 1e-3) -> np.ndarray:
    """Channels ``[reference, *others]`` stacked as ``(C, z, y, x)``, in that order.

    Every volume must already lie on ``reference``'s grid (use :func:`resample_to`).

    Raises:
        GeometryError: If a volume is not on the reference grid.
    """
    for i, other in enumerate(others, start=1):
        if not reference.same_grid(other, tolerance_mm=tolerance_mm):
            raise GeometryError(
                f"channel {i} (series {other.series_uid or '?'}, shape {other.shape}) is not on the grid of "
                f"series {reference.series_uid or '?'} (shape {reference.shape}); "
                "resample it first with resample_to(volume, reference)"
            )
    return np.stack([reference.array, *(o.array for o in others)], axis=0)
