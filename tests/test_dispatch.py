"""Results reach their destinations: real pynetdicom Storage SCPs and a real HTTP
STOW-RS server on 127.0.0.1, on SQLite and PostgreSQL.

The SEG, SR and key image are made once per session by the real pipeline (the
sphere test model); each test ingests the source series through the real
receive path, stores the results with ``store_outputs`` (which queues the
deliveries) and lets the dispatcher send them.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select

from pacs_node.config import RETURN_TO_SENDER, Settings
from pacs_node.deliver.base import backoff_delay, classify_dimse_status
from pacs_node.deliver.dicomweb import parse_stow_response
from pacs_node.deliver.dispatcher import Dispatcher, claim, reap_expired_leases
from pacs_node.deliver.ledger import DeliveryNotFound, DeliveryStateError, cancel_delivery, retry_delivery
from pacs_node.errors import ConfigError
from pacs_node.process.results import store_outputs
from pacs_node.query import list_deliveries
from storage.db import Database
from storage.models import Delivery, DeliveryState, Job, JobState, OutputKind, Series, utcnow
from tests.conftest import Env, Made, RecordingSCP, dimse, free_port, wait_for


def assert_same_dataset(received: Dataset, stored: Path) -> None:
    """The peer holds the stored object: same elements with the same values, same pixel bytes."""
    a = dcmread(stored)
    assert [el.tag for el in received] == [el.tag for el in a]
    diffs = [str(el.tag) for el in a if el.value != received[el.tag].value]
    assert not diffs, f"element values differ: {diffs}"
    if "PixelData" in a:
        assert received.PixelData == a.PixelData


# -- DIMSE ---------------------------------------------------------------------------------------------------------


def test_results_reach_dimse_peers_once_each_with_their_seg_type(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    binary = recording_scp("BINARY").start()
    labelmap = recording_scp("LABELMAP").start()
    env = queued({"pacs": dimse(binary), "viewer": dimse(labelmap, seg_type="labelmap")})
    outs = env.outputs()
    by_kind = {o.kind: o for o in outs.values()}
    assert env.sop_uids("pacs") == {by_kind[k].sop_uid for k in (OutputKind.SEG, OutputKind.SR, OutputKind.KEY_IMAGE)}
    # a LABELMAP destination also gets the BINARY SEG, which the SR references
    assert env.sop_uids("viewer") == {
        by_kind[k].sop_uid for k in (OutputKind.SEG_LABELMAP, OutputKind.SEG, OutputKind.SR, OutputKind.KEY_IMAGE)
    }
    assert env.states() == {"pending": 7}

    dispatcher = Dispatcher(env.settings, env.db, env.store, worker_id="test")
    assert dispatcher.run_once() == 7
    assert env.states() == {"delivered": 7}
    for scp, name in ((binary, "pacs"), (labelmap, "viewer")):
        assert scp.uids == env.sop_uids(name)
        assert set(scp.requests.values()) == {1}
        assert set(scp.calling_aes) == {"PACSNODE"}
        for ds in scp.received:
            out = next(o for o in outs.values() if o.sop_uid == ds.SOPInstanceUID)
            assert ds.SOPClassUID == out.sop_class_uid
            assert_same_dataset(ds, env.store.path(out.path))
    for d in env.deliveries():
        assert (d.attempts, d.last_status, d.last_error, d.worker_id, d.lease_until) == (1, 0, None, None, None)
        assert d.delivered_at is not None and d.started_at is not None

    # Nothing is due any more: a second pass sends nothing.
    assert dispatcher.run_once() == 0
    assert set(binary.requests.values()) == {1} and set(labelmap.requests.values()) == {1}


def test_destination_down_results_wait_and_arrive_once_when_it_comes_up(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    scp = recording_scp("PACS")  # its port is reserved, nothing listens yet
    env = queued({"pacs": dimse(scp)}, dispatch={"max_attempts": 1000})
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    dispatcher.start()
    try:
        wait_for(
            lambda: all(d.attempts >= 2 and d.state is DeliveryState.PENDING for d in env.deliveries()),
            what="two failed attempts per delivery while the peer is down",
        )
        for d in env.deliveries():
            assert not d.permanent and d.next_attempt_at is not None
            assert "connection refused" in (d.last_error or ""), d.last_error
        scp.start()
        wait_for(lambda: env.states() == {"delivered": 3}, what="delivery once the peer is up")
    finally:
        dispatcher.stop()
    assert scp.uids == env.sop_uids("pacs")
    assert set(scp.requests.values()) == {1}, f"sent more than once: {scp.requests}"
    assert all(d.attempts >= 3 for d in env.deliveries())


def test_permanent_refusal_ends_failed_after_a_bounded_number_of_attempts(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    refusing = recording_scp("REFUSER", status=0xA900).start()
    rejecting = recording_scp("REJECTER").start()
    env = queued({"refuser": dimse(refusing), "wrong-ae": dimse(rejecting, ae_title="NOT-ITS-AE")})
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    dispatcher.start()
    try:
        wait_for(lambda: env.states() == {"failed": 6}, what="every delivery failed")
    finally:
        dispatcher.stop()
    for d in env.deliveries():
        assert d.permanent and d.attempts == 2, (d.destination, d.attempts)
        assert "refused permanently 2 times" in (d.last_error or "")
        if d.destination == "refuser":
            assert d.last_status == 0xA900 and "0xA900" in (d.last_error or "")
        else:
            assert "Rejected Permanent" in (d.last_error or "")
    assert set(refusing.requests.values()) == {2}, "exactly two C-STOREs per instance, then no more"
    assert refusing.received == [] and rejecting.requests == Counter()


def test_transient_refusal_is_retried_and_a_warning_counts_as_delivered(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    seen: Counter[str] = Counter()

    def busy_then_coerce(ds: Dataset) -> int:
        seen[str(ds.SOPInstanceUID)] += 1
        return 0xA700 if seen[str(ds.SOPInstanceUID)] <= 2 else 0xB000

    flaky = recording_scp("FLAKY", status=busy_then_coerce).start()
    full = recording_scp("FULL", status=0xA702).start()
    env = queued({"flaky": dimse(flaky), "full": dimse(full)})
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    dispatcher.start()
    try:
        wait_for(lambda: env.states() == {"delivered": 3, "failed": 3}, what="flaky delivered, full failed")
    finally:
        dispatcher.stop()
    for d in env.deliveries():
        assert not d.permanent
        if d.destination == "flaky":
            assert d.attempts == 3 and d.last_status == 0xB000
            assert "warning 0xB000" in (d.last_error or "")
        else:
            assert d.attempts == 4 and d.last_status == 0xA702
            assert "out of resources" in (d.last_error or "") and "gave up after 4 attempts" in (d.last_error or "")
    assert set(flaky.requests.values()) == {3} and set(full.requests.values()) == {4}


def test_max_age_ends_retries(queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]) -> None:
    down = recording_scp("DOWN")
    env = queued({"down": dimse(down)}, dispatch={"max_age_s": 0.5, "max_attempts": 1000})
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    deadline_hit = wait_for(
        lambda: dispatcher.run_once() >= 0 and env.states() == {"failed": 3}, what="deliveries aged out"
    )
    assert deadline_hit
    for d in env.deliveries():
        assert "older than dispatch.max_age_s" in (d.last_error or "") and d.attempts < 1000


def test_a_crashed_dispatchers_lease_expires_and_another_delivers(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    scp = recording_scp("PACS").start()
    env = queued({"pacs": dimse(scp)})
    ids = claim(env.db, "pacs", "crashed-host:1:dispatch", limit=10, lease_s=0.2)
    assert len(ids) == 3
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 0, "leased rows are not due"
    wait_for(lambda: reap_expired_leases(env.db, env.settings.dispatch) == 3, what="the lease to expire")
    for d in env.deliveries():
        assert d.state is DeliveryState.PENDING and d.worker_id is None and "lease" in (d.last_error or "")
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 3
    assert env.states() == {"delivered": 3}
    assert all(d.attempts == 2 for d in env.deliveries())
    assert set(scp.requests.values()) == {1}


def test_two_dispatchers_never_claim_the_same_delivery(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    a, b, c = (recording_scp(t) for t in ("A", "B", "C"))
    env = queued({"a": dimse(a), "b": dimse(b), "c": dimse(c)})  # 9 deliveries
    claimed: dict[str, list[int]] = {"one": [], "two": []}
    barrier = threading.Barrier(2)

    def claimer(name: str) -> None:
        db = Database(env.settings.db_url)  # its own engine, as another process would have
        try:
            barrier.wait()
            for _ in range(20):
                for dest in ("a", "b", "c"):
                    claimed[name] += claim(db, dest, name, limit=1, lease_s=60)
        finally:
            db.dispose()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = claimed["one"] + claimed["two"]
    assert sorted(ids) == sorted(d.id for d in env.deliveries()), claimed
    assert len(set(ids)) == len(ids) == 9
    for d in env.deliveries():
        owner = "one" if d.id in claimed["one"] else "two"
        assert (d.state, d.worker_id, d.attempts) == (DeliveryState.IN_PROGRESS, owner, 1)


def test_deliveries_to_a_destination_no_longer_configured_fail_at_once(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    env = queued({"gone": {}})
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 3
    for d in env.deliveries():
        assert d.state is DeliveryState.FAILED and d.attempts == 1
        assert "'gone' is no longer configured" in (d.last_error or "")


def test_superseding_results_cancel_unsent_deliveries(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP], made: Made
) -> None:
    scp = recording_scp("PACS")
    env = queued({"pacs": dimse(scp)})
    with env.db.session() as s:
        first = s.get(Job, env.job_id)
        assert first is not None
        rerun = Job(
            study_id=first.study_id,
            pipeline="spheres",
            route="spheres",
            state=JobState.DONE,
            inputs=first.inputs,
            destinations=first.destinations,
            trigger_series_uid=first.trigger_series_uid,
            input_key="rerun",
        )
        s.add(rerun)
        s.flush()
        rerun_id = rerun.id
    store_outputs(env.settings, env.db, env.store, rerun_id, made.built)
    by_job = Counter((d.job_id, d.state.value) for d in env.deliveries())
    assert by_job == {(env.job_id, "cancelled"): 3, (rerun_id, "pending"): 3}
    old = [d for d in env.deliveries() if d.job_id == env.job_id]
    assert all(f"superseded by the results of job {rerun_id}" in (d.last_error or "") for d in old)
    with env.db.session() as s, pytest.raises(DeliveryStateError, match=f"superseded by job {rerun_id}"):
        retry_delivery(s, old[0].id)


def test_return_to_sender_sends_results_to_the_calling_ae(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    modality = recording_scp("MODALITY").start()  # the AE title the series came from (see queued)
    env = queued({}, route={"return_to_sender": {"port": modality.port}})
    assert {d.destination for d in env.deliveries()} == {RETURN_TO_SENDER}
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 3
    assert env.states() == {"delivered": 3}
    assert modality.uids == env.sop_uids(RETURN_TO_SENDER)


def test_return_to_sender_without_a_dimse_sender_fails_with_the_reason(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    env = queued({}, route={"return_to_sender": {"port": free_port()}})
    with env.db.session() as s:
        series = s.scalars(select(Series)).one()
        series.calling_ae = None  # as for a series received over STOW-RS
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 3
    for d in env.deliveries():
        assert d.state is DeliveryState.FAILED and d.attempts == 1
        assert "did not arrive over DIMSE" in (d.last_error or "")


# -- operator actions ------------------------------------------------------------------------------------------------


def test_retry_and_cancel(queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]) -> None:
    scp = recording_scp("PACS", status=0xC001).start()
    env = queued({"pacs": dimse(scp)}, dispatch={"permanent_max_attempts": 1})
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    dispatcher.run_once()
    assert env.states() == {"failed": 3}
    first, second, third = env.deliveries()

    with env.db.session() as s, pytest.raises(DeliveryNotFound, match="no delivery with id 999"):
        retry_delivery(s, 999)
    with env.db.session() as s:
        row = retry_delivery(s, first.id)
        assert (row.state, row.attempts, row.permanent) == (DeliveryState.PENDING, 0, False)
    with env.db.session() as s:
        assert cancel_delivery(s, second.id).state is DeliveryState.CANCELLED
    with env.db.session() as s, pytest.raises(DeliveryStateError, match="only failed or cancelled"):
        retry_delivery(s, first.id)
    with env.db.session() as s, pytest.raises(DeliveryStateError, match="only pending or failed"):
        cancel_delivery(s, second.id)
    with env.db.session() as s:
        assert [r.delivery.id for r in list_deliveries(s, states=["failed"]).items] == [third.id]
        assert [r.delivery.id for r in list_deliveries(s, states=[DeliveryState.PENDING]).items] == [first.id]

    scp.status = 0x0000
    assert dispatcher.run_once() == 1
    with env.db.session() as s:
        row = s.get(Delivery, first.id)
        assert row is not None and row.state is DeliveryState.DELIVERED and row.attempts == 1
        retry_delivery(s, second.id)  # a cancelled delivery can be re-queued as well
    assert dispatcher.run_once() == 1
    assert env.states() == {"delivered": 2, "failed": 1}
    with env.db.session() as s, pytest.raises(DeliveryStateError, match="is delivered"):
        retry_delivery(s, first.id)


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """``main()`` configures logging onto the captured stderr; put the handlers back afterwards."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in ("", "pynetdicom", "alembic")}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_deliveries_cli(
    queued: Callable[..., Env],
    recording_scp: Callable[..., RecordingSCP],
    tmp_path: Path,
    capsys: Any,
    keep_logging: None,
) -> None:
    import yaml

    from pacs_node.app.cli import main

    scp = recording_scp("PACS", status=0xA900).start()
    env = queued({"pacs": dimse(scp)}, dispatch={"permanent_max_attempts": 1})
    Dispatcher(env.settings, env.db, env.store).run_once()
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(json.loads(env.settings.model_dump_json())))

    assert main(["--config", str(config), "deliveries", "list", "--state", "failed", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and {r["state"] for r in rows} == {"failed"}
    assert {r["kind"] for r in rows} == {"SEG", "SR", "KEY_IMAGE"} and all(r["last_status"] == 0xA900 for r in rows)

    assert main(["--config", str(config), "deliveries", "list"]) == 0
    table = capsys.readouterr().out
    assert "failed" in table and "0xA900" in table

    target = rows[0]["id"]
    assert main(["--config", str(config), "deliveries", "retry", str(target)]) == 0
    assert f"delivery {target}" in capsys.readouterr().out
    assert main(["--config", str(config), "deliveries", "retry", str(target)]) == 1
    assert "only failed or cancelled" in capsys.readouterr().err
    assert main(["--config", str(config), "deliveries", "cancel", "424242"]) == 1
    assert "no delivery with id 424242" in capsys.readouterr().err
    assert main(["--config", str(config), "deliveries", "list", "--state", "pending", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == [target]


# -- STOW-RS ---------------------------------------------------------------------------------------------------------


class StowServer:
    """A small real STOW-RS server: parses multipart/related bodies and answers from a script.

    ``script`` is called with the received instances (SOP Instance UID -> bytes) and
    returns (HTTP status, headers, DICOM JSON body or None).
    """

    def __init__(self, script: Callable[[dict[str, bytes]], tuple[int, dict[str, str], Any]]) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self.stored: dict[str, bytes] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                ctype = self.headers["Content-Type"]
                boundary = ctype.split("boundary=")[1].split(";")[0].strip('"')
                parts = body.split(b"--" + boundary.encode())
                instances: dict[str, bytes] = {}
                for part in parts[1:-1]:
                    head, _, data = part.partition(b"\r\n\r\n")
                    assert b"application/dicom" in head
                    data = data.removesuffix(b"\r\n")
                    instances[str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
                server.requests.append({"path": self.path, "headers": dict(self.headers), "instances": instances})
                status, headers, payload = server.script(instances)
                if status in (200, 202):
                    for uid in instances:
                        if uid not in str(payload.get("00081198", "")):
                            server.stored[uid] = instances[uid]
                out = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def referenced(uids: Any, failed: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids if u not in (failed or {})],
        }
    }
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [r]}}
                for u, r in failed.items()
            ],
        }
    return body


