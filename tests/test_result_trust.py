"""What a radiologist reads in the PACS equals what it points to (issue 15).

Checked on the demo's own outputs (one run per session, tests/demo_support.py):
the SEG, SR and key image that the demo PACS received for the stroke, dentate and
kidney phantoms. Every number is checked against its source: the SR's volume
against the voxels of the SEG segment it references, left and right against
patient coordinates, each lesion's point against the lesion's voxels.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from inference.codes import CODES
from inference.outputs.sr import volumes_from_sr
from inference.segments import body_midline_x
from inference.volume import select_b_value, volume_from_datasets
from tests.conftest import dciodvfy
from tests.demo_support import DemoRun

PIPELINES = ("stroke", "dentate", "kidney")


class SegVolume:
    """A received BINARY SEG as one boolean mask per segment on its own grid, with that grid's geometry."""

    def __init__(self, path: Path) -> None:
        ds = dcmread(path)
        self.ds = ds
        self.labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
        shared = ds.SharedFunctionalGroupsSequence[0]
        measures = shared.PixelMeasuresSequence[0]
        row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
        orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
        self.row_dir, self.col_dir = orientation[:3], orientation[3:]
        normal = np.cross(self.row_dir, self.col_dir)
        frames = ds.PerFrameFunctionalGroupsSequence
        positions = np.array([np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames])
        heights = positions @ normal
        planes = np.unique(np.round(heights, 3))
        # slices the SEG has no frame for (empty) still count in the spacing: the smallest step between planes
        step = float(np.min(np.diff(planes))) if len(planes) > 1 else float(measures.get("SliceThickness", 1.0))
        self.voxel_ml = row_mm * col_mm * step / 1000.0
        self.pixel_mm = (row_mm, col_mm)
        pixels = ds.pixel_array.reshape(len(frames), int(ds.Rows), int(ds.Columns)).astype(bool)

        def segment_of(frame: object) -> int:  # per frame, or shared when the SEG has one segment
            item = frame if "SegmentIdentificationSequence" in frame else shared  # type: ignore[operator]
            return int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)  # type: ignore[attr-defined]

        self.frames = [(segment_of(f), positions[k], pixels[k]) for k, f in enumerate(frames)]

    def voxels(self, number: int) -> int:
        return int(sum(int(p.sum()) for n, _, p in self.frames if n == number))

    def points(self, number: int) -> np.ndarray:
        """LPS centres (mm) of every voxel of a segment, shape (N, 3)."""
        row_mm, col_mm = self.pixel_mm
        out = []
        for n, origin, plane in self.frames:
            if n != number or not plane.any():
                continue
            r, c = np.nonzero(plane)
            # ImageOrientationPatient: first vector along a row (increasing column), second along a column
            out.append(origin + np.outer(c * col_mm, self.row_dir) + np.outer(r * row_mm, self.col_dir))
        return np.concatenate(out) if out else np.zeros((0, 3))

    def number(self, label: str) -> int:
        return next(n for n, name in self.labels.items() if name == label)


def _sr(folder: Path) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(dcmread(folder / "sr.dcm"))


def _groups(folder: Path) -> list:
    return list(_sr(folder).content.get_volumetric_roi_measurement_groups())


@pytest.mark.parametrize("name", PIPELINES)
def test_every_sr_volume_is_the_voxels_of_the_segment_it_references(demo_run: DemoRun, name: str) -> None:
    folder = demo_run.folder / name
    seg = SegVolume(folder / "seg.dcm")
    volumes = volumes_from_sr(dcmread(folder / "sr.dcm"))
    assert sorted(volumes) == sorted(seg.labels), "one volume per SEG segment"
    for number, volume in volumes.items():
        expected = seg.voxels(number) * seg.voxel_ml
        assert volume == pytest.approx(expected, rel=1e-3, abs=1e-6), f"{name}: {seg.labels[number]}"
    # the job's figures (dashboard, API) are the SR's
    reported = demo_run.results[name].volumes_ml
    for number, volume in volumes.items():
        assert reported[seg.labels[number]] == pytest.approx(volume, abs=0.006)


def test_kidney_segments_are_whole_organs_per_side_with_their_parts_inside(demo_run: DemoRun) -> None:
    seg = SegVolume(demo_run.folder / "kidney" / "seg.dcm")
    names = set(seg.labels.values())
    assert {"Right kidney", "Left kidney", "Right renal parenchyma", "Left renal parenchyma"} <= names
    # the tumour label is not validated by the model card: not drawn nor measured in what went to the PACS
    assert not any("tumour" in n for n in names)
    for side in ("Right", "Left"):
        kidney = {tuple(p) for p in np.round(seg.points(seg.number(f"{side} kidney")), 2)}
        parenchyma = {tuple(p) for p in np.round(seg.points(seg.number(f"{side} renal parenchyma")), 2)}
        assert parenchyma and parenchyma <= kidney, f"the {side.lower()} parenchyma lies inside its kidney"
        # the whole organ, not just the sinus: the parenchyma is most of it
        assert len(parenchyma) > 0.5 * len(kidney)
    # left and right in patient coordinates (LPS: +x is the patient's left)
    right_x = seg.points(seg.number("Right kidney"))[:, 0]
    left_x = seg.points(seg.number("Left kidney"))[:, 0]
    assert right_x.max() < left_x.min()
    # the side qualifies the parenchyma's anatomic region, the kidney
    for item in seg.ds.SegmentSequence:
        if "parenchyma" in item.SegmentLabel:
            region = item.AnatomicRegionSequence[0]
            assert region.CodeValue == CODES["kidney"].value
            side = item.SegmentLabel.split()[0].lower()
            assert region.AnatomicRegionModifierSequence[0].CodeValue == CODES[side].value


