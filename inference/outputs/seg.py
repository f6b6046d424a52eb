"""The DICOM Segmentation (SEG) of a job's segments, built with highdicom.

One segment per output segment of the model package
(:attr:`inference.manifest.Manifest.output_segments`, numbered 1..N in that order;
without a ``segments`` section, one per label in ascending label value), every one
of them described even when the model found nothing for it. Segments may overlap
(a whole kidney contains its parenchyma): the BINARY SEG carries each segment's
own mask, so a viewer's segment and the SR's volume of it are the same voxels.
A LABELMAP SEG holds one value per voxel, so it paints segments in ascending
number and a later (finer) segment shows over an earlier one where they overlap
(:func:`inference.segments.display_labels`); the SR always measures the full masks.

The masks keep the source series' own grid and slice order: each SEG frame carries the plane position of, and a
per-frame reference to, the very source instance (or enhanced-instance frame)
its slice of the label volume came from (DESIGN.md habit 8).

Two encodings: ``binary`` (the classic 1-bit SEG every viewer reads, the
default) and ``labelmap`` (the Label Map Segmentation IOD, one 8/16-bit frame
per slice, smaller and faster to write but only read by recent viewers). Empty
frames are left out of both.

Identity follows :mod:`inference.outputs.common`: deterministic Series and SOP
Instance UIDs, patient and study attributes (and the Specific Character Set)
of the source, Manufacturer ``pacs-node``, and the model in Software Versions,
Manufacturer's Model Name and the segments' Algorithm Identification. A demo
model is marked ``DEMO MODEL - NOT FOR CLINICAL USE`` in the content
description, the image comments and the algorithm identification.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from enum import Enum
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes

from inference.errors import GeometryError, InferenceError
from inference.manifest import Code, Manifest, SegmentSpec
from inference.outputs.common import (
    DEMO_WARNING,
    MANUFACTURER,
    ResultIdentity,
    copy_study_attributes,
    software_versions,
)
from inference.segments import Segment, build_segments, display_labels
from inference.volume import Volume, is_multiframe, number_of_frames

__all__ = [
    "LATERALITY_CODES",
    "SegBuildError",
    "SegmentationType",
    "build_seg",
    "segment_numbers",
]

logger = logging.getLogger(__name__)

#: SNOMED CT qualifiers used as the segmented property type modifier of a label
#: with a laterality and no explicit modifier.
LATERALITY_CODES: dict[str, Code] = {side: Code.model_validate(side) for side in ("left", "right")}

_LO_MAX = 64  # Long String
_CS_MAX = 16  # Code String

#: Largest distance (mm) between a source image's position and the position the
#: label volume gives its slice that still counts as "the same plane".
_POSITION_TOLERANCE_MM = 0.01


class SegBuildError(InferenceError, ValueError):
    """The label volume, the source datasets and the manifest do not fit together.

    A :class:`ValueError` too, for callers that treat bad arguments generically.
    """


class SegmentationType(str, Enum):
    """How the segments are encoded."""

    #: one 1-bit frame per (segment, slice) holding that segment; every viewer reads it
    BINARY = "binary"
    #: one frame per slice whose pixel values are segment numbers (Label Map SEG IOD)
    LABELMAP = "labelmap"


def _segmentation_type(value: str | SegmentationType | hd.seg.SegmentationTypeValues) -> SegmentationType:
    if isinstance(value, SegmentationType):
        return value
    if isinstance(value, hd.seg.SegmentationTypeValues):
        value = value.value
    try:
        return SegmentationType(str(value).strip().lower())
    except ValueError:
        choices = ", ".join(repr(m.value) for m in SegmentationType)
        raise ValueError(f"seg_type must be one of {choices}; got {value!r}") from None


# --------------------------------------------------------------------------- segments


def segment_numbers(manifest: Manifest) -> dict[int, int]:
    """Label value -> SEG segment number for a manifest without a ``segments`` section (one per label,
    ascending label value, numbered 1..N); with one, segment numbers follow ``segments``' order.
    """
    return {int(value): number for number, value in enumerate(sorted(manifest.labels), start=1)}


def _coded(code: Code) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _lo(text: str) -> str:
    """A valid Long String: no backslash or control characters, at most 64 characters."""
    cleaned = re.sub(r"[\\\x00-\x1f]", " ", text).strip()
    return cleaned if len(cleaned) <= _LO_MAX else cleaned[: _LO_MAX - 3].rstrip() + "..."


def _content_label(pipeline: str) -> str:
    """``AI_<PIPELINE>`` as a valid Code String (A-Z, 0-9, space, underscore; 16 characters)."""
    label = re.sub(r"[^A-Z0-9_ ]", "_", f"AI_{pipeline}".upper())
    return label[:_CS_MAX].rstrip() or "AI_SEG"


def _algorithm(manifest: Manifest) -> hd.AlgorithmIdentificationSequence:
    name = f"{manifest.name} (demo)" if manifest.demo else manifest.name
    source = f"{MANUFACTURER}: {DEMO_WARNING}" if manifest.demo else MANUFACTURER
    return hd.AlgorithmIdentificationSequence(
        name=_lo(name),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(manifest.version),
        source=_lo(source),
    )


def _segment_description(
    number: int, spec: SegmentSpec, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(spec.name),
        segmented_property_category=_coded(spec.category),
        segmented_property_type=_coded(spec.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[_coded(spec.anatomy)] if spec.anatomy is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*spec.color),
    )
    laterality = LATERALITY_CODES[spec.laterality] if spec.laterality else None
    if spec.anatomy is not None and laterality is not None:
        # the side qualifies the anatomic region (the kidney of a right renal parenchyma)
        region = description.AnatomicRegionSequence[0]
        region.AnatomicRegionModifierSequence = [_coded(laterality)]
        laterality = None
    modifier = spec.modifier or laterality
    if modifier is not None:
        # Segmented Property Type Modifier Code Sequence lives inside the type's item (PS3.3 C.8.20.4).
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_coded(modifier)]
    return description


def _segment_pixels(segments: Sequence[Segment], kind: SegmentationType, shape: tuple[int, ...]) -> np.ndarray:
    """What highdicom encodes: segment numbers per voxel (LABELMAP, or BINARY without overlaps),
    else one boolean mask per segment along a fourth axis (BINARY with overlaps)."""
    if kind is SegmentationType.LABELMAP or not segments:
        return display_labels(segments, shape)
    coverage = np.zeros(shape, dtype=np.uint16)
    for seg in segments:
        coverage += seg.mask
    if int(coverage.max(initial=0)) <= 1:
        return display_labels(segments, shape)
    return np.stack([seg.mask for seg in segments], axis=-1)


def _segment_array(array: np.ndarray, manifest: Manifest) -> np.ndarray:
    """The label array with label values replaced by segment numbers (uint8, or uint16 beyond 255 segments).

    Raises:
        SegBuildError: the array is not integer-valued, or holds a value the manifest does not declare.
    """
    mapping = segment_numbers(manifest)
    dtype = np.uint8 if len(mapping) <= 255 else np.uint16
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    elif arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise SegBuildError("the label volume holds non-integer values; pass a label map (integer dtype)")
        arr = rounded.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise SegBuildError(f"the label volume has dtype {arr.dtype}; pass a label map (integer dtype)")
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=dtype)
    low, high = int(arr.min()), int(arr.max())
    declared = sorted(mapping)
    if low >= 0 and declared == list(range(1, len(declared) + 1)):
        # The usual case: labels 1..N are their own segment numbers.
        if high > len(declared):
            raise SegBuildError(_undeclared(arr, mapping))
        return arr if arr.dtype == dtype else arr.astype(dtype)
    if low < 0:
        raise SegBuildError(_undeclared(arr, mapping))
    sentinel = np.iinfo(dtype).max
    lut = np.full(high + 1, sentinel, dtype=dtype)
    lut[0] = 0
    for value, number in mapping.items():
        if value <= high:
            lut[value] = number
    out = lut[arr]
    if len(mapping) < sentinel and np.any(out == sentinel):
        raise SegBuildError(_undeclared(arr, mapping))
    return out


def _undeclared(arr: np.ndarray, mapping: dict[int, int]) -> str:
    values = sorted(set(np.unique(arr).tolist()) - set(mapping) - {0})
    return (
        f"the label volume holds value(s) {values[:10]} that the model package does not declare "
        f"(declared labels: {sorted(mapping)}); fix the model's label_map or the manifest's labels"
    )


# --------------------------------------------------------------------------- sources


def _group_value(ds: Dataset, frame_number: int, sequence: str, keyword: str) -> Any:
    """``keyword`` of functional group ``sequence`` for a frame (per-frame item first, then shared)."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame_number - 1),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items is not None and index < len(items):
            seq = items[index].get(sequence)
            if seq and seq[0].get(keyword) is not None:
                return seq[0].get(keyword)
    return None


