"""The model runner on DICOM series: laterality in every acquisition geometry,
labels on the source grid, twins (compressed, multi-frame) that give the same
result, and inputs that cannot be used."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import RLELossless

from inference.errors import InferenceError, MissingSlicesError, ModelPackageError
from inference.pipeline import ModelRunner
from inference.volume import volume_from_datasets
from pacs_lab.model_packages import two_spheres
from pacs_lab.synthetic import make_oriented_series

LEFT_ML = 4 / 3 * np.pi * 7.0**3 / 1000
RIGHT_ML = 4 / 3 * np.pi * 5.0**3 / 1000


@pytest.fixture(scope="module")
def runner(sphere_package: Path) -> ModelRunner:
    return ModelRunner(sphere_package, allow_gpu=False)


def _series(**kw: object) -> list[Dataset]:
    return make_oriented_series(two_spheres(), rows=40, cols=40, slices=24, spacing=(2.0, 2.0, 2.5), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "orientation,flip_rows,reverse",
    [
        ("axial", False, False),
        ("axial", False, True),
        ("axial", True, False),
        ("coronal", False, False),
        ("coronal", True, True),
        ("sagittal", False, False),
        ("sagittal", True, True),
    ],
)
def test_left_label_lands_on_the_patients_left(
    runner: ModelRunner, orientation: str, flip_rows: bool, reverse: bool
) -> None:
    series = _series(orientation=orientation, flip_rows=flip_rows, reverse=reverse)
    result = runner.run({"image": series})
    labels = result.labels
    for value, sign in ((1, +1), (2, -1)):
        idx = np.argwhere(labels.array == value)
        assert len(idx), f"label {value} missing in {orientation}"
        x = labels.index_to_lps(idx[:, ::-1].astype(float))[:, 0]
        assert np.all(np.sign(x) == sign), f"label {value} ({'left' if sign > 0 else 'right'}) crosses the midline"
    m = result.metrics["segments"]
    assert m["1"]["name"] == "Left sphere" and m["1"]["laterality"] == "left"
    assert m["1"]["volume_ml"] == pytest.approx(LEFT_ML, rel=0.3)
    assert m["2"]["volume_ml"] == pytest.approx(RIGHT_ML, rel=0.4)
    assert m["2"]["count"] == 1


def test_labels_live_on_the_source_grid_with_the_slice_to_sop_map(runner: ModelRunner) -> None:
    series = _series(orientation="axial", reverse=True)
    result = runner.run({"image": series})
    source = volume_from_datasets(series)
    assert result.labels.shape == source.shape
    assert result.labels.same_grid(source)
    assert result.labels.sop_uids == source.sop_uids
    # Every slice that holds a label is the instance whose position it has.
    by_uid = {ds.SOPInstanceUID: ds for ds in series}
    for k in np.unique(np.argwhere(result.labels.array > 0)[:, 0]):
        ds = by_uid[result.labels.sop_uids[k]]
        assert np.allclose(result.labels.index_to_lps(np.array([0.0, 0.0, float(k)])), ds.ImagePositionPatient)
    # volumes from voxel counts on the source grid
    voxels = int((result.labels.array == 1).sum())
    assert result.metrics["segments"]["1"]["volume_ml"] == pytest.approx(voxels * source.voxel_volume_ml)
    assert result.metrics["segments"]["1"]["mean"]["image"] == pytest.approx(110.0, abs=15)
    assert set(result.timings) >= {"preprocess", "predict", "postprocess"}
    assert result.model["name"] == "test-spheres" and result.model["checksums"]


def test_compressed_series_gives_the_same_result(runner: ModelRunner) -> None:
    series = _series(orientation="coronal")
    compressed = []
    for ds in series:
        c = copy.deepcopy(ds)
        c.compress(RLELossless)
        compressed.append(c)
    a = runner.run({"image": series}).labels.array
    b = runner.run({"image": compressed}).labels.array
    assert np.array_equal(a, b)


def test_enhanced_multiframe_gives_the_same_result(runner: ModelRunner) -> None:
    from tests.test_volume import make_enhanced

    series = _series(orientation="axial")
    single = runner.run({"image": series}).labels
    order = list(range(len(series)))[::-1]  # frames stored in reverse order
    enhanced = make_enhanced(series, order)
    multi = runner.run({"image": [enhanced]}).labels
    assert np.array_equal(single.array, multi.array)
    assert multi.frame_numbers is not None and multi.same_grid(single)


def test_missing_slice_is_a_clear_failure(runner: ModelRunner) -> None:
    series = _series(orientation="axial")
    del series[10]
    with pytest.raises(MissingSlicesError, match="missing"):
        runner.run({"image": series})


def test_missing_required_input(runner: ModelRunner) -> None:
    with pytest.raises(InferenceError, match="needs input image"):
        runner.run({"other": _series()})


def test_package_without_manifest_or_weights(tmp_path: Path, sphere_package: Path) -> None:
    with pytest.raises(ModelPackageError, match="model.yaml"):
        ModelRunner(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.yaml").write_text((sphere_package / "model.yaml").read_text())
    with pytest.raises(ModelPackageError, match="weights.safetensors"):
        ModelRunner(broken)


def test_secondary_inputs_are_resampled_onto_the_reference_grid(sphere_package: Path, tmp_path: Path) -> None:
    """A DWI-like reference plus a FLAIR-like series at another resolution and
    orientation: the secondary channel is resampled in patient space onto the
    reference grid and stacked in manifest order; an absent optional one is zeros."""
    import shutil

    import yaml

    package = tmp_path / "two-inputs"
    shutil.copytree(sphere_package, package)
    manifest = yaml.safe_load((package / "model.yaml").read_text())
    manifest["inputs"] = [{"role": "image"}, {"role": "flair", "optional": True}, {"role": "extra", "optional": True}]
    (package / "model.yaml").write_text(yaml.safe_dump(manifest))
    runner = ModelRunner(package, allow_gpu=False)
    reference = _series(orientation="axial")
    flair = make_oriented_series(
        two_spheres(),
        orientation="sagittal",
        rows=30,
        cols=30,
        slices=40,
        spacing=(3.0, 3.0, 1.5),
        study_uid=reference[0].StudyInstanceUID,
    )
    ref, image, volumes = runner.build_inputs({"image": reference, "flair": flair})
    assert image.shape == (3, *ref.shape)
    assert volumes["flair"].same_grid(ref)
    assert not image[2].any(), "an absent optional input is a channel of zeros"
    # The left sphere is bright in both channels at the same patient position.
    centre = np.round(ref.lps_to_index(np.array([18.0, 0.0, 0.0]))).astype(int)  # (x, y, z)
    x, y, z = centre
    assert image[0, z, y, x] > 90 and image[1, z, y, x] > 90
    away = np.round(ref.lps_to_index(np.array([0.0, 0.0, 0.0]))).astype(int)
    assert image[1, away[2], away[1], away[0]] < 30
