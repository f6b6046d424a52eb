"""Retention purges inputs days after their work ended, results days after their deliveries
ended, and nothing earlier."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select

from pacs_lab.synthetic import make_series, new_uid
from pacs_node.config import Settings
from pacs_node.deliver.dispatcher import Dispatcher
from pacs_node.process.results import store_outputs
from pacs_node.retain.retention import Retention
from storage.models import Instance, Job, JobState, Series, utcnow
from tests.conftest import Env, Made, RecordingSCP, dimse
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


def test_results_purged_days_after_their_deliveries_ended(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    scp = recording_scp("PACS").start()
    env = queued({"pacs": dimse(scp)}, retention={"results_days": 2})
    retention = Retention(env.settings.retention, env.db, env.store, data_dir=env.settings.data_dir)
    outputs = env.outputs()
    files = [env.store.path(o.path) for o in outputs.values()]
    folder = env.settings.results_dir / str(env.job_id)
    assert len(files) == 4 and all(f.exists() for f in files) and (folder / "key-image.png").exists()

    # Deliveries still pending: kept however old, except the labelmap SEG no destination wanted.
    assert retention.purge_results(utcnow() + timedelta(days=30)) == 1
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 3
    assert retention.purge_results(utcnow() + timedelta(days=1)) == 0, "too early"
    assert retention.purge_results(utcnow() + timedelta(days=3)) == 3
    assert not any(f.exists() for f in files) and not folder.exists()
    assert all(o.purged_at is not None for o in env.outputs().values())
    assert env.states() == {"delivered": 3}, "delivery rows stay for the history"
    assert retention.purge_results(utcnow() + timedelta(days=4)) == 0


def test_a_result_file_shared_with_a_live_result_is_kept(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP], made: Made
) -> None:
    env = queued({"pacs": dimse(recording_scp("PACS"))}, retention={"results_days": 2})
    with env.db.session() as s:
        first = s.get(Job, env.job_id)
        assert first is not None
        rerun = Job(study_id=first.study_id, pipeline="spheres", route="spheres", state=JobState.DONE,
                    inputs=first.inputs, destinations=first.destinations, input_key="rerun")  # fmt: skip
        s.add(rerun)
        s.flush()
        rerun_id = rerun.id
    store_outputs(env.settings, env.db, env.store, rerun_id, made.built)  # same UIDs, same files
    retention = Retention(env.settings.retention, env.db, env.store, data_dir=env.settings.data_dir)
    # The first job's four (deliveries cancelled) and the re-run's labelmap SEG (no destination).
    assert retention.purge_results(utcnow() + timedelta(days=3)) == 5
    live = [o for o in env.outputs().values() if o.purged_at is None]
    assert sorted(o.kind.value for o in live) == ["KEY_IMAGE", "SEG", "SR"]
    assert all(env.store.path(o.path).exists() for o in live), "a file a live result uses was deleted"
    assert not (env.settings.results_dir / str(env.job_id)).exists()
    assert (env.settings.results_dir / str(rerun_id) / "key-image.png").exists()
