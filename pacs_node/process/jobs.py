"""Every change of a job's state, in one place: the process stage owns them.

Who calls what:

* claiming: :func:`claim_job` is the one conditional UPDATE that moves a job
  PENDING -> RUNNING. A Celery task claims the job its message names at the
  attempt it names; an embedded worker process calls :func:`claim_next`, which
  picks the most urgent PENDING job and claims it the same way.
* while a job runs: :func:`renew_lease` (a :class:`Heartbeat` thread of the
  Celery task); the job ends with :func:`finish_job` (DONE, inside the
  transaction that stores its outputs) or :func:`fail_job` (FAILED).
* time limits and lost workers: :func:`reap_jobs`, one pass over RUNNING jobs,
  run by serve's enqueuer (distributed: a worker is lost when its lease expired,
  :func:`lease_expired`) and by the embedded
  :class:`~pacs_node.process.worker.WorkerSupervisor` (a worker is lost when its
  process died, or at start when the node stopped under it; its processes are
  killed at a time limit).
  A job past its pipeline's time limit fails as a timeout; a job whose worker is
  lost is re-queued, or fails once it has had ``worker.max_attempts`` runs.
* :func:`rerun` queues a job again for an operator (CLI, API).

Every change is one UPDATE conditional on the row still being what its caller
saw (state, worker, attempts), so of two changes racing (a heartbeat and the
reaper, a finish and a time limit, two claims) exactly one lands.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from pacs_node.config import Settings
from pacs_node.errors import PacsNodeError
from storage.db import Database
from storage.models import Job, JobState, Series, SeriesState, Study, utcnow

logger = logging.getLogger(__name__)

#: the time limit of a job whose pipeline is no longer configured
DEFAULT_TIME_LIMIT_S = 900.0


class JobTakenOver(PacsNodeError):
    """The job is no longer held by the worker that ran it (re-queued, or failed by a time limit)."""


def time_limit_s(settings: Settings, pipeline: str) -> float:
    """The time limit of a job of ``pipeline`` (``pipelines.<name>.time_limit_s``)."""
    spec = settings.pipelines.get(pipeline)
    return spec.time_limit_s if spec else DEFAULT_TIME_LIMIT_S


def _sql_now(db: Database) -> Any:
    """The current time for leases in an UPDATE: the database server's clock on PostgreSQL (hosts' clocks
    differ), ours on SQLite."""
    return func.now() if db.dialect == "postgresql" else utcnow()


def db_time(db: Database) -> datetime:
    """The current time on the clock :func:`_sql_now` stamps leases with."""
    if db.dialect == "postgresql":
        with db.session() as session:
            value = session.scalar(select(func.now()))
        if isinstance(value, datetime):
            return value
    return utcnow()


def _update(session: Session, where: tuple[ColumnElement[bool], ...], **values: Any) -> bool:
    """One conditional UPDATE of a job; True when it matched (and changed) the row."""
    result = session.execute(update(Job).where(*where).values(**values).execution_options(synchronize_session=False))
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


def _change(db: Database, where: tuple[ColumnElement[bool], ...], **values: Any) -> bool:
    with db.session() as session:
        return _update(session, where, **values)


def _held(job_id: int, worker_id: str | None) -> tuple[ColumnElement[bool], ...]:
    """The job is RUNNING (and, when ``worker_id`` is given, held by that worker)."""
    running = (Job.id == job_id, Job.state == JobState.RUNNING)
    return running if worker_id is None else (*running, Job.worker_id == worker_id)


# -- claiming ---------------------------------------------------------------------------------------------------


def claim_job(db: Database, job_id: int, worker_id: str, attempts: int) -> bool:
    """Move job ``job_id`` from PENDING to RUNNING for ``worker_id`` if it is still at ``attempts`` runs.

    One conditional UPDATE: of several deliveries of the same message (a
    broker's redelivery, a re-publication) or several idle workers exactly one
    wins; a claim for a job that is running, finished, cancelled or was
    re-queued since (its attempts moved on) changes nothing and returns False.
    """
    now = _sql_now(db)
    return _change(
        db,
        (Job.id == job_id, Job.state == JobState.PENDING, Job.attempts == attempts),
        state=JobState.RUNNING,
        worker_id=worker_id,
        started_at=now,
        heartbeat_at=now,
        attempts=Job.attempts + 1,
        updated_at=now,
    )


def claim_next(db: Database, worker_id: str) -> int | None:
    """Claim the most urgent PENDING job (STAT first, then the oldest) for ``worker_id``; its id, or None.

    Safe with several workers on SQLite or PostgreSQL: a job another worker
    claimed first is skipped for the next one.
    """
    for _ in range(5):
        with db.session() as session:
            row = session.execute(
                select(Job.id, Job.attempts)
                .where(Job.state == JobState.PENDING)
                .order_by(Job.priority_rank, Job.id)
                .limit(1)
            ).first()
        if row is None:
            return None
        job_id, attempts = int(row[0]), int(row[1])
        if claim_job(db, job_id, worker_id, attempts):
            return job_id
    return None


# -- while a job runs, and how it ends ---------------------------------------------------------------------------


def renew_lease(db: Database, job_id: int, worker_id: str) -> bool:
    """Set the job's heartbeat to now if ``worker_id`` still holds it RUNNING; False when it does not."""
    return _change(db, _held(job_id, worker_id), heartbeat_at=_sql_now(db))


class Heartbeat:
    """Renews a running job's lease every ``interval_s`` in a thread, until the ``with`` block ends.

    A failed renewal (database unreachable) is logged and retried at the next
    beat; a lost lease (the job was re-queued or failed meanwhile) is logged once.
    """

    def __init__(self, db: Database, job_id: int, worker_id: str, interval_s: float) -> None:
        self.db = db
        self.job_id = job_id
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                held = renew_lease(self.db, self.job_id, self.worker_id)
            except Exception as exc:
                logger.warning("job %d: lease not renewed (%s); retrying", self.job_id, exc)
                continue
            if not held and not self.lost:
                self.lost = True
                logger.warning(
                    "job %d: worker %s no longer holds it (lease expired or time limit); its result will be discarded",
                    self.job_id,
                    self.worker_id,
                )


def finish_job(session: Session, job_id: int, worker_id: str | None, **values: Any) -> None:
    """Move the job to DONE with ``values`` (metrics, timings, model, result path) in ``session``.

    Meant as the ``fence`` of :func:`pacs_node.process.results.store_outputs`:
    it runs in the transaction that records the job's outputs and deliveries,
    so they commit together with DONE, or not at all.

    Raises:
        JobTakenOver: ``worker_id`` no longer holds the job RUNNING (it was
            re-queued or failed meanwhile); the transaction must roll back.
    """
    now = utcnow()
    if not _update(
        session, _held(job_id, worker_id), state=JobState.DONE, finished_at=now, updated_at=now, reason=None, **values
    ):
        raise JobTakenOver(f"job {job_id} is no longer held by worker {worker_id}")


def _fail(
    db: Database, where: tuple[ColumnElement[bool], ...], job_id: int, reason: str, kind: str, now: datetime
) -> bool:
    if not _change(db, where, state=JobState.FAILED, finished_at=now, updated_at=now, failure_kind=kind, reason=reason):
        return False
    logger.warning("job %d FAILED: %s", job_id, reason)
    return True


def fail_job(db: Database, job_id: int, reason: str, *, worker_id: str | None = None, kind: str = "internal") -> bool:
    """Move a RUNNING job (held by ``worker_id``, when given) to FAILED with ``reason``; False when it was not.

    ``kind`` is the job's ``failure_kind``: input, model, internal or timeout.
    """
    return _fail(db, _held(job_id, worker_id), job_id, reason, kind, utcnow())


# -- time limits and lost workers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningJob:
    """A RUNNING job as :func:`reap_jobs` read it."""

    id: int
    pipeline: str
    worker_id: str | None
    attempts: int
    started_at: datetime | None
    heartbeat_at: datetime | None


@dataclass(frozen=True)
class Lost:
    """Why a running job's worker is presumed gone.

    ``what`` goes into the log and the job's reason; ``still`` are conditions
    the row must still meet when it is taken away (a heartbeat that lands at the
    same moment wins).
    """

    what: str
    still: tuple[ColumnElement[bool], ...] = ()


LostCheck = Callable[[RunningJob], Lost | None]
"""Tells whether a running job's worker is lost (and why), or None while it is not."""


def lease_expired(settings: Settings, now: datetime) -> LostCheck:
    """Distributed mode: a job's worker is lost when it sent no heartbeat for ``queue.lease_s``."""
    lease = timedelta(seconds=settings.queue.lease_s)

    def check(job: RunningJob) -> Lost | None:
        beat = job.heartbeat_at or job.started_at
        if beat is None or now - beat <= lease:
            return None
        silent = int((now - beat).total_seconds())
        return Lost(
            f"worker {job.worker_id} sent no heartbeat for {silent} s (queue.lease_s {settings.queue.lease_s:g})",
            (or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < now - lease),),
        )

    return check


