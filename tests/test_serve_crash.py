"""`pacs-node serve` in distributed mode (PostgreSQL + RabbitMQ), as a real process, killed with
SIGKILL in the middle of a transfer and in the middle of sending results, then restarted.

Every instance it acknowledged is in the store and the database; every delivery
it owed is completed after the restart; the destination receives each result's
SOP Instance UID, and a second time only the one it was storing when the node
died (a re-send of the same UID replaces, it is not a new instance).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom import AE
from sqlalchemy import select

from pacs_node.common.store import open_store
from pacs_node.config import settings_from_mapping
from pacs_node.deliver.scu import echo
from pacs_node.process.results import store_outputs
from storage.db import Database
from storage.models import Delivery, DeliveryState, Instance, Job, JobState, Series, Study
from tests import distributed_support as support
from tests.conftest import Made, RecordingSCP, dimse, wait_for
from tests.distributed_support import Broker, ChildProcess, distributed_config, new_prefix, write_config

# fixtures of tests/distributed_support.py
amqp, children, drop_queues = support.amqp, support.children, support.drop_queues

AET = "PACSNODE"


def _start_serve(serve: ChildProcess, port: int) -> None:
    serve.spawn()

    def answering() -> bool:
        serve.check_alive()
        try:
            return echo("127.0.0.1", port, calling_ae="PROBE", called_ae=AET, timeout=2) == 0
        except ConnectionError:
            return False

    wait_for(answering, 90, 0.1, "serve to answer C-ECHO")


def _associate(port: int, series: list[Dataset]) -> Any:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for ctx in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in series}:
        ae.add_requested_context(*ctx)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established
    return assoc


def test_serve_killed_mid_transfer_and_mid_dispatch_loses_and_duplicates_nothing(
    pg_url: str,
    amqp: Broker,
    tmp_path: Path,
    made: Made,
    recording_scp: Callable[..., RecordingSCP],
    children: list[ChildProcess],
    drop_queues: list[Any],
) -> None:
    # The destination holds its first C-STORE until the test opens the gate.
    gate, entered = threading.Event(), threading.Event()

    def held_first(_ds: Dataset) -> int:
        if not entered.is_set():
            entered.set()
            gate.wait(60)
        return 0x0000

    scp = recording_scp("PACS", status=held_first).start()
    cfg = distributed_config(
        tmp_path,
        database_url=pg_url,
        broker=amqp,
        prefix=new_prefix(),
        destinations={"pacs": dimse(scp)},
        pipelines={"spheres": {"model": "unused"}},
        dispatch={"poll_interval_s": 0.05, "timeout_s": 10, "lease_s": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.2},
    )
    settings = settings_from_mapping(cfg, environ={})
    drop_queues.append(settings)
    port = settings.dicom.port
    serve = ChildProcess(write_config(tmp_path / "pacs-node.yaml", cfg), ["serve"], tmp_path, "serve")
    children.append(serve)
    series = made.series

    # 1. SIGKILL with an association open: eight instances acknowledged, eight to come.
    _start_serve(serve, port)
    assoc = _associate(port, series)
    acked = [str(ds.SOPInstanceUID) for ds in series[:8] if int(assoc.send_c_store(ds).Status) == 0]
    assert len(acked) == 8
    serve.kill()
    try:
        status = assoc.send_c_store(series[8])
    except (RuntimeError, ConnectionError):
        status = None
    finally:
        assoc.abort()
    assert not (status and int(status.get("Status", -1)) == 0), "a killed node acknowledged an instance"

    # The restarted node holds every acknowledged instance; the sender sends the series again.
    _start_serve(serve, port)
    assoc = _associate(port, series)
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in series] == [0] * len(series)
    finally:
        assoc.release()
    db = Database(pg_url)
    store = open_store(settings)
    try:

        def indexed() -> dict[str, str] | None:
            with db.session() as s:
                rows = {i.sop_uid: i.path for i in s.scalars(select(Instance))}
            return rows if len(rows) == len(series) else None

        rows = wait_for(indexed, 30, 0.1, "every instance indexed once")
        assert set(acked) <= set(rows)
        for rel in rows.values():
            assert store.path(rel).is_file(), rel
        with db.session() as s:
            (only,) = s.scalars(select(Series)).all()
            assert only.instance_count == len(series)
            study_id = only.study_id
            assert s.scalar(select(Study.study_uid).where(Study.id == study_id)) == str(series[0].StudyInstanceUID)

        # 2. A job's results are stored with their deliveries (as a worker does); serve starts sending.
        with db.session() as s:
            job = Job(
                study_id=study_id,
                pipeline="spheres",
                route="spheres",
                state=JobState.DONE,
                inputs={"image": str(series[0].SeriesInstanceUID)},
                destinations=["pacs"],
            )
            s.add(job)
            s.flush()
            job_id = job.id
        outputs = store_outputs(settings, db, store, job_id, made.built)
        sent_uids = {o.sop_uid for o in outputs if o.kind.value != "SEG_LABELMAP"}  # "pacs" takes binary SEG
        assert len(sent_uids) == 3
        assert entered.wait(60), "the dispatcher never reached the destination"

        # SIGKILL while the destination stores the first result of the batch.
        serve.kill()
        with db.session() as s:
            in_flight = [d for d in s.scalars(select(Delivery)) if d.state is DeliveryState.IN_PROGRESS]
        assert len(in_flight) == 3, [(d.id, d.state) for d in in_flight]
        gate.set()  # the destination finishes storing it; the node never hears

        # 3. Restarted, the node sends what it owed once its old lease expired.
        _start_serve(serve, port)

        def delivered() -> list[Delivery] | None:
            serve.check_alive()
            with db.session() as s:
                rows = list(s.scalars(select(Delivery)))
            return rows if rows and all(d.state is DeliveryState.DELIVERED for d in rows) else None

        deliveries = wait_for(delivered, 60, 0.1, "every delivery completed after the restart")
        assert len(deliveries) == 3
        assert "re-queued: lease of dispatcher" in serve.log(), serve.log()[-3000:]
        assert scp.uids == sent_uids  # nothing else arrived
        first = str(scp.received[0].SOPInstanceUID)
        assert scp.requests[first] == 2  # stored when the node died, then re-sent with the same UID
        assert all(n == 1 for uid, n in scp.requests.items() if uid != first), scp.requests
        assert serve.stop() == 0, serve.log()[-3000:]
    finally:
        db.dispose()
