"""Retention: purge received inputs some days after their study's work is over.

The free-space watermark refuses new instances when the disk is nearly full;
this policy is what keeps the disk from getting there. A study's inputs are
purged ``retention.inputs_days`` after the last of its jobs finished, or, when
no job was ever made for it (nothing routed), after its last series was routed
or ignored. Rows stay (marked ``purged_at``) so the history remains visible.
Results produced by the node follow ``retention.results_days`` once outputs
and deliveries exist.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pacs_node.config import RetentionSettings
from storage.db import Database
from storage.filestore import FileStore
from storage.models import TERMINAL_JOB_STATES, Instance, Job, SeriesState, Study, utcnow

logger = logging.getLogger(__name__)


class Retention:
    """Periodic purge of expired inputs.

    Args:
        settings: the ``retention`` section.
        db: the database.
        store: the file store.
    """

    def __init__(self, settings: RetentionSettings, db: Database, store: FileStore) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Purge every ``interval_s`` in a background thread."""
        if self.settings.inputs_days is None or self._thread is not None:
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
            try:
                self.purge_inputs()
            except Exception:
                logger.exception("retention pass failed; will try again")
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
