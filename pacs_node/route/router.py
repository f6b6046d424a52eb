"""Series completion, routing rules, and job assembly.

A separate loop that shares only the database with the receive path:

1. a RECEIVING series that has been quiet for ``routing.series_quiet_s`` (or
   whose header hints say every frame has arrived) becomes COMPLETE, but no
   series does while the store's journal holds acknowledged instances that
   the indexer has not caught up with (a database outage, a slow index): the
   index cannot say which series they belong to, and a series called complete
   without them would be routed without them;
2. a COMPLETE series is checked by the loop guard and the routing rules; each
   matching route creates a job (one per series for single-input pipelines,
   one per study for pipelines with several input roles) and the series is
   ROUTED, or IGNORED with the reason;
3. a WAITING job assembles its input series by role; when the required roles
   are complete (and the optional ones, or their grace period has passed) it
   becomes PENDING; when the study timeout passes first it FAILS with a reason
   a person can act on.

Every step is idempotent, so the loop recovers by simply running again: series
whose quiet period passed while the node was down are routed at the first tick.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from pacs_node.common.store import open_store
from pacs_node.config import LateInstancePolicy, PipelineSettings, RouteSettings, Settings
from pacs_node.config.rules import CompiledRules, compile_settings
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Job, JobState, Series, SeriesState, utcnow

logger = logging.getLogger(__name__)

_READY_STATES = (SeriesState.COMPLETE, SeriesState.ROUTED, SeriesState.IGNORED)

#: An instance acknowledged longer ago than this and still in the journal means
#: the indexer is behind (at most half the quiet period, so that a series still
#: arriving is never taken for a quiet one).
INDEX_LAG_S = 2.0


def journal_backlog(journal: Path, acked_before_ns: int) -> tuple[int, int | None]:
    """Files in the store's journal acknowledged before ``acked_before_ns``, and the oldest's time.

    Journal names begin with the acknowledgement time in nanoseconds
    (:meth:`storage.filestore.FileStore.acknowledge`); a name that does not is
    dated by its modification time.
    """
    count, oldest = 0, None
    try:
        entries = os.scandir(journal)
    except FileNotFoundError:
        return 0, None
    with entries:
        for entry in entries:
            if not entry.name.endswith(".dcm"):
                continue
            stamp = entry.name.partition("-")[0]
            try:
                acked = int(stamp) if stamp.isdigit() else entry.stat().st_mtime_ns
            except FileNotFoundError:
                continue  # indexed meanwhile
            if acked < acked_before_ns:
                count += 1
                oldest = acked if oldest is None else min(oldest, acked)
    return count, oldest


class Router:
    """The routing loop.

    Args:
        settings: the node's settings (routing, pipelines, routes).
        db: the database.
        rules: compiled rules (compiled from ``settings`` when omitted).
        on_pending: called after a pass that made jobs PENDING.
        store: the file store whose journal holds acknowledged, not yet indexed
            instances (opened from ``settings`` when omitted).
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        rules: CompiledRules | None = None,
        on_pending: Callable[[], None] | None = None,
        store: FileStore | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.journal = (store or open_store(settings)).acked_dir
        self._held_since: datetime | None = None  # completion held for the indexer since then
        self.rules = rules or compile_settings(settings)
        self.on_pending = on_pending  # told after a pass that made jobs PENDING (distributed mode publishes them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Run :meth:`tick` every ``routing.poll_interval_s`` in a background thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="router", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("routing tick failed; retrying")
            self._stop.wait(self.settings.routing.poll_interval_s)

    # -- one pass ----------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> dict[str, int]:
        """Run one pass of all three steps; returns counts for logs and tests."""
        now = now or utcnow()
        with self._lock:
            completed = self.complete_series(now)
            routed = self.route_series(now)
            assembled = self.assemble_jobs(now)
        if (routed or assembled) and self.on_pending is not None:
            self.on_pending()
        return {"completed": completed, "routed": routed, "assembled": assembled}

    def complete_series(self, now: datetime) -> int:
        """Mark quiet (or hinted-complete) RECEIVING series COMPLETE.

        Nothing is completed while the indexer lags behind the journal (see
        :meth:`index_lagging`).
        """
        if self.index_lagging(now):
            return 0
        quiet_before = now - timedelta(seconds=self.settings.routing.series_quiet_s)
        with self.db.session() as session:
            rows = session.scalars(
                select(Series).where(
                    Series.state == SeriesState.RECEIVING,
                    or_(
                        Series.last_received_at <= quiet_before,
                        and_(
                            Series.expected_frames.is_not(None),
                            Series.frames_received >= Series.expected_frames,
                        ),
                    ),
                )
            ).all()
            for series in rows:
                hinted = series.expected_frames is not None and series.frames_received >= series.expected_frames
                series.state = SeriesState.COMPLETE
                series.completed_at = now
                logger.info(
                    "series %s complete: %d instances, %d frames (%s)",
                    series.series_uid,
                    series.instance_count,
                    series.frames_received,
                    "all frames announced by the header arrived" if hinted else "quiet period passed",
                )
            return len(rows)

    def index_lagging(self, now: datetime) -> bool:
        """Whether acknowledged instances wait in the journal longer than the index normally takes.

        The database cannot say which series they belong to, so while they
        wait no series is called complete: one of them might be theirs. Logged
        once when the hold begins and once when it ends.
        """
        lag = min(INDEX_LAG_S, self.settings.routing.series_quiet_s / 2)
        seconds = (now if now.tzinfo is not None else now.replace(tzinfo=timezone.utc)).timestamp()
        count, oldest = journal_backlog(self.journal, int((seconds - lag) * 1e9))
        if count:
            if self._held_since is None:
                self._held_since = now
                age = seconds - (oldest or 0) / 1e9
                logger.info(
                    "series completion held: %d acknowledged instances wait in the journal to be indexed "
                    "(oldest %.0f s); no series is called complete before they are in the index",
                    count,
                    age,
                )
            return True
        if self._held_since is not None:
            logger.info(
                "series completion resumes: the index caught up with the journal after %.1f s",
                (now - self._held_since).total_seconds(),
            )
            self._held_since = None
        return False

    def route_series(self, now: datetime) -> int:
        """Apply the loop guard and the rules to COMPLETE series."""
        n = 0
        with self.db.session() as session:
            rows = session.scalars(select(Series).where(Series.state == SeriesState.COMPLETE).order_by(Series.id)).all()
            for series in rows:
                self._route_one(session, series, now)
                n += 1
        return n

    def _route_one(self, session: Session, series: Series, now: datetime) -> None:
        series.routed_at = now
        decision = self.rules.evaluate(series.header or {}, calling_ae=series.calling_ae, called_ae=series.called_ae)
        if decision.guard:
            series.state = SeriesState.IGNORED
            series.route_note = f"never routed: {decision.guard}"
            logger.info("series %s not routed: %s", series.series_uid, decision.guard)
            return
        late_ignored = series.reopen_count and self.settings.routing.late_instances is LateInstancePolicy.IGNORE
        if late_ignored and _has_jobs_for(session, series):
            # Only the first completion routes; late instances are stored, not re-run.
            series.state = SeriesState.ROUTED
            series.route_note = "late instances stored; not re-run (routing.late_instances: ignore)"
            return
        if not decision.matches:
            series.state = SeriesState.IGNORED
            nearest = decision.misses[0] if decision.misses else None
            series.route_note = "no rule matched" + (
                f" (nearest: {nearest.route.name}: {'; '.join(nearest.failures)})" if nearest else ""
            )
            logger.info("series %s: %s", series.series_uid, series.route_note)
            return
        notes = []
        for match in decision.matches:
            route = match.route
            pipeline = self.settings.pipelines[route.pipeline]
            if pipeline.per_series:
                job = self._series_job(session, series, route, pipeline, now)
                notes.append(f"{route.name} -> job {job.id}" if job else f"{route.name} -> job exists")
            else:
                job = self._study_job(session, series, route, pipeline, now)
                notes.append(f"{route.name} -> job {job.id} ({job.state.value})")
        series.state = SeriesState.ROUTED
        series.route_note = "; ".join(notes)

    def _series_job(
        self, session: Session, series: Series, route: RouteSettings, pipeline: PipelineSettings, now: datetime
    ) -> Job | None:
        role = next(iter(pipeline.inputs))
        key = f"{route.pipeline}|{route.name}|{series.series_uid}:{series.instance_count}"
        if session.scalar(select(Job.id).where(Job.input_key == key)) is not None:
            logger.info("series %s: job for %s already exists for these instances", series.series_uid, route.name)
            return None
        job = Job(
            study_id=series.study_id,
            pipeline=route.pipeline,
            route=route.name,
            state=JobState.PENDING,
            priority=route.priority.value,
            priority_rank=route.priority.rank,
            inputs={role: series.series_uid},
            destinations=list(route.destinations),
            trigger_series_uid=series.series_uid,
            input_key=key,
            required_complete_at=now,
            queued_at=now,
        )
        session.add(job)
        session.flush()
        logger.info(
            "job %d PENDING: pipeline %s (route %s, %s) on series %s",
            job.id,
            route.pipeline,
            route.name,
            route.priority.value,
            series.series_uid,
        )
        return job

    def _study_job(
        self, session: Session, series: Series, route: RouteSettings, pipeline: PipelineSettings, now: datetime
    ) -> Job:
        job = session.scalar(
            select(Job).where(
                Job.study_id == series.study_id,
                Job.pipeline == route.pipeline,
                Job.route == route.name,
                Job.state == JobState.WAITING,
            )
        )
        if job is None:
            job = Job(
                study_id=series.study_id,
                pipeline=route.pipeline,
                route=route.name,
                state=JobState.WAITING,
                priority=route.priority.value,
                priority_rank=route.priority.rank,
                inputs={},
                destinations=list(route.destinations),
                trigger_series_uid=series.series_uid,
                deadline_at=now + timedelta(seconds=pipeline.study_timeout_s),
            )
            session.add(job)
            session.flush()
            logger.info(
                "job %d WAITING for the inputs of pipeline %s in study of series %s",
                job.id,
                route.pipeline,
                series.series_uid,
            )
        return job

    # -- assembly of multi-series jobs --------------------------------------------------
    def assemble_jobs(self, now: datetime) -> int:
        """Fill WAITING jobs' roles; promote to PENDING or fail on timeout."""
        n = 0
        with self.db.session() as session:
            jobs = session.scalars(select(Job).where(Job.state == JobState.WAITING).order_by(Job.id)).all()
            for job in jobs:
                if self._assemble_one(session, job, now):
                    n += 1
        return n

    def _assemble_one(self, session: Session, job: Job, now: datetime) -> bool:
        pipeline = self.settings.pipelines.get(job.pipeline)
        if pipeline is None:
            job.state = JobState.FAILED
            job.finished_at = now
            job.reason = f"pipeline {job.pipeline!r} is no longer configured"
            return True
        series_rows = session.scalars(select(Series).where(Series.study_id == job.study_id).order_by(Series.id)).all()
        ready: dict[str, Series] = {}
        arriving: set[str] = set()
        for series in series_rows:
            if self.rules.evaluate(series.header or {}).guard:
                continue
            roles = self.rules.role_matches(job.pipeline, series.header or {})
            for role in roles:
                if series.state in _READY_STATES:
                    if role not in ready or _newer(series, ready[role]):
                        ready[role] = series
                else:
                    arriving.add(role)
        required = [r for r, spec in pipeline.inputs.items() if spec.required]
        optional = [r for r, spec in pipeline.inputs.items() if not spec.required]
        missing = [r for r in required if r not in ready]
        if missing:
            if job.deadline_at is not None and now >= job.deadline_at:
                waited = int(round(pipeline.study_timeout_s))
                names = ", ".join(_role_name(r) for r in missing)
                job.state = JobState.FAILED
                job.finished_at = now
                job.failure_kind = "input"
                job.reason = (
                    f"required input {names} not received within {waited} s "
                    f"(pipeline {job.pipeline}; check that the PACS route sends "
                    f"{'these series' if len(missing) > 1 else 'this series'} and that the "
                    f"pipelines.{job.pipeline}.inputs matchers fit its headers: try `pacs-node rules test`)"
                )
                logger.warning("job %d FAILED: %s", job.id, job.reason)
                return True
            return False
        if job.required_complete_at is None:
            job.required_complete_at = now
        absent = [r for r in optional if r not in ready]
        grace_over = now >= job.required_complete_at + timedelta(seconds=pipeline.optional_grace_s)
        if absent and not grace_over:
            return False
        if any(r in arriving for r in required):
            return False  # a newer copy of a required series is still arriving
        inputs = {role: ready[role].series_uid for role in pipeline.inputs if role in ready}
        key = f"{job.pipeline}|{job.route}|" + ",".join(
            f"{role}={ready[role].series_uid}:{ready[role].instance_count}" for role in sorted(inputs)
        )
        if session.scalar(select(Job.id).where(Job.input_key == key)) is not None:
            job.state = JobState.CANCELLED
            job.finished_at = now
            job.reason = "the same inputs were already processed by an earlier job"
            return True
        job.inputs = inputs
        job.input_key = key
        job.state = JobState.PENDING
        job.queued_at = now
        logger.info(
            "job %d PENDING: pipeline %s with roles %s%s",
            job.id,
            job.pipeline,
            ", ".join(sorted(inputs)),
            f" (optional {', '.join(absent)} not received within {pipeline.optional_grace_s:g} s)" if absent else "",
        )
        return True


def _role_name(role: str) -> str:
    return role.upper() if len(role) <= 5 else role


def _newer(a: Series, b: Series) -> bool:
    return (a.completed_at or a.last_received_at, a.id) > (b.completed_at or b.last_received_at, b.id)


def _has_jobs_for(session: Session, series: Series) -> bool:
    jobs: Any = session.scalars(select(Job).where(Job.study_id == series.study_id)).all()
    return any(
        series.series_uid in (job.inputs or {}).values() or job.trigger_series_uid == series.series_uid for job in jobs
    )
