"""DICOM SEG output: segments, pixels, geometry, references, identity, validators.

Every SEG is encoded to bytes and read back (highdicom ``segread``) before it
is checked; the BINARY SEG is also run through dicom3tools' ``dciodvfy``.
Sources are small synthetic series of known orientation, read back header-only
(``stop_before_pixels``) as the worker would hand them over.
"""

from __future__ import annotations

import dataclasses
import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from inference.manifest import Manifest
from inference.outputs.common import DEMO_WARNING, MANUFACTURER, ResultIdentity
from inference.outputs.seg import SegBuildError, SegmentationType, build_seg, segment_numbers
from inference.volume import FrameSelection, Volume, volume_from_datasets
from pacs_lab.synthetic import make_oriented_series, new_uid
from tests.conftest import dciodvfy
from tests.test_volume import make_enhanced

PIPELINE = "kidney"

LABELS: dict[int, dict[str, Any]] = {
    1: {
        "name": "Lesion",
        "category": {"value": "49755003", "meaning": "Morphologically Altered Structure"},
        "type": {"value": "52988006", "meaning": "Lesion"},
        "color": [255, 255, 0],
    },
    2: {"name": "Left kidney", "type": {"value": "64033007", "meaning": "Kidney"}, "laterality": "left"},
    4: {
        "name": "Right kidney",
        "type": {"value": "64033007", "meaning": "Kidney"},
        "laterality": "right",
        "color": [0, 128, 255],
    },
    5: {
        "name": "Renal cortex",
        "type": {"value": "64033007", "meaning": "Kidney"},
        "modifier": {"value": "68493006", "meaning": "Cortex"},
        "color": [10, 200, 30],
    },
}
#: label value -> segment number (values are not consecutive on purpose)
NUMBERS = {1: 1, 2: 2, 4: 3, 5: 4}


def make_manifest(*, demo: bool = False, version: str = "1.0.0") -> Manifest:
    return Manifest.model_validate(
        {
            "name": "test-kidneys",
            "version": version,
            "intended_use": "tests only",
            "demo": demo,
            "inputs": [{"role": "ct"}],
            "reference": "ct",
            "labels": LABELS,
            "stages": [
                {"name": "k", "label_map": {v: v for v in LABELS}, "model": {"backend": "nnunet", "folders": "x"}}
            ],
        }
    )


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def header_only(datasets: Sequence[Dataset]) -> list[Dataset]:
    """The datasets as the worker reads them from disk: encoded, then read without pixel data."""
    return [pydicom.dcmread(io.BytesIO(encode(ds)), stop_before_pixels=True) for ds in datasets]


def series(**kwargs: Any) -> list[Dataset]:
    """A small series (rows != columns, so a transposition shows) in a fresh frame of reference."""
    args: dict[str, Any] = {"rows": 24, "cols": 20, "slices": 8, "spacing": (2.0, 2.5, 3.0)}
    args.update(kwargs)
    return make_oriented_series(lambda p: np.full(len(p), 100.0), FrameOfReferenceUID=new_uid(), **args)


def label_volume(volume: Volume) -> Volume:
    """Labels placed by patient position: label 2 on the patient's left (+x), 4 on the right, 1 at the centre.

    Label 5 is declared but absent (an empty segment).
    """
    z, y, x = volume.shape
    kk, jj, ii = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    lps = volume.index_to_lps(np.stack([ii, jj, kk], axis=-1).reshape(-1, 3).astype(float)).reshape(z, y, x, 3)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[(lps[..., 0] > 8) & (np.abs(lps[..., 1]) < 10) & (np.abs(lps[..., 2]) < 7)] = 2
    labels[(lps[..., 0] < -8) & (np.abs(lps[..., 1]) < 6) & (lps[..., 2] > -4) & (lps[..., 2] < 8)] = 4
    labels[(np.abs(lps[..., 0]) < 3) & (np.abs(lps[..., 1]) < 3) & (np.abs(lps[..., 2]) < 2)] = 1
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 4}
    return volume.with_array(labels)


def identity_for(sources: Sequence[Dataset], version: str = "1.0.0") -> ResultIdentity:
    return ResultIdentity.of((str(ds.SOPInstanceUID) for ds in sources), PIPELINE, "test-kidneys", version)


def build(
    labels: Volume,
    sources: Sequence[Dataset],
    manifest: Manifest | None = None,
    identity: ResultIdentity | None = None,
    **kwargs: Any,
) -> Dataset:
    return build_seg(
        labels,
        sources,
        manifest or make_manifest(),
        identity or identity_for(sources),
        pipeline=PIPELINE,
        node_version="9.9.9",
        **kwargs,
    )


def read_back(seg: Dataset) -> hd.seg.Segmentation:
    return hd.seg.segread(io.BytesIO(encode(seg)))


