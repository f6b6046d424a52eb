"""The administrator's rule tester: which route would take each series of some files, and why not.

``pacs-node rules test PATH...`` and the dashboard's rule page read headers from
files offline and explain, series by series, the decision of the compiled rules
(:mod:`pacs_node.config.rules`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs_node.common.header import HeaderError, NotDicomError, header_from_file
from pacs_node.config.model import PipelineSettings, Settings
from pacs_node.config.rules import CompiledRules, _as_number, _quote, compile_settings

# -- the administrator's rule tester -----------------------------------------------


@dataclass
class _SeriesGroup:
    uid: str
    header: dict[str, Any]
    files: int = 0


def _iter_files(paths: Iterable[Path], notes: list[str]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            notes.append(f"{path}: not found")
    return files


def _series_sort_key(group: _SeriesGroup) -> tuple[str, float, str]:
    number = _as_number(group.header.get("SeriesNumber"))
    return (
        str(group.header.get("StudyInstanceUID", "")),
        number if number is not None else math.inf,
        str(group.header.get("SeriesDescription", "")),
    )


def _role_text(pipeline: PipelineSettings, roles: Sequence[str]) -> str:
    filled = ", ".join(f"{r} ({'required' if pipeline.inputs[r].required else 'optional'})" for r in roles)
    text = f"as input {filled}"
    if len(pipeline.inputs) > 1:
        required = [r for r, i in pipeline.inputs.items() if i.required]
        text += f"; a study job starts once the required inputs ({', '.join(required)}) have arrived"
    return text


def _series_block(number: int, total: int, group: _SeriesGroup, rules: CompiledRules) -> tuple[list[str], str]:
    header = group.header
    modality = header.get("Modality", "?")
    manufacturer = header.get("Manufacturer")
    if manufacturer:
        modality = f"{modality} ({manufacturer})"
    series_no = header.get("SeriesNumber", "?")
    description = header.get("SeriesDescription")
    shown = _quote(str(description)) if description is not None else "(no description)"
    files = f"{group.files} file" + ("" if group.files == 1 else "s")
    lines = [f"Series {number}/{total}: {modality}, series {series_no} {shown}, {files}"]
    lines.append(f"  SeriesInstanceUID {group.uid}")
    decision = rules.evaluate(header)
    if decision.guard is not None:
        lines.append(f"  NEVER ROUTED: {decision.guard}")
        return lines, "guarded"
    settings = rules.settings
    for match in decision.matches:
        route = match.route
        pipeline = settings.pipelines[route.pipeline]
        destinations = ", ".join(route.destinations) or "none configured"
        lines.append(f"  ROUTED by route {route.name!r} to pipeline {route.pipeline!r}")
        lines.append(f"    {_role_text(pipeline, match.roles)}")
        lines.append(f"    priority {route.priority.value}; results go to: {destinations}")
        lines.extend(f"    note: {n}" for n in match.notes)
    if not decision.matches:
        if not settings.routes:
            lines.append("  NOT ROUTED: no routes are configured")
        else:
            lines.append("  NOT ROUTED: no route matches this series")
    near = decision.misses[:3]
    if near:
        lines.append("  Nearest misses:" if decision.matches else "  Nearest misses (what would have to change):")
        for miss in near:
            lines.append(f"    route {miss.route.name!r} (pipeline {miss.route.pipeline!r}):")
            lines.extend(f"      - {f}" for f in miss.failures)
    return lines, ("routed" if decision.matches else "unmatched")


def rules_report(settings: Settings, paths: Sequence[Path]) -> tuple[str, int]:
    """Explain, series by series, what the rules decide for the DICOM files given.

    The ``pacs-node rules test PATH`` tool for administrators: reads headers only
    (no pixel data), skips non-DICOM files with a note, groups files by
    SeriesInstanceUID and, for each series, prints the loop-guard reason or the
    matching routes (pipeline, roles, priority, destinations) and up to three
    nearest misses with their failed conditions. Calling/called AE conditions are
    reported as not checked. No patient names or IDs are printed.

    Args:
        settings: the loaded settings.
        paths: files or folders (searched recursively).

    Returns:
        ``(text, exit_code)``: 0 when it ran, 2 when no DICOM file was found.

    Raises:
        RuleError: the settings' rules do not compile.
    """
    rules = compile_settings(settings)
    notes: list[str] = []
    files = _iter_files([Path(p) for p in paths], notes)
    skipped: list[str] = []
    groups: dict[str, _SeriesGroup] = {}
    for path in files:
        try:
            header = header_from_file(path)
        except NotDicomError:
            skipped.append(f"{path}: not DICOM, skipped")
            continue
        except HeaderError as exc:
            skipped.append(f"{exc}, skipped")
            continue
        uid = str(header.get("SeriesInstanceUID") or "")
        if not uid:
            skipped.append(f"{path}: DICOM but no SeriesInstanceUID (not an image instance), skipped")
            continue
        group = groups.setdefault(uid, _SeriesGroup(uid, header))
        group.files += 1
    lines = ["pacs-node rules test"]
    lines.append(
        f"{len(files)} file(s) examined, {len(groups)} series found, {len(settings.routes)} route(s) configured"
    )
    lines.append("AE title conditions are not checked here (the sender is unknown).")
    for note in notes + skipped[:20]:
        lines.append(f"  note: {note}")
    if len(skipped) > 20:
        lines.append(f"  note: ... and {len(skipped) - 20} more files skipped")
    if not groups:
        shown_paths = ", ".join(str(p) for p in paths) or "(no paths given)"
        lines.append(f"No DICOM files found in {shown_paths}.")
        return "\n".join(lines) + "\n", 2
    counts = {"routed": 0, "guarded": 0, "unmatched": 0}
    ordered = sorted(groups.values(), key=_series_sort_key)
    for number, group in enumerate(ordered, 1):
        block, outcome = _series_block(number, len(ordered), group, rules)
        counts[outcome] += 1
        lines.append("")
        lines.extend(block)
    lines.append("")
    lines.append(
        f"Summary: {counts['routed']} series routed, {counts['guarded']} never routed (loop guard), "
        f"{counts['unmatched']} matched no route."
    )
    return "\n".join(lines) + "\n", 0
