"""Retention: purge received inputs and produced results some days after their work is over.

The free-space watermark refuses new instances when the disk is nearly full;
this policy is what keeps the disk from getting there. A study's inputs are
purged ``retention.inputs_days`` after the last of its jobs finished, or, when
no job was ever made for it (nothing routed), after its last series was routed
or ignored. A result (SEG, SR, key image, notice) is purged
``retention.results_days`` after the last of its deliveries ended (delivered,
failed or cancelled), or after it was made when it had no destination; one
with a delivery still pending or in progress is kept however old. A job's
results folder (label volume, key image PNG) goes with its last result. Rows
stay (marked ``purged_at``) so the history remains visible.
"""

from __future__ import annotations

import logging
import shutil
import threading
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, case, delete, func, select
from sqlalchemy.orm import Session

from pacs_node.config import RetentionSettings
from storage.db import Database
from storage.filestore import FileStore
from storage.models import (
    TERMINAL_DELIVERY_STATES,
    TERMINAL_JOB_STATES,
    Delivery,
    Instance,
    Job,
    Output,
    SeriesState,
    Study,
    utcnow,
)

logger = logging.getLogger(__name__)


class Retention:
    """Periodic purge of expired inputs and results.

    Args:
        settings: the ``retention`` section.
        db: the database.
        store: the file store.
        data_dir: where ``results/<job id>`` folders and key image PNGs live (``Settings.data_dir``);
            without it only the results' DICOM files are purged.
    """

    def __init__(
        self, settings: RetentionSettings, db: Database, store: FileStore, *, data_dir: Path | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.data_dir = data_dir
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Purge every ``interval_s`` in a background thread."""
        if (self.settings.inputs_days is None and self.settings.results_days is None) or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while True:
            for purge in (self.purge_inputs, self.purge_results):
                try:
                    purge()
                except Exception:
                    logger.exception("retention pass (%s) failed; will try again", purge.__name__)
            if self._stop.wait(self.settings.interval_s):
                return

    def purge_inputs(self, now: datetime | None = None) -> int:
        """Delete input files of studies whose work ended before the cutoff.

        Returns the number of instance files removed.
        """
        if self.settings.inputs_days is None:
            return 0
        now = now or utcnow()
        cutoff = now - timedelta(days=self.settings.inputs_days)
        removed = 0
        with self.db.session() as session:
            for study in session.scalars(select(Study)).all():
                if not _expired(session, study, cutoff):
                    continue
                removed += self._purge_study(session, study, now)
        if removed:
            logger.info("retention: purged %d input instances older than %g days", removed, self.settings.inputs_days)
        return removed

    def _purge_study(self, session: Session, study: Study, now: datetime) -> int:
        n = 0
        for series in study.series:
            if series.purged_at is not None:
                continue
            for inst in session.scalars(select(Instance).where(Instance.series_id == series.id)):
                if self.store.delete(inst.path):
                    n += 1
            session.execute(delete(Instance).where(Instance.series_id == series.id))
            series.purged_at = now
        logger.info("retention: purged inputs of study %s (%d files)", study.study_uid, n)
        return n

    def purge_results(self, now: datetime | None = None) -> int:
        """Delete the files of results whose deliveries all ended before the cutoff.

        A file shared with a result that stays (a re-run wrote the same UIDs to
        the same path) is kept. Returns the number of results purged.
        """
        if self.settings.results_days is None:
            return 0
        now = now or utcnow()
        cutoff = now - timedelta(days=self.settings.results_days)
        with self.db.session() as session:
            ended = (
                select(
                    Delivery.output_id,
                    func.max(Delivery.updated_at).label("ended"),
                    func.sum(_open_delivery()).label("open"),
                )
                .group_by(Delivery.output_id)
                .subquery()
            )
            rows = session.execute(
                select(Output, ended.c.ended, ended.c.open)
                .outerjoin(ended, ended.c.output_id == Output.id)
                .where(Output.purged_at.is_(None))
                .order_by(Output.id)
            ).all()
            expired: list[Output] = []
            for output, last, still_open in rows:
                if still_open:
                    continue
                finished = last if last is not None else output.created_at
                if finished.tzinfo is None:  # an aggregate on SQLite comes back as naive UTC
                    finished = finished.replace(tzinfo=now.tzinfo)
                if finished <= cutoff:
                    expired.append(output)
            if not expired:
                return 0
            ids = {o.id for o in expired}
            kept_paths = set(
                session.scalars(
                    select(Output.path).where(
                        Output.purged_at.is_(None), Output.id.not_in(ids), Output.path.in_({o.path for o in expired})
                    )
                )
            )
            jobs: set[int] = set()
            for output in expired:
                if output.path not in kept_paths:
                    self.store.delete(output.path)
                if output.png_path and self.data_dir is not None:
                    (self.data_dir / output.png_path).unlink(missing_ok=True)
                output.purged_at = now
                jobs.add(output.job_id)
            session.flush()
            folders = self._purge_job_folders(session, jobs)
        logger.info(
            "retention: purged %d results (and %d job folders) whose deliveries ended over %g days ago",
            len(expired),
            folders,
            self.settings.results_days,
        )
        return len(expired)

    def _purge_job_folders(self, session: Session, job_ids: set[int]) -> int:
        if self.data_dir is None:
            return 0
        n = 0
        for job_id in sorted(job_ids):
            live = session.scalar(
                select(func.count(Output.id)).where(Output.job_id == job_id, Output.purged_at.is_(None))
            )
            folder = self.data_dir / "results" / str(job_id)
            if not live and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                n += 1
        return n


def _open_delivery() -> ColumnElement[int]:
    """1 for a delivery not yet ended, else 0."""
    return case((Delivery.state.in_(list(TERMINAL_DELIVERY_STATES)), 0), else_=1)


def _expired(session: Session, study: Study, cutoff: datetime) -> bool:
    series = study.series
    if not series or all(s.purged_at is not None for s in series):
        return False
    if any(s.state not in (SeriesState.ROUTED, SeriesState.IGNORED) for s in series):
        return False  # still arriving or not yet routed
    jobs = session.scalars(select(Job).where(Job.study_id == study.id)).all()
    if any(j.state not in TERMINAL_JOB_STATES for j in jobs):
        return False
    if jobs:
        ended = max((j.finished_at or j.updated_at) for j in jobs)
    else:
        ended = max((s.routed_at or s.last_received_at) for s in series)
    return ended <= cutoff