@pytest.fixture
def stow_server() -> Iterator[Callable[..., StowServer]]:
    made: list[StowServer] = []

    def make(script: Callable[[dict[str, bytes]], tuple[int, dict[str, str], Any]]) -> StowServer:
        server = StowServer(script)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def test_stow_rs_with_a_bearer_token_from_a_file_retries_a_503_and_sends_the_stored_bytes(
    queued: Callable[..., Env], stow_server: Callable[..., StowServer], tmp_path: Path
) -> None:
    calls = Counter[str]()

    def script(instances: dict[str, bytes]) -> tuple[int, dict[str, str], Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            return 503, {"Retry-After": "0"}, None
        return 200, {}, referenced(instances)

    server = stow_server(script)
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    env = queued({"web": {"type": "dicomweb", "url": server.url + "/", "auth": "bearer", "token_file": str(token)}})
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    assert dispatcher.run_once() == 3  # one request, 503
    assert env.states() == {"pending": 3}
    assert all(d.last_status == 503 and "HTTP 503" in (d.last_error or "") for d in env.deliveries())
    wait_for(lambda: dispatcher.run_once() and env.states() == {"delivered": 3}, what="the retry after the 503")
    assert len(server.requests) == 2, "one request per batch"
    request = server.requests[-1]
    assert request["path"] == "/dicom-web/studies"
    assert request["headers"]["Authorization"] == "Bearer s3cret-token"
    assert request["headers"]["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    outs = {o.sop_uid: o for o in env.outputs().values()}
    assert set(server.stored) == env.sop_uids("web")
    for uid, data in server.stored.items():
        assert data == env.store.path(outs[uid].path).read_bytes(), "bytes differ from the stored object"
    assert all(d.last_status == 200 and d.attempts == 2 for d in env.deliveries())


def test_stow_rs_per_instance_failures_and_basic_auth_from_the_environment(
    queued: Callable[..., Env], stow_server: Callable[..., StowServer], made: Made
) -> None:
    kinds = {str(b.dataset.SOPInstanceUID): b.kind for b in made.built}

    def script(instances: dict[str, bytes]) -> tuple[int, dict[str, str], Any]:
        failed = {}
        for uid in instances:
            if kinds[uid] is OutputKind.SR:
                failed[uid] = 0xA700  # out of resources: transient
            elif kinds[uid] is OutputKind.KEY_IMAGE:
                failed[uid] = 0xC000  # cannot understand: permanent
        return 202, {}, referenced(instances, failed)

    server = stow_server(script)
    env = queued(
        {
            "web": {
                "type": "dicomweb",
                "url": server.url,
                "auth": "basic",
                "username": "node",
                "password_env": "ARCHIVE_PASSWORD",
            }
        },
        environ={"ARCHIVE_PASSWORD": "pa55"},
    )
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    wait_for(lambda: dispatcher.run_once() == 0 and not env.states()["pending"], what="all deliveries settled")
    outs = env.outputs()
    result = {outs[d.output_id].kind: d for d in env.deliveries()}
    seg, sr, key = result[OutputKind.SEG], result[OutputKind.SR], result[OutputKind.KEY_IMAGE]
    assert seg.state is DeliveryState.DELIVERED and seg.attempts == 1
    assert sr.state is DeliveryState.FAILED and sr.attempts == 4 and not sr.permanent
    assert "FailureReason 0xA700" in (sr.last_error or "")
    assert key.state is DeliveryState.FAILED and key.attempts == 2 and key.permanent
    assert "FailureReason 0xC000" in (key.last_error or "")
    import base64

    assert server.requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"node:pa55").decode()


def test_stow_rs_4xx_is_permanent_and_a_missing_secret_names_its_key(
    queued: Callable[..., Env], stow_server: Callable[..., StowServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = stow_server(lambda instances: (400, {}, {"error": "bad request for Doe^Jane"}))
    env = queued(
        {
            "web": {"type": "dicomweb", "url": server.url},
            "locked": {"type": "dicomweb", "url": server.url, "auth": "bearer", "token_env": "NOT_SET_ANYWHERE"},
        },
        environ={},
    )
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    assert any("destinations.locked.token_env" in line for line in dispatcher.check_destinations())
    wait_for(lambda: dispatcher.run_once() == 0 and env.states() == {"failed": 6}, what="all deliveries failed")
    for d in env.deliveries():
        assert d.permanent and d.attempts == 2
        if d.destination == "web":
            assert d.last_status == 400 and "HTTP 400" in (d.last_error or "")
            assert 'peer said: {"error": "bad request for Doe^Jane"}' in (d.last_error or "")
        else:
            assert "destinations.locked.token_env: environment variable NOT_SET_ANYWHERE was not set" in (
                d.last_error or ""
            )
    assert len(server.requests) == 2
    # What a peer says may name a patient: it is kept for the operator, logged at DEBUG only.
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG and "Doe^Jane" in r.getMessage()]
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and "Doe^Jane" in r.getMessage()]


# -- plain functions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "delivered", "permanent"),
    [
        (0x0000, True, False),
        (0xB000, True, False),
        (0xB006, True, False),
        (0xB007, True, False),
        (0x0111, True, False),
        (0xA700, False, False),
        (0xA7FF, False, False),
        (0x0213, False, False),
        (0x0110, False, False),
        (0xA900, False, True),
        (0xC000, False, True),
        (0xC211, False, True),
        (0x0122, False, True),
        (0x0124, False, True),
    ],
)
def test_status_classification(status: int, delivered: bool, permanent: bool) -> None:
    outcome = classify_dimse_status(status)
    assert (outcome.delivered, outcome.permanent, outcome.status) == (delivered, permanent, status)
    assert delivered == (outcome.message is None or "warning" in outcome.message or "duplicate" in outcome.message)