def _position(ds: Dataset, frame_number: int | None) -> np.ndarray | None:
    value = (
        ds.get("ImagePositionPatient")
        if frame_number is None
        else _group_value(ds, frame_number, "PlanePositionSequence", "ImagePositionPatient")
    )
    try:
        return None if value is None else np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _orientation(ds: Dataset, multiframe: bool) -> np.ndarray | None:
    value = (
        _group_value(ds, 1, "PlaneOrientationSequence", "ImageOrientationPatient")
        if multiframe
        else ds.get("ImageOrientationPatient")
    )
    try:
        return None if value is None else np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _ordered_sources(labels: Volume, sources: Sequence[Dataset]) -> tuple[list[Dataset], bool]:
    """The source datasets in slice order (single-frame), or the one multi-frame source; and whether multi-frame.

    Raises:
        SegBuildError: the volume does not name its source instances, a slice's
            source is missing, or the slices come from several multi-frame instances.
    """
    if not labels.sop_uids:
        raise SegBuildError(
            "the label volume does not name its source instances (Volume.sop_uids is empty); build it on the "
            "reference series' grid (volume_from_datasets(...).with_array(labels))"
        )
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if uid:
            by_uid.setdefault(uid, ds)
    missing = [(k, uid) for k, uid in enumerate(labels.sop_uids) if uid not in by_uid]
    if missing:
        listed = ", ".join(f"slice {k} (SOP {uid})" for k, uid in missing[:5])
        raise SegBuildError(
            f"{len(missing)} of the label volume's {len(labels.sop_uids)} slice(s) have no source dataset among the "
            f"{len(sources)} given: {listed}{' ...' if len(missing) > 5 else ''}; pass the reference series the "
            "volume was built from"
        )
    if labels.frame_numbers is None:
        ordered = [by_uid[uid] for uid in labels.sop_uids]
        if len(set(labels.sop_uids)) != len(labels.sop_uids):
            raise SegBuildError(
                "the label volume names one SOP Instance for several slices but gives no frame numbers; "
                "rebuild it with volume_from_datasets()"
            )
        if any(is_multiframe(ds) for ds in ordered):
            raise SegBuildError(
                "the label volume has no frame numbers but its source is a multi-frame instance; "
                "rebuild it with volume_from_datasets()"
            )
        return ordered, False
    uids = sorted(set(labels.sop_uids))
    if len(uids) > 1:
        raise SegBuildError(
            f"the label volume's slices come from {len(uids)} instances ({', '.join(uids[:3])}), at least one of "
            "them multi-frame; a SEG can be derived from one multi-frame instance or from single-frame instances only"
        )
    source = by_uid[uids[0]]
    frames = number_of_frames(source)
    bad = [f for f in labels.frame_numbers if not 1 <= f <= frames]
    if bad or len(set(labels.frame_numbers)) != len(labels.frame_numbers):
        raise SegBuildError(
            f"the label volume's frame numbers {sorted(labels.frame_numbers)[:10]} do not fit source SOP {uids[0]} "
            f"({frames} frames, each used once)"
        )
    return [source], True


