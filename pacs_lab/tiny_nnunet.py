"""A tiny but real nnU-Net v2 results folder, built in about a minute on CPU.

:func:`build_tiny_nnunet` writes a synthetic raw dataset (``Dataset987_Tiny``:
one MR-like channel, a bright sphere = label 1 and a medium-intensity box =
label 2 in noise), runs nnU-Net's own fingerprinting, planning and
preprocessing command on it, shrinks the ``3d_fullres`` network in the plans so
it trains in seconds, builds the network from the plans exactly as nnU-Net's
trainer does, trains it with a plain torch loop on nnU-Net's preprocessed
(z-scored) cases, and saves the results folder nnU-Net's predictor reads::

    nnUNet_results/Dataset987_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres/
        dataset.json  plans.json  dataset_fingerprint.json  fold_0/checkpoint_final.pth

:func:`make_case` draws one more phantom (image and truth) from the same
family, for tests. Nothing here imports torchvision.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_Tiny"
CONFIGURATION = "3d_fullres"
TRAINER_FOLDER = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
#: (z, y, x) voxels and spacing in mm of the phantoms
SHAPE_ZYX = (32, 40, 48)
SPACING_ZYX = (2.0, 1.0, 1.0)
#: the patch and network the plans are shrunk to (features: a quarter of nnU-Net's, at most MAX_FEATURES)
PATCH_SIZE = (16, 32, 32)
MAX_FEATURES = 32
N_STAGES = 4
LABELS = {"background": 0, "sphere": 1, "box": 2}


def make_case(
    rng: np.random.Generator,
    shape_zyx: tuple[int, int, int] = SHAPE_ZYX,
    spacing_zyx: tuple[float, float, float] = SPACING_ZYX,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: (image float32 (z, y, x), labels uint8 (z, y, x)).

    A bright sphere (label 1, radius 5-8 mm) and a medium-intensity box (label 2)
    in noisy background, at random non-overlapping places.
    """
    nz, ny, nx = shape_zyx
    sz, sy, sx = spacing_zyx
    z, y, x = np.meshgrid(np.arange(nz) * sz, np.arange(ny) * sy, np.arange(nx) * sx, indexing="ij")
    labels = np.zeros(shape_zyx, np.uint8)
    # sphere in the left half along x, box in the right half: never overlapping
    radius = rng.uniform(5.0, 8.0)
    cz = rng.uniform(radius + 2, nz * sz - radius - 2)
    cy = rng.uniform(radius + 2, ny * sy - radius - 2)
    cx = rng.uniform(radius + 2, nx * sx / 2 - 1)
    labels[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius**2] = 1
    bz, by, bx = int(rng.integers(3, 6)), int(rng.integers(6, 12)), int(rng.integers(6, 12))
    oz = int(rng.integers(2, nz - bz - 2))
    oy = int(rng.integers(2, ny - by - 2))
    ox = int(rng.integers(nx // 2 + 2, nx - bx - 2))
    labels[oz : oz + bz, oy : oy + by, ox : ox + bx] = 2
    means = np.array([100.0, 400.0, 220.0], np.float32)
    image = means[labels] + rng.normal(0.0, 15.0, shape_zyx).astype(np.float32)
    return image.astype(np.float32), labels


def write_nifti(
    array: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    path: Path,
    direction: np.ndarray | None = None,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    """Write a (z, y, x) array as NIfTI with SimpleITK (spacing given z, y, x)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in np.asarray(direction, float).ravel()))
    sitk.WriteImage(img, str(path))


def nnunet_env(root: Path) -> dict[str, str]:
    """Environment for nnU-Net's commands, with its three folders under ``root``."""
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "nnUNet_raw"),
        nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
        nnUNet_results=str(root / "nnUNet_results"),
        nnUNet_def_n_proc="1",
        nnUNet_n_proc_DA="1",
        OMP_NUM_THREADS="1",
    )
    return env


def nnunet_command(name: str) -> str:
    """Path of one of nnU-Net's console scripts, next to this interpreter."""
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH; install nnunetv2")
    return found


def _write_raw(root: Path, rng: np.random.Generator, n_cases: int) -> None:
    raw = root / "nnUNet_raw" / DATASET_NAME
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        image, labels = make_case(rng)
        write_nifti(image, SPACING_ZYX, raw / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        write_nifti(labels, SPACING_ZYX, raw / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    dataset = {
        "channel_names": {"0": "MR"},
        "labels": LABELS,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "Tiny phantoms (pacs-node tests)",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _shrink_plans(plans: dict[str, Any]) -> dict[str, Any]:
    """Make the 3d_fullres network small: N_STAGES stages, <= MAX_FEATURES features, PATCH_SIZE."""
    cfg = plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]["arch_kwargs"]
    n = min(N_STAGES, arch["n_stages"])
    strides = [list(s) for s in arch["strides"][:n]]
    # the patch must be divisible by the total stride along each axis
    total = np.prod(np.array(strides), axis=0)
    if any(p % t for p, t in zip(PATCH_SIZE, total, strict=True)):
        raise RuntimeError(f"patch {PATCH_SIZE} not divisible by the network's total stride {total.tolist()}")
    arch["n_stages"] = n
    arch["features_per_stage"] = [min(MAX_FEATURES, f // 4) for f in arch["features_per_stage"][:n]]
    arch["kernel_sizes"] = [list(k) for k in arch["kernel_sizes"][:n]]
    arch["strides"] = strides
    arch["n_conv_per_stage"] = list(arch["n_conv_per_stage"][:n])
    arch["n_conv_per_stage_decoder"] = list(arch["n_conv_per_stage_decoder"][: n - 1])
    cfg["patch_size"] = list(PATCH_SIZE)
    cfg["batch_size"] = 2
    return plans


def _random_patch(data: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A PATCH_SIZE crop, centred on a foreground voxel half of the time (nnU-Net's oversampling)."""
    shape = np.array(data.shape[1:])
    patch = np.array(PATCH_SIZE)
    fg = np.argwhere(seg[0] > 0)
    if len(fg) and rng.random() < 0.5:
        centre = fg[rng.integers(len(fg))]
        lo = np.clip(centre - patch // 2, 0, shape - patch)
    else:
        lo = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch, strict=True)])
    sl = (slice(None), *(slice(int(a), int(a + p)) for a, p in zip(lo, patch, strict=True)))
    return data[sl], seg[sl]


def build_tiny_nnunet(root: Path, *, seed: int = 0, n_cases: int = 8, steps: int = 450) -> Path:
    """Build a tiny, trained nnU-Net v2 results folder under ``root``.

    Args:
        root: an empty (or new) folder; ``nnUNet_raw``, ``nnUNet_preprocessed``
            and ``nnUNet_results`` are made inside it.
        seed: seeds the phantoms, the weight initialisation and the training.
        n_cases: number of training phantoms.
        steps: training iterations (batch of 2 patches each).

    Returns:
        The results folder ``.../nnUNetTrainer__nnUNetPlans__3d_fullres``.

    Raises:
        subprocess.CalledProcessError: nnU-Net's planning command failed.
    """
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root = Path(root)
    rng = np.random.default_rng(seed)
    _write_raw(root, rng, n_cases)

    # nnU-Net's own fingerprint, plans and preprocessing (one process, one worker)
    subprocess.run(
        [
            nnunet_command("nnUNetv2_plan_and_preprocess"),
            "-d",
            str(DATASET_ID),
            "-c",
            CONFIGURATION,
            "-np",
            "1",
            "-npfp",
            "1",
            "--no_pbar",
        ],
        env=nnunet_env(root),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    pre = root / "nnUNet_preprocessed" / DATASET_NAME
    plans = _shrink_plans(json.loads((pre / "nnUNetPlans.json").read_text()))
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans_manager = PlansManager(plans)
    cfg = plans_manager.get_configuration(CONFIGURATION)
    label_manager = plans_manager.get_label_manager(dataset_json)

    # the preprocessed cases, read with nnU-Net's own dataset class
    data_folder = pre / cfg.data_identifier
    dataset = infer_dataset_class(str(data_folder))(str(data_folder))
    cases = []
    for identifier in sorted(dataset.identifiers):
        data, seg, _, _ = dataset.load_case(identifier)
        cases.append((np.asarray(data[:], np.float32), np.asarray(seg[:], np.int64)))

    # the network, built from the plans as nnU-Net's trainer (and predictor) build it
    torch.manual_seed(seed)
    n_in = determine_num_input_channels(plans_manager, cfg, dataset_json)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, cfg, n_in, label_manager.num_segmentation_heads, enable_deep_supervision=False
    )
    old_threads = torch.get_num_threads()
    # one thread: deterministic, and faster than two on a small, busy CPU
    torch.set_num_threads(1)
    try:
        _train(network, cases, rng, steps=steps, n_classes=label_manager.num_segmentation_heads)
    finally:
        torch.set_num_threads(old_threads)

    out = root / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER
    (out / "fold_0").mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(plans, indent=2))
    shutil.copy(pre / "dataset.json", out / "dataset.json")
    shutil.copy(pre / "dataset_fingerprint.json", out / "dataset_fingerprint.json")
    mirror_axes = tuple(range(len(cfg.patch_size)))
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": CONFIGURATION,
            "fold": 0,
            "dataset_json": dataset_json,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": mirror_axes,
    }
    torch.save(checkpoint, out / "fold_0" / "checkpoint_final.pth")
    return out


def _train(
    network: Any, cases: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, *, steps: int, n_classes: int
) -> None:
    """Plain training: random patches with flips, cross-entropy + soft Dice, AdamW."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.2)
    network.train()
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(2):
            data, seg = cases[int(rng.integers(len(cases)))]
            x, y = _random_patch(data, seg, rng)
            for axis in range(1, 4):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y[0]))
        xb = torch.from_numpy(np.stack(xs))
        yb = torch.from_numpy(np.stack(ys))
        logits = network(xb)
        probs = logits.softmax(1)
        onehot = F.one_hot(yb, n_classes).permute(0, 4, 1, 2, 3).float()
        inter = (probs * onehot).sum((0, 2, 3, 4))
        dice = (2 * inter + 1e-5) / (probs.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1e-5)
        loss = F.cross_entropy(logits, yb) + (1 - dice[1:].mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    network.eval()


def nnunet_package(tiny_root: Path, dest: Path, *, mirroring: bool = False) -> Path:
    """A model package whose only stage is the tiny nnU-Net folder, copied in as is."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny_root / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER, dest / TRAINER_FOLDER)
    manifest = {
        "name": "tiny-nnunet",
        "version": "0.0.1",
        "intended_use": "tests only",
        "demo": True,
        "inputs": [{"role": "image"}],
        "reference": "image",
        "labels": {
            1: {"name": "Sphere", "type": {"value": "27925004", "meaning": "Nodule"}},
            2: {"name": "Box", "type": {"value": "27925004", "meaning": "Nodule"}, "color": [0, 255, 0]},
        },
        "stages": [
            {
                "name": "segment",
                "label_map": {1: 1, 2: 2},
                "model": {
                    "backend": "nnunet",
                    "folders": [TRAINER_FOLDER],
                    "folds": [0],
                    "use_mirroring": mirroring,
                },
            }
        ],
        "gpu": False,
    }
    (dest / "model.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dest