def expected_segments(labels: Volume) -> np.ndarray:
    out = np.zeros(labels.shape, dtype=np.uint8)
    for value, number in NUMBERS.items():
        out[labels.array == value] = number
    return out


def frame_pixels(seg: hd.seg.Segmentation) -> np.ndarray:
    """Stored frames, (frames, rows, columns)."""
    return np.asarray(seg.pixel_array).reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))


def frame_references(seg: Dataset) -> list[tuple[str, int | None, tuple[float, ...]]]:
    """(referenced SOP, referenced frame or None, plane position) of every SEG frame."""
    out = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        refs = item.DerivationImageSequence[0].SourceImageSequence
        assert len(refs) == 1, "each frame references exactly one source image"
        frame = refs[0].get("ReferencedFrameNumber")
        position = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        out.append((str(refs[0].ReferencedSOPInstanceUID), None if frame is None else int(frame), position))
    return out


@pytest.fixture(scope="module")
def axial() -> tuple[list[Dataset], Volume]:
    datasets = series()
    random.Random(3).shuffle(datasets)
    return header_only(datasets), label_volume(volume_from_datasets(datasets))


# --------------------------------------------------------------------------- BINARY


def test_segment_numbers_follow_ascending_label_values() -> None:
    assert segment_numbers(make_manifest()) == NUMBERS


