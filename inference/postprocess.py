"""Post-processing and measurement of label maps: plain numpy/scipy functions.

Label maps are (z, y, x) integer arrays on the reference series' grid. Connected
components use full (26-) connectivity throughout, so a lesion counted here is the
same lesion that is kept or dropped.

Left and right are decided in patient coordinates, never from array indices: the
caller passes ``index_to_lps``, a function mapping an (N, 3) array of voxel
indices in ``(x, y, z)`` = (column, row, slice) order (the order of
:meth:`inference.volume.Volume.index_to_lps`, which can be passed as is) to
(N, 3) DICOM patient (LPS) points in mm, where +x is the patient's LEFT. Note the
order: label arrays are indexed ``[z, y, x]``, the callable takes ``(x, y, z)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from inference.manifest import PostProcess

logger = logging.getLogger(__name__)

__all__ = [
    "IndexToLps",
    "apply_postprocess",
    "component_volumes_ml",
    "keep_largest_components",
    "label_volumes_ml",
    "mean_inside",
    "remove_small_components",
    "split_left_right",
]

#: maps an (N, 3) array of (x, y, z) indices (column, row, slice; Volume.index_to_lps) to (N, 3) LPS mm
IndexToLps = Callable[[np.ndarray], np.ndarray]

#: full connectivity in 3-D
STRUCTURE = np.ones((3, 3, 3), dtype=bool)


def _components(labels: np.ndarray, label: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(component map, count, voxel count per component 1..count)."""
    comp, n = ndimage.label(labels == label, structure=STRUCTURE)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    return comp, int(n), sizes


def keep_largest_components(labels: np.ndarray, label: int, n: int) -> np.ndarray:
    """A copy of ``labels`` keeping only the ``n`` largest components of ``label`` (others set to 0).

    Ties in size are broken by component order (first in raster order wins).
    """
    out = np.array(labels, copy=True)
    comp, count, sizes = _components(labels, label)
    if count <= n:
        return out
    order = np.argsort(-sizes, kind="stable")  # component index - 1, largest first
    drop = np.zeros(count + 1, dtype=bool)
    drop[order[max(n, 0) :] + 1] = True
    out[drop[comp]] = 0
    return out


def remove_small_components(labels: np.ndarray, label: int, min_mm3: float, voxel_mm3: float) -> np.ndarray:
    """A copy of ``labels`` without the components of ``label`` smaller than ``min_mm3``.

    Args:
        voxel_mm3: the volume of one voxel in mm^3 (product of the spacing).
    """
    out = np.array(labels, copy=True)
    comp, count, sizes = _components(labels, label)
    if count == 0:
        return out
    drop = np.zeros(count + 1, dtype=bool)
    drop[1:] = sizes * float(voxel_mm3) < float(min_mm3)
    out[drop[comp]] = 0
    return out


def split_left_right(
    labels: np.ndarray,
    label: int,
    left_value: int,
    right_value: int,
    *,
    index_to_lps: IndexToLps,
    with_labels: Sequence[int] = (),
    midline_x: float | None = None,
) -> np.ndarray:
    """A copy of ``labels`` with each component of ``label`` relabelled as left or right.

    With ``with_labels``, components are those of the whole organ (``label`` and
    ``with_labels`` together) and the side is decided per organ; only the voxels of
    ``label`` change value.

    A component is the patient's LEFT when its centroid's patient x (LPS: +x is the
    patient's left) is greater than the midline, else RIGHT. The midline is the
    mean x of all components' centroids when there are two or more, else
    ``midline_x``, the body midline in patient coordinates
    (:func:`inference.segments.body_midline_x`); never the centre of the array.
    A centroid exactly on the midline counts as right.

    Args:
        index_to_lps: (N, 3) indices in ``(x, y, z)`` order -> (N, 3) LPS mm
            (``Volume.index_to_lps``).
        midline_x: the body midline (LPS x, mm) for a single component.

    Raises:
        ValueError: a single component and no ``midline_x``.
    """
    out = np.array(labels, copy=True)
    if with_labels:
        # components of the whole organ (label + its companions), relabelled on label only
        organ = np.isin(labels, [label, *with_labels]).astype(np.uint8)
        comp, count, _ = _components(organ, 1)
        comp = np.where(labels == label, comp, 0)
        present = np.unique(comp[comp > 0])
        if present.size and present.size < count:  # organs without the label play no part
            lut = np.zeros(count + 1, dtype=comp.dtype)
            lut[present] = np.arange(1, present.size + 1)
            comp, count = lut[comp], int(present.size)
        elif not present.size:
            return out
    else:
        comp, count, _ = _components(labels, label)
    if count == 0:
        return out
    idx = np.arange(1, count + 1)
    centroids = np.array(ndimage.center_of_mass(np.ones(comp.shape, dtype=np.float32), comp, idx), dtype=np.float64)
    # centroids are (z, y, x); index_to_lps takes (x, y, z)
    x = np.asarray(index_to_lps(centroids.reshape(count, 3)[:, ::-1]), dtype=np.float64).reshape(count, 3)[:, 0]
    if count >= 2:
        midline = float(x.mean())
    elif midline_x is not None:
        midline = float(midline_x)
    else:
        raise ValueError(
            f"label {label}: one component and no body midline: cannot tell left from right in patient coordinates"
        )
    value = np.zeros(count + 1, dtype=out.dtype)
    value[1:] = np.where(x > midline, left_value, right_value)
    mask = comp > 0
    out[mask] = value[comp[mask]]
    logger.debug(
        "split label %d into %d left / %d right components (midline x=%.1f mm)",
        label,
        int((x > midline).sum()),
        int((x <= midline).sum()),
        midline,
    )
    return out


