"""Distributed mode (issue 7): PostgreSQL + Celery workers.

Against the real services on loopback (PostgreSQL, RabbitMQ, Redis; mandatory
in CI): the settings that switch modes, the claim that makes a duplicate
message a no-op, the job lease and its reaper, the fence that keeps a result
from a worker presumed dead out of the database, STAT priority through both
brokers, and the whole path with two `pacs-node worker` processes, twenty jobs
in two pipeline groups and one worker SIGKILLed in the middle of a job.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from pacs_lab.model_packages import two_spheres
from pacs_lab.synthetic import make_oriented_series, write_series
from pacs_node.common.store import open_store
from pacs_node.config import Settings, settings_from_mapping
from pacs_node.deliver.scu import send_files
from pacs_node.errors import ConfigError
from pacs_node.process.distributed import publish_pending
from pacs_node.process.jobs import claim_job, reap_jobs
from pacs_node.process.worker import RunnerCache, execute_job
from storage.db import Database
from storage.models import Delivery, DeliveryState, Job, JobState, Output, Series, Study, utcnow
from tests import distributed_support as support
from tests.conftest import RecordingSCP, dimse, ingest, wait_for
from tests.distributed_support import Broker, ChildProcess, distributed_config, new_prefix, start_worker, write_config

# fixtures of tests/distributed_support.py
amqp, redis_broker, children, drop_queues = support.amqp, support.redis_broker, support.children, support.drop_queues

PG = "postgresql://u@db.example.org/pacs"


def _celery(**queue: Any) -> dict[str, Any]:
    return {"queue": {"backend": "celery", "broker_url": "amqp://pacs@mq.example.org:5672/site", **queue}}


@pytest.mark.parametrize(
    "data,needle",
    [
        (_celery(), "queue.backend: celery needs a PostgreSQL database_url"),
        ({**_celery(), "database_url": "sqlite:////tmp/x.db"}, "needs a PostgreSQL database_url"),
        ({"database_url": PG, "queue": {"backend": "celery"}}, "queue.broker_url: needed for queue.backend: celery"),
        ({"database_url": PG, **_celery(broker_url="amqp://u:secret@mq/")}, "queue.broker_url: no password"),
        ({"database_url": PG, **_celery(broker_url="http://mq/")}, "queue.broker_url: must start with"),
        ({"database_url": PG, **_celery(groups={"nope": "neuro"})}, "queue.groups: 'nope' is not defined"),
        ({"database_url": PG, **_celery(brokr_url="x")}, "queue.brokr_url: Extra inputs are not permitted"),
        ({"database_url": PG, **_celery(lease_s=10, heartbeat_s=5)}, "queue: lease_s: must be at least 3 x"),
        ({"queue": {"backend": "kafka"}}, "queue.backend"),
        ({"database_url": PG, **_celery(default_group="neuro.stat")}, "queue.default_group"),
    ],
)
def test_queue_settings_name_the_bad_key(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, environ={})
    assert needle in str(info.value), str(info.value)


def test_same_file_switches_modes_and_the_broker_password_stays_out_of_the_url(tmp_path: Path) -> None:
    pipelines = {"stroke": {"model": "m"}, "kidney": {"model": "m"}}
    embedded = settings_from_mapping({"pipelines": pipelines}, environ={})
    assert not embedded.distributed and embedded.queue.backend == "embedded"
    secret = tmp_path / "pw"
    secret.write_text("s3cr/t\n")
    s = settings_from_mapping(
        {
            "pipelines": pipelines,
            "database_url": PG,
            **_celery(groups={"stroke": "neuro"}, broker_password_file=str(secret)),
        },
        environ={},
    )
    assert s.distributed
    assert s.queue.group_of("stroke") == "neuro" and s.queue.group_of("kidney") == "default"
    assert s.queue.all_groups == ("default", "neuro")
    assert s.queue.queue_name("neuro") == "pacs-node.neuro"
    assert s.queue.broker_connection_url() == "amqp://pacs:s3cr%2Ft@mq.example.org:5672/site"
    assert "s3cr" not in s.queue.redacted_broker_url()
    r = settings_from_mapping(
        {"database_url": PG, **_celery(broker_url="redis://mq:6379/0", broker_password_env="MQ_PW")},
        environ={"MQ_PW": "pw"},
    )
    assert r.queue.broker_connection_url() == "redis://:pw@mq:6379/0"


def test_worker_command_refuses_the_embedded_mode_and_unknown_groups(tmp_path: Path) -> None:
    from pacs_node.process.celery_app import run_worker

    with pytest.raises(ConfigError, match="queue.backend: celery"):
        run_worker(settings_from_mapping({}, environ={}), groups=["default"])
    s = settings_from_mapping(
        {"database_url": PG, "pipelines": {"p": {"model": "m"}}, **_celery(groups={"p": "neuro"})}, environ={}
    )
    with pytest.raises(ConfigError, match=r"--queues: unknown group abdomen; the configured groups are default, neuro"):
        run_worker(s, groups=["neuro", "abdomen"])


# -- claim, lease and reaper on PostgreSQL -------------------------------------------------------------------------


def _pg_settings(pg_url: str, tmp_path: Path, package: Path | str = "m", **queue: Any) -> Settings:
    return settings_from_mapping(
        {
            "data_dir": str(tmp_path / "data"),
            "database_url": pg_url,
            "storage": {"min_free_mb": 0},
            "pipelines": {"spheres": {"model": str(package), "time_limit_s": 60}},
            "worker": {"max_attempts": 2},
            **_celery(lease_s=3, heartbeat_s=0.5, **queue),
        },
        environ={},
    )


def _job(db: Database, **kw: Any) -> int:
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == "1.2.3"))
        if study is None:
            study = Study(study_uid="1.2.3")
            s.add(study)
            s.flush()
        job = Job(study_id=study.id, pipeline="spheres", route="r", state=JobState.PENDING, **kw)
        s.add(job)
        s.flush()
        return int(job.id)


def _row(db: Database, job_id: int) -> Job:
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _age_heartbeat(db: Database, job_id: int, seconds: float) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_claim_wins_once_stale_messages_do_nothing_and_expired_leases_are_reaped(pg_url: str, tmp_path: Path) -> None:
    settings = _pg_settings(pg_url, tmp_path)
    db = Database(pg_url)
    db.upgrade()
    try:
        job_id = _job(db, input_key="a")
        # Two deliveries of the message for run 1: one claim wins.
        assert claim_job(db, job_id, "w1", 0) is True
        assert claim_job(db, job_id, "w2", 0) is False
        row = _row(db, job_id)
        assert (row.state, row.worker_id, row.attempts) == (JobState.RUNNING, "w1", 1)
        assert row.started_at is not None and row.heartbeat_at is not None
        # A fresh heartbeat keeps the job; a silent worker loses it after queue.lease_s.
        assert reap_jobs(db, settings) == {"timed_out": 0, "requeued": 0, "failed": 0}
        _age_heartbeat(db, job_id, 10)
        assert reap_jobs(db, settings)["requeued"] == 1
        row = _row(db, job_id)
        assert (row.state, row.worker_id, row.published_at, row.attempts) == (JobState.PENDING, None, None, 1)
        # The first message, redelivered late, is stale now; the re-published one runs.
        assert claim_job(db, job_id, "w2", 0) is False
        assert claim_job(db, job_id, "w2", 1) is True
        # After worker.max_attempts runs the job fails with the reason.
        _age_heartbeat(db, job_id, 10)
        assert reap_jobs(db, settings)["failed"] == 1
        row = _row(db, job_id)
        assert row.state is JobState.FAILED and row.failure_kind == "internal"
        assert "w2 sent no heartbeat" in (row.reason or "") and "worker.max_attempts" in (row.reason or "")
        assert claim_job(db, job_id, "w3", 2) is False  # a finished job is never claimed again

        # Past its pipeline's time limit, a job fails as a timeout even while its worker beats.
        slow = _job(db, input_key="b")
        assert claim_job(db, slow, "w1", 0)
        with db.session() as s:
            s.execute(update(Job).where(Job.id == slow).values(started_at=utcnow() - timedelta(seconds=61)))
        assert reap_jobs(db, settings)["timed_out"] == 1
        row = _row(db, slow)
        assert row.state is JobState.FAILED and row.failure_kind == "timeout"
        assert "pipelines.spheres.time_limit_s" in (row.reason or "")
    finally:
        db.dispose()


def test_publishing_marks_jobs_and_a_broker_failure_keeps_them_pending(pg_url: str, tmp_path: Path) -> None:
    settings = _pg_settings(pg_url, tmp_path, republish_s=60)
    db = Database(pg_url)
    db.upgrade()
    try:
        ids = [_job(db, input_key=str(i), priority_rank=rank) for i, rank in enumerate([1, 2, 0, 1])]
        sent: list[tuple[int, int]] = []

        def flaky(job_id: int, attempts: int, pipeline: str, rank: int) -> str:
            if len(sent) == 2:
                raise ConnectionError("broker down")
            sent.append((job_id, rank))
            return "q"

        with pytest.raises(ConnectionError):
            publish_pending(db, settings, flaky)
        assert sent == [(ids[2], 0), (ids[0], 1)]  # most urgent first
        published = {i: _row(db, i).published_at is not None for i in ids}
        assert published == {ids[0]: True, ids[1]: False, ids[2]: True, ids[3]: False}
        sent.clear()
        assert publish_pending(db, settings, lambda *a: sent.append((a[0], a[3])) or "q") == 2
        assert sent == [(ids[3], 1), (ids[1], 2)]
        assert publish_pending(db, settings, lambda *a: pytest.fail("published twice")) == 0
        # Not started long after it was published: a lost message is published again.
        later = utcnow() + timedelta(seconds=61)
        assert publish_pending(db, settings, lambda *a: "q", now=later) == 4
    finally:
        db.dispose()


def test_a_worker_presumed_dead_cannot_store_its_result(pg_url: str, tmp_path: Path, sphere_package: Path) -> None:
    """Worker 1's lease expires while it runs; worker 2 takes the job over. Whoever finishes first,
    the job's outputs and deliveries are recorded once, by the holder of the lease."""
    settings = _pg_settings(pg_url, tmp_path, sphere_package)
    db = Database(pg_url)
    db.upgrade()
    store = open_store(settings)
    series = make_oriented_series(two_spheres(), rows=32, cols=32, slices=16, SeriesDescription="spheres")
    try:
        ingest(settings, db, store, series, "MODALITY")
        with db.session() as s:
            study_id = s.scalars(select(Series.study_id)).one()
        job_id = _job(db, input_key="x", inputs={"image": str(series[0].SeriesInstanceUID)})
        with db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(study_id=study_id))
        cache = RunnerCache()
        assert claim_job(db, job_id, "w1", 0)

        class TakenOverWhileRunning:
            """The real model; while it runs, worker 1 falls silent and worker 2 claims the job."""

            def __init__(self, runner: Any) -> None:
                self.runner = runner
                self.manifest = runner.manifest

            def run(self, inputs: Any) -> Any:
                result = self.runner.run(inputs)
                _age_heartbeat(db, job_id, 10)
                assert reap_jobs(db, settings)["requeued"] == 1
                assert claim_job(db, job_id, "w2", 1)
                return result

        state = execute_job(
            job_id, settings, db, store, lambda m, g: TakenOverWhileRunning(cache(m, g)), worker_id="w1"
        )
        assert state is JobState.RUNNING  # now worker 2's
        with db.session() as s:
            assert s.scalars(select(Output)).all() == []
            assert s.scalars(select(Delivery)).all() == []
        assert execute_job(job_id, settings, db, store, cache, worker_id="w1") is JobState.RUNNING  # not its job
        assert execute_job(job_id, settings, db, store, cache, worker_id="w2") is JobState.DONE
        row = _row(db, job_id)
        assert (row.state, row.worker_id, row.attempts) == (JobState.DONE, "w2", 2)
        with db.session() as s:
            kinds = Counter(o.kind.value for o in s.scalars(select(Output)))
        assert kinds == Counter({"SEG": 1, "SR": 1, "KEY_IMAGE": 1})
    finally:
        db.dispose()


