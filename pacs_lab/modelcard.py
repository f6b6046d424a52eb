"""MODEL_CARD.md for a demo model package, from its training record.

The card says first and loudly that the model is a demo trained on synthetic
phantoms; then the intended use, inputs and labels, the training recipe and
data (seeds), the held-out evaluation (the same tables ``pacs-node models
evaluate`` prints), the comparison with the published figures the tasks come
from, stated as phantom results, and how to reproduce it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inference.manifest import Manifest, ModelPackage
from pacs_lab.evaluation import format_table

__all__ = ["PUBLISHED", "label_and_segment_tables", "write_model_card"]

#: what the source studies reported, for the comparison paragraph (phantom results are not comparable)
PUBLISHED = {
    "stroke": (
        "The stroke lesion study segmented acute infarcts with nnU-Net on DWI/ADC(/FLAIR) and reported that "
        "models using DWI outperformed FLAIR-only models, with Dice reported by lesion-size stratum "
        "(small lesions below 1 mL being the hardest)."
    ),
    "dentate": (
        "The dentate nucleus study (localise, then segment on QSM) reported Dice 0.90 (left) and 0.89 (right) "
        "on its internal test set."
    ),
    "kidney": (
        "The kidney and renal parenchyma study reported Dice above 0.90 for kidneys with a model trained on "
        "CT and MR together, and that adding CT data helped the MR results compared with MR-only training."
    ),
}


def label_and_segment_tables(m: Manifest) -> list[str]:
    """The network's labels, then the segments the outputs carry (what the SEG draws and the SR measures),
    with what the card validates: a segment marked not validated is left out of what goes to the PACS."""
    lines = ["| label | name | type (code) | colour |", "|---|---|---|---|"]
    for value, spec in sorted(m.labels.items()):
        code = f"{spec.type.meaning} ({spec.type.scheme} {spec.type.value})"
        lines.append(f"| {value} | {spec.name} | {code} | {tuple(spec.color)} |")
    lines += [
        "",
        "Segments sent to the PACS (SEG segment, SR group), each measured on its own voxels:",
        "",
        "| # | segment | labels | side | anatomy | plausible mL | validated |",
        "|---|---|---|---|---|---|---|",
    ]
    for number, seg in enumerate(m.output_segments, start=1):
        plausible = f"{seg.plausible_ml[0]:g}-{seg.plausible_ml[1]:g}" if seg.plausible_ml else ""
        anatomy = seg.anatomy.meaning if seg.anatomy else seg.type.meaning
        validated = "yes" if seg.validated else "**no**: not sent unless a route sets `include_unvalidated`"
        labels = ", ".join(str(v) for v in (*seg.labels, *seg.grow_into))
        lines.append(
            f"| {number} | {seg.name} | {labels} | {seg.laterality or ''} | {anatomy} | {plausible} | {validated} |"
        )
    return lines


def write_model_card(folder: str | Path, record: dict[str, Any], recipe: Any) -> Path:
    """Write ``folder/MODEL_CARD.md`` from a training record (see :mod:`pacs_lab.training`).

    A ``comparison.json`` in the folder (MR-only comparison) is included when present.
    """
    folder = Path(folder)
    m = ModelPackage(folder).manifest
    ev = record.get("evaluation")
    task_key = "kidney" if record["task"].startswith("kidney") else record["task"]
    lines = [
        f"# {m.name} {m.version}",
        "",
        "> **DEMO MODEL: trained on synthetic phantoms by pacs-node's own script. Not for clinical use.** "
        "Its figures below are phantom results, not clinical ones.",
        "",
        f"{m.description}",
        "",
        "## Intended use",
        "",
        m.intended_use,
        "",
        "## Inputs and outputs",
        "",
        "| channel | role | b-value | optional |",
        "|---|---|---|---|",
    ]
    for i, c in enumerate(m.inputs):
        b = "" if c.b_value is None else f"{c.b_value:g}"
        lines.append(f"| {i} | {c.role} | {b} | {'yes' if c.optional else 'no'} |")
    lines += ["", *label_and_segment_tables(m), "", "## Stages", ""]
    for stage in m.stages:
        mod = stage.model
        crop = f", on crops of `{stage.crop.from_stage}` (+{stage.crop.margin_mm:g} mm)" if stage.crop else ""
        info = record["stages"].get(stage.name, {})
        lines.append(
            f"- `{stage.name}`: DynUNet, {getattr(mod, 'spacing', '')} mm, patch {getattr(mod, 'patch_size', '')}"
            f"{crop}; {info.get('parameters', '?')} parameters, {info.get('steps', '?')} steps "
            f"in {info.get('seconds', '?')} s on CPU ({record.get('threads', '?')} threads), "
            f"final loss {info.get('final_loss', '?')}; weights sha256 `{str(info.get('sha256', ''))[:16]}`"
        )
    lines += [
        "",
        "## Training data and recipe",
        "",
        f"- {record['train_cases']} synthetic `{record['task']}` phantoms (pacs_lab.phantoms), seeds "
        f"{record['train_seeds'][0]}-{record['train_seeds'][1]}; recipe seed {record['seed']}; "
        f"torch {record['torch']}.",
        "- Inputs assembled by the node's own `build_inputs`, reoriented to LPS, normalised and resampled "
        "exactly as the native backend does at inference; patches sampled with foreground oversampling, "
        "random flips, intensity scale/shift and noise; AdamW with polynomial decay, cross-entropy + soft Dice.",
        f"- Reproduce: `python -m pacs_lab.training {record['recipe']} --out <folder> --seed {record['seed']}` "
        "(same seed: same phantoms, same patches, same initial weights; the held-out metrics agree within "
        "about 0.01 Dice, CPU kernels not being bit-exact across machines).",
        "",
    ]
    if ev:
        lines += [
            "## Held-out evaluation (phantoms never used in training)",
            "",
            f"`pacs-node models evaluate {folder.name} --cases {ev['cases']} --seed {ev['seed']}`",
            "",
            "```",
            format_table(ev),
            "```",
            "",
        ]
    comparison = folder / "comparison.json"
    if comparison.is_file():
        comp = json.loads(comparison.read_text(encoding="utf-8"))
        lines += [
            "## CT + MR training against MR-only training (same MR test phantoms)",
            "",
            f"Both models on {comp['cases']} MR phantoms from seed {comp['seed']} "
            f"(`python -m pacs_lab.training kidney-mr --out build/kidney-mr --compare-with {folder}`):",
            "",
            "| structure | CT + MR model Dice | MR-only model Dice |",
            "|---|---|---|",
        ]
        for name, mixed in comp["mixed"]["summary"].items():
            mr = comp["mr_only"]["summary"].get(name, {})
            lines.append(f"| {name} | {mixed.get('dice_mean', '-')} | {mr.get('dice_mean', '-')} |")
        lines.append("")
    lines += [
        "## Compared with the published work",
        "",
        PUBLISHED.get(task_key, ""),
        "These demo figures come from synthetic phantoms whose anatomy and contrast are simpler than patients'; "
        "they show that the node's pipeline works end to end, not that the model would work clinically.",
        "",
    ]
    path = folder / "MODEL_CARD.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