def test_dentate_nuclei_are_coded_as_dentate_nuclei_on_their_own_side(demo_run: DemoRun) -> None:
    folder = demo_run.folder / "dentate"
    seg = SegVolume(folder / "seg.dcm")
    for item in seg.ds.SegmentSequence:
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == (
            CODES["dentate_nucleus"].value,
            CODES["dentate_nucleus"].scheme,
        )
        side = str(item.SegmentLabel).split()[0].lower()
        assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == CODES[side].value
    left_x = seg.points(seg.number("Left dentate nucleus"))[:, 0]
    right_x = seg.points(seg.number("Right dentate nucleus"))[:, 0]
    assert left_x.min() > right_x.max()
    for group in _groups(folder):
        (site,) = group.finding_sites
        assert site.value == hd.sr.CodedConcept(CODES["dentate_nucleus"].value, "UMLS", "Dentate nucleus")
        side = group.tracking_identifier.split()[0].lower()
        assert site.laterality.value == CODES[side].value


def test_kidney_parenchyma_has_the_kidney_and_its_side_as_finding_site(demo_run: DemoRun) -> None:
    for group in _groups(demo_run.folder / "kidney"):
        if "parenchyma" not in group.tracking_identifier:
            continue
        (site,) = group.finding_sites
        assert site.value.value == CODES["kidney"].value
        assert site.laterality.value == CODES[group.tracking_identifier.split()[0].lower()].value


def test_each_stroke_lesion_is_located_inside_itself_with_brain_and_hemisphere(demo_run: DemoRun) -> None:
    folder = demo_run.folder / "stroke"
    seg = SegVolume(folder / "seg.dcm")
    lesion_voxels = seg.points(seg.number("Stroke lesion"))
    groups = _groups(folder)
    (whole,) = [g for g in groups if g.referenced_segment is not None]
    assert whole.finding_sites[0].value.value == CODES["brain"].value
    lesions = [g for g in groups if g.referenced_segment is None]
    (count,) = [m for m in whole.get_measurements() if m.name.value == CODES["number_of_lesions"].value]
    assert int(count.value) == len(lesions) >= 1
    total = sum(
        float(g.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[0].value) for g in lesions
    )
    assert total == pytest.approx(volumes_from_sr(dcmread(folder / "sr.dcm"))[1], rel=1e-3)
    # the hemisphere: the side of the lesion's point relative to the brain's midline in the sent DWI
    dwi = [dcmread(f) for f in sorted((demo_run.folder / "inputs" / "stroke" / "dwi").rglob("*")) if f.is_file()]
    midline = body_midline_x(volume_from_datasets(select_b_value(dwi, target=1000)))
    assert midline is not None
    for group in lesions:
        point = np.asarray(group.roi.graphic_data, dtype=float).reshape(-1, 3)[0]
        nearest = float(np.min(np.linalg.norm(lesion_voxels - point, axis=1)))
        assert nearest < 3.0, f"{group.tracking_identifier}: its point lies {nearest:.1f} mm from the lesion"
        (site,) = group.finding_sites
        assert site.value.value == CODES["brain"].value
        side = "left" if point[0] > midline else "right"  # LPS: +x is the patient's left
        assert site.laterality.value == CODES[side].value, f"{group.tracking_identifier} at x={point[0]:.1f} mm"
        assert "slices" in group.tracking_identifier


def test_confidence_and_qc_travel_with_the_result(demo_run: DemoRun) -> None:
    for name in PIPELINES:
        for group in _groups(demo_run.folder / name):
            if group.referenced_segment is None:
                continue
            certainty = [m for m in group.get_measurements() if m.name.value == CODES["certainty_of_finding"].value]
            volume = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[0].value
            if float(volume) > 0:
                (c,) = certainty
                assert 50.0 <= float(c.value) <= 100.0 and c.unit.value == "%"
    # the kidney and dentate model cards give plausible volumes: each such segment carries the verdict
    for name in ("kidney", "dentate"):
        for group in _groups(demo_run.folder / name):
            if group.referenced_segment is None:
                continue
            verdicts = [
                e for e in group.get_qualitative_evaluations() if e.name.value == CODES["quality_finding"].value
            ]
            assert len(verdicts) == 1 and verdicts[0].value.value in (CODES["qc_met"].value, CODES["qc_not_met"].value)


def test_key_image_validates_without_a_laterality_complaint(demo_run: DemoRun) -> None:
    for name in PIPELINES:
        for path in sorted((demo_run.folder / name).glob("key-image-*.dcm")):
            report = dciodvfy(path)
            assert "Laterality" not in report, report
            assert dcmread(path).ImageLaterality == "B"
