"""TID 1500 SR and "not processed" notice: bytes round trip, dciodvfy, content.

The SEG is built here with highdicom directly (segments 1..N in ascending label
value, the convention of ``inference.outputs.seg``), on a small synthetic MR
series; the metrics come from the real ``inference.segments.measure_segments``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes

from inference.manifest import Manifest
from inference.outputs.common import DEMO_WARNING, MANUFACTURER, ResultIdentity, derived_uid
from inference.outputs.notice import build_not_processed_notice
from inference.outputs.seg import segment_numbers
from inference.outputs.sr import ReportError, build_sr, volumes_from_sr
from inference.segments import build_segments, measure_segments
from inference.volume import Volume, volume_from_datasets
from pacs_lab.synthetic import make_series
from tests.conftest import dciodvfy

PIPELINE = "dentate"
SPACING = (0.8, 0.8, 2.5)  # column, row, slice (mm)
ROWS = COLS = 16
SLICES = 6
VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")
SUSCEPTIBILITY = hd.sr.CodedConcept("126396", "DCM", "Magnetic Susceptibility")
NUMBER_OF_LESIONS = hd.sr.CodedConcept("246206008", "SCT", "Number of lesions")
MEAN = hd.sr.CodedConcept("373098007", "SCT", "Mean")
LEFT = hd.sr.CodedConcept("7771000", "SCT", "Left")
RIGHT = hd.sr.CodedConcept("24028007", "SCT", "Right")

#: Label values deliberately not contiguous: segments are 1..4 in ascending label value.
MANIFEST_DATA: dict[str, Any] = {
    "name": "dn-demo",
    "version": "1.2.0",
    "intended_use": "tests",
    "demo": True,
    "inputs": [{"role": "qsm"}],
    "reference": "qsm",
    "labels": {
        1: {
            "name": "left dentate nucleus",
            "type": {"value": "42932006", "meaning": "Dentate nucleus"},
            "laterality": "left",
            "measure_mean_of": ["qsm"],
            "mean_unit": "[ppb]",
        },
        2: {
            "name": "right dentate nucleus",
            "type": {"value": "42932006", "meaning": "Dentate nucleus"},
            "laterality": "right",
            "measure_mean_of": ["qsm"],
            "mean_unit": "[ppb]",
        },
        5: {
            "name": "lesion",
            "category": {"value": "49755003", "meaning": "Morphologically Abnormal Structure"},
            "type": {"value": "52988006", "meaning": "Lesion"},
            "count_components": True,
        },
        7: {
            "name": "kidney",
            "type": {"value": "64033007", "meaning": "Kidney"},
        },
    },
    "stages": [
        {
            "name": "seg",
            "model": {
                "backend": "native",
                "network": "DynUNet",
                "network_args": {},
                "weights": "w.safetensors",
                "spacing": [1, 1, 1],
                "patch_size": [8, 8, 8],
            },
            "label_map": {1: 1, 2: 2, 3: 5, 4: 7},
        }
    ],
}


def _manifest(**over: Any) -> Manifest:
    return Manifest.model_validate({**MANIFEST_DATA, **over})


def _roundtrip(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


def _sources(patient_name: str = "Müller^Jürgen", charset: str | list[str] = "ISO_IR 100") -> list[Dataset]:
    out = []
    for ds in make_series(SLICES, modality="MR", rows=ROWS, cols=COLS, spacing=SPACING, seed=3):
        ds.SpecificCharacterSet = charset
        ds.PatientName = patient_name
        out.append(_roundtrip(ds))
    return out


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    """Label map [z, y, x]: left DN at high x (patient left), right DN at low x, two lesions, no kidney."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:4, 4:8, 10:14] = 1  # 3*4*4 = 48 voxels
    labels[1:3, 4:7, 1:5] = 2  # 2*3*4 = 24 voxels
    labels[4:6, 10:13, 2:5] = 5  # 2*3*3 = 18 voxels
    labels[5, 13:15, 12:14] = 5  # 4 voxels, a second lesion
    return labels


