"""Run a model's stages: one stage, or a cascade that localises, crops and refines.

Each stage's raw output (its own label values, on the full input grid) is kept
by stage name so that a later stage can take its crops from it. A stage with a
``crop`` runs once per crop of the input image (same spacing and direction: a
crop only moves the origin), and its labels are pasted back into the full grid
where the crop predicted foreground. Stages marked ``final`` write their labels,
mapped through ``label_map``, into the final label map; later stages overwrite
earlier ones where they predict foreground. Beside the label map the cascade
keeps, per voxel of a final label, the probability the network gave the class it
chose: the segments' mean confidence (a QC figure of the outputs) comes from it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from inference.backends import StagePredictor
from inference.errors import PredictionError
from inference.manifest import StageSpec

logger = logging.getLogger(__name__)

__all__ = ["Box", "crop_boxes", "map_labels", "run_cascade"]

Box = tuple[slice, slice, slice]

_STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def _grow(box: Sequence[slice], margin: Sequence[int], shape: Sequence[int]) -> Box:
    z, y, x = (
        slice(max(0, int(s.start) - m), min(n, int(s.stop) + m)) for s, m, n in zip(box, margin, shape, strict=True)
    )
    return (z, y, x)


def crop_boxes(
    stage1_labels: np.ndarray,
    labels: Sequence[int],
    margin_mm: float,
    spacing_zyx: Sequence[float],
    per_component: bool,
    largest: int | None = None,
) -> list[Box]:
    """Crop boxes (z, y, x slices) around ``labels`` in a stage output.

    With ``per_component``, one box per connected component (26-connectivity) of
    each label, in label order then raster order; otherwise one box around every
    voxel of all ``labels``. With ``largest``, only the ``largest`` biggest components
    (of all ``labels`` together) count. Boxes grow by ``margin_mm`` on each side (rounded up to
    whole voxels per axis) and are clipped to the image. No foreground: no boxes.
    """
    shape = stage1_labels.shape
    if largest is not None:
        stage1_labels = _largest_only(stage1_labels, labels, largest)
    margin = [int(math.ceil(float(margin_mm) / float(s) - 1e-9)) if margin_mm > 0 else 0 for s in spacing_zyx]
    boxes: list[Box] = []
    if not per_component:
        mask = np.isin(stage1_labels, list(labels))
        found = ndimage.find_objects(mask.astype(np.uint8))
        if found and found[0] is not None:
            boxes.append(_grow(found[0], margin, shape))
        return boxes
    for label in labels:
        comp, n = ndimage.label(stage1_labels == label, structure=_STRUCTURE)
        for sl in ndimage.find_objects(comp, max_label=n):
            if sl is not None:
                boxes.append(_grow(sl, margin, shape))
    return boxes


def _largest_only(labels: np.ndarray, values: Sequence[int], n: int) -> np.ndarray:
    """``labels`` with every component of ``values`` outside the ``n`` largest set to 0."""
    comp, count = ndimage.label(np.isin(labels, list(values)), structure=_STRUCTURE)
    if count <= n:
        return labels
    sizes = np.bincount(comp.ravel(), minlength=count + 1)
    sizes[0] = 0
    keep = np.argsort(sizes)[::-1][:n]
    return np.where(np.isin(comp, keep), labels, 0).astype(labels.dtype)


def map_labels(pred: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Stage output values -> final label values (uint8); unmapped values become 0.

    Raises:
        PredictionError: a mapped value does not fit in uint8.
    """
    lut = np.zeros(max(256, int(pred.max(initial=0)) + 1), dtype=np.uint8)
    for src, dst in label_map.items():
        if not 0 <= int(dst) <= 255 or int(src) < 0:
            raise PredictionError(f"label_map: {src} -> {dst} is outside 0-255")
        if int(src) < lut.size:
            lut[int(src)] = int(dst)
    return lut[pred]


def run_cascade(
    image: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    direction: np.ndarray,
    stages: Sequence[tuple[StageSpec, StagePredictor]],
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Run the stages of a model on one image.

    Args:
        image: float32 (channels, z, y, x) on the reference grid.
        spacing_zyx: voxel spacing in mm along (z, y, x).
        direction: 3x3, columns = LPS directions of increasing x, y, z index.
        stages: each stage's manifest entry with its loaded predictor, in manifest order.

    Returns:
        (final uint8 label map (z, y, x) on the input grid, float32 confidence map on the same grid
        (the chosen class's probability where a final stage wrote a label, 0 elsewhere), seconds
        per stage name).

    Raises:
        PredictionError: a stage crops from a stage that has not run, or the image is
            not (channels, z, y, x); predictor errors pass through.
    """
    if image.ndim != 4:
        raise PredictionError(f"image: expected (channels, z, y, x), got shape {image.shape}")
    grid = image.shape[1:]
    final = np.zeros(grid, dtype=np.uint8)
    confidence = np.zeros(grid, dtype=np.float32)
    raw: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    for spec, predictor in stages:
        t0 = time.perf_counter()
        if spec.crop is None:
            pred, conf = predictor.predict_with_confidence(image, spacing_zyx, direction)
            if pred.shape != grid:
                raise PredictionError(f"stage {spec.name}: output shape {pred.shape} is not the input grid {grid}")
            raw[spec.name] = pred
            if spec.final:
                mapped = map_labels(pred, spec.label_map)
                fg = mapped > 0
                final[fg] = mapped[fg]
                confidence[fg] = conf[fg]
        else:
            source = raw.get(spec.crop.from_stage)
            if source is None:
                raise PredictionError(f"stage {spec.name}: crops from {spec.crop.from_stage!r}, which has not run")
            boxes = crop_boxes(
                source,
                spec.crop.labels,
                spec.crop.margin_mm,
                spacing_zyx,
                spec.crop.per_component,
                largest=spec.crop.largest,
            )
            if not boxes:
                logger.info(
                    "stage %s: no labels %s in stage %s, nothing to crop",
                    spec.name,
                    spec.crop.labels,
                    spec.crop.from_stage,
                )
            full = np.zeros(grid, dtype=np.uint8)
            for box in boxes:
                sub = np.ascontiguousarray(image[(slice(None), *box)])
                pred, conf = predictor.predict_with_confidence(sub, spacing_zyx, direction)
                if pred.shape != sub.shape[1:]:
                    raise PredictionError(
                        f"stage {spec.name}: output shape {pred.shape} is not the crop shape {sub.shape[1:]}"
                    )
                fg = pred > 0
                full[box][fg] = pred[fg]
                if spec.final:
                    mapped = map_labels(pred, spec.label_map)
                    fgm = mapped > 0
                    final[box][fgm] = mapped[fgm]
                    confidence[box][fgm] = conf[fgm]
            raw[spec.name] = full
            logger.debug("stage %s: %d crop(s) %s", spec.name, len(boxes), boxes)
        timings[spec.name] = time.perf_counter() - t0
        logger.info("stage %s done in %.2f s", spec.name, timings[spec.name])
    return final, confidence, timings
