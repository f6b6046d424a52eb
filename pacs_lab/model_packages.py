"""Tiny model packages built by the tests themselves (nothing downloaded).

``build_sphere_package`` trains a small DynUNet for a few seconds to find
bright spheres, and writes a native model package whose post-processing splits
the result into a LEFT and a RIGHT label by patient coordinates: the package
the laterality, geometry and worker tests run through the real inference path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from inference.backends.native import build_network, normalize, save_native_weights
from inference.manifest import Normalization

DYN_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "kernel_size": [3, 3, 3],
    "strides": [1, 2, 2],
    "upsample_kernel_size": [2, 2],
    "filters": [4, 4, 8],
    "norm_name": "batch",
}
NORM = Normalization(scheme="ct", clip=(0.0, 200.0), mean=50.0, std=50.0)

MANIFEST: dict[str, Any] = {
    "name": "test-spheres",
    "version": "1.0.0",
    "intended_use": "tests only: finds bright spheres and names them left/right",
    "demo": True,
    "inputs": [{"role": "image"}],
    "reference": "image",
    "labels": {
        1: {
            "name": "Left sphere",
            "type": {"value": "27925004", "meaning": "Nodule"},
            "laterality": "left",
            "color": [255, 0, 0],
            "measure_mean_of": ["image"],
        },
        2: {
            "name": "Right sphere",
            "type": {"value": "27925004", "meaning": "Nodule"},
            "laterality": "right",
            "color": [0, 0, 255],
            "count_components": True,
        },
    },
    "stages": [
        {
            "name": "spheres",
            "label_map": {1: 1},
            "model": {
                "backend": "native",
                "network": "DynUNet",
                "network_args": DYN_ARGS,
                "weights": "weights.safetensors",
                "spacing": [2.0, 2.0, 2.0],
                "patch_size": [16, 16, 16],
                "normalization": NORM.model_dump(),
                "orientation": "LPS",
            },
        }
    ],
    "postprocess": {"min_size_mm3": {1: 30.0}, "split_laterality": {1: [1, 2]}},
    "gpu": False,
}


def _sphere(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    shape = (12, 12, 12)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre, radius = rng.uniform(2, 10, 3), rng.uniform(2.0, 4.5)
    mask = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2
    image = (mask * 100.0 + rng.normal(0.0, 10.0, shape)).astype(np.float32)
    return image, mask


def build_sphere_package(folder: Path, *, steps: int = 120, seed: int = 0) -> Path:
    """Train the sphere finder (about 5 s on one core) and write its package."""
    folder.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net, _, _ = build_network("DynUNet", DYN_ARGS)
        opt = torch.optim.Adam(net.parameters(), lr=2e-2)
        net.train()
        for _ in range(steps):
            pairs = [_sphere(rng) for _ in range(2)]
            x = normalize(torch.from_numpy(np.stack([p[0] for p in pairs])), NORM)[:, None]
            y = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_native_weights(net, folder / "weights.safetensors")
    finally:
        torch.set_num_threads(threads)
    (folder / "model.yaml").write_text(yaml.safe_dump(MANIFEST, sort_keys=False))
    (folder / "MODEL_CARD.md").write_text("# test-spheres\n\nTrained by pacs_lab/model_packages.py; tests only.\n")
    return folder


def two_spheres(left_mm: float = 18.0, r_left: float = 7.0, r_right: float = 5.0) -> Any:
    """Intensity function: a larger sphere on the patient's left (+x), a smaller on the right."""

    def values(points: np.ndarray) -> np.ndarray:
        left = np.linalg.norm(points - np.array([left_mm, 0.0, 0.0]), axis=1) <= r_left
        right = np.linalg.norm(points - np.array([-left_mm, 0.0, 0.0]), axis=1) <= r_right
        return np.where(left | right, 100.0, 0.0) + 10.0

    return values
