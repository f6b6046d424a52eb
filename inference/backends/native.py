"""The ``native`` backend: a network class the node knows, weights in safetensors.

A :class:`NativeStage` is built once from a manifest's :class:`~inference.manifest.NativeBackend`
(network class + arguments, safetensors weights, target spacing, patch size,
normalisation, test-time mirroring, orientation) and then predicts many images.
Nothing is unpickled: weights are read with :func:`safetensors.torch.load_file`.

Per image, :meth:`NativeStage.predict_proba`:

1. reorients the array to the manifest's orientation (exact permutation/flip of
   axes, as SimpleITK's ``DICOMOrient`` would do; undone at the end),
2. normalises intensities (``ct``: clip + stored mean/std; ``zscore``: per channel;
   ``none``),
3. resamples to the model spacing with ``torch.nn.functional.interpolate``
   (trilinear, on the compute device),
4. pads to at least the patch size and runs MONAI's ``sliding_window_inference``
   with Gaussian blending, softmax per patch and optional mirroring averaged,
5. removes the padding, resamples the probabilities back to the input grid
   (trilinear, renormalised) and undoes the reorientation.

Everything runs under ``torch.inference_mode()``, with autocast on CUDA. When the
GPU runs out of memory the image and the blended output are kept in host memory
and only the patches go to the GPU (nnU-Net's fallback).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from inference.backends import StagePredictor
from inference.errors import ModelPackageError, PredictionError
from inference.manifest import NativeBackend, Normalization, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "NativeStage",
    "build_network",
    "normalize",
    "orientation_transform",
    "save_native_weights",
]

#: PlainConvUNet arguments that name a torch.nn class
_CLASS_ARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")
#: DynUNet arguments that MONAI wants as (name, kwargs) tuples, which YAML gives as lists
_TUPLE_ARGS = ("norm_name", "act_name", "dropout")
_AXIS_OF = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}


# ---------------------------------------------------------------------------
# network construction and weights


def _torch_class(key: str, name: Any) -> Any:
    """``"Conv3d"``, ``"torch.nn.Conv3d"`` or ``"torch.nn.modules.conv.Conv3d"`` -> ``torch.nn.Conv3d``."""
    if name is None or isinstance(name, type):
        return name
    if not isinstance(name, str):
        raise ModelPackageError(f"network_args.{key}: expected a torch.nn class name, got {name!r}")
    parts = name.split(".")
    if len(parts) > 1 and parts[:2] != ["torch", "nn"]:
        raise ModelPackageError(f"network_args.{key}: {name!r} is not a torch.nn class")
    cls = getattr(nn, parts[-1], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelPackageError(f"network_args.{key}: {name!r} is not a torch.nn module class")
    return cls


def build_network(network: str, network_args: dict[str, Any]) -> tuple[nn.Module, int, int]:
    """Instantiate a supported network with random weights.

    Args:
        network: ``"DynUNet"`` (MONAI) or ``"PlainConvUNet"`` (dynamic_network_architectures).
        network_args: constructor arguments; for PlainConvUNet, ``conv_op``, ``norm_op``,
            ``dropout_op`` and ``nonlin`` may be torch.nn class names (``"Conv3d"``).

    Returns:
        (network, input channels, output classes).

    Raises:
        ModelPackageError: unknown network, unknown class name or arguments the class rejects.
    """
    args = dict(network_args)
    try:
        if network == "DynUNet":
            from monai.networks.nets import DynUNet

            for key in _TUPLE_ARGS:
                if isinstance(args.get(key), list):
                    args[key] = tuple(args[key])
            args.setdefault("spatial_dims", 3)
            if args.get("deep_supervision"):
                raise ModelPackageError("network_args.deep_supervision: must be false for inference")
            net: nn.Module = DynUNet(**args)
            in_ch, out_ch = int(args["in_channels"]), int(args["out_channels"])
        elif network == "PlainConvUNet":
            from dynamic_network_architectures.architectures.unet import (  # type: ignore[import-untyped]
                PlainConvUNet,
            )

            for key in _CLASS_ARGS:
                if key in args:
                    args[key] = _torch_class(key, args[key])
            # the decoder holds every deep-supervision head either way, so the weights
            # match; inference wants the full-resolution output only
            args["deep_supervision"] = False
            net = PlainConvUNet(**args)
            in_ch, out_ch = int(args["input_channels"]), int(args["num_classes"])
        else:
            raise ModelPackageError(f"network: {network!r} is not one of DynUNet, PlainConvUNet")
    except (TypeError, ValueError, KeyError, AssertionError, AttributeError) as exc:
        raise ModelPackageError(f"network_args: cannot build {network}: {exc!r}") from exc
    return net, in_ch, out_ch


def save_native_weights(network: nn.Module, path: str | Path) -> str:
    """Write ``network``'s weights as safetensors (atomically) for a native model package.

    Returns:
        the SHA-256 of the written file, hex.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in network.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sha256_file(path)