def _seg(sources: Sequence[Dataset], labels: Volume, manifest: Manifest) -> Dataset:
    numbers = segment_numbers(manifest)
    segment_map = np.zeros(labels.shape, dtype=np.uint8)
    for value, number in numbers.items():
        segment_map[labels.array == value] = number
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    ordered = [by_uid[uid] for uid in labels.sop_uids]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manifest.name, version=manifest.version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=manifest.labels[value].name,
            segmented_property_category=hd.sr.CodedConcept(
                manifest.labels[value].category.value, "SCT", manifest.labels[value].category.meaning
            ),
            segmented_property_type=hd.sr.CodedConcept(
                manifest.labels[value].type.value, "SCT", manifest.labels[value].type.meaning
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for value, number in numbers.items()
    ]
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=segment_map,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid("test-seg-series"),
        series_number=9001,
        sop_instance_uid=derived_uid("test-seg-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.name,
        software_versions="test",
        device_serial_number="1",
        specific_character_set=None,  # highdicom refuses the valid "\\ISO 2022 IR 87"; copied below
    )
    seg.SpecificCharacterSet = sources[0].SpecificCharacterSet
    return _roundtrip(seg)


class Case(SimpleNamespace):
    sources: list[Dataset]
    labels: Volume
    manifest: Manifest
    identity: ResultIdentity
    metrics: dict[str, Any]
    seg: Dataset
    sr: Dataset
    read: Any


def _case(
    *, patient_name: str = "Müller^Jürgen", charset: str | list[str] = "ISO_IR 100", version: str = "1.2.0"
) -> Case:
    manifest = _manifest(version=version)
    sources = _sources(patient_name, charset)
    image = volume_from_datasets(sources)
    labels = image.with_array(_labels(image.shape))
    metrics = measure_segments(build_segments(labels, manifest, midline_x=None), labels, {"qsm": image})
    identity = ResultIdentity.of([ds.SOPInstanceUID for ds in sources], PIPELINE, manifest.name, manifest.version)
    seg = _seg(sources, labels, manifest)
    sr = build_sr(seg, sources, metrics, manifest, identity, pipeline=PIPELINE, node_version="0.9.0")
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    read = hd.sr.srread(io.BytesIO(buf.getvalue()))
    return Case(
        sources=sources, labels=labels, manifest=manifest, identity=identity, metrics=metrics, seg=seg, sr=sr, read=read
    )


@pytest.fixture(scope="module")
def case() -> Case:
    return _case()


def _groups(read: Any) -> list[Any]:
    return list(read.content.get_volumetric_roi_measurement_groups())


def _segment_number(group: Any) -> int | None:
    """The segment a group references; None for a lesion's group (located by a point instead)."""
    if group.referenced_segment is None:
        return None
    return int(group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)


def _lesion_groups(read: Any) -> list[Any]:
    return [g for g in _groups(read) if g.referenced_segment is None]


def _dciodvfy(ds: Dataset, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    # dcmtk's SR reader checks the content tree's relationship constraints, when installed
    dsrdump = shutil.which("dsrdump")
    if dsrdump is not None:
        proc = subprocess.run(
            [dsrdump, "-Ec", "-Ee", str(path)], capture_output=True, text=True, errors="replace", timeout=60
        )
        problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("E:")]
        assert proc.returncode == 0 and not problems, f"dsrdump rejects {name}:\n{proc.stdout}{proc.stderr}"


# -- the report ------------------------------------------------------------------------


