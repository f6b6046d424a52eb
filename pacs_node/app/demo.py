"""``pacs-node demo``: the whole job on one machine, in a few minutes.

1. starts a small C-STORE SCP that plays the hospital PACS (the results' destination),
2. starts the node on its embedded defaults (the three demo pipelines and their
   routes), with its data in the output folder, a free DICOM port and a short
   quiet period,
3. generates one phantom study per pipeline (stroke MR: DWI + ADC + FLAIR; QSM;
   abdomen CT) and sends each by C-STORE, as a PACS auto-route would,
4. waits until the SEG, SR and key images of every study have arrived at the
   demo PACS,
5. prints a table (pipeline, volumes, Dice of the received SEG against the
   phantom truth, seconds per stage) and writes the received objects and PNG
   previews under ``<out>/<pipeline>/``, plus ``demo.json``.

The models are DEMO models trained on synthetic phantoms; nothing here is clinical.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from sqlalchemy import select

from pacs_node.app.service import Node
from pacs_node.config import Settings, settings_from_mapping
from pacs_node.config.defaults import embedded_defaults
from pacs_node.deliver.scu import send_files
from pacs_node.errors import PacsNodeError
from storage.models import Job, JobState, Series, Study

logger = logging.getLogger(__name__)

__all__ = ["DEMO_CASES", "DemoPacs", "DemoResult", "run_demo"]

#: pipeline -> (phantom task, seed); seeds outside the training and evaluation ranges
DEMO_CASES: dict[str, tuple[str, int]] = {
    "stroke": ("stroke", 4252),  # three infarcts: 13.5, 11.9 and 1.1 mL
    "dentate": ("dentate", 4242),
    "kidney": ("kidney-ct", 4242),
}

_RESULT_CLASSES = (
    SegmentationStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
)


class DemoError(PacsNodeError):
    """The demo could not run or its results did not arrive."""


class DemoPacs:
    """A C-STORE SCP on 127.0.0.1 that keeps what it receives (the demo's PACS).

    Args:
        folder: received instances are written to ``folder/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.
        ae_title: its AE title.
    """

    def __init__(self, folder: Path, *, ae_title: str = "DEMOPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.received: dict[str, list[tuple[Path, Dataset, float]]] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self.port = 0

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study = str(ds.StudyInstanceUID)
        path = self.folder / study / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            items = self.received.setdefault(study, [])
            items[:] = [i for i in items if i[1].SOPInstanceUID != ds.SOPInstanceUID]
            items.append((path, ds, time.time()))
        return 0x0000

    def start(self) -> int:
        """Listen on a free port; returns it."""
        ae = AE(ae_title=self.ae_title)
        for uid in _RESULT_CLASSES:
            ae.add_supported_context(uid)
        self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self._server.server_address[1])
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def study(self, study_uid: str) -> list[tuple[Path, Dataset, float]]:
        with self._lock:
            return list(self.received.get(study_uid, []))


@dataclass
class DemoResult:
    """One pipeline's outcome."""

    pipeline: str
    study_uid: str
    state: str = "not run"
    reason: str | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    dice: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def _demo_settings(
    data_dir: Path, pacs_port: int, base: Mapping[str, Any] | None, log_level: str | None = None
) -> Settings:
    tree: dict[str, Any] = json.loads(json.dumps(base if base is not None else embedded_defaults()))
    tree["data_dir"] = str(data_dir)
    if log_level:
        tree["log_level"] = log_level
    tree["database_url"] = None
    tree.setdefault("dicom", {}).update({"host": "127.0.0.1", "port": 0})
    tree.setdefault("http", {}).update({"host": "127.0.0.1", "port": 0})
    tree.setdefault("routing", {}).update({"series_quiet_s": 1.5, "poll_interval_s": 0.25})
    tree.setdefault("worker", {}).update({"processes": 1, "poll_interval_s": 0.2})
    tree.setdefault("dispatch", {}).update({"poll_interval_s": 0.25, "backoff_base_s": 1.0, "backoff_max_s": 5.0})
    tree.setdefault("destinations", {})["demo-pacs"] = {
        "type": "dimse",
        "host": "127.0.0.1",
        "port": pacs_port,
        "ae_title": "DEMOPACS",
    }
    for route in tree.get("routes", []):
        route["destinations"] = ["demo-pacs"]
    for pipe in tree.get("pipelines", {}).values():
        pipe["optional_grace_s"] = min(float(pipe.get("optional_grace_s", 10)), 1.0)
    return settings_from_mapping(tree, source="demo settings (embedded defaults + demo overrides)")


def _seg_masks(seg_path: Path, reference_uids: list[str]) -> dict[str, np.ndarray]:
    """The received SEG's segments by label, as masks on the reference slices."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        reference_uids, combine_segments=False, skip_overlap_checks=True, dtype=np.uint8
    )  # (slices, rows, columns, segments)
    numbers = [int(n) for n in seg.segment_numbers]
    return {str(seg.get_segment_description(n).SegmentLabel): pixels[..., numbers.index(n)] > 0 for n in numbers}


def _png(ds: Dataset, path: Path) -> None:
    from PIL import Image

    arr = ds.pixel_array
    mode = "RGB" if arr.ndim == 3 and arr.shape[-1] == 3 else "L"
    Image.fromarray(np.asarray(arr, dtype=np.uint8), mode=mode).save(path)


def _utc(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def run_demo(
    out: str | Path,
    *,
    base: Mapping[str, Any] | None = None,
    timeout_s: float = 600.0,
    stream: TextIO | None = None,
    pipelines: tuple[str, ...] = tuple(DEMO_CASES),
    log_level: str | None = None,
) -> list[DemoResult]:
    """Run the demo; see the module docstring.

    Args:
        out: output folder (created; its previous ``node-data`` and results are replaced).
        base: settings tree to start from (default: the embedded defaults).
        timeout_s: how long to wait for all results.
        stream: where the progress lines and the table go (none: only logged).
        pipelines: which of the demo pipelines to run.
        log_level: the node's log level (its worker processes configure their own logging).

    Raises:
        DemoError: a model package is missing (train it first), or the node did not start.
    """
    from inference.manifest import ModelPackage
    from inference.pipeline import build_inputs
    from inference.segments import body_midline_x, build_segments
    from pacs_lab.evaluation import dice
    from pacs_lab.tasks import get_task

    def say(text: str) -> None:
        logger.info("%s", text)
        if stream is not None:
            stream.write(text + "\n")
            stream.flush()

    out = Path(out).resolve()
    for sub in ("node-data", "inputs", "received", *pipelines):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    pacs = DemoPacs(out / "received")
    pacs_port = pacs.start()
    settings = _demo_settings(out / "node-data", pacs_port, base, log_level)
    for name in pipelines:
        if name not in settings.pipelines:
            raise DemoError(f"pipeline {name!r} is not configured (the settings have {sorted(settings.pipelines)})")
        model = Path(settings.pipelines[name].model)
        if not (model / "model.yaml").is_file():
            raise DemoError(
                f"demo model {model} is missing; train it with `python -m pacs_lab.training {name} --out {model}`"
            )
    node = Node(settings)
    results: list[DemoResult] = []
    try:
        node.start()
        say(
            f"pacs-node started: AE {settings.dicom.ae_title} on 127.0.0.1:{node.scp.port}, data in {settings.data_dir}"
        )
        say(f"demo PACS (receives the results): AE DEMOPACS on 127.0.0.1:{pacs_port}")
        cases = {}
        sent_at: dict[str, float] = {}
        for name in pipelines:
            task_name, seed = DEMO_CASES[name]
            case = get_task(task_name).case(seed)
            folder = out / "inputs" / name
            paths: list[str] = []
            for role, datasets in case.inputs.items():
                from pacs_lab.phantoms.brain import save_series

                paths += [str(p) for p in save_series(folder / role, datasets)]
            study_uid = str(next(iter(case.inputs.values()))[0].StudyInstanceUID)
            t0 = time.time()
            statuses = send_files(
                "127.0.0.1", node.scp.port, paths, calling_ae="DEMOSCU", called_ae=settings.dicom.ae_title
            )
            sent_at[name] = time.time()
            bad = {uid: s for uid, s in statuses.items() if s != 0}
            say(
                f"sent {name} study ({len(paths)} instances, {', '.join(case.inputs)}) by C-STORE in "
                f"{sent_at[name] - t0:.1f} s" + (f"; {len(bad)} refused" if bad else "")
            )
            cases[name] = (case, study_uid)
            seconds = {"send": round(sent_at[name] - t0, 2)}
            results.append(DemoResult(pipeline=name, study_uid=study_uid, seconds=seconds))

        deadline = time.monotonic() + timeout_s
        pending = {r.pipeline for r in results}
        while pending and time.monotonic() < deadline:
            for r in results:
                if r.pipeline not in pending:
                    continue
                with node.db.session() as session:
                    jobs = session.scalars(
                        select(Job).join(Study).where(Study.study_uid == r.study_uid, Job.pipeline == r.pipeline)
                    ).all()
                    states = [j.state for j in jobs]
                    job = jobs[-1] if jobs else None
                    if job is not None:
                        session.expunge(job)
                if job is None:
                    continue
                if job.state is JobState.FAILED:
                    r.state, r.reason = "failed", job.reason
                    pending.discard(r.pipeline)
                    say(f"{r.pipeline}: job FAILED: {job.reason}")
                    continue
                if job.state is not JobState.DONE or any(s is not JobState.DONE for s in states):
                    continue
                received = pacs.study(r.study_uid)
                modalities = {str(ds.Modality) for _, ds, _ in received}
                if {"SEG", "SR"} <= modalities and any(
                    ds.SOPClassUID == SecondaryCaptureImageStorage for _, ds, _ in received
                ):
                    r.state = "done"
                    pending.discard(r.pipeline)
                    _collect(r, job, received, node, out, sent_at[r.pipeline])
                    say(f"{r.pipeline}: results received by the demo PACS ({len(received)} objects)")
            time.sleep(0.25)
        for r in results:
            if r.pipeline in pending:
                r.state, r.reason = "timeout", f"no complete results within {timeout_s:.0f} s"

        # Dice of the received SEG's segments against the same segments of the phantom truth, volumes from the job
        for r in results:
            if r.state != "done":
                continue
            case, _ = cases[r.pipeline]
            model_folder = Path(settings.pipelines[r.pipeline].model)
            manifest = ModelPackage(model_folder).manifest
            ref, _, _ = build_inputs(manifest, case.inputs)
            seg_file = next(Path(f) for f in r.files if f.endswith("seg.dcm"))
            pred = _seg_masks(seg_file, list(ref.sop_uids))
            truth_segments = build_segments(case.truth, manifest, midline_x=body_midline_x(ref))
            for truth_segment in truth_segments:
                name = truth_segment.spec.name
                if name in pred:  # an unvalidated segment does not go to the PACS
                    d = dice(pred[name], truth_segment.mask)
                    r.dice[name] = None if d is None else round(d, 3)
            task = get_task(DEMO_CASES[r.pipeline][0])
            for union, values in task.unions.items():
                inside = [s.spec.name for s in truth_segments if {*s.spec.labels, *s.spec.grow_into} <= set(values)]
                predicted = np.zeros(ref.shape, dtype=bool)
                for name in inside:
                    if name in pred:
                        predicted |= pred[name]
                d = dice(predicted, np.isin(case.truth.array, list(values)))
                r.dice[union] = None if d is None else round(d, 3)
    finally:
        node.stop()
        pacs.stop()

    say("")
    say(format_results(results))
    say("")
    say(f"SEG, SR, key images and PNG previews: {out}/<pipeline>/   (DEMO models on synthetic phantoms)")
    (out / "demo.json").write_text(
        json.dumps([r.__dict__ for r in results], indent=2, default=str) + "\n", encoding="utf-8"
    )
    return results


def _collect(
    r: DemoResult, job: Job, received: list[tuple[Path, Dataset, float]], node: Any, out: Path, sent: float
) -> None:
    """Copy the received objects to ``out/<pipeline>``, write PNG previews, fill volumes and seconds."""
    folder = out / r.pipeline
    folder.mkdir(parents=True, exist_ok=True)
    n_key = 0
    for path, ds, _ in sorted(received, key=lambda item: str(item[1].SOPClassUID)):
        if ds.SOPClassUID == SegmentationStorage:
            target = folder / "seg.dcm"
        elif str(ds.Modality) == "SR":
            target = folder / "sr.dcm"
        else:
            n_key += 1
            target = folder / f"key-image-{n_key}.dcm"
            _png(ds, target.with_suffix(".png"))
            r.files.append(str(target.with_suffix(".png")))
        shutil.copyfile(path, target)
        r.files.append(str(target))
    metrics = job.metrics or {}
    for entry in (metrics.get("segments") or {}).values():
        r.volumes_ml[str(entry["name"])] = round(float(entry["volume_ml"]), 2)
    timings = job.timings or {}
    with node.db.session() as session:
        series = session.scalars(select(Series).join(Study).where(Study.study_uid == r.study_uid)).all()
        last = max((_utc(s.last_received_at) or 0.0) for s in series)
        complete = max((_utc(s.completed_at) or 0.0) for s in series)
    created, started, finished = _utc(job.created_at), _utc(job.started_at), _utc(job.finished_at)
    arrived = max(t for _, _, t in received)
    r.seconds.update(
        {
            "series complete": round(complete - last, 2),
            "queue": round((started or 0) - max(created or 0, complete), 2),
            "inference": round(float(timings.get("predict", 0.0)), 2),
            "job total": round(float(timings.get("total", 0.0)), 2),
            "delivery": round(arrived - (finished or arrived), 2),
            "total": round(arrived - sent, 2),
        }
    )


def format_results(results: list[DemoResult]) -> str:
    """The demo's table."""
    lines = [f"{'pipeline':<9} {'state':<7} {'structure':<22} {'volume mL':>9} {'Dice':>6}   seconds"]
    for r in results:
        names = list(dict.fromkeys([*r.volumes_ml, *(k for k in r.dice if k not in r.volumes_ml)])) or ["-"]
        stage = ", ".join(f"{k} {v:g}" for k, v in r.seconds.items())
        for i, name in enumerate(names):
            vol = r.volumes_ml.get(name)
            d = r.dice.get(name, r.dice.get(name.lower()))
            lines.append(
                f"{(r.pipeline if i == 0 else ''):<9} {(r.state if i == 0 else ''):<7} {name[:22]:<22} "
                f"{'' if vol is None else f'{vol:.2f}':>9} {'' if d is None else f'{d:.3f}':>6}   "
                f"{stage if i == 0 else ''}"
            )
        if r.reason:
            lines.append(f"{'':<17} reason: {r.reason}")
    return "\n".join(lines)
