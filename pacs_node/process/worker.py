"""The inference worker: claims PENDING jobs (STAT first) and runs their pipeline.

Embedded mode: workers are child processes of ``pacs-node serve``, each keeping
its models warm. The parent's :class:`WorkerSupervisor` enforces each
pipeline's time limit (a job that runs too long is stopped by killing its
worker, failed with that reason, and the worker restarted) and recovers from a
worker that dies (its job is retried up to ``worker.max_attempts`` runs, then
failed). A job that fails never stops the worker.

Distributed mode (``queue.backend: celery``): a broker message names a job and
the attempt it was published for; :func:`run_queued_job` claims exactly that
job (a duplicate or stale message changes nothing), renews the job's lease with
a :class:`~pacs_node.process.jobs.Heartbeat` while it runs, and calls the same
:func:`execute_job`.

Both modes claim, finish, fail and reap jobs with the functions of
:mod:`pacs_node.process.jobs`; this module only decides when.

:func:`execute_job` is the plain function that does one job; the loops, the
supervisor and the Celery task are glue around it. It stores a job's outputs,
queues their deliveries and moves the job to DONE in one transaction, and only
while this worker still holds the job (:func:`~pacs_node.process.jobs.finish_job`
as the fence of :func:`~pacs_node.process.results.store_outputs`): a worker
whose lease was taken over (it was presumed dead, the job re-queued) discards
its result, so a job's outputs exist once whatever the timing.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_node.common.logs import configure_logging
from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.process.jobs import (
    Heartbeat,
    JobTakenOver,
    Lost,
    RunningJob,
    claim_job,
    claim_next,
    fail_job,
    finish_job,
    reap_jobs,
)
from pacs_node.process.results import build_outputs, emit_notices, store_outputs
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, Job, JobState, Series

if TYPE_CHECKING:  # torch loads only in worker processes
    from inference.manifest import Manifest
    from inference.pipeline import SegmentationResult

logger = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job cannot run; the message is the reason a person reads."""


class Runner(Protocol):
    """What the worker needs from a loaded model (:class:`inference.pipeline.ModelRunner`)."""

    manifest: Manifest

    def run(self, inputs: dict[str, list[Dataset]]) -> SegmentationResult: ...


RunnerFactory = Callable[[str, bool], Runner]


def load_inputs(db: Database, store: FileStore, job: Job) -> dict[str, list[Dataset]]:
    """Read every input series of ``job`` from the store, by role.

    Raises:
        JobFailed: a series or one of its files is gone (purged, deleted).
    """
    inputs: dict[str, list[Dataset]] = {}
    with db.session() as session:
        for role, series_uid in (job.inputs or {}).items():
            series = session.scalar(select(Series).where(Series.series_uid == series_uid))
            if series is None:
                raise JobFailed(f"input {role}: series {series_uid} is no longer on the node")
            paths = session.scalars(select(Instance.path).where(Instance.series_id == series.id)).all()
            if not paths:
                raise JobFailed(f"input {role}: series {series_uid} has no instances left (purged by retention?)")
            datasets: list[Dataset] = []
            for rel in paths:
                try:
                    datasets.append(dcmread(store.path(rel)))
                except FileNotFoundError as exc:
                    raise JobFailed(f"input {role}: file {rel} is missing from the store") from exc
                except Exception as exc:
                    raise JobFailed(f"input {role}: file {rel} cannot be read: {exc}") from exc
            inputs[role] = datasets
    return inputs


