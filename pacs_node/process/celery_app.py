"""Celery glue of the distributed mode: the app, its queues, the job task, and ``pacs-node worker``.

There is no module-level app: :func:`make_celery` builds one from the one
:class:`~pacs_node.config.Settings` object, in ``serve`` (to publish) and in
``pacs-node worker`` (to consume). The task calls
:func:`pacs_node.process.worker.run_queued_job`, which claims the job the message
names and runs the same :func:`~pacs_node.process.worker.execute_job` as the embedded
mode; no pipeline or inference code knows which mode it runs in.

Delivery guarantees, and who gives them:

* a message is acknowledged after its task ran (``acks_late``), requeued when
  the worker process running it dies (``task_reject_on_worker_lost``), and a
  worker holds one unacknowledged message per pool process (prefetch 1);
* a broker's redelivery can take long (Redis: ``visibility_timeout``), so the
  job also holds a lease in the database (``Job.worker_id`` + ``heartbeat_at``
  renewed every ``queue.heartbeat_s``), and serve re-publishes a job whose
  lease expired (:func:`pacs_node.process.jobs.reap_jobs`);
* duplicates are harmless: the claim is one conditional UPDATE on the job's
  state and attempt count, so only one delivery of a message runs it, and a
  stale message (an earlier attempt's) changes nothing.

STAT first across the broker: every group's queue is a priority queue (RabbitMQ
``x-max-priority``; on Redis, kombu's priority sub-queues, read in order); a
job's priority rank becomes the message priority, so with prefetch 1 a worker
takes the most urgent job waiting in its queues.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import Queue

from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.errors import ConfigError, PacsNodeError
from pacs_node.process.jobs import time_limit_s
from pacs_node.process.worker import RunnerCache, run_queued_job
from storage.db import MIGRATIONS_DIR, Database

logger = logging.getLogger(__name__)

TASK_NAME = "pacs_node.run_job"
#: seconds beyond a pipeline's time limit after which Celery kills the process still running the job
#: (serve has failed the job at the limit; this frees the worker)
HARD_LIMIT_GRACE_S = 30.0
#: RabbitMQ priorities: higher is served first; STAT, NORMAL, LOW by Priority.rank 0, 1, 2
_AMQP_PRIORITY = {0: 9, 1: 5, 2: 1}
#: Redis (kombu's emulation): a lower number is served first
_REDIS_PRIORITY = {0: 0, 1: 5, 2: 9}
MAX_PRIORITY = 9


def is_redis(settings: Settings) -> bool:
    """The broker is Redis (priorities run the other way round there)."""
    return (settings.queue.broker_url or "").startswith(("redis://", "rediss://"))


def broker_priority(settings: Settings, rank: int) -> int:
    """The message priority of a job of priority rank ``rank`` (0 STAT, 1 normal, 2 low) on this broker."""
    table = _REDIS_PRIORITY if is_redis(settings) else _AMQP_PRIORITY
    return table.get(rank, table[1])


def declared_queues(settings: Settings, groups: Sequence[str] | None = None) -> list[Queue]:
    """The broker queues of ``groups`` (default: every group), declared the same way by publisher and worker."""
    q = settings.queue
    return [
        Queue(
            q.queue_name(group),
            routing_key=q.queue_name(group),
            queue_arguments={"x-max-priority": MAX_PRIORITY},
        )
        for group in (groups if groups is not None else q.all_groups)
    ]


def make_celery(settings: Settings, *, groups: Sequence[str] | None = None) -> Celery:
    """A Celery app for ``settings.queue`` (publisher side; :func:`run_worker` adds the task).

    Raises:
        ConfigError: the queue backend is not celery, or the broker password is unavailable.
    """
    q = settings.queue
    if q.backend != "celery":
        raise ConfigError("queue.backend: celery is needed for the distributed mode (it is 'embedded')")
    app = Celery("pacs_node", set_as_current=False)
    transport: dict[str, Any] = {}
    if is_redis(settings):
        transport = {
            "visibility_timeout": q.visibility_timeout_s,
            "priority_steps": list(range(MAX_PRIORITY + 1)),
            "queue_order_strategy": "priority",
            "socket_timeout": q.publish_timeout_s,
            "socket_connect_timeout": q.publish_timeout_s,
        }
    app.conf.update(
        broker_url=q.broker_connection_url(),
        broker_connection_timeout=q.publish_timeout_s,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        task_queues=declared_queues(settings, groups),
        task_default_queue=q.queue_name(q.default_group),
        task_create_missing_queues=False,
        task_queue_max_priority=MAX_PRIORITY,
        task_default_priority=broker_priority(settings, 1),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1},
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,  # no pidbox queue per worker name: nothing here uses it
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_disable_prefetch=is_redis(settings),  # Redis: take a message only when a process is free
    )
    return app


def publish(app: Celery, settings: Settings, job_id: int, attempts: int, pipeline: str, rank: int) -> str:
    """Send the message that runs ``job_id`` (at ``attempts`` runs so far) to its group's queue.

    Returns the queue's name. Raises what kombu raises when the broker cannot be reached.
    """
    group = settings.queue.group_of(pipeline)
    name = settings.queue.queue_name(group)
    limit = time_limit_s(settings, pipeline) + HARD_LIMIT_GRACE_S
    app.send_task(
        TASK_NAME,
        args=[job_id, attempts],
        queue=name,
        routing_key=name,
        priority=broker_priority(settings, rank),
        time_limit=limit,
        ignore_result=True,
    )
    return name


# -- the worker side --------------------------------------------------------------------------------------------


@dataclass
class _ProcessContext:
    """What one pool process keeps between jobs: its database connections, the store and warm models."""

    pid: int
    db: Any
    store: Any
    runners: Any


_context: _ProcessContext | None = None  # per pool process, made at its first job (never inherited)


def _process_context(settings: Settings) -> _ProcessContext:
    global _context
    if _context is None or _context.pid != os.getpid():
        _context = _ProcessContext(os.getpid(), Database(settings.db_url), open_store(settings), RunnerCache())
    return _context


def _register_task(app: Celery, settings: Settings) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(self: Any, job_id: int, attempts: int) -> str:

        ctx = _process_context(settings)
        worker_id = f"{self.request.hostname}/{os.getpid()}"
        try:
            state = run_queued_job(job_id, attempts, worker_id, settings, ctx.db, ctx.store, ctx.runners)
        except SQLAlchemyError as exc:  # the database is unreachable: try again later, the message stays
            retries = int(self.request.retries or 0)
            logger.warning("job %d: database error (%s); message retried (retry %d)", job_id, exc, retries + 1)
            raise self.retry(exc=exc, countdown=min(60, 2**retries), max_retries=20) from exc
        return "duplicate" if state is None else state.value


def check_worker_host(settings: Settings, *, wait_s: float = 120.0) -> None:
    """Wait until the shared data_dir is mounted and the database is at this version's schema.

    ``serve`` migrates the database and creates the store; a worker started at
    the same time waits for it rather than racing the migration.

    Raises:
        PacsNodeError: not ready after ``wait_s`` seconds, saying what is missing.
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    deadline = time.monotonic() + wait_s
    db = Database(settings.db_url)
    logged: set[str] = set()
    try:
        while True:
            problem = None
            try:
                with db.engine.connect() as conn:
                    current = MigrationContext.configure(conn).get_current_revision()
                if current != head:
                    if current is not None and current > (head or ""):
                        raise PacsNodeError(
                            f"the database schema ({current}) is newer than this worker's ({head}): "
                            "upgrade pacs-node on this host to the version serve runs"
                        )
                    problem = (
                        f"the database schema is at {current or 'nothing'}, this worker needs {head}: "
                        "start `pacs-node serve` (it migrates) or run `pacs-node db upgrade`"
                    )
            except SQLAlchemyError as exc:
                problem = f"the database {db.engine.url.render_as_string(hide_password=True)} is unreachable: {exc}"
            if problem is None and not settings.store_dir.is_dir():
                problem = (
                    f"data_dir {settings.data_dir} has no store/: mount the shared data_dir on this host at the "
                    "same path as serve's (workers read inputs and write results there)"
                )
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise PacsNodeError(f"worker not started: {problem}")
            if problem not in logged:
                logger.info("waiting: %s", problem)
                logged.add(problem)
            time.sleep(1.0)
    finally:
        db.dispose()


