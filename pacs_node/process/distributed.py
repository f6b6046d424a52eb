"""The serve side of the distributed mode: publish PENDING jobs, reap expired leases.

With ``queue.backend: celery``, ``serve`` runs no inference. Its :class:`Enqueuer`
loop (a thread beside the router and the dispatcher) does, every
``queue.poll_interval_s`` or when the router wakes it:

1. :func:`~pacs_node.process.jobs.reap_jobs` (the same pass the embedded
   supervisor runs): a RUNNING job past its pipeline's ``time_limit_s`` fails
   (``failure_kind`` timeout; its worker's result would be discarded), and one
   whose worker sent no heartbeat for ``queue.lease_s`` goes back to PENDING to
   be published again, or fails once it has had ``worker.max_attempts`` runs.
   A broker redelivers the message of a dead worker too, but only when it
   notices (RabbitMQ at once when the connection drops; Redis after its
   visibility timeout, an hour by default); the lease bounds that wait.
2. :func:`publish_pending`: PENDING jobs not yet published (or published more
   than ``queue.republish_s`` ago and still not started: a lost message) are
   sent, most urgent first, to their group's queue; then marked published.
   A crash in between publishes them again at the next start, which is harmless:
   the worker's claim is conditional, a duplicate message changes nothing.
3. "not processed" notices for jobs that failed for their input (the embedded
   workers write them when idle; here serve does, in one place).

Rows stay the source of truth: the broker only carries "job N, attempt k".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from pacs_node.config import Settings
from pacs_node.process.jobs import reap_jobs
from pacs_node.process.results import emit_notices
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Job, JobState, utcnow

logger = logging.getLogger(__name__)

#: jobs published per pass (the rest follow at the next, without waiting for the interval)
PUBLISH_BATCH = 200

Publisher = Callable[[int, int, str, int], str]
"""(job id, attempts so far, pipeline, priority rank) -> queue name; raises when the broker is unreachable."""


def publish_pending(db: Database, settings: Settings, send: Publisher, now: datetime | None = None) -> int:
    """Publish PENDING jobs that need it, most urgent first; returns how many were published.

    Stops at the first broker error (raised to the caller); what was published
    before it is marked, the rest stays for the next pass.
    """
    now = now or utcnow()
    republish_before = now - timedelta(seconds=settings.queue.republish_s)
    with db.session() as session:
        rows = session.execute(
            select(Job.id, Job.attempts, Job.pipeline, Job.priority_rank, Job.published_at)
            .where(
                Job.state == JobState.PENDING,
                or_(Job.published_at.is_(None), Job.published_at < republish_before),
            )
            .order_by(Job.priority_rank, Job.id)
            .limit(PUBLISH_BATCH)
        ).all()
    sent: list[tuple[int, int]] = []
    try:
        for job_id, attempts, pipeline, rank, published_at in rows:
            queue = send(job_id, attempts, pipeline, rank)
            sent.append((job_id, attempts))
            if published_at is None:
                logger.info("job %d published to queue %s (run %d)", job_id, queue, attempts + 1)
            else:
                logger.warning(
                    "job %d published again to queue %s: not started %d s after it was published "
                    "(is a worker consuming %s? see queue.republish_s)",
                    job_id,
                    queue,
                    int((now - published_at).total_seconds()),
                    queue,
                )
    finally:
        if sent:
            with db.session() as session:
                for job_id, attempts in sent:
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.state == JobState.PENDING, Job.attempts == attempts)
                        .values(published_at=now)
                        .execution_options(synchronize_session=False)
                    )
    return len(sent)


class Enqueuer:
    """The loop of the distributed mode in serve: reap leases, publish PENDING jobs, write notices.

    Args:
        settings: the node's settings (``queue``, ``pipelines``, ``worker.max_attempts``).
        db: the database (PostgreSQL).
        store: the file store (for not-processed notices).
        publisher: sends one job's message (default: Celery, from ``settings.queue``).
    """

    def __init__(
        self, settings: Settings, db: Database, store: FileStore, *, publisher: Publisher | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self._publisher = publisher
        self._app: Any = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker_down = False

    def _send(self, job_id: int, attempts: int, pipeline: str, rank: int) -> str:
        if self._publisher is not None:
            return self._publisher(job_id, attempts, pipeline, rank)
        from pacs_node.process.celery_app import make_celery, publish

        if self._app is None:
            self._app = make_celery(self.settings)
        return publish(self._app, self.settings, job_id, attempts, pipeline, rank)

    def start(self) -> None:
        """Start the loop thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="enqueuer", daemon=True)
            self._thread.start()
            logger.info(
                "distributed mode: jobs go to queues %s at %s; lease %g s",
                ", ".join(self.settings.queue.queue_name(g) for g in self.settings.queue.all_groups),
                self.settings.queue.redacted_broker_url(),
                self.settings.queue.lease_s,
            )

    def stop(self) -> None:
        """Stop the loop (jobs not yet published are published at the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self._app is not None:
            self._app.close()
            self._app = None

    def wake(self) -> None:
        """Run a pass now (the router calls this when it made jobs PENDING)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            more = False
            try:
                more = self.tick()
            except Exception:
                logger.exception("enqueuer pass failed; retrying")
            if not more:
                self._wake.wait(self.settings.queue.poll_interval_s)
            self._wake.clear()

    def tick(self) -> bool:
        """One pass; returns True when a full batch was published (more may be waiting)."""
        reap_jobs(self.db, self.settings)
        try:
            n = publish_pending(self.db, self.settings, self._send)
        except Exception as exc:
            if not self._broker_down:
                logger.error(
                    "cannot publish jobs to the broker %s (%s: %s); they stay PENDING and are published when it "
                    "is back",
                    self.settings.queue.redacted_broker_url(),
                    type(exc).__name__,
                    exc,
                )
                self._broker_down = True
            return False
        if self._broker_down:
            logger.info("broker %s reachable again", self.settings.queue.redacted_broker_url())
            self._broker_down = False
        try:
            emit_notices(self.settings, self.db, self.store)
        except Exception:
            logger.exception("writing not-processed notices failed; will retry")
        return n >= PUBLISH_BATCH
