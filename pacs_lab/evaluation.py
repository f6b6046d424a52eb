"""Evaluate a model package on fresh phantoms, the way the source studies measured theirs.

:func:`evaluate_package` runs the package through the node's own
:class:`~inference.pipeline.ModelRunner` (the same code path as a job) on
``cases`` phantoms of its task drawn from ``seed`` on, and compares the result
with the phantom truth on the reference grid:

* Dice per structure (labels, unions such as "kidney", whole organs such as
  "right kidney" = sinus label + connected parenchyma and tumour);
* volumes (mL, from voxel counts on the reference grid): mean absolute and
  relative error and the Pearson r of predicted against true volumes;
* stroke: lesion-wise detection and Dice by lesion-size stratum (< 1 mL,
  1-10 mL, > 10 mL), lesions being the truth's connected components;
* dentate: whether left and right are the right way round in every case;
* per modality summaries (kidney: CT and MR) and seconds per case.

The result is plain JSON-able data; :func:`format_table` prints it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from inference.errors import ModelPackageError
from inference.manifest import ModelPackage
from inference.pipeline import ModelRunner
from inference.postprocess import STRUCTURE, organ_mask
from pacs_lab.tasks import PhantomTask, get_task

__all__ = ["EVAL_SEED", "STROKE_STRATA", "dice", "evaluate_package", "format_table", "pearson_r"]

#: default first seed of held-out phantoms (training uses 10,000-19,999)
EVAL_SEED = 900_000

#: lesion-size strata of the stroke study, in mL: (name, low, high)
STROKE_STRATA = (("<1 mL", 0.0, 1.0), ("1-10 mL", 1.0, 10.0), (">10 mL", 10.0, math.inf))


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two masks; None when both are empty."""
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return None
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 pairs or no variance."""
    if len(x) < 3:
        return None
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.std() == 0 or ya.std() == 0:
        return None
    return float(np.corrcoef(xa, ya)[0, 1])


def _masks(task: PhantomTask, labels: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: labels == value for value, name in task.structures.items()}
    for name, values in task.unions.items():
        out[name] = np.isin(labels, list(values))
    for name, (value, includes) in task.organs.items():
        out[name] = organ_mask(labels, value, includes)
    return out


def _lesions(truth: np.ndarray, pred: np.ndarray, voxel_ml: float) -> list[dict[str, Any]]:
    """Per truth lesion: volume, detected, Dice against the predicted components touching it."""
    t_comp, n_t = ndimage.label(truth, structure=STRUCTURE)
    p_comp, _ = ndimage.label(pred, structure=STRUCTURE)
    out = []
    for k in range(1, n_t + 1):
        t = t_comp == k
        touching = np.unique(p_comp[t])
        touching = touching[touching > 0]
        p = np.isin(p_comp, touching) if touching.size else np.zeros_like(t)
        out.append(
            {
                "volume_ml": round(float(t.sum()) * voxel_ml, 4),
                "detected": bool(touching.size),
                "dice": round(dice(t, p) or 0.0, 4),
            }
        )
    return out


def _summary(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        dices = [r["dice"][name] for r in rows if r["dice"].get(name) is not None]
        tv = [r["volume_true_ml"][name] for r in rows]
        pv = [r["volume_pred_ml"][name] for r in rows]
        present = [(t, p) for t, p in zip(tv, pv, strict=True) if t > 0]
        entry: dict[str, Any] = {"cases": len(dices)}
        if dices:
            entry.update(
                dice_mean=round(float(np.mean(dices)), 4),
                dice_median=round(float(np.median(dices)), 4),
                dice_min=round(float(np.min(dices)), 4),
            )
        if present:
            entry["abs_volume_error_ml"] = round(float(np.mean([abs(p - t) for t, p in present])), 3)
            entry["rel_volume_error"] = round(float(np.mean([abs(p - t) / t for t, p in present])), 4)
        r = pearson_r(tv, pv)
        entry["volume_pearson_r"] = None if r is None else round(r, 4)
        entry["false_positive_cases"] = sum(1 for t, p in zip(tv, pv, strict=True) if t == 0 and p > 0)
        out[name] = entry
    return out


def evaluate_package(
    package: str | Path | ModelPackage,
    *,
    cases: int,
    seed: int = EVAL_SEED,
    task: str | None = None,
    allow_gpu: bool = True,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``package`` on ``cases`` fresh phantoms from ``seed`` on and compare with the truth.

    Args:
        task: the phantom task; default the manifest's ``phantom_task``.
        progress: called with each case's row as it finishes.

    Raises:
        ModelPackageError: the package names no phantom task and none was given, or it is invalid.
    """

    pkg = package if isinstance(package, ModelPackage) else ModelPackage(package)
    name = task or pkg.manifest.phantom_task
    if not name:
        raise ModelPackageError(
            f"{pkg.folder}: model.yaml names no phantom_task; pass the task (stroke, dentate, kidney, ...)"
        )
    try:
        phantoms = get_task(name)
    except KeyError as exc:
        raise ModelPackageError(str(exc.args[0])) from exc
    if cases < 1:
        raise ValueError("cases must be at least 1")
    runner = ModelRunner(pkg, allow_gpu=allow_gpu)
    rows: list[dict[str, Any]] = []
    lesions: list[dict[str, Any]] = []
    names: list[str] = []
    for i in range(cases):
        case = phantoms.case(seed + i)
        t0 = time.perf_counter()
        result = runner.run(case.inputs)
        seconds = time.perf_counter() - t0
        pred, truth = result.labels.array, case.truth.array
        if pred.shape != truth.shape:
            raise ModelPackageError(f"prediction shape {pred.shape} is not the truth's {truth.shape}")
        voxel_ml = case.truth.voxel_volume_ml
        pm, tm = _masks(phantoms, pred), _masks(phantoms, truth)
        names = list(pm)
        row: dict[str, Any] = {
            "seed": case.seed,
            "modality": case.modality,
            **{k: v for k, v in case.info.items() if isinstance(v, (str, int, float, bool))},
            "seconds": round(seconds, 3),
            "dice": {k: (None if (d := dice(pm[k], tm[k])) is None else round(d, 4)) for k in names},
            "volume_true_ml": {k: round(float(tm[k].sum()) * voxel_ml, 4) for k in names},
            "volume_pred_ml": {k: round(float(pm[k].sum()) * voxel_ml, 4) for k in names},
        }
        if phantoms.name == "stroke":
            case_lesions = _lesions(truth > 0, pred > 0, voxel_ml)
            row["lesions"] = case_lesions
            lesions.extend(case_lesions)
        if phantoms.name == "dentate":
            right = (dice(pred == 1, truth == 1) or 0) + (dice(pred == 2, truth == 2) or 0)
            swapped = (dice(pred == 1, truth == 2) or 0) + (dice(pred == 2, truth == 1) or 0)
            row["laterality_correct"] = bool(right > swapped)
        rows.append(row)
        if progress is not None:
            progress(row)

    out: dict[str, Any] = {
        "model": pkg.manifest.name,
        "version": pkg.manifest.version,
        "demo": pkg.manifest.demo,
        "task": phantoms.name,
        "seed": seed,
        "cases": cases,
        "device": str(runner.device),
        "seconds_per_case": round(float(np.mean([r["seconds"] for r in rows])), 3),
        "summary": _summary(rows, names),
    }
    modalities = sorted({r["modality"] for r in rows})
    if len(modalities) > 1:
        out["by_modality"] = {m: _summary([r for r in rows if r["modality"] == m], names) for m in modalities}
    if phantoms.name == "stroke":
        strata: dict[str, Any] = {}
        for label, lo, hi in STROKE_STRATA:
            group = [les for les in lesions if lo <= les["volume_ml"] < hi]
            strata[label] = {
                "lesions": len(group),
                "detected": sum(les["detected"] for les in group),
                "detection_rate": round(sum(les["detected"] for les in group) / len(group), 4) if group else None,
                "dice_mean": round(float(np.mean([les["dice"] for les in group])), 4) if group else None,
            }
        out["lesion_strata"] = strata
    if phantoms.name == "dentate":
        out["laterality_correct"] = sum(r["laterality_correct"] for r in rows)
    out["rows"] = rows
    return out


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of an evaluation result."""
    demo = " (DEMO: synthetic phantoms, not for clinical use)" if result["demo"] else ""
    lines = [
        f"{result['model']} {result['version']}{demo}",
        f"task {result['task']}, {result['cases']} held-out phantoms from seed {result['seed']}, "
        f"{result['seconds_per_case']:.2f} s/case on {result['device']}",
        "",
        f"{'structure':<22} {'cases':>5} {'Dice mean':>9} {'median':>7} {'min':>6} "
        f"{'|dV| mL':>8} {'|dV|/V':>7} {'r(V)':>6}",
    ]
    groups = [("", result["summary"])] + [(f"[{m}] ", s) for m, s in result.get("by_modality", {}).items()]
    for prefix, summary in groups:
        for name, e in summary.items():
            lines.append(
                f"{(prefix + name)[:22]:<22} {e['cases']:>5} {_fmt(e.get('dice_mean')):>9} "
                f"{_fmt(e.get('dice_median')):>7} {_fmt(e.get('dice_min'), '.2f'):>6} "
                f"{_fmt(e.get('abs_volume_error_ml'), '.2f'):>8} {_fmt(e.get('rel_volume_error'), '.3f'):>7} "
                f"{_fmt(e.get('volume_pearson_r'), '.3f'):>6}"
            )
    if "lesion_strata" in result:
        lines += ["", f"{'lesion size':<10} {'lesions':>7} {'detected':>8} {'rate':>6} {'Dice':>6}"]
        for label, e in result["lesion_strata"].items():
            lines.append(
                f"{label:<10} {e['lesions']:>7} {e['detected']:>8} {_fmt(e['detection_rate'], '.2f'):>6} "
                f"{_fmt(e['dice_mean'], '.3f'):>6}"
            )
    if "laterality_correct" in result:
        lines += ["", f"left/right correct in {result['laterality_correct']}/{result['cases']} cases"]
    return "\n".join(lines)