def _geometry_matches(labels: Volume, ordered: list[Dataset], multiframe: bool) -> tuple[bool, list[np.ndarray]]:
    """Whether the volume lies on its sources' planes; and the sources' own slice positions."""
    source = ordered[0]
    if multiframe:
        assert labels.frame_numbers is not None  # checked by _ordered_sources
        found = [_position(source, f) for f in labels.frame_numbers]
    else:
        found = [_position(ds, None) for ds in ordered]
    if any(p is None for p in found):
        raise GeometryError(
            "a source image has no ImagePositionPatient (or Plane Position functional group); a SEG needs the "
            "patient position of every source plane"
        )
    positions = [p for p in found if p is not None]
    rows, columns = int(source.get("Rows") or 0), int(source.get("Columns") or 0)
    if (rows, columns) != labels.shape[1:]:
        return False, positions
    orientation = _orientation(source, multiframe)
    if orientation is None or orientation.shape != (6,):
        return False, positions
    if not np.allclose(orientation, np.concatenate([labels.direction[:, 0], labels.direction[:, 1]]), atol=1e-3):
        return False, positions
    expected = labels.index_to_lps(np.array([(0.0, 0.0, float(k)) for k in range(labels.shape[0])]))
    tolerance = max(_POSITION_TOLERANCE_MM, 0.01 * labels.spacing[2])
    return bool(np.max(np.linalg.norm(np.stack(positions) - expected, axis=1)) <= tolerance), positions