def test_sr_round_trips_and_validates(case: Case, tmp_path: Path) -> None:
    assert isinstance(case.read, hd.sr.Comprehensive3DSR)
    assert isinstance(case.read.content, hd.sr.MeasurementReport)
    assert case.read.Manufacturer == MANUFACTURER
    assert case.read.SeriesNumber == 9002
    assert case.read.SeriesDescription.startswith(f"AI {PIPELINE} SR")
    assert list(case.read.SoftwareVersions) == [f"{MANUFACTURER} 0.9.0", "dn-demo 1.2.0"]
    assert case.read.StudyInstanceUID == case.sources[0].StudyInstanceUID
    assert case.read.AccessionNumber == case.sources[0].AccessionNumber
    evidence = {uid for _, _, uid, _ in case.read.get_evidence()}
    assert case.seg.SOPInstanceUID in evidence
    assert {ds.SOPInstanceUID for ds in case.sources} <= evidence
    _dciodvfy(case.sr, tmp_path, "sr")


def test_device_observer_and_procedure(case: Case) -> None:
    (observer,) = case.read.content.get_observer_contexts(observer_type=codes.DCM.Device)
    attrs = observer.observer_identifying_attributes
    assert attrs.name == "pacs-node"
    assert attrs.manufacturer_name == MANUFACTURER
    assert attrs.model_name == "dn-demo 1.2.0"
    procedures = [
        item.value for item in case.read.content[0].ContentSequence if item.name == codes.DCM.ProcedureReported
    ]
    assert procedures == [hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region")]


def test_every_segment_has_its_group_with_the_seg_volume(case: Case) -> None:
    seg = hd.seg.segread(io.BytesIO(_bytes(case.seg)))
    numbers = sorted(int(s.SegmentNumber) for s in seg.SegmentSequence)
    assert numbers == [1, 2, 3, 4]
    # voxel volume from the source geometry: PixelSpacing x slice spacing
    positions = sorted(float(ds.ImagePositionPatient[2]) for ds in case.sources)
    slice_spacing = positions[1] - positions[0]
    row_mm, col_mm = (float(v) for v in case.sources[0].PixelSpacing)
    voxel_ml = row_mm * col_mm * slice_spacing / 1000.0
    uids = [ds.SOPInstanceUID for ds in case.sources]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=False, skip_overlap_checks=True)
    volumes = volumes_from_sr(case.read)
    assert sorted(volumes) == numbers
    for k, number in enumerate(numbers):
        expected = float(pixels[..., k].astype(bool).sum()) * voxel_ml
        assert volumes[number] == pytest.approx(expected, rel=1e-3, abs=1e-9), f"segment {number}"
    assert volumes[4] == 0.0  # the kidney label is empty but reported
    # the segment-level groups reference the SEG and the source series
    for group in _groups(case.read):
        ref = group.referenced_segment
        if ref is None:  # a lesion's own group: located by its centroid (see below)
            continue
        assert ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == case.seg.SOPInstanceUID
        assert ref[1].value == case.sources[0].SeriesInstanceUID
    # volumes_from_sr also reads a plain pydicom dataset
    assert volumes_from_sr(dcmread(io.BytesIO(_bytes(case.sr)))) == volumes


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_laterality_and_means(case: Case) -> None:
    by_segment = {}
    for group in _groups(case.read):
        by_segment.setdefault(_segment_number(group), group)
    left, right, lesion, kidney = (by_segment[n] for n in (1, 2, 3, 4))
    assert left.tracking_identifier == "left dentate nucleus"
    assert left.finding_type == hd.sr.CodedConcept("42932006", "SCT", "Dentate nucleus")
    (site,) = left.finding_sites
    assert site.laterality == LEFT
    assert right.finding_sites[0].laterality == RIGHT
    assert lesion.finding_sites == []
    assert kidney.finding_sites[0].laterality is None
    (mean,) = left.get_measurements(name=SUSCEPTIBILITY)
    assert mean.derivation == MEAN
    assert mean.unit.value == "[ppb]"
    assert mean.value == pytest.approx(case.metrics["segments"]["1"]["mean"]["qsm"], rel=1e-6)
    assert lesion.get_measurements(name=SUSCEPTIBILITY) == []