# -- STAT first through the broker ------------------------------------------------------------------------------


@pytest.mark.parametrize("broker_name", ["amqp", "redis_broker"])
def test_stat_jobs_keep_their_priority_in_the_broker(
    broker_name: str, request: pytest.FixtureRequest, pg_url: str, tmp_path: Path, drop_queues: list[Any]
) -> None:
    """Normal and low jobs are published first, a STAT job last: a worker's next message is the STAT job's."""
    from pacs_node.process.celery_app import declared_queues, make_celery, publish

    broker: Broker = request.getfixturevalue(broker_name)
    cfg = distributed_config(
        tmp_path, database_url=pg_url, broker=broker, prefix=new_prefix(), pipelines={"spheres": {"model": "m"}}
    )
    settings = settings_from_mapping(cfg, environ={})
    drop_queues.append(settings)
    db = Database(pg_url)
    db.upgrade()
    app = make_celery(settings)
    try:

        def send(job_id: int, attempts: int, pipeline: str, rank: int) -> str:
            return publish(app, settings, job_id, attempts, pipeline, rank)

        normal = [_job(db, input_key=f"n{i}", priority_rank=1, priority="normal") for i in range(3)]
        low = _job(db, input_key="low", priority_rank=2, priority="low")
        assert publish_pending(db, settings, send) == 4
        stat = _job(db, input_key="stat", priority_rank=0, priority="stat")
        assert publish_pending(db, settings, send) == 1

        order: list[int] = []
        with app.connection_for_read() as conn:
            queue = declared_queues(settings)[0].bind(conn.default_channel)
            queue.declare()

            def next_message() -> bool:
                msg = queue.get(no_ack=True)
                if msg is None:
                    return False
                assert msg.headers["task"] == "pacs_node.run_job"
                args = msg.decode()[0]
                order.append(int(args[0]))
                assert args[1] == 0  # attempts so far: the claim's condition
                return True

            wait_for(next_message, 10, 0.05, "the first message")
            while len(order) < 5:
                wait_for(next_message, 10, 0.05, f"message {len(order) + 1}")
            assert queue.get(no_ack=True) is None
        assert order == [stat, *normal, low]
    finally:
        app.close()
        db.dispose()