def test_binary_seg_round_trip(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    manifest = make_manifest()
    seg = read_back(build(labels, sources, manifest))

    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.SeriesDescription == f"AI {PIPELINE} SEG"
    assert seg.ContentLabel == "AI_KIDNEY"
    assert seg.Manufacturer == MANUFACTURER
    assert seg.ManufacturerModelName == "test-kidneys"
    assert list(seg.SoftwareVersions) == [f"{MANUFACTURER} 9.9.9", "test-kidneys 1.0.0"]
    assert seg.DeviceSerialNumber
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert DEMO_WARNING not in encode(seg).decode("latin-1")

    # Every declared label is a segment, the empty one (label 5) too.
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3, 4]
    for value, number in NUMBERS.items():
        spec = manifest.labels[value]
        item = seg.SegmentSequence[number - 1]
        assert item.SegmentLabel == spec.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == (spec.category.value, "SCT")
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator, prop.CodeMeaning) == (
            spec.type.value,
            "SCT",
            spec.type.meaning,
        )
        modifiers = [m.CodeValue for m in prop.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        expected_modifier = {1: [], 2: ["7771000"], 4: ["24028007"], 5: ["68493006"]}[value]
        assert modifiers == expected_modifier
        rgb = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb(clip=True)
        assert np.max(np.abs(np.array(rgb) - np.array(spec.color))) <= 1
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "test-kidneys"
        assert algorithm.AlgorithmVersion == "1.0.0"
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")  # Artificial Intelligence

    # The pixels, reconstructed per source instance, are the label volume.
    got = seg.get_pixels_by_source_instance(
        list(labels.sop_uids), combine_segments=True, assert_missing_frames_are_empty=True, dtype=np.uint8
    )
    np.testing.assert_array_equal(got, expected_segments(labels))
    # Empty frames are left out; the empty segment has none.
    present = {
        int(i.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for i in seg.PerFrameFunctionalGroupsSequence
    }
    assert present == {1, 2, 3}
    expected_frames = sum(int(np.any(labels.array[k] == v)) for k in range(labels.shape[0]) for v in NUMBERS)
    assert int(seg.NumberOfFrames) == expected_frames


def test_binary_seg_frames_sit_on_their_source_planes(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    seg = read_back(build(labels, sources))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for sop, frame, position in frame_references(seg):
        assert frame is None
        np.testing.assert_allclose(position, [float(v) for v in by_uid[sop].ImagePositionPatient], atol=1e-4)


def test_binary_seg_passes_dciodvfy(axial: tuple[list[Dataset], Volume], tmp_path: Path) -> None:
    sources, labels = axial
    path = tmp_path / "seg.dcm"
    path.write_bytes(encode(build(labels, sources, make_manifest(demo=True))))
    lines = dciodvfy(path).splitlines()
    assert "Segmentation" in lines, "dciodvfy did not recognise the Segmentation IOD:\n" + "\n".join(lines)


# --------------------------------------------------------------------------- LABELMAP


@pytest.mark.parametrize("seg_type", ["labelmap", "LABELMAP", SegmentationType.LABELMAP])
def test_labelmap_seg_round_trip(axial: tuple[list[Dataset], Volume], seg_type: Any) -> None:
    sources, labels = axial
    seg = read_back(build(labels, sources, seg_type=seg_type))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert seg.SegmentationType == "LABELMAP"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [0, 1, 2, 3, 4]  # 0: background
    assert [s.SegmentLabel for s in seg.SegmentSequence[1:]] == [LABELS[v]["name"] for v in sorted(LABELS)]
    got = seg.get_pixels_by_source_instance(
        list(labels.sop_uids), combine_segments=True, assert_missing_frames_are_empty=True, dtype=np.uint8
    )
    np.testing.assert_array_equal(got, expected_segments(labels))
    for sop, _, _ in frame_references(seg):
        assert sop in labels.sop_uids
    assert int(seg.NumberOfFrames) == int(np.count_nonzero(labels.array.any(axis=(1, 2))))


@pytest.mark.parametrize(("seg_type", "frames"), [("binary", 4), ("labelmap", 1)])
def test_nothing_found_gives_a_small_seg(seg_type: str, frames: int, tmp_path: Path) -> None:
    datasets = series()
    labels = volume_from_datasets(datasets)
    empty = labels.with_array(np.zeros(labels.shape, dtype=np.uint8))
    seg = read_back(build(empty, header_only(datasets), seg_type=seg_type))
    assert int(seg.NumberOfFrames) == frames
    assert not np.any(frame_pixels(seg))
    first = labels.sop_uids[0]
    for sop, _, position in frame_references(seg):
        assert sop == first
        np.testing.assert_allclose(position, labels.origin, atol=1e-4)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(labels.sop_uids)
    got = seg.get_pixels_by_source_instance(
        list(labels.sop_uids), combine_segments=True, assert_missing_frames_are_empty=True, dtype=np.uint8
    )
    assert not got.any()


def test_seg_type_is_validated(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    with pytest.raises(ValueError, match="seg_type"):
        build(labels, sources, seg_type="fractional")


# --------------------------------------------------------------------------- geometry


def _frames_by_position(seg: hd.seg.Segmentation) -> dict[tuple[int, tuple[float, ...]], bytes]:
    pixels = frame_pixels(seg)
    out = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        out[(number, position)] = pixels[index].tobytes()
    return out


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_reversed_and_shuffled_series_give_the_same_frames(orientation: str) -> None:
    forward = series(orientation=orientation, flip_rows=True)
    backward = series(orientation=orientation, flip_rows=True, reverse=True)
    random.Random(7).shuffle(backward)
    segs = []
    for datasets in (forward, backward):
        sources = header_only(datasets)
        labels = label_volume(volume_from_datasets(datasets))
        seg = read_back(build(labels, sources[::-1]))
        by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
        for sop, _, position in frame_references(seg):
            np.testing.assert_allclose(position, [float(v) for v in by_uid[sop].ImagePositionPatient], atol=1e-4)
        segs.append(seg)
    assert _frames_by_position(segs[0]) == _frames_by_position(segs[1])


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_left_segment_lies_on_the_patients_left(orientation: str) -> None:
    """Laterality guard: pixels of the 'Left kidney' segment map to +x (patient's left) in LPS."""
    datasets = series(orientation=orientation, flip_rows=True)
    labels = label_volume(volume_from_datasets(datasets))
    seg = read_back(build(labels, header_only(datasets)))
    iop = np.array(
        [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    )
    row_spacing, col_spacing = (
        float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    )
    pixels = frame_pixels(seg)
    xs: dict[int, list[float]] = {2: [], 3: []}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in xs:
            continue
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        rr, cc = np.nonzero(pixels[index])
        points = ipp + cc[:, None] * col_spacing * iop[:3] + rr[:, None] * row_spacing * iop[3:]
        xs[number].extend(points[:, 0].tolist())
    assert xs[2] and min(xs[2]) > 0, "Left kidney (segment 2) must lie at +x, the patient's left"
    assert xs[3] and max(xs[3]) < 0, "Right kidney (segment 3) must lie at -x, the patient's right"


def test_volume_off_its_source_planes_keeps_its_own_geometry(caplog: pytest.LogCaptureFixture) -> None:
    """A label volume shifted in-plane (e.g. resampled) is written where it lies, not on the source planes."""
    datasets = series()
    labels = label_volume(volume_from_datasets(datasets))
    shifted = dataclasses.replace(labels, origin=labels.origin + np.array([0.7, 0.0, 0.0]))
    seg = read_back(build(shifted, header_only(datasets)))
    assert "does not lie on its source planes" in caplog.text
    z_of = {round(float(ds.ImagePositionPatient[2]), 3): str(ds.SOPInstanceUID) for ds in datasets}
    for sop, _, position in frame_references(seg):
        k = round(float(shifted.lps_to_index(np.array(position))[2]))
        np.testing.assert_allclose(position, shifted.index_to_lps((0.0, 0.0, float(k))), atol=1e-4)
        assert sop == z_of[round(position[2], 3)]  # the coplanar source image


# --------------------------------------------------------------------------- multi-frame


def _enhanced(slices: list[Dataset], frame_order: list[int]) -> Dataset:
    ds = make_enhanced(slices, frame_order)
    first = slices[0]
    for keyword in (
        "SpecificCharacterSet",
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, first.get(keyword))
    ds.SeriesNumber, ds.InstanceNumber, ds.ImageType = 2, 1, ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    return ds


def test_enhanced_source_frames_reference_their_frame_numbers() -> None:
    slices = series(modality="CT")
    order = [3, 0, 6, 1, 7, 4, 2, 5]  # frame f holds slice order[f - 1]
    enhanced = _enhanced(slices, order)
    labels = label_volume(volume_from_datasets([enhanced]))
    assert labels.frame_numbers is not None
    sources = header_only([enhanced])
    seg = read_back(build(labels, sources))

    slice_of_frame = {f: k for k, f in enumerate(labels.frame_numbers)}
    source_positions = {
        f: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for f, item in enumerate(sources[0].PerFrameFunctionalGroupsSequence, start=1)
    }
    seen = set()
    for sop, frame, position in frame_references(seg):
        assert sop == enhanced.SOPInstanceUID
        assert frame is not None
        np.testing.assert_allclose(position, source_positions[frame], atol=1e-4)
        seen.add(frame)
    assert seen == {f for f, k in slice_of_frame.items() if labels.array[k].any()}
    got = seg.get_pixels_by_source_frame(
        str(enhanced.SOPInstanceUID),
        list(range(1, len(order) + 1)),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
        dtype=np.uint8,
    )
    expected = expected_segments(labels)
    np.testing.assert_array_equal(got, expected[[slice_of_frame[f] for f in range(1, len(order) + 1)]])


def test_enhanced_source_subset_references_only_the_frames_used() -> None:
    """Two images per position (like two b-values): the SEG of frames 9-16 references only those."""
    slices = series(modality="CT")
    enhanced = _enhanced(slices, list(range(8)) + list(range(8)))
    labels = label_volume(volume_from_datasets([FrameSelection(enhanced, tuple(range(9, 17)))]))
    assert labels.frame_numbers == tuple(range(9, 17))
    seg = read_back(build(labels, header_only([enhanced])))
    frames = [frame for _, frame, _ in frame_references(seg)]
    assert frames and all(frame is not None and 9 <= frame <= 16 for frame in frames)
    got = seg.get_pixels_by_source_frame(
        str(enhanced.SOPInstanceUID),
        list(range(9, 17)),
        combine_segments=True,
        assert_missing_frames_are_empty=True,
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(got, expected_segments(labels))


# --------------------------------------------------------------------------- identity and text


def test_uids_are_deterministic_and_follow_the_model_version(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    first = build(labels, sources, identity=identity_for(sources))
    again = build(labels, list(reversed(sources)), identity=identity_for(list(reversed(sources))))
    bumped = build(labels, sources, make_manifest(version="1.0.1"), identity_for(sources, version="1.0.1"))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert first.SeriesInstanceUID == identity_for(sources).series_uid("SEG")
    assert first.SOPInstanceUID == identity_for(sources).instance_uid("SEG")
    assert bumped.SeriesInstanceUID != first.SeriesInstanceUID
    assert bumped.SOPInstanceUID != first.SOPInstanceUID


def test_demo_model_is_marked(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    seg = read_back(build(labels, sources, make_manifest(demo=True)))
    assert seg.SeriesDescription == f"AI {PIPELINE} SEG"
    assert DEMO_WARNING in seg.ContentDescription
    assert DEMO_WARNING in seg.ImageComments
    for item in seg.SegmentSequence:
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert "demo" in algorithm.AlgorithmName
        assert DEMO_WARNING in algorithm.AlgorithmSource


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "山田^太郎"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
    ],
)
def test_patient_name_survives_with_the_source_character_set(charset: Any, name: str) -> None:
    datasets = series(slices=3)
    for ds in datasets:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
    labels = label_volume(volume_from_datasets(datasets))
    seg = pydicom.dcmread(io.BytesIO(encode(build(labels, header_only(datasets)))))
    assert seg.SpecificCharacterSet == charset
    assert str(seg.PatientName) == name


# --------------------------------------------------------------------------- errors


def test_missing_source_is_reported(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    missing = labels.sop_uids[2]
    with pytest.raises(SegBuildError, match=missing):
        build(labels, [ds for ds in sources if ds.SOPInstanceUID != missing])


def test_undeclared_label_value_is_refused(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    array = labels.array.copy()
    array[0, 0, 0] = 3  # not declared by the manifest
    with pytest.raises(ValueError, match=r"\[3\]"):
        build(labels.with_array(array), sources)


def test_volume_without_sources_is_refused(axial: tuple[list[Dataset], Volume]) -> None:
    sources, labels = axial
    bare = Volume(labels.array, labels.origin, labels.spacing, labels.direction)
    with pytest.raises(SegBuildError, match="sop_uids"):
        build(bare, sources)