def test_lesion_count_and_per_lesion_volumes(case: Case) -> None:
    (whole,) = [g for g in _groups(case.read) if _segment_number(g) == 3]
    lesions = _lesion_groups(case.read)
    (count,) = whole.get_measurements(name=NUMBER_OF_LESIONS)
    assert count.value == 2
    # each lesion is named with its slices (1-based, the source series' order): z 4-5 and z 5 of _labels
    assert [g.tracking_identifier for g in lesions] == ["lesion lesion 1, slices 5-6", "lesion lesion 2, slices 6-6"]
    voxel_ml = case.labels.voxel_volume_ml
    got = [g.get_measurements(name=VOLUME)[0].value for g in lesions]
    assert got == pytest.approx([18 * voxel_ml, 4 * voxel_ml], rel=1e-6)
    assert len({g.tracking_uid for g in [whole, *lesions]}) == 3
    # each lesion is located by its centroid, a 3D point in the source's frame of reference, inside the lesion
    expected = [(slice(4, 6), slice(10, 13), slice(2, 5)), (slice(5, 6), slice(13, 15), slice(12, 14))]
    for group, box in zip(lesions, expected, strict=True):
        surface = group.roi
        assert isinstance(surface, hd.sr.VolumeSurface) and surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == case.sources[0].FrameOfReferenceUID
        point = np.asarray(surface.graphic_data, dtype=float).reshape(-1, 3)[0]
        x, y, z = case.labels.lps_to_index(point)
        centre = [(s.start + s.stop - 1) / 2 for s in box]  # (z, y, x)
        assert (z, y, x) == pytest.approx(centre, abs=1e-6)
    # the empty kidney label has no lesions and no count
    kidney = [g for g in _groups(case.read) if _segment_number(g) == 4]
    assert len(kidney) == 1
    assert kidney[0].get_measurements(name=NUMBER_OF_LESIONS) == []


def test_algorithm_identification_and_demo_warning(case: Case) -> None:
    text = _bytes(case.sr)
    assert DEMO_WARNING.encode() in text
    assert DEMO_WARNING in case.read.SeriesDescription
    group = _groups(case.read)[0]
    names = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmName)
    assert names and DEMO_WARNING in names[0].value
    families = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmFamily)
    assert families[0].value == codes.DCM.ArtificialIntelligence
    (volume,) = group.get_measurements(name=VOLUME)
    assert hd.sr.utils.find_content_items(volume[0], name=codes.DCM.AlgorithmVersion)[0].value == "1.2.0"


def test_not_demo_has_plain_series_description() -> None:
    manifest = _manifest(demo=False)
    sources = _sources()
    image = volume_from_datasets(sources)
    labels = image.with_array(_labels(image.shape))
    metrics = measure_segments(build_segments(labels, manifest, midline_x=None), labels, {"qsm": image})
    identity = ResultIdentity.of([ds.SOPInstanceUID for ds in sources], PIPELINE, manifest.name, manifest.version)
    sr = build_sr(
        _seg(sources, labels, manifest), sources, metrics, manifest, identity, pipeline=PIPELINE, node_version="0.9.0"
    )
    assert sr.SeriesDescription == f"AI {PIPELINE} SR"
    assert DEMO_WARNING.encode() not in _bytes(sr)


