"""Post-processing (components, sizes in mm^3, left/right in patient space, volumes)
and the two-stage cascade (crop boxes, margins in mm, paste-back, label maps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from inference.backends import StagePredictor
from inference.cascade import crop_boxes, map_labels, run_cascade
from inference.errors import PredictionError
from inference.manifest import PostProcess, StageSpec
from inference.postprocess import (
    apply_postprocess,
    component_volumes_ml,
    keep_largest_components,
    label_volumes_ml,
    mean_inside,
    remove_small_components,
    split_left_right,
)


def index_to_lps(origin: Any, spacing_xyz: Any, direction: Any) -> Callable[[np.ndarray], np.ndarray]:
    """(N, 3) (x, y, z) indices -> LPS mm, the convention of Volume.index_to_lps."""
    o, s, d = (np.asarray(v, dtype=np.float64) for v in (origin, spacing_xyz, direction))
    return lambda ijk: (np.asarray(ijk, dtype=np.float64) * s) @ d.T + o


IDENTITY = index_to_lps((0, 0, 0), (1, 1, 1), np.eye(3))


def _blobs(shape: tuple[int, int, int], *boxes: tuple[tuple[slice, slice, slice], int]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    for box, value in boxes:
        out[box] = value
    return out


# -- components and sizes ----------------------------------------------------


def test_keep_largest_components() -> None:
    labels = _blobs(
        (10, 10, 10),
        ((slice(0, 3), slice(0, 3), slice(0, 3)), 1),  # 27 voxels
        ((slice(5, 7), slice(5, 7), slice(5, 7)), 1),  # 8
        ((slice(9, 10), slice(0, 1), slice(9, 10)), 1),  # 1
        ((slice(0, 1), slice(9, 10), slice(9, 10)), 2),  # another label, untouched
    )
    out = keep_largest_components(labels, 1, 2)
    assert component_volumes_ml(out, 1, 1.0) == [27.0, 8.0]
    assert out[9, 0, 9] == 0 and out[0, 9, 9] == 2
    assert labels[9, 0, 9] == 1  # input not modified
    assert component_volumes_ml(keep_largest_components(labels, 1, 1), 1, 1.0) == [27.0]
    np.testing.assert_array_equal(keep_largest_components(labels, 1, 5), labels)


def test_components_use_full_connectivity() -> None:
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = 1  # corner-touching: one component
    assert component_volumes_ml(labels, 1, 1.0) == [2.0]


def test_remove_small_components_in_mm3_with_anisotropic_voxels() -> None:
    spacing_zyx = (3.0, 0.5, 0.5)  # 0.75 mm^3 per voxel
    labels = _blobs(
        (12, 12, 12),
        ((slice(0, 3), slice(0, 3), slice(0, 3)), 1),  # 27 voxels = 20.25 mm^3
        ((slice(6, 8), slice(6, 8), slice(6, 8)), 1),  # 8 voxels = 6 mm^3 (but 8 >= 7 voxels)
    )
    out = remove_small_components(labels, 1, 7.0, float(np.prod(spacing_zyx)))
    assert out[6:8, 6:8, 6:8].max() == 0 and out[:3, :3, :3].min() == 1
    out = apply_postprocess(labels, PostProcess(min_size_mm3={1: 5.0}), spacing_zyx=spacing_zyx, index_to_lps=IDENTITY)
    np.testing.assert_array_equal(out, labels)


def test_volumes_and_means() -> None:
    labels = _blobs(
        (5, 6, 7), ((slice(0, 2), slice(0, 3), slice(0, 4)), 1), ((slice(4, 5), slice(5, 6), slice(6, 7)), 3)
    )
    voxel_ml = 2.0 * 1.0 * 0.5 / 1000.0
    vols = label_volumes_ml(labels, voxel_ml)
    assert vols.keys() == {1, 3}
    assert vols[1] == pytest.approx(24 * 0.001) and vols[3] == pytest.approx(0.001)
    image = np.arange(labels.size, dtype=np.float32).reshape(labels.shape)
    assert mean_inside(labels, 3, image) == pytest.approx(float(image[4, 5, 6]))
    assert mean_inside(labels, 1, image) == pytest.approx(float(image[:2, :3, :4].mean()))
    assert mean_inside(labels, 2, image) is None
    with pytest.raises(ValueError):
        mean_inside(labels, 1, image[:-1])


# -- left / right in patient space -------------------------------------------

SHAPE = (8, 10, 20)
LOW_X = (slice(2, 5), slice(3, 6), slice(2, 5))  # small x index
HIGH_X = (slice(2, 5), slice(3, 6), slice(14, 17))  # large x index
LOW_Z = (slice(0, 2), slice(3, 6), slice(8, 11))  # small z index
HIGH_Z = (slice(6, 8), slice(3, 6), slice(8, 11))  # large z index
LEFT, RIGHT = 11, 12


@pytest.mark.parametrize(
    ("name", "direction", "left_box", "right_box"),
    [
        # axial, identity: +x index -> patient's left
        ("axial", np.eye(3), HIGH_X, LOW_X),
        # x flipped: columns run right-to-left (+x index -> patient's right), slices towards the feet
        ("x flipped", np.diag([-1.0, 1.0, -1.0]), LOW_X, HIGH_X),
        # coronal: rows along +L, columns towards the feet, slices posterior
        ("coronal", np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]), HIGH_X, LOW_X),
        # sagittal: rows posterior, columns towards the feet, slices (row x column) towards the RIGHT
        ("sagittal", np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]), LOW_Z, HIGH_Z),
    ],
)
def test_split_left_right_by_patient_x(name: str, direction: np.ndarray, left_box: Any, right_box: Any) -> None:
    assert np.allclose(np.cross(direction[:, 0], direction[:, 1]), direction[:, 2])  # a real DICOM stack
    to_lps = index_to_lps((-40.0, 12.0, 300.0), (0.7, 0.8, 2.5), direction)
    labels = _blobs(SHAPE, (left_box, 1), (right_box, 1), ((slice(0, 1), slice(0, 1), slice(0, 1)), 4))
    out = split_left_right(labels, 1, LEFT, RIGHT, index_to_lps=to_lps)
    assert (out[left_box] == LEFT).all(), name
    assert (out[right_box] == RIGHT).all(), name
    assert out[0, 0, 0] == 4 and not (out == 1).any()
    # one component: compared with the body midline in patient coordinates, never the array's centre
    centre = (np.asarray(SHAPE[::-1], dtype=np.float64) - 1) / 2
    centre_x = float(to_lps(centre[None])[0, 0])
    single = _blobs(SHAPE, (left_box, 1))
    assert (split_left_right(single, 1, LEFT, RIGHT, index_to_lps=to_lps, midline_x=centre_x)[left_box] == LEFT).all()
    # the same component in a patient whose midline lies further left (an off-centre body): the right side
    far_left = centre_x + 1000.0
    assert (split_left_right(single, 1, LEFT, RIGHT, index_to_lps=to_lps, midline_x=far_left)[left_box] == RIGHT).all()
    single = _blobs(SHAPE, (right_box, 1))
    assert (split_left_right(single, 1, LEFT, RIGHT, index_to_lps=to_lps, midline_x=centre_x)[right_box] == RIGHT).all()
    with pytest.raises(ValueError, match="no body midline"):
        split_left_right(single, 1, LEFT, RIGHT, index_to_lps=to_lps)


def test_split_left_right_with_volume_index_to_lps() -> None:
    """The lead's Volume.index_to_lps (x, y, z order) can be passed as is."""
    volume_mod = pytest.importorskip("inference.volume")
    direction = np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]])  # sagittal, slices towards the right
    labels = _blobs(SHAPE, (LOW_Z, 1), (HIGH_Z, 1))
    vol = volume_mod.Volume(array=labels, origin=np.zeros(3), spacing=(0.7, 0.8, 2.5), direction=direction)
    out = split_left_right(labels, 1, LEFT, RIGHT, index_to_lps=vol.index_to_lps)
    assert (out[LOW_Z] == LEFT).all() and (out[HIGH_Z] == RIGHT).all()