def organ_mask(labels: np.ndarray, label: int | Sequence[int], includes: Sequence[int]) -> np.ndarray:
    """Voxels of ``label`` (one value or several) plus those of ``includes`` connected (26-neighbourhood) to them.

    A kidney labelled 1 (sinus) with parenchyma 3 and tumour 4: ``organ_mask(m, 1, (3, 4))``
    is the whole right kidney, excluding the left kidney's parenchyma.
    """
    own_values = [label] if isinstance(label, int) else list(label)
    own = np.isin(labels, own_values)
    if not includes or not own.any():
        return own
    comp, _, _ = _components(np.isin(labels, [*own_values, *includes]).astype(np.uint8), 1)
    keep = np.unique(comp[own])
    return np.isin(comp, keep[keep > 0])


def label_volumes_ml(labels: np.ndarray, voxel_volume_ml: float) -> dict[int, float]:
    """Volume in mL of every non-zero label present."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel())
    return {int(k): float(c) * float(voxel_volume_ml) for k, c in enumerate(counts) if k and c}


def component_volumes_ml(labels: np.ndarray, label: int, voxel_volume_ml: float) -> list[float]:
    """Volumes in mL of the connected components of ``label``, largest first."""
    _, _, sizes = _components(labels, label)
    return sorted((float(s) * float(voxel_volume_ml) for s in sizes), reverse=True)


def mean_inside(labels: np.ndarray, label: int, image: np.ndarray) -> float | None:
    """Mean of ``image`` (same (z, y, x) grid) over ``label``; None when the label is empty.

    Raises:
        ValueError: the image is not on the label grid.
    """
    if image.shape != labels.shape:
        raise ValueError(f"image shape {image.shape} differs from the label map shape {labels.shape}")
    mask = labels == label
    if not mask.any():
        return None
    return float(np.asarray(image, dtype=np.float64)[mask].mean())


def apply_postprocess(
    labels: np.ndarray,
    spec: PostProcess,
    *,
    spacing_zyx: Sequence[float],
    index_to_lps: IndexToLps,
    midline_x: float | None = None,
) -> np.ndarray:
    """Apply a manifest's post-processing: small components dropped, then the largest
    kept, then left/right split (so that a dropped fragment cannot move the midline;
    ``midline_x``, the body midline, places a single organ).
    """
    voxel_mm3 = float(np.prod(np.asarray(spacing_zyx, dtype=np.float64)))
    out = labels
    for label, min_mm3 in spec.min_size_mm3.items():
        out = remove_small_components(out, label, min_mm3, voxel_mm3)
    for label, n in spec.keep_largest.items():
        out = keep_largest_components(out, label, n)
    for label, (left, right) in spec.split_laterality.items():
        out = split_left_right(
            out,
            label,
            left,
            right,
            index_to_lps=index_to_lps,
            with_labels=spec.laterality_with.get(label, ()),
            midline_x=midline_x,
        )
    return out if out is not labels else np.array(labels, copy=True)
