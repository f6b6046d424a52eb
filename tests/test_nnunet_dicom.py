"""An nnU-Net v2 results folder, unchanged, inside a pacs-node model package:
the node's in-process result on a DICOM series agrees with what nnU-Net's own
`nnUNetv2_predict_from_modelfolder` writes for the same series converted to
NIfTI by SimpleITK (an independent DICOM reader)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from pydicom import Dataset

from inference.pipeline import ModelRunner
from pacs_lab.synthetic import make_series, write_series
from pacs_lab.tiny_nnunet import (
    SPACING_ZYX,
    TRAINER_FOLDER,
    make_case,
    nnunet_command,
    nnunet_env,
    nnunet_package,
)


def phantom_series(image: np.ndarray, *, reverse: bool = False) -> list[Dataset]:
    """The (z, y, x) phantom as an axial MR series, slice spacing and pixel size as in training."""
    nz, ny, nx = image.shape
    sz, sy, sx = SPACING_ZYX
    series = list(make_series(nz, modality="MR", rows=ny, cols=nx, spacing=(sx, sy, sz), pixels=False))
    for k, ds in enumerate(series):
        ds.ImagePositionPatient = [-40.0, -20.0, 10.0 + k * sz]
        ds.PixelRepresentation = 1
        ds.PixelData = np.rint(image[k]).astype(np.int16).tobytes()
        ds.InstanceNumber = nz - k if reverse else k + 1
    return series[::-1] if reverse else series


def test_node_agrees_with_nnunet_on_a_dicom_series(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    image, truth = make_case(np.random.default_rng(4242))
    series = phantom_series(image, reverse=True)
    files = write_series(tmp_path / "dicom", series)

    runner = ModelRunner(nnunet_package(tiny_nnunet_root, tmp_path / "package"), allow_gpu=False)
    ours = runner.run({"image": series})

    # nnU-Net's own path: SimpleITK converts the DICOM files to NIfTI, nnU-Net predicts.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(files[0].parent)))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(reader.Execute(), str(tmp_path / "in" / "case_0000.nii.gz"))
    subprocess.run(
        [
            nnunet_command("nnUNetv2_predict_from_modelfolder"),
            "-i", str(tmp_path / "in"),
            "-o", str(tmp_path / "out"),
            "-m", str(tmp_path / "package" / TRAINER_FOLDER),
            "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta", "--disable_progress_bar",
        ],
        env=nnunet_env(tiny_nnunet_root),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    theirs_img = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz"))
    theirs = sitk.GetArrayFromImage(theirs_img)

    ours_img = ours.labels.to_sitk()
    assert ours.labels.shape == theirs.shape
    assert np.allclose(ours_img.GetOrigin(), theirs_img.GetOrigin(), atol=1e-3)
    assert np.allclose(ours_img.GetSpacing(), theirs_img.GetSpacing(), atol=1e-4)
    assert np.allclose(ours_img.GetDirection(), theirs_img.GetDirection(), atol=1e-4)
    for label in (1, 2):
        a, b = ours.labels.array == label, theirs == label
        dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        assert dice >= 0.99, f"label {label}: Dice {dice:.4f} against nnUNetv2_predict_from_modelfolder"
        learnt = 2 * np.logical_and(a, truth == label).sum() / (a.sum() + (truth == label).sum())
        assert learnt > 0.8
    assert ours.model["checksums"] and all(len(v) == 64 for v in ours.model["checksums"].values())


def test_missing_fold_fails_with_a_clear_reason(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    from inference.errors import ModelPackageError

    package = nnunet_package(tiny_nnunet_root, tmp_path / "package")
    manifest = yaml.safe_load((package / "model.yaml").read_text())
    manifest["stages"][0]["model"]["folds"] = [0, 1]
    (package / "model.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ModelPackageError, match="fold_1"):
        ModelRunner(package, allow_gpu=False)