def test_backoff_is_full_jitter_capped(make_settings: Callable[..., Settings]) -> None:
    import random

    ds = make_settings(dispatch={"backoff_base_s": 2, "backoff_max_s": 30}).dispatch
    rng = random.Random(1)
    for attempts, cap in ((1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (12, 30)):
        delays = [backoff_delay(attempts, ds, rng) for _ in range(300)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > 0.8 * cap and min(delays) < 0.2 * cap, "spread over the whole range"


def test_stow_response_parsing() -> None:
    body = referenced(["1.2.3", "1.2.4"], {"1.2.4": 0xA700})
    body["00081199"]["Value"][0]["00081196"] = {"vr": "US", "Value": [0xB000]}
    stored, failed, ok = parse_stow_response(json.dumps(body))
    assert ok and stored == {"1.2.3": 0xB000} and failed == {"1.2.4": 0xA700}
    assert parse_stow_response("<NativeDicomModel/>") == ({}, {}, False)


def test_destination_settings_errors_name_the_key(make_settings: Callable[..., Settings]) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"type": "dicomweb", "url": "http://x", "auth": "bearer"}, "destinations.d: token_file or token_env"),
        (
            {"type": "dicomweb", "url": "http://x", "auth": "bearer", "token_file": "/a", "token_env": "B"},
            "exactly one",
        ),
        ({"type": "dicomweb", "url": "http://x", "auth": "basic", "password_env": "P"}, "username: needed"),
        ({"type": "dicomweb", "url": "http://x", "token_env": "T"}, "token_file/token_env: only used with auth"),
        ({"type": "dicomweb", "url": "https://u:p@x/dicom-web"}, "destinations.d.url: no user or password"),
        ({"type": "dimse", "host": "h", "port": 1, "ae_title": "A", "tls": {"key_file": "k"}}, "d.tls: cert_file"),
        ({"type": "dimse", "host": "h", "port": 1, "ae_title": "A", "calling_ae": "A\\B"}, "destinations.d.calling"),
    ]
    for dest, message in bad:
        with pytest.raises(ConfigError, match=message.replace("\\", "\\\\").replace(".", r"\.")):
            make_settings(destinations={"d": dest})
    with pytest.raises(ConfigError, match=r"destinations: '@sender'"):
        make_settings(destinations={"@sender": {"type": "dicomweb", "url": "http://x"}})
    with pytest.raises(ConfigError, match=r"dispatch: backoff_max_s"):
        make_settings(dispatch={"backoff_base_s": 10, "backoff_max_s": 1})
    with pytest.raises(ConfigError, match=r"routes\[0\]\.return_to_sender\.port"):
        make_settings(pipelines={"p": {"model": "m"}}, routes=[{"name": "r", "pipeline": "p", "return_to_sender": {}}])


