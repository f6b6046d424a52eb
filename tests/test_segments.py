"""Output segments (inference.segments): overlapping per-side organs, sides from patient coordinates,
measurements on the segments' own voxels, QC, and what goes to the PACS."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from inference.manifest import Manifest
from inference.segments import body_midline_x, build_segments, display_labels, for_output, measure_segments
from inference.volume import Volume

SHAPE = (10, 40, 60)  # z, y, x


def _manifest(segments: list[dict[str, Any]], labels: dict[int, str] | None = None) -> Manifest:
    labels = labels or {1: "kidney", 3: "parenchyma", 4: "neoplasm"}
    return Manifest.model_validate(
        {
            "name": "t",
            "version": "1",
            "intended_use": "tests",
            "inputs": [{"role": "image"}],
            "reference": "image",
            "labels": {v: {"name": f"label {v}", "type": key} for v, key in labels.items()},
            "segments": segments,
            "stages": [
                {
                    "name": "s",
                    "model": {
                        "backend": "native",
                        "network": "DynUNet",
                        "network_args": {},
                        "weights": "w",
                        "spacing": [1, 1, 1],
                        "patch_size": [8, 8, 8],
                    },
                    "label_map": {v: v for v in labels},
                }
            ],
        }
    )


def _side(side: str, labels: list[int], type_: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": f"{side} {type_}",
        "labels": labels,
        "type": type_,
        "laterality": side,
        "side_of": [1, 3, 4],
        **extra,
    }


KIDNEYS = [
    _side("right", [1, 3, 4], "kidney", plausible_ml=[0.5, 5.0]),
    _side("left", [1, 3, 4], "kidney", plausible_ml=[0.5, 5.0]),
    _side("right", [3], "parenchyma", anatomy="kidney"),
    _side("left", [3], "parenchyma", anatomy="kidney"),
    _side("right", [4], "neoplasm", count_components=True, validated=False),
    _side("left", [4], "neoplasm", count_components=True, validated=False),
]


def _volume(array: np.ndarray, origin_x: float = -30.0) -> Volume:
    """Axial, identity direction: +x index is the patient's left; 1 mm voxels (1 uL)."""
    return Volume(array=array, origin=np.array([origin_x, -20.0, 0.0]), spacing=(1.0, 1.0, 1.0), direction=np.eye(3))


def _two_kidneys() -> np.ndarray:
    a = np.zeros(SHAPE, dtype=np.uint8)
    # patient's right kidney at low x index, left at high x
    a[2:8, 10:30, 5:20] = 3
    a[3:7, 15:25, 10:15] = 1  # its sinus
    a[2:8, 10:30, 40:55] = 3
    a[3:7, 15:25, 45:50] = 1
    a[2:4, 10:14, 50:54] = 4  # a tumour in the left kidney
    return a


def test_whole_kidneys_contain_their_parenchyma_and_every_figure_is_its_segments_voxels() -> None:
    labels = _volume(_two_kidneys())
    segments = build_segments(labels, _manifest(KIDNEYS), midline_x=None)
    by_name = {s.spec.name: s for s in segments}
    right, left = by_name["right kidney"].mask, by_name["left kidney"].mask
    assert not right[:, :, 30:].any() and not left[:, :, :30].any(), "each kidney on its own side"
    assert (by_name["right parenchyma"].mask <= right).all() and (by_name["left parenchyma"].mask <= left).all()
    assert int(right.sum()) == 6 * 20 * 15 and int(left.sum()) == 6 * 20 * 15  # sinus + parenchyma (+ tumour)
    assert not by_name["right neoplasm"].mask.any() and int(by_name["left neoplasm"].mask.sum()) == 2 * 4 * 4
    metrics = measure_segments(segments, labels, {})
    for seg in segments:
        entry = metrics["segments"][str(seg.number)]
        assert entry["voxels"] == int(seg.mask.sum())
        assert entry["volume_ml"] == pytest.approx(seg.mask.sum() * labels.voxel_volume_ml)
    # LABELMAP precedence: later (finer) segments over earlier ones
    shown = display_labels(segments, labels.shape)
    assert shown[3, 12, 12] == by_name["right parenchyma"].number and shown[5, 20, 12] == by_name["right kidney"].number