#: imported before the pool forks, so that a pool process's first job does not pay for them (monai alone
#: takes seconds); nnU-Net's backend only where it is installed
PRELOAD = (
    "inference.pipeline",
    "inference.backends.native",
    "inference.backends.nnunet",
    "inference.outputs.seg",
    "inference.outputs.sr",
    "inference.outputs.keyimage",
    "pacs_node.process.results",
)


def _preload() -> None:
    """Import the inference stack once in the worker's main process (no torch operation runs before the fork)."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            logger.debug("not preloaded: %s (%s)", name, exc)


def run_worker(
    settings: Settings,
    *,
    groups: Sequence[str],
    concurrency: int = 1,
    threads: int | None = None,
    name: str | None = None,
    wait_s: float = 120.0,
) -> int:
    """Consume the queues of ``groups`` until SIGTERM (warm shutdown: running jobs finish) or SIGINT.

    Each of the ``concurrency`` pool processes runs one job at a time and keeps
    its models loaded between jobs.

    Raises:
        ConfigError: not in celery mode, or an unknown group.
        PacsNodeError: the shared store or the database is not ready in time.
    """
    q = settings.queue
    if q.backend != "celery":
        raise ConfigError(
            "pacs-node worker needs queue.backend: celery (with a PostgreSQL database_url and a broker_url); "
            "in the embedded mode serve runs the workers itself (worker.processes)"
        )
    unknown = [g for g in groups if g not in q.all_groups]
    if unknown or not groups:
        raise ConfigError(
            f"--queues: unknown group {', '.join(unknown) or '(none given)'}; "
            f"the configured groups are {', '.join(q.all_groups)} (queue.groups, queue.default_group)"
        )
    if concurrency < 1:
        raise ConfigError("--concurrency: at least 1")
    check_worker_host(settings, wait_s=wait_s)

    _preload()
    from celery import signals

    app = make_celery(settings, groups=groups)
    _register_task(app, settings)
    node = name or f"pacs-node.{os.getpid()}@{socket.gethostname()}"
    queues = [q.queue_name(g) for g in groups]

    def _init_process(**_: Any) -> None:
        global _context
        _context = None
        if threads:
            import torch

            torch.set_num_threads(threads)
        if settings.worker.preload:  # the models of this worker's queues, loaded and warm before the first job
            mine = [p for p in settings.pipelines if q.group_of(p) in groups]
            _process_context(settings).runners.preload(settings, pipelines=mine)

    def _ready(**_: Any) -> None:
        logger.info(
            "worker %s ready: queues %s, %d process(es)%s, broker %s",
            node,
            ", ".join(queues),
            concurrency,
            f", {threads} torch thread(s) each" if threads else "",
            q.redacted_broker_url(),
        )

    signals.worker_process_init.connect(_init_process, weak=False)
    signals.worker_ready.connect(_ready, weak=False)
    worker = app.Worker(
        hostname=node,
        queues=queues,
        concurrency=concurrency,
        pool_cls="prefork",
        loglevel=settings.log_level,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        quiet=True,
        optimization="fair",
    )
    worker.start()
    return int(worker.exitcode or 0)