def _planes_from_volume(
    labels: Volume, positions: Sequence[np.ndarray]
) -> tuple[list[hd.PlanePositionSequence], hd.PlaneOrientationSequence, hd.PixelMeasuresSequence]:
    patient = hd.CoordinateSystemNames.PATIENT
    plane_positions = [hd.PlanePositionSequence(patient, [float(v) for v in p]) for p in positions]
    orientation = hd.PlaneOrientationSequence(
        patient, [float(v) for v in (*labels.direction[:, 0], *labels.direction[:, 1])]
    )
    col_spacing, row_spacing, slice_spacing = labels.spacing
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=[row_spacing, col_spacing], slice_thickness=slice_spacing, spacing_between_slices=slice_spacing
    )
    return plane_positions, orientation, measures


def _pin_frame_references(seg: Dataset, labels: Volume, positions: Sequence[np.ndarray]) -> None:
    """Keep, in each SEG frame's derivation references, only the source frame the volume took at that position.

    highdicom references every source frame at a frame's position; an enhanced
    instance with several images per position (b-values, echoes) would then be
    referenced several times where the volume used one of them.
    """
    assert labels.frame_numbers is not None
    frame_at = {tuple(np.round(p, 3)): f for p, f in zip(positions, labels.frame_numbers, strict=True)}
    for item in seg.get("PerFrameFunctionalGroupsSequence", []):
        key = tuple(np.round([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], 3))
        frame = frame_at.get(key)
        derivation = item.get("DerivationImageSequence")
        if frame is None or not derivation:
            continue
        refs = [r for r in derivation[0].SourceImageSequence if int(r.get("ReferencedFrameNumber", 0)) == frame]
        if refs:
            derivation[0].SourceImageSequence = refs


# --------------------------------------------------------------------------- build


def _construction_charset(source: Dataset) -> Any:
    """The Specific Character Set to construct the SEG with: the source's where highdicom accepts it.

    highdicom refuses valid values it does not list, e.g. ``['', 'ISO 2022 IR 87']``
    (an empty first value = the default repertoire, as Japanese sites send). The SEG
    is then built with UTF-8 and :func:`copy_study_attributes` restores the
    source's value before anything is encoded (pydicom encodes text on writing).
    """
    charset = source.get("SpecificCharacterSet")
    if charset is None:
        return None
    values = [charset] if isinstance(charset, str) else list(charset)
    try:
        for value in values:
            hd.enum.SpecificCharacterSetValues(value)
    except ValueError:
        return "ISO_IR 192"
    return charset


