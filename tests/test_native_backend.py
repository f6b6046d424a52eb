"""The native backend: tiny DynUNet / PlainConvUNet networks saved as safetensors,
loaded by NativeStage and run through the real inference path (orientation,
resampling, normalisation, sliding window, mirroring)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from inference.backends.native import (
    NativeStage,
    build_network,
    normalize,
    orientation_transform,
    save_native_weights,
)
from inference.errors import ModelPackageError, PredictionError
from inference.manifest import NativeBackend, Normalization, sha256_file
from pacs_lab.model_packages import DYN_ARGS

PLAIN_ARGS: dict[str, Any] = {
    "input_channels": 2,
    "n_stages": 3,
    "features_per_stage": [4, 8, 8],
    "conv_op": "Conv3d",
    "kernel_sizes": [3, 3, 3],
    "strides": [1, 2, 2],
    "n_conv_per_stage": [1, 1, 1],
    "num_classes": 3,
    "n_conv_per_stage_decoder": [1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "nonlin": "LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
CT = Normalization(scheme="ct", clip=(-50.0, 150.0), mean=50.0, std=50.0)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # the test machine has two cores shared with other work; oversubscribed
    # intra-op threads make tiny 3-D convolutions ten times slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spec(network: str = "DynUNet", args: dict[str, Any] | None = None, **kw: Any) -> NativeBackend:
    base: dict[str, Any] = {
        "backend": "native",
        "network": network,
        "network_args": DYN_ARGS if args is None else args,
        "weights": "weights.safetensors",
        "spacing": (1.0, 1.0, 1.0),
        "patch_size": (16, 16, 16),
        "normalization": CT,
        "orientation": None,
    }
    base.update(kw)
    return NativeBackend.model_validate(base)


def _sphere(
    shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    centre_mm: Any,
    radius_mm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A bright noisy sphere (HU-like values) and its mask on a (z, y, x) grid."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing_zyx, strict=True)], indexing="ij")
    mask = sum((g - c) ** 2 for g, c in zip(grids, centre_mm, strict=True)) <= radius_mm**2
    image = (mask * 100.0 + rng.normal(0.0, 15.0, shape)).astype(np.float32)
    return image[None], mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def sphere_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DynUNet trained for 100 steps to segment bright spheres, saved as a native package folder."""
    folder = tmp_path_factory.mktemp("sphere")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net, _, _ = build_network("DynUNet", DYN_ARGS)
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    net.train()
    for _ in range(100):
        pairs = [_sphere((12, 12, 12), (1, 1, 1), rng.uniform(2, 10, 3), rng.uniform(2.5, 4.5), rng) for _ in range(2)]
        x = normalize(torch.from_numpy(np.concatenate([p[0] for p in pairs])), CT)[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(before)
    save_native_weights(net, folder / "weights.safetensors")
    return folder


def test_trained_sphere_dice_through_predict(sphere_package: Path) -> None:
    stage = NativeStage(_spec(), sphere_package)
    rng = np.random.default_rng(1)
    # anisotropic input grid: the stage resamples to 1 mm and back
    spacing = (1.5, 0.9, 1.1)
    image, mask = _sphere((20, 30, 26), spacing, (14.0, 13.0, 15.0), 6.0, rng)
    labels = stage.predict(image, spacing, np.eye(3))
    assert labels.shape == mask.shape and labels.dtype == np.uint8
    assert _dice(labels == 1, mask) > 0.9
    assert stage.checksums == {"weights.safetensors": sha256_file(sphere_package / "weights.safetensors")}
    assert stage.num_classes == 2
    assert "torchvision" not in sys.modules


def test_mirroring_averages_and_keeps_quality(sphere_package: Path) -> None:
    plain = NativeStage(_spec(), sphere_package)
    mirrored = NativeStage(_spec(mirror_axes=(0, 1, 2)), sphere_package)
    assert len(mirrored._flips) == 8
    rng = np.random.default_rng(2)
    image, mask = _sphere((18, 18, 18), (1, 1, 1), (8.0, 9.0, 10.0), 5.0, rng)
    p0 = plain.predict_proba(image, (1.0, 1.0, 1.0), np.eye(3))
    p1 = mirrored.predict_proba(image, (1.0, 1.0, 1.0), np.eye(3))
    assert p1.shape == p0.shape == (2, 18, 18, 18)
    np.testing.assert_allclose(p1.sum(axis=0), 1.0, atol=1e-5)
    assert not np.allclose(p0, p1)  # flips really were averaged in
    assert _dice(p1.argmax(0) == 1, mask) > 0.9


def test_shape_on_input_grid_anisotropic_and_small(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, _, _ = build_network("DynUNet", DYN_ARGS)
    save_native_weights(net, tmp_path / "weights.safetensors")
    stage = NativeStage(_spec(spacing=(1.5, 1.5, 1.5), normalization=Normalization(scheme="zscore")), tmp_path)
    image = np.random.default_rng(0).normal(size=(1, 7, 37, 29)).astype(np.float32)
    # z resamples to 14 slices (< patch 16: padded), y/x to 20/15 (not multiples of the patch)
    probs = stage.predict_proba(image, (3.0, 0.8, 0.8), np.eye(3))
    assert probs.shape == (2, 7, 37, 29) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.all(probs >= 0)


def test_plain_conv_unet_with_class_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, in_ch, out_ch = build_network("PlainConvUNet", PLAIN_ARGS)
    assert (in_ch, out_ch) == (2, 3)
    assert isinstance(net.encoder.stages[0][0].convs[0].conv, torch.nn.Conv3d)  # type: ignore[index,union-attr]
    digest = save_native_weights(net, tmp_path / "w" / "plain.safetensors")
    spec = _spec(
        "PlainConvUNet",
        PLAIN_ARGS,
        weights="w/plain.safetensors",
        normalization=Normalization(scheme="none"),
        patch_size=(8, 16, 16),
        spacing=(1.0, 1.0, 2.0),
        overlap=0.25,
    )
    stage = NativeStage(spec, tmp_path, sw_batch_size=4)
    assert stage.num_classes == 3 and stage.checksums == {"w/plain.safetensors": digest}
    image = np.random.default_rng(0).normal(size=(2, 11, 21, 19)).astype(np.float32)
    probs = stage.predict_proba(image, (2.0, 1.0, 1.0), np.eye(3))
    assert probs.shape == (3, 11, 21, 19)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    with pytest.raises(PredictionError, match="expected \\(2, z, y, x\\)"):
        stage.predict_proba(image[:1], (2.0, 1.0, 1.0), np.eye(3))


def test_bad_weights_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="not found"):
        NativeStage(_spec(), tmp_path)
    other = dict(DYN_ARGS, filters=[4, 8, 8])
    net, _, _ = build_network("DynUNet", other)
    save_native_weights(net, tmp_path / "weights.safetensors")
    with pytest.raises(ModelPackageError, match="do not fit the DynUNet.*another shape"):
        NativeStage(_spec(), tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelPackageError, match="not a readable safetensors"):
        NativeStage(_spec(), tmp_path)
    with pytest.raises(ModelPackageError, match="not a torch.nn"):
        build_network("PlainConvUNet", dict(PLAIN_ARGS, conv_op="os.system"))
    with pytest.raises(ModelPackageError, match="cannot build"):
        build_network("DynUNet", dict(DYN_ARGS, strides=[1, 2]))
    net, _, _ = build_network("DynUNet", DYN_ARGS)
    save_native_weights(net, tmp_path / "weights.safetensors")
    with pytest.raises(ModelPackageError, match="multiple of the network's total stride"):
        NativeStage(_spec(patch_size=(16, 16, 10)), tmp_path)


# -- orientation -------------------------------------------------------------

DIRECTIONS = {
    "x flipped": np.diag([-1.0, 1.0, 1.0]),
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]),  # columns: x->L, y->S, z->A
    "sagittal": np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]),  # columns: x->P, y->I, z->R
    "oblique": np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_orientation_transform_matches_simpleitk(name: str) -> None:
    direction = DIRECTIONS[name]
    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    img = sitk.GetImageFromArray(arr)
    img.SetDirection(direction.ravel().tolist())
    for target in ("LPS", "RAS"):
        expected = sitk.GetArrayFromImage(sitk.DICOMOrient(img, target))
        perm, flip = orientation_transform(direction, target)
        axes = (2 - perm[2], 2 - perm[1], 2 - perm[0])
        ours = arr.transpose(axes)
        ours = np.flip(ours, [2 - i for i in range(3) if flip[i]])
        np.testing.assert_array_equal(ours, expected)
    with pytest.raises(PredictionError):
        orientation_transform(direction, "LPX")