# -- the whole path: serve + two workers -------------------------------------------------------------------------


def test_two_workers_run_twenty_jobs_once_and_finish_the_job_of_a_killed_worker(
    pg_url: str,
    amqp: Broker,
    tmp_path: Path,
    sphere_package: Path,
    run_node: Callable[[Settings], Any],
    recording_scp: Callable[..., RecordingSCP],
    children: list[ChildProcess],
    drop_queues: list[Any],
) -> None:
    scp = recording_scp("PACS").start()
    cfg = distributed_config(
        tmp_path,
        database_url=pg_url,
        broker=amqp,
        prefix=new_prefix(),
        groups={"brain": "neuro", "belly": "abdomen"},
        destinations={"pacs": dimse(scp)},
        pipelines={
            name: {"model": str(sphere_package), "inputs": {"image": {"match": {"SeriesDescription": f"{name}.*"}}}}
            for name in ("brain", "belly")
        },
        routes=[{"name": name, "pipeline": name, "destinations": ["pacs"]} for name in ("brain", "belly")],
    )
    settings = settings_from_mapping(cfg, environ={})
    drop_queues.append(settings)
    node = run_node(settings)  # serve in this process: SCP, router, enqueuer + reaper, dispatcher
    assert node.workers is None and node.enqueuer is not None
    config = write_config(tmp_path / "pacs-node.yaml", cfg)
    workers = {name: start_worker(children, config, tmp_path, name, "neuro,abdomen") for name in ("wa", "wb")}

    # 19 small series, then one larger one whose job (a few seconds) is killed while it runs. The larger is sent
    # last so that its job cannot have finished before the test starts watching for it.
    small = [
        make_oriented_series(
            two_spheres(), rows=32, cols=32, slices=16, SeriesDescription=f"{kind} {i}", ImagesInAcquisition=16
        )
        for i, kind in enumerate(["brain"] * 9 + ["belly"] * 10)
    ]
    big = make_oriented_series(
        two_spheres(), rows=128, cols=128, slices=48, SeriesDescription="brain big", ImagesInAcquisition=48
    )
    big_uid = str(big[0].SeriesInstanceUID)
    for i, series in enumerate([*small, big]):
        files = write_series(tmp_path / "in" / str(i), series)
        statuses = send_files("127.0.0.1", node.scp.port, [str(f) for f in files], called_ae="PACSNODE")
        assert set(statuses.values()) == {0}

    def jobs() -> list[Job]:
        with node.db.session() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def big_running() -> Job | None:
        for w in workers.values():
            w.check_alive()
        big_job = next((j for j in jobs() if j.inputs.get("image") == big_uid), None)
        if big_job is not None and big_job.state in (JobState.DONE, JobState.FAILED):
            raise AssertionError(
                f"the big job ended ({big_job.state.value}, {big_job.reason}) before it was seen running; "
                f"worker logs:\n{workers['wa'].log()[-3000:]}\n{workers['wb'].log()[-3000:]}"
            )
        return big_job if big_job is not None and big_job.state is JobState.RUNNING else None

    def states() -> str:
        return ", ".join(f"{j.id}:{j.state.value}/{j.attempts}" for j in jobs())

    running = wait_for(big_running, 120, 0.05, "the big job to run on a worker", details=states)
    victim_name = (running.worker_id or "").split("@")[0]
    assert victim_name in workers, running.worker_id
    survivor_name = next(n for n in workers if n != victim_name)
    workers[victim_name].kill()  # SIGKILL to its process group, in the middle of the job

    def all_done() -> list[Job] | None:
        workers[survivor_name].check_alive()
        js = jobs()
        assert len(js) <= 20, [(j.id, j.inputs, j.route) for j in js]
        failed = [j for j in js if j.state is JobState.FAILED]
        assert not failed, [(j.id, j.reason) for j in failed]
        return js if len(js) == 20 and all(j.state is JobState.DONE for j in js) else None

    done = wait_for(all_done, 150, 0.2, "twenty jobs DONE", details=states)
    big_job = next(j for j in done if j.inputs["image"] == big_uid)
    assert big_job.attempts == 2 and (big_job.worker_id or "").startswith(f"{survivor_name}@"), (
        big_job.attempts,
        big_job.worker_id,
    )
    assert all(j.attempts == 1 for j in done if j.id != big_job.id), [(j.id, j.attempts) for j in done]
    assert {j.pipeline for j in done} == {"brain", "belly"}
    ran_on = Counter((j.worker_id or "").split("@")[0] for j in done)
    assert set(ran_on) <= set(workers) and ran_on[survivor_name] >= 1
    # The killed worker's message came back from the broker: a duplicate, and a no-op.
    survivor_log = workers[survivor_name].log()
    assert f"job {big_job.id}: message for run 1 is a duplicate or stale" in survivor_log, survivor_log[-4000:]

    # One live set of outputs per job, each file once in the store.
    with node.db.session() as s:
        outputs = list(s.scalars(select(Output).order_by(Output.id)))
    per_job = Counter((o.job_id, o.kind.value) for o in outputs)
    assert set(per_job.values()) == {1} and len(per_job) == 60, per_job
    assert {o.job_id for o in outputs} == {j.id for j in done}
    assert all(o.superseded_at is None for o in outputs)
    assert len({o.sop_uid for o in outputs}) == 60
    for o in outputs:
        assert node.store.path(o.path).is_file(), o.path

    # Every result delivered once: one Delivery per output, one C-STORE per SOP Instance UID.
    def delivered() -> list[Delivery] | None:
        with node.db.session() as s:
            rows = list(s.scalars(select(Delivery)))
        return rows if len(rows) == 60 and all(d.state is DeliveryState.DELIVERED for d in rows) else None

    wait_for(delivered, 60, 0.2, "sixty deliveries")
    assert scp.uids == {o.sop_uid for o in outputs}
    assert set(scp.requests.values()) == {1}, [u for u, n in scp.requests.items() if n > 1]
    assert workers[survivor_name].stop() == 0, workers[survivor_name].log()[-4000:]


def test_a_worker_waits_for_the_schema_and_the_shared_store_then_says_what_is_missing(
    pg_url: str, tmp_path: Path
) -> None:
    from pacs_node.errors import PacsNodeError
    from pacs_node.process.celery_app import check_worker_host

    settings = _pg_settings(pg_url, tmp_path)
    with pytest.raises(PacsNodeError, match=r"schema is at nothing, this worker needs \d+: start `pacs-node serve`"):
        check_worker_host(settings, wait_s=0)
    db = Database(pg_url)
    db.upgrade()
    db.dispose()
    with pytest.raises(PacsNodeError, match="has no store/: mount the shared data_dir on this host"):
        check_worker_host(settings, wait_s=0)
    settings.store_dir.mkdir(parents=True)
    check_worker_host(settings, wait_s=0)  # ready
