"""The three clinical tasks on synthetic phantoms: how a case looks to a model.

A :class:`PhantomTask` ties a phantom generator to the final label space of a
demo model. :meth:`PhantomTask.case` turns a seed into the series a PACS would
send (by input role) and the ground truth on the reference series' grid, in
the model's final label values:

* ``stroke``: DWI (b0 + b1000 in one series), ADC, FLAIR (optional) -> 1 = lesion.
* ``dentate``: QSM -> 1 = left dentate nucleus, 2 = right.
* ``kidney``: CT (portal venous) or MR (fat-suppressed T2w), alternating by seed ->
  1 = right kidney and 2 = left kidney (the kidney outside parenchyma and
  tumour: sinus, collecting system), 3 = renal parenchyma, 4 = renal tumour.
  A whole kidney is label 1 (or 2) together with the parenchyma and tumour
  voxels connected to it (:func:`inference.postprocess.organ_mask`).
* ``kidney-ct`` / ``kidney-mr``: the same, one modality only.

Training (:mod:`pacs_lab.training`) and evaluation (:mod:`pacs_lab.evaluation`)
both draw their cases here, with disjoint seed ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom import Dataset

from inference.volume import Volume

__all__ = ["TASKS", "PhantomCase", "PhantomTask", "get_task"]


@dataclass(eq=False)
class PhantomCase:
    """One phantom case as a model sees it.

    Attributes:
        seed: the generator seed.
        inputs: series by input role (what the node would assemble for the job).
        truth: ground truth on the reference grid, in the task's final label values.
        modality: "MR" or "CT".
        lesion_volumes_ml: stroke only: the continuous model's per-lesion volumes.
    """

    seed: int
    inputs: dict[str, list[Dataset]]
    truth: Volume
    modality: str
    lesion_volumes_ml: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PhantomTask:
    """A phantom family and its final label space."""

    name: str
    #: final label value -> structure name used in evaluation tables
    structures: Mapping[int, str]
    make: Callable[[int], PhantomCase]
    #: evaluation structures made of several labels: name -> labels (union)
    unions: Mapping[str, Sequence[int]] = field(default_factory=dict)
    #: whole organs: name -> (label, labels connected to it that belong to the organ)
    organs: Mapping[str, tuple[int, Sequence[int]]] = field(default_factory=dict)

    def case(self, seed: int) -> PhantomCase:
        """The case for ``seed`` (reproducible)."""
        return self.make(int(seed))


def _stroke(seed: int) -> PhantomCase:
    from pacs_lab.phantoms.brain import make_stroke_case

    c = make_stroke_case(seed)
    truth = c.labels.with_array((c.labels.array > 0).astype(np.uint8))
    return PhantomCase(
        seed=seed,
        inputs={"dwi": c.dwi, "adc": c.adc, "flair": c.flair},
        truth=truth,
        modality="MR",
        lesion_volumes_ml=list(c.lesion_volumes_ml),
        info={"vendor": c.vendor},
    )


def _dentate(seed: int) -> PhantomCase:
    from pacs_lab.phantoms.brain import make_qsm_case

    c = make_qsm_case(seed)
    return PhantomCase(
        seed=seed,
        inputs={"qsm": c.qsm},
        truth=c.labels.with_array(c.labels.array.astype(np.uint8)),
        modality="MR",
        info={"vendor": c.vendor, "coverage": c.coverage},
    )


def _abdomen(seed: int, modality: str) -> PhantomCase:
    from pacs_lab.phantoms.abdomen import make_ct_case, make_mr_case

    c = make_ct_case(seed) if modality == "CT" else make_mr_case(seed)
    truth = c.labels.array.astype(np.uint8).copy()  # 1 right, 2 left (whole kidney)
    assert c.parenchyma is not None
    truth[(c.parenchyma.array > 0) & (truth > 0)] = 3
    if c.tumour_mask is not None:
        truth[c.tumour_mask.array > 0] = 4
    return PhantomCase(
        seed=seed,
        inputs={"image": c.series},
        truth=c.labels.with_array(truth),
        modality=modality,
        info={"vendor": c.vendor, "orientation": c.orientation, "tumour": bool(c.tumour)},
    )


def _kidney_mixed(seed: int) -> PhantomCase:
    return _abdomen(seed, "CT" if seed % 2 == 0 else "MR")


_KIDNEY_STRUCTURES = {1: "right kidney (sinus)", 2: "left kidney (sinus)", 3: "parenchyma", 4: "tumour"}
_KIDNEY_UNIONS = {"kidney": (1, 2, 3, 4)}
_KIDNEY_ORGANS = {"right kidney": (1, (3, 4)), "left kidney": (2, (3, 4))}

TASKS: dict[str, PhantomTask] = {
    "stroke": PhantomTask("stroke", {1: "lesion"}, _stroke),
    "dentate": PhantomTask("dentate", {1: "left dentate", 2: "right dentate"}, _dentate),
    "kidney": PhantomTask("kidney", _KIDNEY_STRUCTURES, _kidney_mixed, _KIDNEY_UNIONS, _KIDNEY_ORGANS),
    "kidney-ct": PhantomTask(
        "kidney-ct", _KIDNEY_STRUCTURES, lambda s: _abdomen(s, "CT"), _KIDNEY_UNIONS, _KIDNEY_ORGANS
    ),
    "kidney-mr": PhantomTask(
        "kidney-mr", _KIDNEY_STRUCTURES, lambda s: _abdomen(s, "MR"), _KIDNEY_UNIONS, _KIDNEY_ORGANS
    ),
}


def get_task(name: str) -> PhantomTask:
    """The task called ``name``.

    Raises:
        KeyError: with the known names, for an unknown task.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown phantom task {name!r}; known: {', '.join(TASKS)}") from None
