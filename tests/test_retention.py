"""Retention purges inputs days after their work ended, and nothing earlier."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select

from pacs_node.config import Settings
from pacs_node.retention import Retention
from pacs_node.synthetic import make_series, new_uid
from storage.models import Instance, Job, JobState, Series, utcnow
from tests.test_router import PIPELINES, ROUTES, Harness


def test_inputs_purged_after_jobs_finished_plus_retention(make_settings: Callable[..., Settings]) -> None:
    h = Harness(make_settings({"pipelines": PIPELINES, "routes": ROUTES, "retention": {"inputs_days": 2}}))
    try:
        study = new_uid()
        h.send(make_series(3, rows=8, cols=8, study_uid=study, SeriesDescription="PV"))  # routed to kidney: a job
        h.send(make_series(2, rows=8, cols=8, study_uid=study, SeriesDescription="arterial"))  # no rule: ignored
        h.send(make_series(2, rows=8, cols=8, SeriesDescription="other study, nothing routed"))
        h.tick(2)
        retention = Retention(h.settings.retention, h.db, h.store)
        with h.db.session() as s:
            paths = [h.store.path(i.path) for i in s.scalars(select(Instance))]
        assert len(paths) == 7 and all(p.exists() for p in paths)

        # The kidney job is still PENDING: its study is kept however old it is.
        # ...while the other study, where nothing was routed, expires on its own clock.
        assert retention.purge_inputs(utcnow() + timedelta(days=30)) == 2

        with h.db.session() as s:
            job = s.scalars(select(Job)).one()
            job.state = JobState.DONE
            job.finished_at = utcnow()
        assert retention.purge_inputs(utcnow() + timedelta(days=1)) == 0, "too early"
        assert retention.purge_inputs(utcnow() + timedelta(days=3)) == 5
        assert not any(p.exists() for p in paths)
        with h.db.session() as s:
            assert s.scalars(select(Instance)).all() == []
            assert all(x.purged_at is not None for x in s.scalars(select(Series)))
        assert retention.purge_inputs(utcnow() + timedelta(days=4)) == 0
    finally:
        h.close()


def test_retention_disabled_keeps_everything(make_settings: Callable[..., Settings]) -> None:
    h = Harness(make_settings({"retention": {"inputs_days": None}}))
    try:
        h.send(make_series(2, rows=8, cols=8))
        h.tick(2)
        assert Retention(h.settings.retention, h.db, h.store).purge_inputs(utcnow() + timedelta(days=999)) == 0
    finally:
        h.close()