def test_orientation_round_trips_exactly(sphere_package: Path) -> None:
    stage = NativeStage(_spec(orientation="LPS"), sphere_package)
    rng = np.random.default_rng(3)
    spacing = (1.2, 1.0, 0.8)
    image, _ = _sphere((14, 17, 20), spacing, (7.0, 8.0, 9.0), 4.0, rng)
    reference = stage.predict_proba(image, spacing, np.eye(3))
    # same patient content, stored with x running right-to-left
    flipped = stage.predict_proba(np.ascontiguousarray(image[..., ::-1]), spacing, np.diag([-1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(flipped, reference[..., ::-1])
    # same content with the x and z index axes swapped and the new x reversed: new +x runs
    # towards the feet (I), +y posterior, +z left ("IPL"); spacing follows the axes
    swapped = np.ascontiguousarray(image.transpose(0, 3, 2, 1)[:, :, :, ::-1])
    direction = np.array([[0, 0, 1.0], [0, 1.0, 0], [-1.0, 0, 0]])  # columns (0,0,-1), (0,1,0), (1,0,0)
    out = stage.predict_proba(swapped, (spacing[2], spacing[1], spacing[0]), direction)
    np.testing.assert_array_equal(out, np.ascontiguousarray(reference.transpose(0, 3, 2, 1)[:, :, :, ::-1]))
    assert "torchvision" not in sys.modules
