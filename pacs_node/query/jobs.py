"""Jobs as the faces show them: lists and cards (study, outputs, deliveries, input series), JSON views.

A card's parts are fetched for all the cards at once (a few IN queries), never per job.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from pacs_node.query.base import Page, fetch_page, in_states, iso, of_study
from pacs_node.query.deliveries import delivery_dict
from storage.models import Delivery, Job, JobState, Output, OutputKind, Series, Study

logger = logging.getLogger(__name__)

#: Order of the per-stage timings a job records (pacs_node.process.worker), for the timing bars.
STAGES = ("load_model", "read_inputs", "preprocess", "predict", "postprocess", "outputs")


@dataclass
class JobRow:
    """A job with what its card shows."""

    job: Job
    study: Study | None = None
    outputs: list[Output] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    inputs: dict[str, Series] = field(default_factory=dict)
    #: deliveries by state, when only counted (lists); else computed from ``deliveries``
    delivery_counts: dict[str, int] | None = None

    @property
    def preview(self) -> Output | None:
        """The live key image with a PNG preview, if any."""
        for out in self.outputs:
            if out.kind is OutputKind.KEY_IMAGE and out.png_path and out.superseded_at is None and not out.purged_at:
                return out
        return None

    @property
    def volumes(self) -> list[dict[str, Any]]:
        """The job's measurements per segment: name, volume (mL), count, means, confidence and QC, as the worker
        recorded them (``segments``; jobs of earlier versions recorded ``labels``)."""
        metrics = self.job.metrics or {}
        entries = metrics.get("segments") or metrics.get("labels") or {}
        rows = []
        for value, entry in sorted(entries.items(), key=lambda item: int(item[0]) if str(item[0]).isdigit() else 0):
            if not isinstance(entry, dict):
                continue
            means = entry.get("mean") or {}
            rows.append(
                {
                    "value": value,
                    "name": entry.get("name", str(value)),
                    "volume_ml": entry.get("volume_ml"),
                    "count": entry.get("count"),
                    "laterality": entry.get("laterality"),
                    "means": {k: v for k, v in means.items() if v is not None},
                    "mean_unit": entry.get("mean_unit") or "",
                    "confidence": entry.get("confidence"),
                    "plausible": (entry.get("qc") or {}).get("plausible", True),
                }
            )
        return rows

    @property
    def qc(self) -> list[str]:
        """Why the result is flagged for QC (implausible volumes, a missing structure); empty when it is not."""
        qc = (self.job.metrics or {}).get("qc") or {}
        return [str(r) for r in qc.get("reasons", [])] if qc.get("flagged") else []

    @property
    def stages(self) -> list[tuple[str, float]]:
        """Per-stage seconds in pipeline order (then any other stage the worker recorded), without the total."""
        timings = {k: float(v) for k, v in (self.job.timings or {}).items() if isinstance(v, int | float)}
        ordered = [(k, timings.pop(k)) for k in STAGES if k in timings]
        ordered += [(k, v) for k, v in timings.items() if k != "total" and not k.startswith("stage_")]
        return ordered

    @property
    def model_stages(self) -> list[tuple[str, float]]:
        """Seconds of each model stage (``stage_<name>``, parts of ``predict``)."""
        return [
            (k.removeprefix("stage_"), float(v))
            for k, v in (self.job.timings or {}).items()
            if k.startswith("stage_") and isinstance(v, int | float)
        ]

    @property
    def total_s(self) -> float | None:
        """The job's run time as the worker measured it (else finished - started)."""
        value = (self.job.timings or {}).get("total")
        if isinstance(value, int | float):
            return float(value)
        if self.job.started_at and self.job.finished_at:
            return (self.job.finished_at - self.job.started_at).total_seconds()
        return None

    @property
    def queue_s(self) -> float | None:
        """Queued (last became PENDING; else inputs complete, else created) to started."""
        if self.job.started_at is None:
            return None
        ready = self.job.queued_at or self.job.required_complete_at or self.job.created_at
        return max(0.0, (self.job.started_at - ready).total_seconds())

    @property
    def delivery_states(self) -> dict[str, int]:
        """Deliveries of the job by state."""
        if self.delivery_counts is not None:
            return self.delivery_counts
        out: dict[str, int] = defaultdict(int)
        for d in self.deliveries:
            out[d.state.value] += 1
        return dict(out)


def job_rows(session: Session, jobs: list[Job], *, studies: dict[int, Study] | None = None) -> list[JobRow]:
    """``jobs`` with their studies (one IN query for those not in ``studies``), in the given order."""
    known = dict(studies or {})
    missing = {j.study_id for j in jobs} - set(known)
    if missing:
        known.update({s.id: s for s in session.scalars(select(Study).where(Study.id.in_(missing)))})
    return [JobRow(j, known.get(j.study_id)) for j in jobs]