def test_one_kidney_is_placed_by_the_body_midline_not_the_image_centre() -> None:
    a = np.zeros(SHAPE, dtype=np.uint8)
    a[2:8, 10:30, 40:55] = 3  # one kidney at high x index: the image's right half
    a[3:7, 15:25, 45:50] = 1
    image = np.full(SHAPE, -1000.0, dtype=np.float32)  # CT air
    # the body fills x index 35..59 only (the patient lies off-centre): its midline is at x index 47
    image[:, 2:38, 35:60] = 40.0
    labels = _volume(a)
    midline = body_midline_x(labels.with_array(image))
    assert midline == pytest.approx(labels.index_to_lps(np.array([[47.0, 0, 0]]))[0, 0], abs=0.6)
    # the kidney's centroid is at x index 42: patient-right of the body's midline (47) but patient-left of the
    # image's centre (x index 29.5): the patient's RIGHT kidney, which the image centre would call left
    a2 = np.roll(a, -5, axis=2)
    segments = build_segments(_volume(a2), _manifest(KIDNEYS), midline_x=midline)
    by_name = {s.spec.name: s for s in segments}
    assert by_name["right kidney"].mask.any() and not by_name["left kidney"].mask.any()
    with pytest.raises(ValueError, match="one organ and no body outline"):
        build_segments(_volume(a2), _manifest(KIDNEYS), midline_x=None)


def test_unvalidated_segments_stay_out_of_the_outputs_unless_a_route_asks() -> None:
    labels = _volume(_two_kidneys())
    segments = build_segments(labels, _manifest(KIDNEYS), midline_x=None)
    metrics = measure_segments(segments, labels, {})
    kept, out = for_output(segments, metrics)
    assert [s.spec.name for s in kept] == ["right kidney", "left kidney", "right parenchyma", "left parenchyma"]
    assert [s.number for s in kept] == [1, 2, 3, 4] and sorted(out["segments"]) == ["1", "2", "3", "4"]
    assert out["not_reported"] == ["right neoplasm", "left neoplasm"]
    everything, out_all = for_output(segments, metrics, include_unvalidated=True)
    assert len(everything) == 6 and out_all["segments"]["6"]["count"] == 1


def test_qc_flags_an_implausible_volume_and_an_empty_lesion_segment_reports_no_lesion() -> None:
    a = _two_kidneys()
    a[:, :, 40:] = 0  # the left kidney is missing
    labels = _volume(a)
    segments = build_segments(labels, _manifest(KIDNEYS), midline_x=float(labels.index_to_lps([[30.0, 0, 0]])[0, 0]))
    metrics = measure_segments(segments, labels, {})
    left = next(v for v in metrics["segments"].values() if v["name"] == "left kidney")
    right = next(v for v in metrics["segments"].values() if v["name"] == "right kidney")
    assert left["qc"] == {"plausible": False, "reasons": ["left kidney not found (expected 0.5-5 mL)"]}
    assert right["qc"]["plausible"] is True
    assert metrics["qc"]["flagged"] and metrics["qc"]["reasons"] == left["qc"]["reasons"]
    tumour = next(v for v in metrics["segments"].values() if v["name"] == "right neoplasm")
    assert tumour["count"] == 0 and tumour["lesions"] == []


def test_confidence_is_the_mean_probability_inside_each_segment() -> None:
    labels = _volume(_two_kidneys())
    segments = build_segments(labels, _manifest(KIDNEYS), midline_x=None)
    confidence = np.where(labels.array > 0, 0.9, 0.0).astype(np.float32)
    confidence[:, :, 30:][labels.array[:, :, 30:] > 0] = 0.6
    metrics = measure_segments(segments, labels, {}, confidence=confidence)
    by_name = {v["name"]: v for v in metrics["segments"].values()}
    assert by_name["right kidney"]["confidence"] == pytest.approx(0.9)
    assert by_name["left kidney"]["confidence"] == pytest.approx(0.6)
    assert "confidence" not in by_name["right neoplasm"]  # empty: no figure at all