def execute_job(
    job_id: int,
    settings: Settings,
    db: Database,
    store: FileStore,
    runner_for: RunnerFactory,
    *,
    worker_id: str | None = None,
) -> JobState:
    """Run one claimed job to DONE or FAILED; never raises for a job's own failure.

    ``worker_id`` is the claimant; a job held by another worker by now (this
    one's lease expired before it started) is left alone.
    """
    from inference.errors import InferenceError, ModelPackageError

    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state is not JobState.RUNNING:
            return job.state if job else JobState.CANCELLED
        if worker_id is not None and job.worker_id != worker_id:
            logger.warning("job %d: now held by worker %s, not %s; not run here", job_id, job.worker_id, worker_id)
            return job.state
        session.expunge(job)
    t0 = time.perf_counter()
    try:
        pipeline = settings.pipelines.get(job.pipeline)
        if pipeline is None:
            raise JobFailed(f"pipeline {job.pipeline!r} is not configured any more")
        runner = runner_for(pipeline.model, pipeline.device != "cpu")
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        inputs = load_inputs(db, store, job)
        t_read = time.perf_counter() - t1
        result = runner.run(inputs)
        out_dir = settings.results_dir / str(job.id)
        out_dir.mkdir(parents=True, exist_ok=True)
        label_path = out_dir / "labels.nii.gz"
        result.save_labels(label_path)
        t2 = time.perf_counter()
        built, metrics = build_outputs(settings, job, result, inputs, runner.manifest)
        timings: dict[str, float] = {}

        def finish(session: Session) -> None:
            """In the outputs' transaction, before it commits: DONE, if this worker still holds the job."""
            timings.update({"load_model": round(t_load, 3), "read_inputs": round(t_read, 3), **result.timings})
            timings["outputs"] = round(time.perf_counter() - t2, 3)
            timings["total"] = round(time.perf_counter() - t0, 3)
            finish_job(
                session,
                job_id,
                job.worker_id,
                metrics=metrics,
                timings=timings,
                model_name=result.model["name"],
                model_version=result.model["version"],
                model_checksums=result.model["checksums"],
                result_path=(
                    str(label_path.relative_to(settings.data_dir))
                    if label_path.is_relative_to(settings.data_dir)
                    else str(label_path)
                ),
            )

        try:
            store_outputs(settings, db, store, job_id, built, fence=finish)
        except JobTakenOver:
            with db.session() as session:
                row = session.get(Job, job_id)
                state = row.state if row else JobState.CANCELLED
                owner = row.worker_id if row else None
            logger.warning(
                "job %d was taken away while running (now %s, worker %s); result of worker %s discarded",
                job_id,
                state.value,
                owner,
                job.worker_id,
            )
            return state
        logger.info(
            "job %d DONE: pipeline %s in %.1f s (%s)",
            job_id,
            job.pipeline,
            timings["total"],
            ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "total"),
        )
        return JobState.DONE
    except ModelPackageError as exc:
        reason, kind = str(exc), "model"
    except (JobFailed, InferenceError) as exc:
        reason, kind = str(exc), "input"
    except Exception as exc:  # a failing job never stops the worker
        logger.error("job %d: unexpected error\n%s", job_id, traceback.format_exc())
        reason, kind = f"internal error ({type(exc).__name__}: {exc}); see the node's log", "internal"
    fail_job(db, job_id, reason, worker_id=job.worker_id, kind=kind)
    return JobState.FAILED


def run_queued_job(
    job_id: int,
    attempts: int,
    worker_id: str,
    settings: Settings,
    db: Database,
    store: FileStore,
    runner_for: RunnerFactory,
) -> JobState | None:
    """Run the job a broker message names, if this worker wins its claim (distributed mode).

    Returns the job's final state, or ``None`` when the message was a duplicate
    or stale (the job is running elsewhere, finished, or was re-queued since):
    nothing was changed and the message can be acknowledged.
    """
    if not claim_job(db, job_id, worker_id, attempts):
        with db.session() as session:
            row = session.get(Job, job_id)
            now_state = f"{row.state.value}, {row.attempts} runs" if row else "no such job"
        logger.info(
            "job %d: message for run %d is a duplicate or stale (%s); nothing to do", job_id, attempts + 1, now_state
        )
        return None
    logger.info("worker %s runs job %d (run %d)", worker_id, job_id, attempts + 1)
    with Heartbeat(db, job_id, worker_id, settings.queue.heartbeat_s):
        return execute_job(job_id, settings, db, store, runner_for, worker_id=worker_id)


class RunnerCache:
    """Loads each model package once per worker process and keeps it warm."""

    def __init__(self) -> None:
        self._runners: dict[tuple[str, bool], Runner] = {}

    def __call__(self, model: str, allow_gpu: bool) -> Runner:
        key = (str(Path(model).resolve()), allow_gpu)
        runner = self._runners.get(key)
        if runner is None:
            from inference.pipeline import ModelRunner

            logger.info("loading model package %s", key[0])
            runner = ModelRunner(key[0], allow_gpu=allow_gpu)
            self._runners[key] = runner
        return runner

    def preload(self, settings: Settings, *, pipelines: Sequence[str] | None = None) -> None:
        """Load every configured pipeline's model (or those of ``pipelines``) and warm it up (``worker.preload``).

        A model that cannot be loaded is logged and left for its first job, which then
        fails with the reason; the worker starts all the same.
        """
        from inference.errors import InferenceError, ModelPackageError

        for name, pipeline in settings.pipelines.items():
            if pipelines is not None and name not in pipelines:
                continue
            try:
                runner = self(pipeline.model, pipeline.device != "cpu")
                warm_up = getattr(runner, "warm_up", None)
                if callable(warm_up):
                    warm_up()
            except (ModelPackageError, InferenceError, OSError, RuntimeError) as exc:
                logger.warning("pipeline %s: model %s not preloaded: %s", name, pipeline.model, exc)