def _discarded(job: RunningJob) -> str:
    return f"worker {job.worker_id}'s result will be discarded"


def reap_jobs(
    db: Database,
    settings: Settings,
    now: datetime | None = None,
    *,
    lost: LostCheck | None = None,
    workers: Collection[str] | None = None,
    stop_worker: Callable[[RunningJob], str] = _discarded,
    time_limits: bool = True,
) -> dict[str, int]:
    """Fail RUNNING jobs past their time limit; re-queue (or fail) those whose worker is lost.

    Args:
        db: the database.
        settings: ``pipelines.*.time_limit_s``, ``worker.max_attempts`` (and ``queue.lease_s``).
        now: the current time (default: the database's clock, as leases are stamped).
        lost: which workers are lost (default: those whose lease expired, :func:`lease_expired`).
        workers: only jobs held by these workers (default: every RUNNING job).
        stop_worker: called for a job past its time limit before it is failed; stops its worker if it can and
            says what became of it, for the job's reason (default: nothing is stopped, its result will be discarded).
        time_limits: False to leave time limits alone (a pass over jobs whose node stopped under them).

    Returns:
        counts of jobs ``timed_out``, ``requeued`` and ``failed`` (worker lost once too often).

    Every change is conditional on the row still being what was read (state,
    worker, attempts), so a heartbeat or a finish that lands at the same moment
    wins and the job is left alone.
    """
    now = now or db_time(db)
    lost = lost or lease_expired(settings, now)
    max_attempts = settings.worker.max_attempts
    counts = {"timed_out": 0, "requeued": 0, "failed": 0}
    query = select(Job.id, Job.pipeline, Job.worker_id, Job.attempts, Job.started_at, Job.heartbeat_at).where(
        Job.state == JobState.RUNNING
    )
    if workers is not None:
        query = query.where(Job.worker_id.in_(list(workers)))
    with db.session() as session:
        running = [RunningJob(*row) for row in session.execute(query)]
    for job in running:
        held = (*_held(job.id, job.worker_id), Job.attempts == job.attempts)
        limit = time_limit_s(settings, job.pipeline)
        if time_limits and job.started_at is not None and now - job.started_at > timedelta(seconds=limit):
            reason = (
                f"stopped after {limit:g} s: the job exceeded its pipeline's time limit "
                f"(pipelines.{job.pipeline}.time_limit_s); {stop_worker(job)}"
            )
            counts["timed_out"] += _fail(db, held, job.id, reason, "timeout", now)
            continue
        gone = lost(job)
        if gone is None:
            continue
        where = (*held, *gone.still)
        if job.attempts >= max_attempts:
            reason = f"{gone.what}, on run {job.attempts} of {max_attempts}; not retried again (worker.max_attempts)"
            counts["failed"] += _fail(db, where, job.id, reason, "internal", now)
        elif _change(
            db, where, state=JobState.PENDING, worker_id=None, published_at=None, queued_at=now, updated_at=now
        ):
            counts["requeued"] += 1
            logger.warning("job %d re-queued: %s; run %d follows", job.id, gone.what, job.attempts + 1)
    return counts


# -- operators ---------------------------------------------------------------------------------------------------


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
