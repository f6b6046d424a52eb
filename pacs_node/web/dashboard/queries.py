"""What the dashboard shows, as plain functions of a database session.

Each function answers one page (or one part of a page) with a bounded number
of queries: lists are paged (:data:`PAGE_SIZE` rows, newest first, keyed on the
primary key) and what a page needs about its rows (series counts, job states,
study names, outputs) is fetched for the page's ids only, never per row. The
indexes they rely on are declared in :mod:`storage.models` (migration 0006).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session, defer

from storage.models import Delivery, DeliveryState, Job, JobState, Output, OutputKind, Series, Study, utcnow

PAGE_SIZE = 50
RECENT = 8

#: Order of the per-stage timings a job records (pacs_node.process.worker), for the timing bars.
STAGES = ("load_model", "read_inputs", "preprocess", "predict", "postprocess", "outputs")


@dataclass
class Page:
    """One page of a list."""

    items: list[Any]
    total: int
    page: int
    size: int = PAGE_SIZE

    @property
    def pages(self) -> int:
        """How many pages the list has (at least 1)."""
        return max(1, -(-self.total // self.size))


@dataclass
class StudyRow:
    """A study in the studies list."""

    study: Study
    series: int = 0
    instances: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    deliveries: dict[str, int] = field(default_factory=dict)


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
        """The job's measurements per label: name, volume (mL), count and means, as the worker recorded them."""
        labels = (self.job.metrics or {}).get("labels") or {}
        rows = []
        for value, entry in sorted(labels.items(), key=lambda item: int(item[0]) if str(item[0]).isdigit() else 0):
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
                }
            )
        return rows

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


def _page_number(value: str | None) -> int:
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1


def _count(session: Session, stmt: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0)


# -- overview -------------------------------------------------------------------------------------------------------


@dataclass
class Overview:
    """The front page's figures."""

    studies: int
    studies_today: int
    jobs: dict[str, int]
    deliveries: dict[str, dict[str, int]]
    recent_jobs: list[JobRow]
    failed_deliveries: list[tuple[Delivery, Output | None, Study | None]]


def overview(session: Session, now: datetime | None = None) -> Overview:
    """Counts by state, the latest jobs and the latest failed deliveries."""
    now = now or utcnow()
    studies = int(session.scalar(select(func.count(Study.id))) or 0)
    today = int(session.scalar(select(func.count(Study.id)).where(Study.created_at >= now - timedelta(days=1))) or 0)
    jobs = {state.value: int(n) for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
    deliveries: dict[str, dict[str, int]] = defaultdict(dict)
    for dest, state, n in session.execute(
        select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)
    ):
        deliveries[dest][state.value] = int(n)
    recent = list(session.scalars(select(Job).order_by(Job.id.desc()).limit(RECENT)))
    failed = list(
        session.scalars(
            select(Delivery).where(Delivery.state == DeliveryState.FAILED).order_by(Delivery.id.desc()).limit(RECENT)
        )
    )
    return Overview(
        studies=studies,
        studies_today=today,
        jobs=jobs,
        deliveries=dict(sorted(deliveries.items())),
        recent_jobs=job_rows(session, recent, brief=True),
        failed_deliveries=_with_outputs(session, failed),
    )


# -- studies --------------------------------------------------------------------------------------------------------


def _study_search(q: str) -> ColumnElement[bool]:
    text = q.strip()
    like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").lower() + "%"
    return or_(
        func.lower(Study.patient_name).like(like, escape="\\"),
        Study.patient_id == text,
        Study.accession_number == text,
        Study.study_uid == text,
        func.lower(Study.study_description).like(like, escape="\\"),
    )


def studies_page(session: Session, *, q: str = "", page: str | None = None) -> Page:
    """Studies, newest first, with series/instance counts and job and delivery states; ``q`` searches
    patient name and description (substring) and patient ID, accession number and Study UID (exact)."""
    number = _page_number(page)
    stmt = select(Study)
    if q.strip():
        stmt = stmt.where(_study_search(q))
    total = _count(session, stmt)
    studies = list(session.scalars(stmt.order_by(Study.id.desc()).offset((number - 1) * PAGE_SIZE).limit(PAGE_SIZE)))
    rows = {s.id: StudyRow(s) for s in studies}
    ids = list(rows)
    if ids:
        for sid, n, inst in session.execute(
            select(Series.study_id, func.count(Series.id), func.coalesce(func.sum(Series.instance_count), 0))
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        ):
            rows[sid].series, rows[sid].instances = int(n), int(inst)
        for sid, state, n in session.execute(
            select(Job.study_id, Job.state, func.count()).where(Job.study_id.in_(ids)).group_by(Job.study_id, Job.state)
        ):
            rows[sid].jobs[state.value] = int(n)
        for sid, d_state, n in session.execute(
            select(Delivery.study_id, Delivery.state, func.count())
            .where(Delivery.study_id.in_(ids))
            .group_by(Delivery.study_id, Delivery.state)
        ):
            rows[sid].deliveries[d_state.value] = int(n)
    return Page(items=list(rows.values()), total=total, page=number)


