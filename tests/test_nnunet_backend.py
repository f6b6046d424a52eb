"""The nnU-Net v2 backend against nnU-Net itself, and the device helpers.

A tiny nnU-Net results folder is built and trained once for the module
(``pacs_lab/tiny_nnunet.py``, about a minute on two cores). The nnU-Net tests are
skipped when nnunetv2 is not installed, except under CI, where they run (and
fail) because CI installs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.device import autocast_context, choose_device, run_with_oom_fallback
from pacs_lab.tiny_nnunet import (
    DATASET_NAME,
    SPACING_ZYX,
    TRAINER_FOLDER,
    make_case,
    nnunet_command,
    nnunet_env,
    write_nifti,
)

HAVE_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_nnunet = pytest.mark.skipif(
    not HAVE_NNUNET and not os.environ.get("CI"), reason="nnunetv2 is not installed (CI installs it)"
)

EYE = np.eye(3)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def spec(**kw: object):  # -> NnUNetBackend
    from inference.manifest import NnUNetBackend

    data: dict[str, object] = {"backend": "nnunet", "folders": [TRAINER_FOLDER], "use_mirroring": False}
    data.update(kw)
    return NnUNetBackend.model_validate(data)


@pytest.fixture(scope="module")
def tiny_root(tiny_nnunet_root: Path) -> Path:
    return tiny_nnunet_root


@pytest.fixture(scope="module")
def package(tiny_root: Path) -> Path:
    """The folder holding the results folder, standing in for a model package."""
    return tiny_root / "nnUNet_results" / DATASET_NAME


@pytest.fixture(scope="module")
def stage(package: Path):  # -> NnUNetStage
    from inference.backends.nnunet import NnUNetStage

    return NnUNetStage(spec(), package, device=torch.device("cpu"), num_threads=1)


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    return make_case(np.random.default_rng(20240607))


# -- nnU-Net backend ------------------------------------------------------------------------------


@needs_nnunet
def test_agrees_with_nnunet_cli(
    tiny_root: Path, package: Path, case: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from inference.backends.nnunet import NnUNetStage

    image, truth = case
    # mirroring on, as nnUNetv2_predict runs by default
    ours_stage = NnUNetStage(spec(use_mirroring=True), package, device=torch.device("cpu"), num_threads=1)
    assert ours_stage.num_classes == 3
    ours = ours_stage.predict(image[None], SPACING_ZYX, EYE)

    (tmp_path / "in").mkdir()
    write_nifti(image, SPACING_ZYX, tmp_path / "in" / "case_0000.nii.gz")
    env = nnunet_env(tiny_root)
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run(
        [
            nnunet_command("nnUNetv2_predict_from_modelfolder"),
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(package / TRAINER_FOLDER),
            "-f",
            "0",
            "-device",
            "cpu",
            "-npp",
            "1",
            "-nps",
            "1",
            "--disable_progress_bar",
        ],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    import SimpleITK as sitk

    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz")))
    assert ours.shape == theirs.shape == truth.shape
    assert ours.dtype == np.uint8
    for label in (1, 2):
        agreement = dice(ours == label, theirs == label)
        learnt = dice(ours == label, truth == label)
        logging.getLogger(__name__).info("label %d: Dice vs nnU-Net CLI %.4f, vs truth %.4f", label, agreement, learnt)
        assert agreement >= 0.99, f"label {label}: Dice {agreement:.4f} against nnUNetv2_predict_from_modelfolder"
        assert learnt > 0.8, f"label {label}: Dice {learnt:.4f} against the phantom truth"


@needs_nnunet
def test_probabilities_on_input_grid(stage, case: tuple[np.ndarray, np.ndarray]) -> None:
    image, truth = case
    proba = stage.predict_proba(image[None], SPACING_ZYX, EYE)
    assert proba.dtype == np.float32 and proba.shape == (3, *image.shape)
    np.testing.assert_allclose(proba.sum(0), 1.0, atol=1e-3)
    # confident, not near-ties
    assert float(np.mean(proba.max(0) > 0.9)) > 0.99
    assert dice(np.argmax(proba, 0) == 1, truth == 1) > 0.8


@needs_nnunet
def test_ensemble_of_one_folder_twice_equals_one(stage, package: Path, case: tuple[np.ndarray, np.ndarray]) -> None:
    from inference.backends.nnunet import NnUNetStage

    image, _ = case
    twice = NnUNetStage(
        spec(folders=[TRAINER_FOLDER, TRAINER_FOLDER]), package, device=torch.device("cpu"), num_threads=1
    )
    np.testing.assert_allclose(
        twice.predict_proba(image[None], SPACING_ZYX, EYE),
        stage.predict_proba(image[None], SPACING_ZYX, EYE),
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        twice.predict(image[None], SPACING_ZYX, EYE), stage.predict(image[None], SPACING_ZYX, EYE)
    )


@needs_nnunet
def test_missing_fold_names_it(package: Path) -> None:
    from inference.backends.nnunet import NnUNetStage
    from inference.errors import ModelPackageError

    with pytest.raises(ModelPackageError) as err:
        NnUNetStage(spec(folds=[0, 1]), package, device=torch.device("cpu"))
    message = str(err.value)
    assert "fold_1/checkpoint_final.pth" in message
    assert "[0]" in message and TRAINER_FOLDER in message


@needs_nnunet
def test_missing_plans_and_checkpoint_name(package: Path, tmp_path: Path) -> None:
    from inference.backends.nnunet import NnUNetStage
    from inference.errors import ModelPackageError

    with pytest.raises(ModelPackageError, match="checkpoint_best.pth"):
        NnUNetStage(spec(checkpoint="checkpoint_best.pth"), package, device=torch.device("cpu"))
    broken = tmp_path / TRAINER_FOLDER
    shutil.copytree(package / TRAINER_FOLDER, broken)
    (broken / "plans.json").unlink()
    with pytest.raises(ModelPackageError, match="lacks plans.json"):
        NnUNetStage(spec(), tmp_path, device=torch.device("cpu"))


@needs_nnunet
def test_wrong_channel_count(stage, case: tuple[np.ndarray, np.ndarray]) -> None:
    from inference.errors import PredictionError

    image, _ = case
    with pytest.raises(PredictionError, match="1 input channel"):
        stage.predict_proba(np.stack([image, image]), SPACING_ZYX, EYE)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR", "SAL"])
def test_orientation_map_matches_simpleitk(orientation: str) -> None:
    sitk = pytest.importorskip("SimpleITK")
    from inference.backends.nnunet import OrientationMap

    rng = np.random.default_rng(1)
    arr = rng.random((5, 6, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 1.0, 3.0))
    # a permuted, flipped direction: x index runs toward S, y toward -R (= L... flipped), z toward A
    direction = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float)
    img.SetDirection(tuple(direction.ravel()))
    expected = sitk.DICOMOrient(img, orientation)
    orient = OrientationMap(direction, orientation)
    np.testing.assert_array_equal(orient.forward(arr), sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(orient.direction, np.reshape(expected.GetDirection(), (3, 3)))
    assert orient.spacing_zyx((3.0, 1.0, 0.5)) == tuple(reversed(expected.GetSpacing()))
    np.testing.assert_array_equal(orient.backward(orient.forward(arr[None]))[0], arr)


@needs_nnunet
def test_orientation_option_maps_back_exactly(stage, package: Path, case: tuple[np.ndarray, np.ndarray]) -> None:
    import SimpleITK as sitk

    from inference.backends.nnunet import NnUNetStage

    image, _ = case
    reference = stage.predict(image[None], SPACING_ZYX, EYE)

    # the same physical volume stored with permuted (y <-> x) and flipped (z, x) axes
    original = sitk.GetImageFromArray(image)
    original.SetSpacing(tuple(reversed(SPACING_ZYX)))
    moved = sitk.Flip(sitk.PermuteAxes(original, [1, 0, 2]), [True, False, True])
    moved_array = sitk.GetArrayFromImage(moved)
    moved_direction = np.reshape(moved.GetDirection(), (3, 3))
    moved_spacing = tuple(reversed(moved.GetSpacing()))
    assert moved_array.shape != image.shape

    oriented = NnUNetStage(spec(orientation="LPS"), package, device=torch.device("cpu"), num_threads=1)
    labels = oriented.predict(moved_array[None], moved_spacing, moved_direction)
    assert labels.shape == moved_array.shape
    label_img = sitk.GetImageFromArray(labels)
    label_img.CopyInformation(moved)
    back = sitk.GetArrayFromImage(sitk.Resample(label_img, original, sitk.Transform(), sitk.sitkNearestNeighbor))
    np.testing.assert_array_equal(back, reference)


@needs_nnunet
def test_postprocessing_pkl_applied(package: Path, tmp_path: Path) -> None:
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )
    from scipy import ndimage

    from inference.backends.nnunet import NnUNetStage

    image, truth = make_case(np.random.default_rng(99))
    # a small, bright, spurious blob far from the sphere (which lies in the low-x half)
    blob = (slice(26, 29), slice(33, 37), slice(41, 45))
    assert not truth[blob].any()
    image[blob] = 400.0

    without = NnUNetStage(spec(), package, device=torch.device("cpu"), num_threads=1).predict(
        image[None], SPACING_ZYX, EYE
    )
    _, n_before = ndimage.label(without == 1)
    assert n_before >= 2, "precondition: the model should label the blob as a second label-1 component"

    folder = tmp_path / TRAINER_FOLDER
    shutil.copytree(package / TRAINER_FOLDER, folder)
    with open(folder / "postprocessing.pkl", "wb") as fh:
        pickle.dump(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": 1}]), fh)
    with_pp = NnUNetStage(spec(), tmp_path, device=torch.device("cpu"), num_threads=1)
    assert "postprocessing.pkl" in "".join(with_pp.checksums)
    after = with_pp.predict(image[None], SPACING_ZYX, EYE)
    _, n_after = ndimage.label(after == 1)
    assert n_after == 1
    assert not (after[blob] == 1).any()
    np.testing.assert_array_equal(after == 2, without == 2)


@needs_nnunet
def test_postprocessing_pkl_with_foreign_globals_refused(package: Path, tmp_path: Path) -> None:
    from inference.backends.nnunet import NnUNetStage
    from inference.errors import ModelPackageError

    folder = tmp_path / TRAINER_FOLDER
    shutil.copytree(package / TRAINER_FOLDER, folder)
    with open(folder / "postprocessing.pkl", "wb") as fh:
        pickle.dump(([shutil.rmtree], [{"path": str(tmp_path)}]), fh)
    with pytest.raises(ModelPackageError, match="postprocessing"):
        NnUNetStage(spec(), tmp_path, device=torch.device("cpu"))
    assert folder.is_dir()


@needs_nnunet
def test_checksums_recorded(stage, package: Path) -> None:
    expected = {
        f"{TRAINER_FOLDER}/{name}": hashlib.sha256((package / TRAINER_FOLDER / name).read_bytes()).hexdigest()
        for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth")
    }
    assert stage.checksums == expected


@needs_nnunet
def test_torchvision_not_imported(stage) -> None:
    assert "torchvision" not in sys.modules


# -- device helpers ------------------------------------------------------------------------------


def test_choose_device_cpu(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_device(allow_gpu=False).type == "cpu"
    assert choose_device(prefer="cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert choose_device().type == "cpu"
        with caplog.at_level(logging.WARNING, logger="inference.device"):
            assert choose_device(prefer="cuda").type == "cpu"
        assert "CUDA is not available" in caplog.text
    with pytest.raises(ValueError, match="device preference"):
        choose_device(prefer="tpu")


def test_autocast_context_cpu_is_noop() -> None:
    with autocast_context(torch.device("cpu")):
        assert not torch.is_autocast_enabled()


def test_oom_fallback_reruns_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[torch.device] = []
    fallbacks: list[torch.device] = []

    def work(device: torch.device) -> str:
        calls.append(device)
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    with caplog.at_level(logging.WARNING, logger="inference.device"):
        result = run_with_oom_fallback(work, torch.device("cuda"), what="stage kidneys", on_fallback=fallbacks.append)
    assert result == "done"
    assert [d.type for d in calls] == ["cuda", "cpu"]
    assert [d.type for d in fallbacks] == ["cpu"]
    assert "GPU out of memory running stage kidneys; falling back to CPU" in caplog.text


def test_oom_fallback_other_errors_and_cpu_propagate() -> None:
    def broken(device: torch.device) -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        run_with_oom_fallback(broken, torch.device("cuda"))

    def cpu_oom(device: torch.device) -> None:
        raise torch.cuda.OutOfMemoryError("odd")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_oom_fallback(cpu_oom, torch.device("cpu"))
