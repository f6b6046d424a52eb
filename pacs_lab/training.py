"""Train the demo models on synthetic phantoms, reproducibly, on CPU.

    python -m pacs_lab.training stroke  --out models/stroke
    python -m pacs_lab.training dentate --out models/dentate
    python -m pacs_lab.training kidney  --out models/kidney
    python -m pacs_lab.training kidney-mr --out build/kidney-mr   # MR-only comparison

Each recipe (:data:`RECIPES`) names a phantom task (:mod:`pacs_lab.tasks`), the
model's manifest (inputs, labels with codes and colours, post-processing) and
one or two stages. Every stage is a small MONAI DynUNet trained on patches of
the training phantoms, preprocessed exactly as the node's ``native`` backend
preprocesses at inference (same input assembly, reorientation to LPS,
normalisation and resampling functions); a cascade's second stage trains on
crops taken around the ground truth with the manifest's crop margin.

Everything is seeded (phantom seeds, patch sampling, augmentation, weight
initialisation) and the number of optimiser steps is fixed, so a re-run with
the same seed on the same torch version reproduces the weights up to
floating-point nondeterminism of the CPU kernels; the held-out metrics agree
within a small tolerance (see the model cards). The result is a native model
package: ``model.yaml``, one safetensors file per stage, ``MODEL_CARD.md`` and
``training.json`` (recipe, timings and held-out evaluation).

These are DEMO models trained on synthetic phantoms. They are not for clinical use.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage  # type: ignore[import-untyped]

from inference.backends.native import _orient_axes, build_network, normalize, orientation_transform, save_native_weights
from inference.cascade import crop_boxes
from inference.manifest import MANIFEST_NAME, Manifest, ModelPackage, Normalization
from inference.pipeline import build_inputs
from pacs_lab.evaluation import EVAL_SEED, evaluate_package
from pacs_lab.modelcard import write_model_card
from pacs_lab.tasks import PhantomCase, get_task

logger = logging.getLogger(__name__)

__all__ = ["RECIPES", "ModelRecipe", "StageRecipe", "train_model"]

#: seeds of training phantoms start here; evaluation seeds are taken far from them
TRAIN_SEED_BASE = 10_000

DEMO_NOTE = (
    "DEMO model trained by pacs-node's own script (python -m pacs_lab.training) on synthetic phantoms. "
    "Not for clinical use."
)


@dataclass(frozen=True)
class StageRecipe:
    """How one stage is built and trained."""

    name: str
    #: target spacing (x, y, z) mm and patch (z, y, x) voxels, as in the manifest
    spacing: tuple[float, float, float]
    patch: tuple[int, int, int]
    #: final label value -> this stage's training class (others are background)
    classes: dict[int, int]
    #: this stage's class -> final label value (manifest label_map)
    label_map: dict[int, int]
    filters: tuple[int, ...] = (8, 16, 32, 64)
    #: per level (z, y, x); the first is always 1
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    normalization: Normalization = Normalization()
    final: bool = True
    #: crop from an earlier stage: {"from_stage", "labels", "margin_mm", "per_component"}
    crop: dict[str, Any] | None = None
    steps: int = 1000
    batch: int = 2
    lr: float = 3e-3
    foreground_p: float = 0.6
    #: flips used as training augmentation (laterality comes from post-processing, so all are safe)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    #: flips averaged at inference (test-time augmentation); none by default, for CPU speed
    tta_axes: tuple[int, ...] = ()
    #: channel index dropped to zero with this probability (an optional input)
    drop_channel: tuple[int, float] | None = None
    #: a localiser learns the structure grown by this margin (mm): a region is found
    #: reliably at low resolution where a small nucleus is a handful of voxels
    dilate_mm: float = 0.0


@dataclass(frozen=True)
class ModelRecipe:
    """A demo model: phantom task, manifest fields and stages."""

    task: str
    manifest: dict[str, Any]
    stages: tuple[StageRecipe, ...]
    train_cases: int
    eval_cases: int
    seed: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


def _label(name: str, type_: str | tuple[str, str], color: tuple[int, int, int], **extra: Any) -> dict[str, Any]:
    category = extra.pop("category", ("91723000", "Anatomical Structure"))
    return {
        "name": name,
        "category": {"value": category[0], "meaning": category[1]},
        "type": type_ if isinstance(type_, str) else {"value": type_[0], "meaning": type_[1]},
        "color": list(color),
        **extra,
    }


_ABNORMAL = ("49755003", "Morphologically Abnormal Structure")


def _segment(name: str, labels: list[int], type_: str, color: tuple[int, int, int], **extra: Any) -> dict[str, Any]:
    """An output segment of a manifest (inference.manifest.SegmentSpec); codes by key of inference.codes.CODES."""
    return {"name": name, "labels": labels, "type": type_, "color": list(color), **extra}


_KIDNEY_LABELS = [1, 2, 3, 4]
#: whole kidneys and their parts per side: what a radiologist reads, every figure measured on its own segment.
#: The tumour label is not validated (phantom Dice about 0.1, see the model card): it is drawn and measured
#: only where a route asks for unvalidated outputs.
# colours far apart in hue, so that a viewer (and the OHIF test reading its screenshots) tells them apart
_KIDNEY_SEGMENTS: list[dict[str, Any]] = [
    *(
        _segment(
            f"{side.capitalize()} kidney",
            _KIDNEY_LABELS,
            "kidney",
            color,
            laterality=side,
            side_of=_KIDNEY_LABELS,
            plausible_ml=[50.0, 400.0],
        )
        for side, color in (("right", (80, 140, 255)), ("left", (255, 200, 0)))
    ),
    *(
        _segment(
            f"{side.capitalize()} renal parenchyma",
            [3],
            "parenchyma",
            color,
            laterality=side,
            side_of=_KIDNEY_LABELS,
            anatomy="kidney",
            plausible_ml=[30.0, 300.0],
        )
        for side, color in (("right", (60, 220, 90)), ("left", (220, 80, 220)))
    ),
    *(
        _segment(
            f"{side.capitalize()} renal tumour",
            [4],
            "neoplasm",
            color,
            category="morphologically_abnormal_structure",
            laterality=side,
            side_of=_KIDNEY_LABELS,
            anatomy="kidney",
            count_components=True,
            validated=False,
        )
        for side, color in (("right", (255, 60, 60)), ("left", (150, 60, 255)))
    ),
]

_KIDNEY_MANIFEST: dict[str, Any] = {
    "version": "1.0.0",
    "intended_use": "Demonstration of pacs-node on synthetic phantoms. Not for clinical use.",
    "demo": True,
    "inputs": [{"role": "image"}],
    "reference": "image",
    "labels": {
        1: _label("Right kidney", ("64033007", "Kidney"), (80, 140, 255), laterality="right", volume_includes=[3, 4]),
        2: _label("Left kidney", ("64033007", "Kidney"), (80, 200, 255), laterality="left", volume_includes=[3, 4]),
        3: _label("Renal parenchyma", "parenchyma", (60, 220, 90)),
        4: _label("Renal tumour", ("108369006", "Neoplasm"), (255, 60, 60), category=_ABNORMAL, count_components=True),
    },
    "segments": _KIDNEY_SEGMENTS,
    "postprocess": {
        "min_size_mm3": {1: 500.0, 3: 500.0, 4: 50.0},
        "split_laterality": {1: [2, 1]},
        "laterality_with": {1: [3, 4]},
    },
}


def _kidney_stages(steps1: int, steps2: int) -> tuple[StageRecipe, ...]:
    return (
        StageRecipe(
            name="kidneys",
            spacing=(6.0, 6.0, 6.0),
            patch=(32, 48, 48),
            classes={1: 1, 2: 1, 3: 1, 4: 1},
            label_map={1: 1},
            final=False,
            steps=steps1,
        ),
        StageRecipe(
            name="parenchyma",
            spacing=(1.75, 1.75, 2.5),
            patch=(32, 48, 48),
            classes={1: 1, 2: 1, 3: 2, 4: 3},
            label_map={1: 1, 2: 3, 3: 4},
            crop={"from_stage": "kidneys", "labels": [1], "margin_mm": 12.0, "per_component": True, "largest": 2},
            steps=steps2,
        ),
    )


RECIPES: dict[str, ModelRecipe] = {
    "stroke": ModelRecipe(
        task="stroke",
        manifest={
            "name": "demo-stroke-dwi",
            "version": "1.0.0",
            "intended_use": "Demonstration of pacs-node on synthetic phantoms. Not for clinical use.",
            "demo": True,
            "description": "Acute infarct on DWI b1000 + ADC (+ FLAIR, optional), one stage.",
            "inputs": [
                {"role": "dwi", "b_value": 1000},
                {"role": "adc"},
                {"role": "flair", "optional": True},
            ],
            "reference": "dwi",
            "labels": {
                1: _label(
                    "Stroke lesion",
                    ("55641003", "Infarct"),
                    (255, 64, 64),
                    category=_ABNORMAL,
                    count_components=True,
                    measure_mean_of=["adc"],
                    mean_unit="um2/s",
                )
            },
            "segments": [
                _segment(
                    "Stroke lesion",
                    [1],
                    "infarct",
                    (255, 64, 64),
                    category="morphologically_abnormal_structure",
                    anatomy="brain",
                    count_components=True,
                    measure_mean_of=["adc"],
                    mean_unit="um2/s",
                )
            ],
            "postprocess": {"min_size_mm3": {1: 20.0}},
        },
        stages=(
            StageRecipe(
                name="lesion",
                spacing=(1.5, 1.5, 4.0),
                patch=(16, 64, 64),
                strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                classes={1: 1},
                label_map={1: 1},
                mirror_axes=(1, 2),
                foreground_p=0.7,
                drop_channel=(2, 0.3),
                steps=1500,
            ),
        ),
        train_cases=24,
        eval_cases=20,
    ),
    "dentate": ModelRecipe(
        task="dentate",
        manifest={
            "name": "demo-dentate-qsm",
            "version": "1.0.0",
            "intended_use": "Demonstration of pacs-node on synthetic phantoms. Not for clinical use.",
            "demo": True,
            "description": "Left and right dentate nuclei on QSM: localise the dentate region (nuclei + 6 mm) "
            "at 3 mm, segment the crop at 1 mm.",
            "inputs": [{"role": "qsm"}],
            "reference": "qsm",
            "labels": {
                1: _label(
                    "Left dentate nucleus",
                    "dentate_nucleus",
                    (255, 200, 0),
                    laterality="left",
                    measure_mean_of=["qsm"],
                    mean_unit="[ppb]",
                ),
                2: _label(
                    "Right dentate nucleus",
                    "dentate_nucleus",
                    (0, 200, 255),
                    laterality="right",
                    measure_mean_of=["qsm"],
                    mean_unit="[ppb]",
                ),
            },
            "segments": [
                _segment(
                    f"{side.capitalize()} dentate nucleus",
                    [value],
                    "dentate_nucleus",
                    color,
                    laterality=side,
                    measure_mean_of=["qsm"],
                    mean_unit="[ppb]",
                    plausible_ml=[0.2, 3.0],
                )
                for value, side, color in ((1, "left", (255, 200, 0)), (2, "right", (0, 200, 255)))
            ],
            "postprocess": {"keep_largest": {1: 2}, "split_laterality": {1: [1, 2]}},
        },
        stages=(
            StageRecipe(
                name="localise",
                spacing=(3.0, 3.0, 3.0),
                patch=(32, 48, 48),
                classes={1: 1, 2: 1},
                label_map={1: 1},
                final=False,
                dilate_mm=6.0,
                foreground_p=0.8,
                steps=400,
            ),
            StageRecipe(
                name="nuclei",
                spacing=(1.0, 1.0, 1.0),
                patch=(32, 48, 64),
                classes={1: 1, 2: 1},
                label_map={1: 1},
                crop={
                    "from_stage": "localise",
                    "labels": [1],
                    "margin_mm": 12.0,
                    "per_component": False,
                    "largest": 2,
                },
                steps=800,
            ),
        ),
        train_cases=24,
        eval_cases=12,
    ),
    "kidney": ModelRecipe(
        task="kidney",
        manifest={
            **copy.deepcopy(_KIDNEY_MANIFEST),
            "name": "demo-kidney-ct-mr",
            "description": "Kidneys, renal parenchyma and tumour on CT and MR fs-T2w: kidneys at 6 mm, "
            "then each kidney crop at 1.75 mm. Trained on CT and MR together.",
        },
        stages=_kidney_stages(400, 800),
        train_cases=32,
        eval_cases=16,
    ),
    "kidney-mr": ModelRecipe(
        task="kidney-mr",
        manifest={
            **copy.deepcopy(_KIDNEY_MANIFEST),
            "name": "demo-kidney-mr-only",
            "description": "The kidney recipe trained on MR phantoms only (comparison model, not shipped).",
        },
        stages=_kidney_stages(400, 800),
        train_cases=16,
        eval_cases=10,
        notes={"comparison_for": "kidney"},
    ),
}

# ---------------------------------------------------------------------------
# data: the same preprocessing as inference.backends.native


@dataclass
class _Sample:
    image: np.ndarray  # (C, z, y, x) float32, normalised, at the stage spacing, LPS
    target: np.ndarray  # (z, y, x) int64 class indices
    fg: np.ndarray  # (N, 3) foreground voxel indices


def _stage_arrays(
    image: np.ndarray,
    target: np.ndarray,
    spacing_zyx: Sequence[float],
    direction: np.ndarray,
    recipe: StageRecipe,
) -> _Sample:
    """Reorient, normalise and resample like :class:`~inference.backends.native.NativeStage`."""
    axes, flips = _orient_axes(*orientation_transform(direction, "LPS"))
    image = image.transpose(axes)
    target = target.transpose(tuple(a - 1 for a in axes[1:]))
    spacing = [spacing_zyx[a - 1] for a in axes[1:]]
    if flips:
        image = np.flip(image, flips)
        target = np.flip(target, tuple(f - 1 for f in flips))
    x = normalize(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), recipe.normalization)
    shape = [max(1, round(n * s / t)) for n, s, t in zip(x.shape[1:], spacing, recipe.spacing[::-1], strict=True)]
    if tuple(shape) != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]
        t = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None, None]
        target = F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy()
    tgt = np.ascontiguousarray(target).astype(np.int64)
    return _Sample(image=x.numpy().astype(np.float32), target=tgt, fg=np.argwhere(tgt > 0))


def _class_map(truth: np.ndarray, classes: dict[int, int]) -> np.ndarray:
    lut = np.zeros(max(256, int(truth.max(initial=0)) + 1), dtype=np.int64)
    for final, cls in classes.items():
        lut[final] = cls
    return lut[truth]


def _prepare(
    cases: Sequence[tuple[PhantomCase, np.ndarray, tuple[float, float, float], np.ndarray]],
    recipe: StageRecipe,
    rng: np.random.Generator,
) -> list[_Sample]:
    """Training samples of one stage from (case, image, spacing_zyx, direction)."""
    out: list[_Sample] = []
    for case, image, spacing_zyx, direction in cases:
        target = _class_map(case.truth.array, recipe.classes)
        if recipe.dilate_mm > 0:
            grown = ndimage.distance_transform_edt(target == 0, sampling=spacing_zyx) <= recipe.dilate_mm
            target = np.where(grown, max(recipe.classes.values()), 0).astype(np.int64)
        if recipe.crop is None:
            out.append(_stage_arrays(image, target, spacing_zyx, direction, recipe))
            continue
        # crops around the truth as the cascade takes them around stage 1's output,
        # with a random extra margin (stage 1 is never exact)
        organ = (case.truth.array > 0).astype(np.uint8)
        margin = float(recipe.crop["margin_mm"]) + float(rng.uniform(-4.0, 8.0))
        boxes = crop_boxes(organ, [1], margin, spacing_zyx, bool(recipe.crop["per_component"]))
        for box in boxes:
            sub = np.ascontiguousarray(image[(slice(None), *box)])
            out.append(_stage_arrays(sub, target[box], spacing_zyx, direction, recipe))
    return out


def _patch(sample: _Sample, recipe: StageRecipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = np.asarray(recipe.patch)
    shape = np.asarray(sample.target.shape)
    if len(sample.fg) and rng.random() < recipe.foreground_p:
        centre = sample.fg[rng.integers(len(sample.fg))] + rng.integers(-size // 4, size // 4 + 1)
    else:
        centre = np.array([rng.integers(0, n) for n in shape])
    lo = centre - size // 2
    img = np.zeros((sample.image.shape[0], *recipe.patch), dtype=np.float32)
    tgt = np.zeros(recipe.patch, dtype=np.int64)
    src = [slice(max(0, lo[i]), min(shape[i], lo[i] + size[i])) for i in range(3)]
    dst = [slice(s.start - lo[i], s.stop - lo[i]) for i, s in enumerate(src)]
    img[(slice(None), *dst)] = sample.image[(slice(None), *src)]
    tgt[tuple(dst)] = sample.target[tuple(src)]
    for axis in recipe.mirror_axes:
        if rng.random() < 0.5:
            img = np.flip(img, axis + 1)
            tgt = np.flip(tgt, axis)
    # intensity augmentation per channel: scale, shift, noise
    c = img.shape[0]
    img = img * rng.uniform(0.85, 1.15, size=(c, 1, 1, 1)).astype(np.float32)
    img = img + rng.normal(0.0, 0.1, size=(c, 1, 1, 1)).astype(np.float32)
    img = img + rng.normal(0.0, 0.05, size=img.shape).astype(np.float32)
    if recipe.drop_channel is not None and rng.random() < recipe.drop_channel[1]:
        img[recipe.drop_channel[0]] = 0.0
    return np.ascontiguousarray(img), np.ascontiguousarray(tgt)


# ---------------------------------------------------------------------------
# network and training loop


def network_args(recipe: StageRecipe, in_channels: int) -> dict[str, Any]:
    """DynUNet arguments of a stage, as written into ``model.yaml``."""
    strides = [list(s) for s in recipe.strides]
    return {
        "spatial_dims": 3,
        "in_channels": in_channels,
        "out_channels": max(recipe.label_map) + 1,
        "kernel_size": [[3, 3, 3]] * len(strides),
        "strides": strides,
        "upsample_kernel_size": strides[1:],
        "filters": list(recipe.filters),
        "norm_name": ["instance", {"affine": True}],
        "act_name": ["leakyrelu", {"inplace": True, "negative_slope": 0.01}],
        "res_block": False,
        "deep_supervision": False,
    }


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the foreground classes (batch Dice, as nnU-Net)."""
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice.mean())