def build_seg(
    labels: Volume,
    sources: Sequence[Dataset],
    manifest: Manifest,
    identity: ResultIdentity,
    *,
    pipeline: str,
    node_version: str,
    seg_type: str | SegmentationType = SegmentationType.BINARY,
    series_number: int = 9001,
    instance_number: int = 1,
    segments: Sequence[Segment] | None = None,
) -> Dataset:
    """A DICOM SEG of the output segments of ``labels`` on the grid of the reference series ``sources``.

    Args:
        labels: The label volume on the reference series' grid (``Volume.sop_uids``
            and, for an enhanced source, ``Volume.frame_numbers`` name each slice's
            source), integer values = the manifest's label values, 0 = background.
        sources: The reference series' datasets, in any order; header-only datasets
            (``dcmread(..., stop_before_pixels=True)``) suffice. Datasets the volume
            does not use (other b-values, a localizer) are ignored.
        manifest: The model package's manifest (labels, codes, colours, name, version, demo flag).
        identity: The job's result identity; the SEG's Series and SOP Instance UIDs
            are ``identity.series_uid("SEG")`` and ``identity.instance_uid("SEG")``.
        pipeline: Pipeline name, for Series Description ``AI <pipeline> SEG`` and Content Label ``AI_<PIPELINE>``.
        node_version: The node's version, first value of Software Versions.
        seg_type: ``"binary"`` (default) or ``"labelmap"`` (a :class:`SegmentationType`
            or highdicom's ``SegmentationTypeValues`` are accepted too).
        series_number: Series Number of the SEG.
        instance_number: Instance Number of the SEG.
        segments: the output segments (:func:`inference.segments.build_segments`, as the
            runner made them); default: built from ``labels`` with no body midline (a
            segment sided by a single organ then cannot be built).

    Returns:
        A :class:`highdicom.seg.Segmentation` (a pydicom Dataset) ready to encode.
        Each frame references its source instance (and frame) and carries its
        plane position; empty frames are omitted; every declared label is
        described as a segment, numbered as :func:`segment_numbers` says. An
        all-background volume (nothing found) gives one empty frame per segment
        (LABELMAP: one frame) on its first slice, still referencing every source.

    Raises:
        ValueError: ``seg_type`` is not one of the two types.
        SegBuildError: The volume does not name its sources, a slice's source is
            missing from ``sources``, the slices come from several multi-frame
            instances, or the volume holds non-integer or undeclared label values.
        GeometryError: A source image has no position, or the volume's frame of
            reference is not the sources'.
    """
    kind = _segmentation_type(seg_type)
    if not manifest.labels:
        raise SegBuildError(f"model {manifest.name} {manifest.version} declares no labels; nothing to describe")
    ordered, multiframe = _ordered_sources(labels, sources)
    source0 = ordered[0]
    source_for = str(source0.get("FrameOfReferenceUID", "") or "")
    if labels.frame_of_reference_uid and source_for and labels.frame_of_reference_uid != source_for:
        raise GeometryError(
            f"the label volume is in frame of reference {labels.frame_of_reference_uid} but its source series "
            f"{source0.get('SeriesInstanceUID', '?')} in {source_for}; build the labels on the reference series' grid"
        )
    _segment_array(labels.array, manifest)  # every value is a declared label
    if segments is None:
        segments = build_segments(labels, manifest, midline_x=None)
    pixels = _segment_pixels(segments, kind, labels.shape)
    on_grid, positions = _geometry_matches(labels, ordered, multiframe)

    # Nothing found (no lesion): highdicom would then keep every (segment, slice)
    # frame, all empty; one frame per segment on the first slice says the same.
    empty = not bool(pixels.any())
    slices = 1 if empty else labels.shape[0]
    spatial: dict[str, Any] = {}
    further: list[Dataset] = []
    pin_frames = False
    if not on_grid:
        logger.warning(
            "SEG for series %s: the label volume does not lie on its source planes; using the volume's own "
            "geometry (per-frame source references may be missing)",
            source0.get("SeriesInstanceUID", "?"),
        )
        vol_positions = labels.index_to_lps(np.array([(0.0, 0.0, float(k)) for k in range(slices)]))
        planes, orientation, measures = _planes_from_volume(labels, list(vol_positions))
        spatial = {"plane_positions": planes, "plane_orientation": orientation, "pixel_measures": measures}
        pixels = pixels[:slices]
    elif multiframe:
        assert labels.frame_numbers is not None
        frames = number_of_frames(source0)
        if not empty and sorted(labels.frame_numbers) == list(range(1, frames + 1)):
            # Every frame used once: hand highdicom the array in the source's frame order.
            by_frame = np.empty_like(pixels)
            by_frame[np.asarray(labels.frame_numbers) - 1] = pixels
            pixels = by_frame
        else:
            # A subset of the frames (one b-value of several): explicit positions, references pinned afterwards.
            planes, _, _ = _planes_from_volume(labels, positions[:slices])
            spatial = {"plane_positions": planes}
            pixels = pixels[:slices]
            pin_frames = True
    elif empty:
        # The first slice's source defines the frame; the others are still referenced.
        ordered, further, pixels = ordered[:1], ordered[1:], pixels[:1]

    algorithm = _algorithm(manifest)
    descriptions = [_segment_description(seg.number, seg.spec, algorithm) for seg in segments]
    model = f"{manifest.name} {manifest.version}"
    content_description = _lo(f"{DEMO_WARNING}: {model}" if manifest.demo else f"AI segmentation: {model}")

    seg = hd.seg.Segmentation(
        source_images=ordered,
        further_source_images=further or None,
        pixel_array=pixels,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP
            if kind is SegmentationType.LABELMAP
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        series_instance_uid=identity.series_uid("SEG"),
        series_number=series_number,
        sop_instance_uid=identity.instance_uid("SEG"),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=_lo(manifest.name),
        software_versions=[_lo(v) for v in software_versions(manifest.name, manifest.version, node_version)],  # type: ignore[arg-type]
        device_serial_number=hashlib.sha256(f"{MANUFACTURER}|{manifest.name}".encode()).hexdigest()[:16],
        content_description=content_description,
        content_label=_content_label(pipeline),
        series_description=_lo(f"AI {pipeline} SEG"),
        omit_empty_frames=not empty,
        specific_character_set=_construction_charset(source0),
        **spatial,
    )
    if pin_frames:
        _pin_frame_references(seg, labels, positions)
    # Patient and study attributes with the source's own Specific Character Set
    # (restoring it where highdicom could not take it, see _construction_charset).
    copy_study_attributes(source0, seg)
    if manifest.demo:
        seg.ImageComments = f"{DEMO_WARNING}. {model}: {manifest.intended_use}".strip()
    logger.debug(
        "SEG %s (%s) for series %s: %d segment(s), %d frame(s)",
        seg.SOPInstanceUID,
        kind.value,
        source0.get("SeriesInstanceUID", "?"),
        len(descriptions),
        int(seg.NumberOfFrames),
    )
    return seg
