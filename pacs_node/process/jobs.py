"""Administrative job operations shared by the CLI (and later the API)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import Job, JobState, Series, SeriesState, Study

logger = logging.getLogger(__name__)


def _copy(session: Session, job: Job) -> Job:
    n = 1 + sum(1 for _ in session.scalars(select(Job.id).where(Job.input_key.like(f"{job.input_key}#rerun%"))))
    new = Job(
        study_id=job.study_id,
        pipeline=job.pipeline,
        route=job.route,
        state=JobState.PENDING,
        priority=job.priority,
        priority_rank=job.priority_rank,
        inputs=dict(job.inputs or {}),
        destinations=list(job.destinations or []),
        trigger_series_uid=job.trigger_series_uid,
        input_key=f"{job.input_key}#rerun{n}" if job.input_key else None,
        required_complete_at=job.required_complete_at,
    )
    session.add(new)
    session.flush()
    return new


def rerun(db: Database, *, study_uid: str | None = None, series_uid: str | None = None) -> list[str]:
    """Queue the latest job of each pipeline again for a study or a series.

    A series that never made a job (ignored, or rules changed since) is routed
    again instead. Returns lines describing what was done; empty when the UID is
    unknown.
    """
    out: list[str] = []
    with db.session() as session:
        if study_uid:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                return []
            jobs = session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
            series_rows = list(study.series)
        else:
            series = session.scalar(select(Series).where(Series.series_uid == series_uid))
            if series is None:
                return []
            jobs = [
                j
                for j in session.scalars(select(Job).where(Job.study_id == series.study_id).order_by(Job.id))
                if series_uid in (j.inputs or {}).values()
            ]
            series_rows = [series]
        latest: dict[tuple[str, str, tuple[tuple[str, str], ...]], Job] = {}
        for job in jobs:
            if job.state in (JobState.WAITING,) or not job.inputs:
                continue
            latest[(job.pipeline, job.route, tuple(sorted(job.inputs.items())))] = job
        for job in latest.values():
            if job.state in (JobState.PENDING, JobState.RUNNING):
                out.append(f"job {job.id} ({job.pipeline}) is already {job.state.value}; not queued twice")
                continue
            new = _copy(session, job)
            out.append(f"job {new.id} PENDING: re-run of job {job.id} ({job.pipeline})")
            logger.info("job %d queued as a re-run of job %d", new.id, job.id)
        if not latest:
            for s in series_rows:
                if s.state in (SeriesState.ROUTED, SeriesState.IGNORED):
                    s.state = SeriesState.COMPLETE
                    out.append(f"series {s.series_uid} will be routed again")
    return out
