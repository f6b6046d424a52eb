"""Output segments: the masks the SEG draws and every number the SR and the key image report.

The network gives a label map (one value per voxel). What a clinician reads is a
list of *segments* (:attr:`inference.manifest.Manifest.output_segments`): "Right
kidney" is the whole organ (sinus, parenchyma and tumour of the right kidney),
"Right renal parenchyma" the parenchyma of that kidney alone. Segments may
overlap. :func:`build_segments` turns a label map into those masks, and
:func:`measure_segments` measures each mask and nothing else, so that a volume in
the SR is, by construction, voxels x voxel volume of the very segment it
references.

Left and right come from patient coordinates (LPS: +x is the patient's left).
The midline is the mean x of the organs' centroids when there are two or more
organs, else the body midline (:func:`body_midline_x`: the centre of the
patient's outline in the image), never the centre of the image array.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from inference.manifest import Manifest, SegmentSpec
from inference.postprocess import organ_mask
from inference.volume import Volume

__all__ = [
    "Segment",
    "body_midline_x",
    "build_segments",
    "display_labels",
    "measure_segments",
    "for_output",
    "organ_sides",
]

logger = logging.getLogger(__name__)

STRUCTURE = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True, eq=False)
class Segment:
    """One output segment: its SEG number (1..N), its definition and its voxels on the reference grid."""

    number: int
    spec: SegmentSpec
    mask: np.ndarray = field(repr=False)  # bool (z, y, x)


def body_midline_x(image: Volume) -> float | None:
    """LPS x (mm) of the centre of the patient's outline in ``image``, or None when nothing stands out.

    The outline is every voxel that differs from the background (the median of the
    volume's border voxels) by more than 10 % of the 1st-99th percentile range;
    its centre is the mean x of those voxels, unweighted, so that a bright organ on
    one side (the liver) does not pull it.
    """
    arr = np.asarray(image.array, dtype=np.float32)
    if arr.size == 0:
        return None
    border = np.concatenate(
        [arr[[0, -1]].ravel(), arr[:, [0, -1]].ravel(), arr[:, :, [0, -1]].ravel()]
    )  # the six faces
    background = float(np.median(border))
    low, high = np.percentile(arr, [1, 99])
    spread = float(high - low)
    if spread <= 0:
        return None
    body = np.abs(arr - background) > 0.1 * spread
    if not body.any():
        return None
    # mean column index per slice weighted by voxel count is the centroid; map through the geometry
    zz, yy, xx = np.nonzero(body)
    centre = np.array([[xx.mean(), yy.mean(), zz.mean()]], dtype=np.float64)
    return float(image.index_to_lps(centre)[0, 0])


def organ_sides(
    labels: np.ndarray,
    organ_labels: Sequence[int],
    reference: Volume,
    *,
    midline_x: float | None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Connected organs (26-connectivity) of ``organ_labels`` and the side of each.

    Returns:
        (component map, {component: "left" | "right"}).

    Raises:
        ValueError: a single organ and no body midline to place it by.
    """
    comp, count = ndimage.label(np.isin(labels, list(organ_labels)), structure=STRUCTURE)
    if count == 0:
        return comp, {}
    idx = np.arange(1, count + 1)
    centroids = np.asarray(ndimage.center_of_mass(np.ones(comp.shape, np.float32), comp, idx), dtype=np.float64)
    x = reference.index_to_lps(centroids.reshape(count, 3)[:, ::-1])[:, 0]  # (z, y, x) -> (x, y, z)
    if count >= 2:
        midline = float(x.mean())
    elif midline_x is not None:
        midline = float(midline_x)
    else:
        raise ValueError(
            "one organ and no body outline to place it by: cannot tell left from right in patient coordinates"
        )
    sides = {int(k): ("left" if xk > midline else "right") for k, xk in zip(idx, x, strict=True)}
    logger.debug("organs of labels %s: %s (midline x=%.1f mm)", list(organ_labels), sides, midline)
    return comp, sides


def build_segments(labels: Volume, manifest: Manifest, *, midline_x: float | None) -> list[Segment]:
    """The manifest's output segments as masks on the label map's grid, numbered 1..N.

    Args:
        labels: the post-processed label map on the reference grid.
        manifest: the model's manifest.
        midline_x: the body midline (LPS x, mm), for a segment sided by a single organ.

    Raises:
        ValueError: a sided segment with a single organ and no midline.
    """
    arr = np.asarray(labels.array)
    sides_cache: dict[tuple[int, ...], tuple[np.ndarray, dict[int, str]]] = {}
    out: list[Segment] = []
    for number, spec in enumerate(manifest.output_segments, start=1):
        mask = organ_mask(arr, spec.labels, spec.grow_into)
        if spec.side_of and mask.any():
            key = tuple(sorted(spec.side_of))
            if key not in sides_cache:
                sides_cache[key] = organ_sides(arr, key, labels, midline_x=midline_x)
            comp, sides = sides_cache[key]
            wanted = [k for k, side in sides.items() if side == spec.laterality]
            mask &= np.isin(comp, wanted)
        out.append(Segment(number, spec, mask))
    return out


def display_labels(segments: Sequence[Segment], shape: tuple[int, ...]) -> np.ndarray:
    """One value per voxel for a LABELMAP SEG or a drawing: segment numbers painted in ascending order.

    A later segment shows over an earlier one where they overlap (the parenchyma
    over the kidney that contains it); that is the documented precedence.
    """
    dtype = np.uint8 if len(segments) <= 255 else np.uint16
    out = np.zeros(shape, dtype=dtype)
    for seg in segments:
        out[seg.mask] = seg.number
    return out


def _lesions(mask: np.ndarray, reference: Volume, midline_x: float | None) -> list[dict[str, Any]]:
    """Connected components of a mask, largest first: volume, centroid (LPS), slice range, side."""
    comp, count = ndimage.label(mask, structure=STRUCTURE)
    if count == 0:
        return []
    idx = np.arange(1, count + 1)
    sizes = np.bincount(comp.ravel(), minlength=count + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(np.ones(comp.shape, np.float32), comp, idx), dtype=np.float64)
    lps = reference.index_to_lps(centroids.reshape(count, 3)[:, ::-1])
    boxes = ndimage.find_objects(comp)
    voxel_ml = reference.voxel_volume_ml
    lesions = []
    for k in np.argsort(-sizes, kind="stable"):
        box = boxes[k]
        entry: dict[str, Any] = {
            "voxels": int(sizes[k]),
            "volume_ml": round(float(sizes[k]) * voxel_ml, 6),
            "centroid_lps": [round(float(v), 2) for v in lps[k]],
            # 1-based slice numbers of the reference series in its own slice order
            "slices": [int(box[0].start) + 1, int(box[0].stop)],
        }
        if midline_x is not None:
            entry["side"] = "left" if float(lps[k][0]) > midline_x else "right"
        lesions.append(entry)
    return lesions


def measure_segments(
    segments: Sequence[Segment],
    reference: Volume,
    volumes: Mapping[str, Volume],
    *,
    confidence: np.ndarray | None = None,
    midline_x: float | None = None,
) -> dict[str, Any]:
    """Every number the outputs report, measured on the segments' own voxels.

    Returns:
        ``{"voxel_volume_ml": v, "segments": {"<number>": entry}, "qc": {...}}`` where an entry has
        name, voxels, volume_ml (= voxels x v), laterality, validated, the mean of each
        ``measure_mean_of`` input, for ``count_components`` segments the lesion count and one
        record per lesion (volume, centroid in LPS mm, slice range, side), the mean network
        confidence inside the segment, and its QC verdict (``plausible`` and the reasons).
    """
    voxel_ml = reference.voxel_volume_ml
    out: dict[str, Any] = {"voxel_volume_ml": voxel_ml, "segments": {}}
    flagged: list[str] = []
    for seg in segments:
        spec = seg.spec
        n = int(np.count_nonzero(seg.mask))
        volume = n * voxel_ml
        entry: dict[str, Any] = {
            "name": spec.name,
            "voxels": n,
            "volume_ml": round(volume, 6),
            "validated": spec.validated,
        }
        if spec.laterality:
            entry["laterality"] = spec.laterality
        if spec.measure_mean_of:
            entry["mean"] = {}
            for role in spec.measure_mean_of:
                vol = volumes.get(role)
                entry["mean"][role] = (
                    None if vol is None or n == 0 else float(np.asarray(vol.array)[seg.mask].mean(dtype=np.float64))
                )
            entry["mean_unit"] = spec.mean_unit
        if spec.count_components:
            lesions = _lesions(seg.mask, reference, midline_x)
            entry["count"] = len(lesions)
            entry["lesions"] = lesions
        if confidence is not None and n:
            entry["confidence"] = round(float(np.asarray(confidence)[seg.mask].mean(dtype=np.float64)), 4)
        reasons = []
        if spec.plausible_ml is not None:
            low, high = spec.plausible_ml
            if n == 0 and low > 0:
                reasons.append(f"{spec.name} not found (expected {low:g}-{high:g} mL)")
            elif n and not low <= volume <= high:
                reasons.append(f"{spec.name} {volume:.1f} mL outside the plausible {low:g}-{high:g} mL")
        entry["qc"] = {"plausible": not reasons, "reasons": reasons}
        if reasons and spec.validated:
            flagged.extend(reasons)
        out["segments"][str(seg.number)] = entry
    out["qc"] = {"flagged": bool(flagged), "reasons": flagged}
    return out


def for_output(
    segments: Sequence[Segment], metrics: Mapping[str, Any], *, include_unvalidated: bool = False
) -> tuple[list[Segment], dict[str, Any]]:
    """The segments (renumbered 1..N) and metrics that go to the PACS.

    A segment the model card marks as not validated (``validated: false``) is left
    out, neither drawn nor measured, unless ``include_unvalidated`` (a route's
    ``include_unvalidated``) asks for it; the numbers of the others close up so
    that SEG segments stay 1..N and the SR references them by the same numbers.
    """
    kept = [seg for seg in segments if include_unvalidated or seg.spec.validated]
    entries = metrics.get("segments", {})
    renumbered = [Segment(k, seg.spec, seg.mask) for k, seg in enumerate(kept, start=1)]
    out = dict(metrics)
    out["segments"] = {str(k): entries[str(seg.number)] for k, seg in enumerate(kept, start=1)}
    reasons = [
        reason for seg in kept for reason in ((entries.get(str(seg.number)) or {}).get("qc") or {}).get("reasons", [])
    ]
    out["qc"] = {"flagged": bool(reasons), "reasons": reasons}
    dropped = [seg.spec.name for seg in segments if seg not in kept]
    if dropped:
        out["not_reported"] = dropped
        logger.info("segments not validated by the model card, left out of the outputs: %s", ", ".join(dropped))
    return renumbered, out