def test_lease_is_renewed_while_a_batch_runs(
    queued: Callable[..., Env], recording_scp: Callable[..., RecordingSCP]
) -> None:
    """A batch longer than the lease keeps its rows: the loop renews leases every poll."""
    release = threading.Event()

    def slow(ds: Dataset) -> int:
        release.wait(10)
        return 0x0000

    scp = recording_scp("SLOW", status=slow).start()
    env = queued({"slow": dimse(scp)}, dispatch={"lease_s": 0.5, "poll_interval_s": 0.05, "timeout_s": 15})
    dispatcher = Dispatcher(env.settings, env.db, env.store)
    dispatcher.start()
    try:
        wait_for(lambda: scp.requests, what="the first C-STORE to arrive")
        first_lease = min(d.lease_until for d in env.deliveries() if d.lease_until is not None)
        wait_for(
            lambda: (
                utcnow() > first_lease + timedelta(seconds=0.5)
                and all(d.lease_until is not None and d.lease_until > utcnow() for d in env.deliveries())
            ),
            what="the first lease to pass while the rows stay leased (renewed)",
        )
        assert reap_expired_leases(env.db, env.settings.dispatch) == 0, "a held lease expired"
        assert env.states() == {"in_progress": 3}
        release.set()
        wait_for(lambda: env.states() == {"delivered": 3}, what="the slow batch to finish")
    finally:
        release.set()
        dispatcher.stop()
    assert set(scp.requests.values()) == {1}