def test_apply_postprocess_order() -> None:
    labels = _blobs(
        SHAPE,
        (LOW_X, 1),
        (HIGH_X, 1),
        ((slice(7, 8), slice(9, 10), slice(19, 20)), 1),  # 1 voxel fragment far right-of-image (patient left)
    )
    spec = PostProcess(min_size_mm3={1: 2.0}, keep_largest={1: 2}, split_laterality={1: (LEFT, RIGHT)})
    out = apply_postprocess(labels, spec, spacing_zyx=(1.0, 1.0, 1.0), index_to_lps=IDENTITY)
    assert out[7, 9, 19] == 0
    assert (out[HIGH_X] == LEFT).all() and (out[LOW_X] == RIGHT).all()
    assert labels[7, 9, 19] == 1


# -- cascade --------------------------------------------------------------------


class FakeStage(StagePredictor):
    """Deterministic label function -> one-hot probabilities; records its calls."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], num_classes: int) -> None:
        self.fn = fn
        self.num_classes = num_classes
        self.checksums = {}
        self.calls: list[tuple[tuple[int, ...], tuple[float, float, float], np.ndarray]] = []

    def predict_proba(
        self, image: np.ndarray, spacing_zyx: tuple[float, float, float], direction: np.ndarray
    ) -> np.ndarray:
        self.calls.append((image.shape, spacing_zyx, direction))
        labels = self.fn(image)
        return (np.arange(self.num_classes)[:, None, None, None] == labels[None]).astype(np.float32)


def _coarse(image: np.ndarray) -> np.ndarray:
    return (image[0] > 0.5).astype(np.uint8)


def _fine(image: np.ndarray) -> np.ndarray:
    """Label 1 on the bright core, 2 at crop voxel (1, 1, 1), 3 (unmapped) at (0, 0, 0)."""
    out = (image[0] > 1.5).astype(np.uint8)
    out[1, 1, 1] = 2
    out[0, 0, 0] = 3
    return out


def _stage(name: str, label_map: dict[int, int], crop: dict[str, Any] | None = None, final: bool = True) -> StageSpec:
    return StageSpec.model_validate(
        {
            "name": name,
            "model": {
                "backend": "native",
                "network": "DynUNet",
                "network_args": {},
                "weights": "w.safetensors",
                "spacing": (1, 1, 1),
                "patch_size": (16, 16, 16),
            },
            "label_map": label_map,
            "crop": crop,
            "final": final,
        }
    )


SPACING = (2.0, 1.0, 0.5)  # z, y, x
KIDNEY_A = (slice(5, 10), slice(10, 20), slice(5, 12))
KIDNEY_B = (slice(5, 10), slice(10, 20), slice(35, 45))
CORE_A = (slice(6, 9), slice(12, 18), slice(7, 10))
CORE_B = (slice(6, 9), slice(12, 18), slice(38, 42))
# margin 3 mm -> (2, 3, 6) voxels, clipped to the (30, 40, 50) grid
BOX_A = (slice(3, 12), slice(7, 23), slice(0, 18))
BOX_B = (slice(3, 12), slice(7, 23), slice(29, 50))


def _kidney_image() -> np.ndarray:
    image = np.zeros((1, 30, 40, 50), dtype=np.float32)
    for kidney, core in ((KIDNEY_A, CORE_A), (KIDNEY_B, CORE_B)):
        image[(0, *kidney)] = 1.0
        image[(0, *core)] = 2.0
    return image


def test_crop_boxes_margins_in_mm() -> None:
    stage1 = _coarse(_kidney_image())
    stage1[KIDNEY_B] = 2
    assert crop_boxes(stage1, (1, 2), 3.0, SPACING, True) == [BOX_A, BOX_B]
    assert crop_boxes(stage1, (2,), 3.0, SPACING, True) == [BOX_B]
    assert crop_boxes(stage1, (1, 2), 3.0, SPACING, False) == [(slice(3, 12), slice(7, 23), slice(0, 50))]
    assert crop_boxes(stage1, (1,), 0.0, SPACING, True) == [KIDNEY_A]
    assert crop_boxes(stage1, (7,), 3.0, SPACING, True) == []
    assert crop_boxes(stage1, (7,), 3.0, SPACING, False) == []


def test_cascade_paste_back_and_label_map() -> None:
    image = _kidney_image()
    direction = np.diag([-1.0, 1.0, 1.0])
    s1, s2 = FakeStage(_coarse, 2), FakeStage(_fine, 4)
    stages = [
        (_stage("kidneys", {1: 1}), s1),
        (_stage("parenchyma", {1: 5, 2: 6}, {"from_stage": "kidneys", "labels": [1], "margin_mm": 3.0}), s2),
    ]
    labels, confidence, timings = run_cascade(image, SPACING, direction, stages)
    assert labels.dtype == np.uint8 and labels.shape == (30, 40, 50)
    assert set(timings) == {"kidneys", "parenchyma"} and all(t >= 0 for t in timings.values())
    # stage 2 saw each crop with spacing and direction unchanged
    assert [c[0] for c in s2.calls] == [(1, 9, 16, 18), (1, 9, 16, 21)]
    assert all(c[1] == SPACING and c[2] is direction for c in s2.calls)

    expected = np.zeros((30, 40, 50), dtype=np.uint8)
    expected[KIDNEY_A] = expected[KIDNEY_B] = 1  # stage 1, kept where stage 2 says background
    expected[CORE_A] = expected[CORE_B] = 5  # stage 2 label 1 -> 5
    for box in (BOX_A, BOX_B):
        z, y, x = (s.start for s in box)
        expected[z + 1, y + 1, x + 1] = 6  # stage 2 label 2 -> 6, at crop (1, 1, 1)
        # crop (0, 0, 0) predicted 3, unmapped: dropped, nothing written
    np.testing.assert_array_equal(labels, expected)
    # one-hot fakes are certain: confidence 1 wherever a final label was written, 0 elsewhere
    np.testing.assert_array_equal(confidence, (expected > 0).astype(np.float32))


def test_cascade_localiser_not_final_and_empty_crop() -> None:
    image = _kidney_image()
    s2 = FakeStage(_fine, 4)
    stages = [
        (_stage("locate", {1: 1}, final=False), FakeStage(_coarse, 2)),
        (_stage("fine", {1: 5}, {"from_stage": "locate", "labels": [1], "margin_mm": 0.0, "per_component": False}), s2),
    ]
    labels, _, _ = run_cascade(image, SPACING, np.eye(3), stages)
    assert [c[0] for c in s2.calls] == [(1, 5, 10, 40)]
    assert set(np.unique(labels)) == {0, 5}
    assert (labels[CORE_A] == 5).all() and (labels[CORE_B] == 5).all()

    empty = np.zeros_like(image)
    s2.calls.clear()
    labels, confidence, timings = run_cascade(empty, SPACING, np.eye(3), stages)
    assert not labels.any() and s2.calls == [] and set(timings) == {"locate", "fine"}


def test_cascade_errors_and_map_labels() -> None:
    image = _kidney_image()
    stage = _stage("fine", {1: 5}, {"from_stage": "missing", "labels": [1]})
    with pytest.raises(PredictionError, match="has not run"):
        run_cascade(image, SPACING, np.eye(3), [(stage, FakeStage(_fine, 4))])
    with pytest.raises(PredictionError, match="channels"):
        run_cascade(image[0], SPACING, np.eye(3), [])
    np.testing.assert_array_equal(map_labels(np.array([0, 1, 2, 3], dtype=np.uint8), {1: 7, 3: 1}), [0, 7, 0, 1])