def _load_weights(net: nn.Module, path: Path, network: str) -> None:
    if not path.is_file():
        raise ModelPackageError(f"weights: {path} not found")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelPackageError(f"weights: {path} is not a readable safetensors file: {exc}") from exc
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {few(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
        if shapes:
            problems.append(f"{len(shapes)} with another shape (file vs network): {few(shapes)}")
        raise ModelPackageError(
            f"weights: {path} do not fit the {network} described by network_args ({'; '.join(problems)}); "
            "were they saved from a network built with the same arguments?"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelPackageError(f"weights: {path} cannot be loaded into {network}: {exc}") from exc


# ---------------------------------------------------------------------------
# plain array helpers


def orientation_transform(direction: np.ndarray, orientation: str) -> tuple[tuple[int, int, int], tuple[bool, ...]]:
    """Axis permutation and flips that bring an image to ``orientation``.

    ``orientation`` is a SimpleITK ``DICOMOrient`` code whose letters name where
    increasing x, y and z index point (``"LPS"``: +x to the patient's left). The
    current code is SimpleITK's own reading of ``direction`` (nearest axes for
    oblique images), so the result is what ``sitk.DICOMOrient`` does.

    Returns:
        (perm, flip) over (x, y, z) index axes: new axis ``i`` is old axis ``perm[i]``,
        reversed when ``flip[i]``.

    Raises:
        PredictionError: ``orientation`` is not a valid three-letter code.
    """
    target = orientation.upper()
    if len(target) != 3 or sorted(_AXIS_OF.get(c, -1) for c in target) != [0, 1, 2]:
        raise PredictionError(f"orientation {orientation!r} is not a code like 'LPS' or 'RAS'")
    flat = [float(v) for v in np.asarray(direction, dtype=np.float64).reshape(9)]
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(flat)
    perm: list[int] = []
    flip: list[bool] = []
    for letter in target:
        j = next(j for j, c in enumerate(current) if _AXIS_OF[c] == _AXIS_OF[letter])
        perm.append(j)
        flip.append(current[j] != letter)
    return (perm[0], perm[1], perm[2]), tuple(flip)


def _orient_axes(perm: Sequence[int], flip: Sequence[bool]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(transpose axes, flip axes) for a (C, z, y, x) array."""
    axes = (0, 3 - perm[2], 3 - perm[1], 3 - perm[0])
    flips = tuple(3 - i for i in range(3) if flip[i])
    return axes, flips


def normalize(image: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Intensity normalisation of a (C, z, y, x) float tensor, as the model was trained.

    ``ct``: clip to the stored window, then ``(x - mean) / std`` with the stored
    statistics; ``zscore``: each channel to zero mean and unit variance over the
    whole image; ``none``: unchanged.
    """
    if norm.scheme == "ct":
        if norm.clip is None or norm.mean is None or norm.std is None:
            raise PredictionError("ct normalisation needs clip, mean and std")
        return (image.clamp(norm.clip[0], norm.clip[1]) - norm.mean) / max(norm.std, 1e-8)
    if norm.scheme == "zscore":
        flat = image.reshape(image.shape[0], -1).double()
        mean = flat.mean(dim=1).to(image.dtype)
        std = flat.std(dim=1, unbiased=False).clamp_min(1e-8).to(image.dtype)
        return (image - mean[:, None, None, None]) / std[:, None, None, None]
    return image


def _resample(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling of a (C, z, y, x) tensor to ``shape``."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    return F.interpolate(x[None], size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)[0]


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------
# the stage


class NativeStage(StagePredictor):
    """A native network, loaded once and used for many predictions.

    Args:
        spec: the stage's ``native`` backend section of the manifest.
        package_folder: the model package folder (``spec.weights`` is relative to it).
        device: where the network runs.
        sw_batch_size: patches per forward pass of the sliding window.

    Raises:
        ModelPackageError: the network cannot be built, the weights file is missing,
            unreadable, or its tensors do not match the network; the patch size does
            not fit the network's downsampling.
    """

    def __init__(
        self,
        spec: NativeBackend,
        package_folder: str | Path,
        *,
        device: torch.device | str = "cpu",
        sw_batch_size: int = 2,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.sw_batch_size = max(1, int(sw_batch_size))
        net, self.in_channels, self.num_classes = build_network(spec.network, spec.network_args)
        weights = Path(package_folder) / spec.weights
        _load_weights(net, weights, spec.network)
        self.checksums = {spec.weights: sha256_file(weights)}
        self._check_patch(spec)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.network = net.to(self.device)
        # all flip combinations of the mirror axes (identity first), as tensor dims
        axes = sorted({2 + int(a) for a in spec.mirror_axes})
        if any(a not in (2, 3, 4) for a in axes):
            raise ModelPackageError(f"mirror_axes: {spec.mirror_axes} must be among 0 (z), 1 (y), 2 (x)")
        self._flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        logger.info(
            "loaded %s (%s, %d -> %d classes, weights %s sha256 %s) on %s",
            spec.network,
            spec.weights,
            self.in_channels,
            self.num_classes,
            weights.name,
            self.checksums[spec.weights][:12],
            self.device,
        )

    @staticmethod
    def _check_patch(spec: NativeBackend) -> None:
        strides = spec.network_args.get("strides")
        if not strides:
            return
        total = np.ones(3, dtype=np.int64)
        for s in strides:
            total *= np.broadcast_to(np.asarray(s, dtype=np.int64), (3,))
        bad = [int(p) for p, t in zip(spec.patch_size, total, strict=True) if p % int(t)]
        if bad or min(spec.patch_size) < 1:
            raise ModelPackageError(
                f"patch_size {tuple(spec.patch_size)} must be a multiple of the network's total stride "
                f"{tuple(int(t) for t in total)} along (z, y, x)"
            )

    # -- prediction ---------------------------------------------------------

    def _patch_proba(self, patch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of a batch of patches, averaged over the mirror flips."""
        out: torch.Tensor | None = None
        with _autocast(self.device):
            for dims in self._flips:
                x = torch.flip(patch, dims) if dims else patch
                p = torch.softmax(self.network(x).float(), dim=1)
                p = torch.flip(p, dims) if dims else p
                out = p if out is None else out + p
        assert out is not None
        return out / len(self._flips)

    def _run(self, image: np.ndarray, spacing_zyx: Sequence[float], data_device: torch.device) -> torch.Tensor:
        """Probabilities on the (already oriented) grid of ``image``, on ``data_device``."""
        spec = self.spec
        x = torch.from_numpy(image).to(data_device, dtype=torch.float32)
        x = normalize(x, spec.normalization)
        in_shape = tuple(int(s) for s in x.shape[1:])
        target_zyx = spec.spacing[::-1]
        shape = [max(1, int(round(n * s / t))) for n, s, t in zip(in_shape, spacing_zyx, target_zyx, strict=True)]
        x = _resample(x, shape)
        # pad to at least the patch size (symmetric, zero = mean after normalisation)
        pads = [max(0, p - n) for p, n in zip(spec.patch_size, shape, strict=True)]
        before = [p // 2 for p in pads]
        if any(pads):
            # F.pad takes (x_lo, x_hi, y_lo, y_hi, z_lo, z_hi)
            flat: list[int] = []
            for b, p in zip(reversed(before), reversed(pads), strict=True):
                flat += [b, p - b]
            x = F.pad(x, flat)
        probs = sliding_window_inference(
            x[None],
            roi_size=tuple(spec.patch_size),
            sw_batch_size=self.sw_batch_size,
            predictor=self._patch_proba,
            overlap=spec.overlap,
            mode="gaussian",
            sigma_scale=0.125,
            padding_mode="constant",
            cval=0.0,
            sw_device=self.device,
            device=data_device,
        )
        assert isinstance(probs, torch.Tensor)
        probs = probs[0].float()
        if any(pads):
            probs = probs[
                :, before[0] : before[0] + shape[0], before[1] : before[1] + shape[1], before[2] : before[2] + shape[2]
            ]
        probs = _resample(probs, in_shape).clamp_min_(0)
        return probs / probs.sum(dim=0, keepdim=True).clamp_min(1e-12)

    @torch.inference_mode()
    def predict_proba(
        self, image: np.ndarray, spacing_zyx: tuple[float, float, float], direction: np.ndarray
    ) -> np.ndarray:
        """Class probabilities (num_classes, z, y, x) float32 on the input grid.

        Raises:
            PredictionError: the image is not (channels, z, y, x) with the network's
                channel count, or the spacing/direction are invalid.
        """
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[0] != self.in_channels or min(image.shape) < 1:
            raise PredictionError(f"image: expected ({self.in_channels}, z, y, x), got shape {tuple(image.shape)}")
        spacing = [float(s) for s in spacing_zyx]
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise PredictionError(f"spacing_zyx: expected three positive numbers, got {spacing_zyx!r}")
        direction = np.asarray(direction, dtype=np.float64)
        if direction.shape != (3, 3):
            raise PredictionError(f"direction: expected a 3x3 matrix, got shape {direction.shape}")

        axes: tuple[int, ...] = (0, 1, 2, 3)
        flips: tuple[int, ...] = ()
        if self.spec.orientation:
            axes, flips = _orient_axes(*orientation_transform(direction, self.spec.orientation))
            image = image.transpose(axes)
            if flips:
                image = np.flip(image, flips)
            spacing = [spacing[a - 1] for a in axes[1:]]

        image = np.ascontiguousarray(image, dtype=np.float32)
        if not image.flags.writeable:  # torch.from_numpy warns on read-only arrays
            image = image.copy()
        try:
            probs = self._run(image, spacing, self.device)
        except RuntimeError as exc:
            if self.device.type != "cuda" or not _is_oom(exc):
                raise
            logger.warning("GPU out of memory on %s image; retrying with the volume in host memory", image.shape)
            torch.cuda.empty_cache()
            probs = self._run(image, spacing, torch.device("cpu"))
        out = probs.cpu().numpy()
        if flips:
            out = np.flip(out, flips)
        out = out.transpose(tuple(int(i) for i in np.argsort(axes)))
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"NativeStage({self.spec.network}, weights={self.spec.weights!r}, device={self.device})"