def train_stage(
    samples: Sequence[_Sample], recipe: StageRecipe, in_channels: int, seed: int
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one stage; returns the network (eval mode) and a training log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    args = network_args(recipe, in_channels)
    net, _, _ = build_network("DynUNet", args)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-5)
    net.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    log_every = max(1, recipe.steps // 10)
    for step in range(recipe.steps):
        lr = recipe.lr * (1 - step / recipe.steps) ** 0.9
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [_patch(samples[int(rng.integers(len(samples)))], recipe, rng) for _ in range(recipe.batch)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]))
        opt.zero_grad(set_to_none=True)
        loss = _loss(net(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step == 0:
            recent = float(np.mean(losses[-log_every:]))
            logger.info(
                "stage %s step %d/%d loss %.4f (%.0f s)",
                recipe.name,
                step + 1,
                recipe.steps,
                recent,
                time.perf_counter() - t0,
            )
    net.eval()
    return net, {
        "steps": recipe.steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(float(np.mean(losses[-log_every:])), 4),
        "parameters": int(sum(p.numel() for p in net.parameters())),
    }


def _stage_manifest(recipe: StageRecipe, in_channels: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": recipe.name,
        "final": recipe.final,
        "label_map": dict(recipe.label_map),
        "model": {
            "backend": "native",
            "network": "DynUNet",
            "network_args": network_args(recipe, in_channels),
            "weights": f"{recipe.name}.safetensors",
            "spacing": list(recipe.spacing),
            "patch_size": list(recipe.patch),
            "normalization": recipe.normalization.model_dump(exclude_none=True),
            "mirror_axes": list(recipe.tta_axes),
            "overlap": 0.5,
            "orientation": "LPS",
        },
    }
    if recipe.crop is not None:
        entry["crop"] = dict(recipe.crop)
    return entry


def _ct_normalization(
    cases: Sequence[tuple[PhantomCase, np.ndarray, Any, Any]],
) -> Normalization | None:
    """nnU-Net's CT scheme from the CT training foreground: clip 0.5/99.5 %, mean, std."""
    values = [img[0][case.truth.array > 0] for case, img, _, _ in cases if case.modality == "CT"]
    if not values or len(values) != len(cases):
        return None
    v = np.concatenate(values).astype(np.float64)
    lo, hi = np.percentile(v, [0.5, 99.5])
    clipped = np.clip(v, lo, hi)
    return Normalization(scheme="ct", clip=(float(lo), float(hi)), mean=float(clipped.mean()), std=float(clipped.std()))


def train_model(
    name: str,
    out: str | Path,
    *,
    seed: int | None = None,
    train_cases: int | None = None,
    eval_cases: int | None = None,
    steps_scale: float = 1.0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train recipe ``name`` and write the model package to ``out``.

    Returns:
        the training record (also written as ``training.json``).

    Raises:
        KeyError: unknown recipe.
    """
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    seed = recipe.seed if seed is None else int(seed)
    n_train = train_cases or recipe.train_cases
    if threads:
        torch.set_num_threads(int(threads))
    task = get_task(recipe.task)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    manifest_data = copy.deepcopy(recipe.manifest)
    manifest_data["phantom_task"] = recipe.task
    manifest = Manifest.model_validate({**manifest_data, "stages": [_stage_manifest(s, 1) for s in recipe.stages]})

    logger.info("generating %d training phantoms (%s, seeds from %d)", n_train, recipe.task, TRAIN_SEED_BASE + seed)
    t = time.perf_counter()
    prepared = []
    for i in range(n_train):
        case = task.case(TRAIN_SEED_BASE + seed * 1000 + i)
        ref, image, _ = build_inputs(manifest, case.inputs)
        spacing_zyx = (ref.spacing[2], ref.spacing[1], ref.spacing[0])
        prepared.append((case, image, spacing_zyx, ref.direction))
    data_s = time.perf_counter() - t
    in_channels = int(prepared[0][1].shape[0])

    stages_out = []
    log: dict[str, Any] = {}
    for k, stage in enumerate(recipe.stages):
        st = stage
        if steps_scale != 1.0:
            st = _replace(st, steps=max(10, int(round(stage.steps * steps_scale))))
        if name.startswith("kidney"):
            norm = _ct_normalization(prepared)
            if norm is not None:
                st = _replace(st, normalization=norm)
        rng = np.random.default_rng([seed, 100 + k])
        samples = _prepare(prepared, st, rng)
        logger.info(
            "stage %s: %d samples, shapes %s", st.name, len(samples), sorted({s.target.shape for s in samples})[:4]
        )
        net, stage_log = train_stage(samples, st, in_channels, seed * 100 + k)
        digest = save_native_weights(net, out / f"{st.name}.safetensors")
        stage_log["sha256"] = digest
        stage_log["samples"] = len(samples)
        log[st.name] = stage_log
        stages_out.append(_stage_manifest(st, in_channels))

    manifest_data["stages"] = stages_out
    Manifest.model_validate(manifest_data)  # fail here, not at load time
    (out / MANIFEST_NAME).write_text(
        "# "
        + DEMO_NOTE
        + "\n# Written by: python -m pacs_lab.training "
        + name
        + "\n"
        + yaml.safe_dump(_plain(manifest_data), sort_keys=False, width=110),
        encoding="utf-8",
    )
    record: dict[str, Any] = {
        "recipe": name,
        "task": recipe.task,
        "seed": seed,
        "train_cases": n_train,
        "train_seeds": [TRAIN_SEED_BASE + seed * 1000, TRAIN_SEED_BASE + seed * 1000 + n_train - 1],
        "data_seconds": round(data_s, 1),
        "stages": log,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    n_eval = recipe.eval_cases if eval_cases is None else int(eval_cases)
    if n_eval:
        record["evaluation"] = evaluate_package(ModelPackage(out), cases=n_eval, seed=EVAL_SEED, allow_gpu=False)
    record["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    write_model_card(out, record, recipe)
    return record


def compare_mr_only(mixed: str | Path, mr_only: str | Path, *, cases: int, seed: int) -> dict[str, Any]:
    """Evaluate a CT + MR kidney model and an MR-only one on the same MR phantoms.

    Writes ``comparison.json`` into the mixed model's folder and rewrites its model card.
    """

    mixed = Path(mixed)
    result: dict[str, Any] = {"cases": cases, "seed": seed}
    for key, folder in (("mixed", mixed), ("mr_only", Path(mr_only))):
        evaluated = evaluate_package(folder, cases=cases, seed=seed, task="kidney-mr", allow_gpu=False)
        evaluated.pop("rows", None)
        result[key] = evaluated
    (mixed / "comparison.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    record = json.loads((mixed / "training.json").read_text(encoding="utf-8"))
    write_model_card(mixed, record, RECIPES[record["recipe"]])
    return result


def _replace(stage: StageRecipe, **changes: Any) -> StageRecipe:
    from dataclasses import replace

    return replace(stage, **changes)


def _plain(value: Any) -> Any:
    """YAML-safe copy (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {(int(k) if isinstance(k, (int, np.integer)) else k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isfinite(value):
        return float(value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pacs_lab.training", description="Train a pacs-node demo model on synthetic phantoms (CPU)."
    )
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--out", required=True, type=Path, help="model package folder to write")
    parser.add_argument("--seed", type=int, default=None, help="recipe seed (default 0: the shipped models)")
    parser.add_argument("--train-cases", type=int, default=None)
    parser.add_argument("--eval-cases", type=int, default=None, help="held-out phantoms evaluated after training")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count (quick runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="kidney-mr only: a CT + MR kidney package to compare with on the same MR phantoms "
        "(writes its comparison.json and model card)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    record = train_model(
        args.recipe,
        args.out,
        seed=args.seed,
        train_cases=args.train_cases,
        eval_cases=args.eval_cases,
        steps_scale=args.steps_scale,
        threads=args.threads,
    )
    if args.compare_with is not None:
        n = args.eval_cases or RECIPES[args.recipe].eval_cases
        comparison = compare_mr_only(args.compare_with, args.out, cases=n, seed=EVAL_SEED + 50_000)
        record["comparison"] = {k: comparison[k]["summary"] for k in ("mixed", "mr_only")}
    summary = record.get("evaluation", {}).get("summary", {})
    sys.stdout.write(json.dumps({"recipe": args.recipe, "seconds": record["total_seconds"], "summary": summary}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