def job_cards(
    session: Session, jobs: list[Job], *, studies: dict[int, Study] | None = None, brief: bool = False
) -> list[JobRow]:
    """Cards for ``jobs``: their study, outputs, deliveries and input series, in a few IN queries.

    ``brief`` (the lists): only the key images among the outputs, deliveries counted by
    state rather than loaded, no input series.
    """
    if not jobs:
        return []
    ids = [j.id for j in jobs]
    rows = {row.job.id: row for row in job_rows(session, jobs, studies=studies)}
    if brief:
        keys = select(Output).where(Output.job_id.in_(ids), Output.kind == OutputKind.KEY_IMAGE).order_by(Output.id)
        for out in session.scalars(keys):
            rows[out.job_id].outputs.append(out)
        counts: dict[int, dict[str, int]] = {i: {} for i in ids}
        counted = select(Delivery.job_id, Delivery.state, func.count()).where(Delivery.job_id.in_(ids))
        for job_id, state, n in session.execute(counted.group_by(Delivery.job_id, Delivery.state)):
            counts[job_id][state.value] = int(n)
        for i, row in rows.items():
            row.delivery_counts = counts[i]
        return [rows[i] for i in ids]
    for out in session.scalars(select(Output).where(Output.job_id.in_(ids)).order_by(Output.id)):
        rows[out.job_id].outputs.append(out)
    for d in session.scalars(select(Delivery).where(Delivery.job_id.in_(ids)).order_by(Delivery.id)):
        rows[d.job_id].deliveries.append(d)
    uids = {uid for j in jobs for uid in (j.inputs or {}).values() if isinstance(uid, str)}
    if uids:
        found = session.scalars(select(Series).options(defer(Series.header)).where(Series.series_uid.in_(uids)))
        series = {s.series_uid: s for s in found}
        for row in rows.values():
            row.inputs = {role: series[uid] for role, uid in (row.job.inputs or {}).items() if uid in series}
    return [rows[i] for i in ids]


def list_jobs(
    session: Session,
    *,
    states: Iterable[JobState | str] = (),
    pipeline: str | None = None,
    study_uid: str | None = None,
    limit: int = 50,
    offset: int = 0,
    cards: bool = False,
) -> Page[JobRow]:
    """Jobs, newest first, in any of ``states``, of one pipeline, of one study; each with its study.

    ``cards``: brief cards (key images, deliveries counted by state) as the dashboard's lists show.

    Raises:
        FilterError: a state is not a job state.
    """
    conds = [*in_states(Job.state, JobState, states), *of_study(Job.study_id, study_uid)]
    if pipeline:
        conds.append(Job.pipeline == pipeline)
    total, jobs = fetch_page(session, select(Job).where(*conds), Job.id.desc(), limit=limit, offset=offset)
    rows = job_cards(session, jobs, brief=True) if cards else job_rows(session, jobs)
    return Page(rows, total, limit, offset)


def job_detail(session: Session, job_id: int) -> JobRow | None:
    """One job's full card (all outputs and deliveries, input series), or None."""
    job = session.get(Job, job_id)
    return job_cards(session, [job])[0] if job is not None else None


def pipelines_seen(session: Session) -> list[str]:
    """Pipeline names that have jobs, in name order."""
    return [p for (p,) in session.execute(select(Job.pipeline).distinct().order_by(Job.pipeline))]


def output_png(session: Session, output_id: int) -> str | None:
    """The key-image preview path (relative to the data folder) of an output, if it has one."""
    out = session.get(Output, output_id)
    if out is None or not out.png_path or out.purged_at is not None:
        return None
    return out.png_path


def job_dict(job: Job, study_uid: str | None = None) -> dict[str, Any]:
    """A JSON-ready view of a job (times in ISO 8601 UTC)."""
    return {
        "id": job.id,
        "state": job.state.value,
        "pipeline": job.pipeline,
        "route": job.route,
        "priority": job.priority,
        "study_uid": study_uid,
        "inputs": job.inputs,
        "destinations": job.destinations,
        "reason": job.reason,
        "failure_kind": job.failure_kind,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "required_complete_at": iso(job.required_complete_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "attempts": job.attempts,
        "worker": job.worker_id,
        "model": {"name": job.model_name, "version": job.model_version, "sha256": job.model_checksums},
        "timings_s": job.timings,
        "metrics": job.metrics,
    }


def output_dict(o: Output) -> dict[str, Any]:
    """A JSON-ready view of one result object."""
    return {
        "id": o.id,
        "job_id": o.job_id,
        "kind": o.kind.value,
        "sop_class_uid": o.sop_class_uid,
        "series_uid": o.series_uid,
        "sop_instance_uid": o.sop_uid,
        "size_bytes": o.size_bytes,
        "created_at": iso(o.created_at),
        "superseded_at": iso(o.superseded_at),
        "superseded_by_job_id": o.superseded_by_job_id,
        "purged_at": iso(o.purged_at),
    }


def job_card_dict(row: JobRow) -> dict[str, Any]:
    """A JSON-ready view of a full card: the job with its outputs and deliveries, in id order."""
    out = job_dict(row.job, row.study.study_uid if row.study else None)
    by_id = {o.id: o for o in row.outputs}
    out["outputs"] = [output_dict(o) for o in row.outputs]
    out["deliveries"] = [delivery_dict(d, by_id.get(d.output_id)) for d in row.deliveries]
    return out