def worker_loop(
    settings: Settings, worker_id: str, stop: threading.Event, *, runner_for: RunnerFactory | None = None
) -> None:
    """Claim and execute jobs until ``stop`` is set."""

    db = Database(settings.db_url)
    store = open_store(settings)
    runners = runner_for or RunnerCache()
    if settings.worker.preload and isinstance(runners, RunnerCache):
        runners.preload(settings)
    logger.info("worker %s ready", worker_id)
    try:
        while not stop.is_set():
            job_id = claim_next(db, worker_id)
            if job_id is None:
                try:
                    emit_notices(settings, db, store)
                except Exception:
                    logger.exception("writing not-processed notices failed; will retry")
                stop.wait(settings.worker.poll_interval_s)
                continue
            logger.info("worker %s runs job %d", worker_id, job_id)
            execute_job(job_id, settings, db, store, runners, worker_id=worker_id)
    finally:
        db.dispose()


def _worker_process(settings: Settings, worker_id: str) -> None:  # pragma: no cover - child process

    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    worker_loop(settings, worker_id, stop)


class WorkerSupervisor:
    """Runs ``worker.processes`` worker processes and enforces time limits.

    Args:
        settings: the node's settings.
        db: the database (the supervisor's own connection).
    """

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._procs: dict[str, mp.process.BaseProcess] = {}
        self._ctx = mp.get_context("spawn")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host = socket.gethostname()

    def start(self) -> None:
        """Start the workers and the watchdog thread."""
        if self.settings.worker.processes <= 0:
            return
        self._requeue_orphans()
        for i in range(self.settings.worker.processes):
            self._spawn(f"{self._host}:{os.getpid()}:w{i}")
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the workers (a running job is re-queued at the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for proc in self._procs.values():
            proc.terminate()
        for proc in self._procs.values():
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._procs.clear()

    def _spawn(self, worker_id: str) -> None:
        proc = self._ctx.Process(target=_worker_process, args=(self.settings, worker_id), name=worker_id, daemon=True)
        proc.start()
        self._procs[worker_id] = proc
        logger.info("started worker %s (pid %s)", worker_id, proc.pid)

    def _requeue_orphans(self) -> None:
        """Jobs left RUNNING by workers of an earlier run of this host go back to PENDING (or fail)."""
        prefix = f"{self._host}:"

        def orphaned(job: RunningJob) -> Lost | None:
            if job.worker_id and job.worker_id.startswith(prefix):
                return Lost("the node stopped while it was running")
            return None

        reap_jobs(self.db, self.settings, lost=orphaned, time_limits=False)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.check()
            except Exception:
                logger.exception("worker supervision failed; retrying")

    def check(self) -> None:
        """One pass: enforce time limits, re-queue the job of a worker that died, replace dead workers."""
        dead = {
            worker_id: proc.exitcode
            for worker_id, proc in self._procs.items()
            if not proc.is_alive() and not self._stop.is_set()
        }

        def died(job: RunningJob) -> Lost | None:
            worker_id = job.worker_id or ""
            return Lost(f"its worker process died (exit code {dead[worker_id]})") if worker_id in dead else None

        def kill(job: RunningJob) -> str:
            worker_id = job.worker_id or ""
            proc = self._procs.get(worker_id)
            if proc is not None and proc.is_alive():
                proc.kill()
                proc.join(10)
                if not proc.is_alive() and not self._stop.is_set():
                    dead[worker_id] = proc.exitcode  # replaced below
            return "the worker was restarted"

        reap_jobs(self.db, self.settings, lost=died, workers=list(self._procs), stop_worker=kill)
        for worker_id, code in dead.items():
            if code not in (0, -signal.SIGKILL):
                logger.error("worker %s died with exit code %s; restarting it", worker_id, code)
            self._spawn(worker_id)