@dataclass
class StudyDetail:
    """A study with its series and its jobs' cards."""

    study: Study
    series: list[Series]
    jobs: list[JobRow]


def study_detail(session: Session, study_uid: str) -> StudyDetail | None:
    """A study by its UID, or None."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return None
    series = list(
        session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id))
    )
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())))
    return StudyDetail(study, series, job_rows(session, jobs, studies={study.id: study}))


# -- jobs -----------------------------------------------------------------------------------------------------------


def job_rows(
    session: Session, jobs: list[Job], *, studies: dict[int, Study] | None = None, brief: bool = False
) -> list[JobRow]:
    """Cards for ``jobs``: their study, outputs, deliveries and input series, in a few IN queries.

    ``brief`` (the lists): only the key images among the outputs, deliveries counted by
    state rather than loaded, no input series.
    """
    if not jobs:
        return []
    ids = [j.id for j in jobs]
    rows = {j.id: JobRow(j) for j in jobs}
    known = dict(studies or {})
    missing = {j.study_id for j in jobs} - set(known)
    if missing:
        known.update({s.id: s for s in session.scalars(select(Study).where(Study.id.in_(missing)))})
    for row in rows.values():
        row.study = known.get(row.job.study_id)
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


def jobs_page(session: Session, *, state: str = "", pipeline: str = "", page: str | None = None) -> Page:
    """Jobs, newest first, optionally of one state and one pipeline.

    Raises:
        ValueError: ``state`` is not a job state.
    """
    number = _page_number(page)
    stmt = select(Job)
    if state:
        stmt = stmt.where(Job.state == JobState(state.upper()))
    if pipeline:
        stmt = stmt.where(Job.pipeline == pipeline)
    total = _count(session, stmt)
    jobs = list(session.scalars(stmt.order_by(Job.id.desc()).offset((number - 1) * PAGE_SIZE).limit(PAGE_SIZE)))
    return Page(items=job_rows(session, jobs, brief=True), total=total, page=number)


def pipelines_seen(session: Session) -> list[str]:
    """Pipeline names that have jobs (for the jobs filter)."""
    return [p for (p,) in session.execute(select(Job.pipeline).distinct().order_by(Job.pipeline))]


def job_detail(session: Session, job_id: int) -> JobRow | None:
    """One job's card, or None."""
    job = session.get(Job, job_id)
    return job_rows(session, [job])[0] if job is not None else None


# -- deliveries -----------------------------------------------------------------------------------------------------


def _with_outputs(session: Session, deliveries: list[Delivery]) -> list[tuple[Delivery, Output | None, Study | None]]:
    outputs = {o.id: o for o in session.scalars(select(Output).where(Output.id.in_({d.output_id for d in deliveries})))}
    studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_({d.study_id for d in deliveries})))}
    return [(d, outputs.get(d.output_id), studies.get(d.study_id)) for d in deliveries]


def delivery_summary(session: Session) -> dict[str, dict[str, int]]:
    """destination -> state -> count."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for dest, state, n in session.execute(
        select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)
    ):
        out[dest][state.value] = int(n)
    return dict(sorted(out.items()))


def deliveries_page(session: Session, *, state: str = "", destination: str = "", page: str | None = None) -> Page:
    """Deliveries, newest first, optionally of one state and one destination.

    Raises:
        ValueError: ``state`` is not a delivery state.
    """
    number = _page_number(page)
    stmt = select(Delivery)
    if state:
        stmt = stmt.where(Delivery.state == DeliveryState(state.lower()))
    if destination:
        stmt = stmt.where(Delivery.destination == destination)
    total = _count(session, stmt)
    rows = list(session.scalars(stmt.order_by(Delivery.id.desc()).offset((number - 1) * PAGE_SIZE).limit(PAGE_SIZE)))
    return Page(items=_with_outputs(session, rows), total=total, page=number)


def output_png(session: Session, output_id: int) -> str | None:
    """The key-image preview path (relative to the data folder) of an output, if it has one."""
    out = session.get(Output, output_id)
    if out is None or not out.png_path or out.purged_at is not None:
        return None
    return out.png_path