def test_deterministic_uids(case: Case) -> None:
    manifest, sources = case.manifest, case.sources
    again = build_sr(case.seg, sources, case.metrics, manifest, case.identity, pipeline=PIPELINE, node_version="0.9.0")
    assert again.SOPInstanceUID == case.sr.SOPInstanceUID == case.identity.instance_uid("SR")
    assert again.SeriesInstanceUID == case.sr.SeriesInstanceUID == case.identity.series_uid("SR")
    tracking = [g.tracking_uid for g in _groups(case.read)]
    assert [
        g.tracking_uid
        for g in hd.sr.Comprehensive3DSR.from_dataset(again).content.get_volumetric_roi_measurement_groups()
    ] == tracking
    newer = ResultIdentity.of([ds.SOPInstanceUID for ds in sources], PIPELINE, manifest.name, "1.3.0")
    other = build_sr(case.seg, sources, case.metrics, manifest, newer, pipeline=PIPELINE, node_version="0.9.0")
    assert other.SOPInstanceUID != case.sr.SOPInstanceUID
    assert other.SeriesInstanceUID != case.sr.SeriesInstanceUID
    assert not set(tracking) & {
        g.tracking_uid
        for g in hd.sr.Comprehensive3DSR.from_dataset(other).content.get_volumetric_roi_measurement_groups()
    }


@pytest.mark.parametrize(
    ("name", "charset"),
    [
        ("Müller^Jürgen", "ISO_IR 100"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["", "ISO 2022 IR 87"]),
        ("Weiß^Zoë", "ISO_IR 192"),
    ],
)
def test_patient_name_survives(name: str, charset: str | list[str], tmp_path: Path) -> None:
    c = _case(patient_name=name, charset=charset)
    assert str(c.read.PatientName) == name
    assert c.read.SpecificCharacterSet == c.sources[0].SpecificCharacterSet
    notice = build_not_processed_notice(
        c.sources, "no DWI series", pipeline="stroke", node_version="0.9.0", identity_key="k"
    )
    assert str(dcmread(io.BytesIO(_bytes(notice))).PatientName) == name


def test_bad_inputs_are_refused(case: Case) -> None:
    with pytest.raises(ReportError, match="DICOM SEG"):
        build_sr(
            case.sources[0],
            case.sources,
            case.metrics,
            case.manifest,
            case.identity,
            pipeline=PIPELINE,
            node_version="0",
        )
    with pytest.raises(ReportError, match="no entry for segment"):
        metrics = {"segments": {k: v for k, v in case.metrics["segments"].items() if k != "4"}}
        build_sr(case.seg, case.sources, metrics, case.manifest, case.identity, pipeline=PIPELINE, node_version="0")
    with pytest.raises(ReportError, match="source images"):
        build_sr(case.seg, [], case.metrics, case.manifest, case.identity, pipeline=PIPELINE, node_version="0")


# -- the notice ------------------------------------------------------------------------


def test_not_processed_notice(case: Case, tmp_path: Path) -> None:
    reason = "the study has no diffusion series with b=1000"
    notice = build_not_processed_notice(
        case.sources, reason, pipeline="stroke", node_version="0.9.0", identity_key="job-key"
    )
    read = hd.sr.srread(io.BytesIO(_bytes(notice)))
    assert read.Manufacturer == MANUFACTURER
    assert read.SeriesDescription == "AI stroke NOT PROCESSED"
    assert read.SeriesNumber == 9004
    assert read.StudyInstanceUID == case.sources[0].StudyInstanceUID
    assert read.PatientID == case.sources[0].PatientID
    assert read.data_element("SoftwareVersions").value in (f"{MANUFACTURER} 0.9.0", [f"{MANUFACTURER} 0.9.0"])
    texts = [item.TextValue for item in read.ContentSequence if item.ValueType == "TEXT"]
    assert f"AI stroke was not run on this study: {reason}" in texts
    again = build_not_processed_notice(
        case.sources, reason, pipeline="stroke", node_version="0.9.0", identity_key="job-key"
    )
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (notice.SOPInstanceUID, notice.SeriesInstanceUID)
    other = build_not_processed_notice(
        case.sources, reason, pipeline="stroke", node_version="0.9.0", identity_key="other"
    )
    assert other.SOPInstanceUID != notice.SOPInstanceUID
    _dciodvfy(notice, tmp_path, "notice")


def test_notice_needs_sources() -> None:
    with pytest.raises(ValueError, match="source"):
        build_not_processed_notice([], "x", pipeline="stroke", node_version="0", identity_key="k")
