"""The HTTP server's access rules (bearer token, loopback binding, Host and
Origin checks, CORS), /healthz, /metrics, /conformance and the JSON API, over
a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from pacs_lab.synthetic import make_series, new_uid
from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.errors import ConfigError
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import Ingestor
from pacs_node.receive.scp import TRANSFER_SYNTAXES
from pacs_node.web import HttpServer
from pacs_node.web.auth import is_loopback_host, load_token
from pacs_node.web.conformance import conformance_statement
from storage.db import Database
from storage.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Output,
    OutputKind,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from tests.conftest import free_port
from tests.http_support import HttpNode, http_node, node_settings, parse_prometheus, sample

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def node(make_settings: Callable[..., Settings]) -> Iterator[HttpNode]:
    with http_node(node_settings(make_settings)) as n:
        yield n


def _store(node: HttpNode, n: int = 3, **header: Any) -> tuple[str, list[Any]]:
    study = new_uid()
    datasets = list(make_series(n, rows=16, cols=16, study_uid=study, **header))
    DICOMwebClient(url=node.dicomweb, headers={"Authorization": f"Bearer {TOKEN}"}).store_instances(datasets)
    node.flush()
    return study, datasets


# -- access ------------------------------------------------------------------------------------------------------------


def test_bearer_token_guards_everything_but_healthz(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with http_node(node_settings(make_settings, token_file=str(token_file))) as node:
        assert httpx.get(f"{node.url}/healthz").status_code == 200
        for path in ("/dicom-web/studies", "/api/studies", "/api/jobs", "/metrics", "/conformance"):
            r = httpx.get(node.url + path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "bearer token" in r.json()["error"]
            for wrong in ("Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", ""):
                assert httpx.get(node.url + path, headers={"Authorization": wrong}).status_code == 401
            assert httpx.get(node.url + path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = httpx.post(f"{node.url}/dicom-web/studies", content=b"x", headers={"Content-Type": "application/dicom"})
        assert r.status_code == 401, "nothing is stored without the token"

        study, _ = _store(node)
        client = DICOMwebClient(url=node.dicomweb, headers={"Authorization": f"Bearer {TOKEN}"})
        assert [s["0020000D"]["Value"][0] for s in client.search_for_studies()] == [study]
        # With a token any Host is fine (the node may sit behind a proxy) and any origin may read.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{node.url}/api/studies", headers={**auth, "Host": "node.example"}).status_code == 200
        r = httpx.options(
            f"{node.dicomweb}/studies",
            headers={
                "Origin": "https://viewer.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.get(f"{node.dicomweb}/studies", headers={**auth, "Origin": "https://viewer.example"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "warning" in r.headers["access-control-expose-headers"].lower()


def test_token_sources_and_their_errors(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    s = make_settings({"http": {"token_env": "NODE_TOKEN"}})
    assert load_token(s.http, {"NODE_TOKEN": f" {TOKEN} "}) == TOKEN
    with pytest.raises(ConfigError, match=r"http\.token_env: the environment variable NODE_TOKEN is not set"):
        load_token(s.http, {})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"http\.token_file: .*empty"):
        load_token(make_settings({"http": {"token_file": str(empty)}}).http, {})
    with pytest.raises(ConfigError, match=r"http\.token_file: cannot read"):
        load_token(make_settings({"http": {"token_file": str(tmp_path / "missing")}}).http, {})
    with pytest.raises(ConfigError, match="only one"):
        load_token(make_settings({"http": {"token_file": str(empty), "token_env": "X"}}).http, {})
    assert load_token(make_settings().http, {}) is None
    # The server reads it from the environment it is given.
    with http_node(node_settings(make_settings, token_env="NODE_TOKEN"), environ={"NODE_TOKEN": TOKEN}) as node:
        assert httpx.get(f"{node.url}/api/studies").status_code == 401
        assert httpx.get(f"{node.url}/api/studies", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_non_loopback_address_needs_a_token(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.1"))
    settings = make_settings({"http": {"host": "0.0.0.0", "port": 0}})
    db = Database(settings.db_url)
    store = open_store(settings)
    ingestor = Ingestor(store, lambda rec: None)
    try:
        with pytest.raises(ConfigError) as err:
            HttpServer(settings, db, store, ingestor, environ={})
        message = str(err.value)
        for key in ("http.host", "http.token_file", "http.token_env", "http.allow_remote_without_token"):
            assert key in message
    finally:
        db.dispose()
    # Explicitly allowed (behind an authenticating proxy), or with a token: it starts.
    with http_node(make_settings({"http": {"host": "0.0.0.0", "port": 0, "allow_remote_without_token": True}})) as n:
        assert httpx.get(f"http://127.0.0.1:{n.server.port}/api/studies").status_code == 200
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with http_node(make_settings({"http": {"host": "0.0.0.0", "port": 0, "token_file": str(token_file)}})) as n:
        assert httpx.get(f"http://127.0.0.1:{n.server.port}/api/studies").status_code == 401


def test_a_port_in_use_is_a_clear_error(make_settings: Callable[..., Settings]) -> None:
    with http_node(make_settings({"http": {"port": 0}})) as first:
        settings = make_settings({"http": {"port": first.server.port}})
        db = Database(settings.db_url)
        store = open_store(settings)
        try:
            server = HttpServer(settings, db, store, Ingestor(store, lambda rec: None))
            with pytest.raises(
                ConfigError, match=rf"http.host/http.port: cannot listen on 127.0.0.1:{first.server.port}"
            ):
                server.start()
        finally:
            db.dispose()


def test_without_a_token_only_local_names_and_pages(node: HttpNode) -> None:
    r = httpx.get(f"{node.url}/api/studies", headers={"Host": "attacker.example"})
    assert r.status_code == 403 and "localhost" in r.json()["error"], "DNS rebinding is refused"
    assert httpx.get(f"{node.url}/api/studies", headers={"Host": f"localhost:{node.server.port}"}).status_code == 200
    # A page from elsewhere cannot post a form to the node; a local viewer can.
    r = httpx.post(f"{node.url}/api/jobs/999/cancel", headers={"Origin": "https://attacker.example"})
    assert r.status_code == 403
    r = httpx.post(f"{node.url}/api/jobs/999/cancel", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 404 and r.json()["error"] == "no job 999"
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "accept"}
    r = httpx.options(f"{node.dicomweb}/studies", headers={"Origin": "http://localhost:3000", **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = httpx.options(f"{node.dicomweb}/studies", headers={"Origin": "https://attacker.example", **preflight})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{node.dicomweb}/studies", headers={"Origin": "https://attacker.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, "the browser keeps it from the page"


# -- health and metrics ------------------------------------------------------------------------------------------------


def test_healthz_reports_database_store_and_free_space(make_settings: Callable[..., Settings]) -> None:
    with http_node(node_settings(make_settings)) as node:
        r = httpx.get(f"{node.url}/healthz")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok"
        assert body["checks"]["database"]["ok"] and body["checks"]["store"]["ok"]
        assert body["checks"]["free_space"]["free_bytes"] > 0
        assert list(node.store.incoming_dir.iterdir()) == [], "the write probe is removed"
    # Below the watermark: failing, with the setting named.
    with http_node(node_settings(make_settings, extra={"storage": {"min_free_mb": 10**9}})) as node:
        r = httpx.get(f"{node.url}/healthz")
        assert r.status_code == 503 and not r.json()["checks"]["free_space"]["ok"]
        assert "storage.min_free_mb" in r.json()["checks"]["free_space"]["error"]
    # An unreachable database.
    settings = make_settings({"http": {"port": 0}, "database_url": f"postgresql://nobody@127.0.0.1:{free_port()}/none"})
    db = Database(settings.db_url)
    store = open_store(settings)
    server = HttpServer(settings, db, store, Ingestor(store, lambda rec: None))
    server.start()
    try:
        r = httpx.get(f"{server.url}/healthz", timeout=30)
        assert r.status_code == 503
        assert r.json()["checks"]["database"]["ok"] is False and r.json()["checks"]["database"]["error"]
        assert r.json()["checks"]["store"]["ok"] is True
    finally:
        server.stop()
        db.dispose()


def test_metrics_parse_and_follow_the_database(node: HttpNode) -> None:
    r = httpx.get(f"{node.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    before = parse_prometheus(r.text)
    assert before["pacs_node_instances_received_total"]["type"] == "counter"
    assert sample(before, "pacs_node_instances_received_total") == 0
    assert before["pacs_node_jobs"]["type"] == "gauge" and before["pacs_node_deliveries"]["type"] == "gauge"
    for name in (
        "pacs_node_series_receive_seconds",
        "pacs_node_job_queue_wait_seconds",
        "pacs_node_job_inference_seconds",
        "pacs_node_delivery_seconds",
    ):
        assert before[name]["type"] == "histogram"

    study, datasets = _store(node, 3)
    now = utcnow()
    with node.db.session() as session:
        st = session.scalar(select(Study).where(Study.study_uid == study))
        series = session.scalar(select(Series).where(Series.study_id == st.id))
        series.state = SeriesState.COMPLETE
        series.first_received_at = now - timedelta(seconds=20)
        series.completed_at = now - timedelta(seconds=8)  # 12 s from first instance to complete
        jobs = [
            Job(study_id=st.id, pipeline="kidney", route="r", state=JobState.DONE, inputs={},
                created_at=now - timedelta(seconds=100), required_complete_at=now - timedelta(seconds=60),
                started_at=now - timedelta(seconds=57), finished_at=now - timedelta(seconds=15)),
            Job(study_id=st.id, pipeline="kidney", route="r", state=JobState.PENDING, inputs={}),
            Job(study_id=st.id, pipeline="kidney", route="r", state=JobState.FAILED, inputs={},
                created_at=now - timedelta(days=3), started_at=now - timedelta(days=3),
                finished_at=now - timedelta(days=3) + timedelta(seconds=5)),
        ]  # fmt: skip
        session.add_all(jobs)
        session.flush()
        out = Output(job_id=jobs[0].id, study_id=st.id, kind=OutputKind.SEG, sop_class_uid="1.2", series_uid="1.3",
                     sop_uid="1.4", path="x.dcm", size_bytes=1)  # fmt: skip
        session.add(out)
        session.flush()
        session.add_all(
            [
                Delivery(output_id=out.id, job_id=jobs[0].id, study_id=st.id, destination="pacs",
                         state=DeliveryState.DELIVERED, created_at=now - timedelta(seconds=10),
                         delivered_at=now - timedelta(seconds=9, milliseconds=300)),
                Delivery(output_id=out.id, job_id=jobs[0].id, study_id=st.id, destination="viewer",
                         state=DeliveryState.FAILED),
            ]
        )  # fmt: skip
    after = parse_prometheus(httpx.get(f"{node.url}/metrics").text)
    assert sample(after, "pacs_node_instances_received_total") == 3
    assert sample(after, "pacs_node_stow_instances_total", result="stored") == 3
    assert sample(after, "pacs_node_series", state="complete") == 1
    assert sample(after, "pacs_node_jobs", state="pending") == 1 and sample(after, "pacs_node_jobs", state="done") == 1
    assert sample(after, "pacs_node_deliveries", state="failed") == 1
    assert sample(after, "pacs_node_deliveries", state="in_progress") == 0

    def bucket(name: str, le: str, **labels: str) -> float:
        return sample(after, f"{name}_bucket", **labels, le=le)

    assert bucket("pacs_node_series_receive_seconds", "10") == 0
    assert bucket("pacs_node_series_receive_seconds", "30") == 1
    assert sample(after, "pacs_node_series_receive_seconds_sum") == pytest.approx(12, abs=0.01)
    labels = {"pipeline": "kidney"}
    assert bucket("pacs_node_job_queue_wait_seconds", "2.5", **labels) == 0
    assert bucket("pacs_node_job_queue_wait_seconds", "5", **labels) == 1, "3 s from inputs complete to start"
    done = {"pipeline": "kidney", "state": "done"}
    assert bucket("pacs_node_job_inference_seconds", "30", **done) == 0
    assert bucket("pacs_node_job_inference_seconds", "60", **done) == 1
    assert bucket("pacs_node_job_inference_seconds", "+Inf", **done) == 1
    with pytest.raises(KeyError):
        sample(after, "pacs_node_job_inference_seconds_count", pipeline="kidney", state="failed")  # 3 days old
    assert bucket("pacs_node_delivery_seconds", "0.5", destination="pacs") == 0
    assert bucket("pacs_node_delivery_seconds", "1", destination="pacs") == 1

    # The counter follows further receives.
    _store(node, 2)
    final = parse_prometheus(httpx.get(f"{node.url}/metrics").text)
    assert sample(final, "pacs_node_instances_received_total") == 5


# -- conformance -------------------------------------------------------------------------------------------------------


def test_conformance_statement_follows_the_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(
        {
            "dicom": {"ae_title": "AINODE", "allowed_calling_aes": ["PACS1"]},
            "destinations": {
                "pacs": {"type": "dimse", "host": "10.0.0.5", "port": 104, "ae_title": "PACS1"},
                "viewer": {"type": "dicomweb", "url": "https://viewer.example/dicom-web", "seg_type": "labelmap"},
            },
        }
    )
    text = conformance_statement(settings, http_url="https://node.example")
    assert "`AINODE`" in text and "`PACS1`" in text
    assert "https://node.example/dicom-web" in text
    for ts in TRANSFER_SYNTAXES:
        assert ts in text
    assert "JPEG 2000 Image Compression (Lossless Only)" in text
    assert "Segmentation Storage" in text and "1.2.840.10008.5.1.4.1.1.66.7" in text
    assert "10.0.0.5:104" in text and "https://viewer.example/dicom-web" in text
    assert "TLS: not configured" in text
    tls = make_settings(
        {"dicom": {"tls": {"cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem"),
                           "ca_file": str(tmp_path / "ca.pem")}}}
    )  # fmt: skip
    assert "client certificates required" in conformance_statement(tls)
    assert "no bearer token configured" in text
    with_token = make_settings({"http": {"token_env": "NODE_TOKEN"}})
    assert "Authorization: Bearer <token>" in conformance_statement(with_token)


def test_conformance_endpoint(node: HttpNode) -> None:
    r = httpx.get(f"{node.url}/conformance")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert r.text == conformance_statement(node.settings, http_url=node.settings.http.public_url)


# -- JSON API ----------------------------------------------------------------------------------------------------------


def _api(node: HttpNode, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{node.url}/api{path}", timeout=30, **kw)


def _fixture_rows(node: HttpNode, study: str) -> dict[str, int]:
    """Jobs in several states, an output with three deliveries."""
    with node.db.session() as session:
        st = session.scalar(select(Study).where(Study.study_uid == study))
        series = session.scalar(select(Series).where(Series.study_id == st.id))
        series.state = SeriesState.ROUTED
        done = Job(study_id=st.id, pipeline="kidney", route="r", state=JobState.DONE,
                   inputs={"ct": series.series_uid}, input_key="k1", finished_at=utcnow())  # fmt: skip
        pending = Job(study_id=st.id, pipeline="kidney", route="r", state=JobState.PENDING, inputs={})
        running = Job(study_id=st.id, pipeline="other", route="r", state=JobState.RUNNING, inputs={})
        session.add_all([done, pending, running])
        session.flush()
        out = Output(job_id=done.id, study_id=st.id, kind=OutputKind.SEG, sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                     series_uid=new_uid(), sop_uid=new_uid(), path="x.dcm", size_bytes=10)  # fmt: skip
        session.add(out)
        session.flush()
        rows = {
            state: Delivery(output_id=out.id, job_id=done.id, study_id=st.id, destination=name, state=state,
                            last_error="refused" if state is DeliveryState.FAILED else None)
            for name, state in (
                ("a", DeliveryState.FAILED), ("b", DeliveryState.PENDING), ("c", DeliveryState.DELIVERED)
            )
        }  # fmt: skip
        session.add_all(rows.values())
        session.flush()
        return {
            "done": done.id,
            "pending": pending.id,
            "running": running.id,
            "output": out.id,
            **{f"delivery_{s.value}": d.id for s, d in rows.items()},
        }


def test_api_studies(node: HttpNode) -> None:
    study, datasets = _store(node, 3, PatientName="Doe^Jane", PatientID="P1")
    other, _ = _store(node, 1, PatientName="Roe^Richard", PatientID="P2", StudyDate="20240102")
    _fixture_rows(node, study)
    body = _api(node, "GET", "/studies").json()
    assert body["total"] == 2 and [s["study_uid"] for s in body["items"]] == [other, study], "newest first"
    mine = body["items"][1]
    assert mine["instance_count"] == 3 and mine["series_count"] == 1
    assert mine["jobs"] == {"done": 1, "pending": 1, "running": 1}
    assert mine["patient_name"] == "Doe^Jane"
    assert [s["study_uid"] for s in _api(node, "GET", "/studies", params={"patient_name": "doe*"}).json()["items"]] == [
        study
    ]
    assert _api(node, "GET", "/studies", params={"patient_id": "P2"}).json()["total"] == 1
    assert (
        _api(node, "GET", "/studies", params={"study_date": "20240101-20241231"}).json()["items"][0]["study_uid"]
        == other
    )
    page = _api(node, "GET", "/studies", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == 2 and [s["study_uid"] for s in page["items"]] == [study]
    assert _api(node, "GET", "/studies", params={"limit": "x"}).status_code == 400

    detail = _api(node, "GET", f"/studies/{study}").json()
    assert [s["series_uid"] for s in detail["series"]] == [datasets[0].SeriesInstanceUID]
    assert detail["series"][0]["instance_count"] == 3 and detail["series"][0]["state"] == "ROUTED"
    assert sorted(j["state"] for j in detail["job_list"]) == ["DONE", "PENDING", "RUNNING"]
    assert [o["kind"] for o in detail["outputs"]] == ["SEG"]
    assert sorted(d["state"] for d in detail["deliveries"]) == ["delivered", "failed", "pending"]
    assert all(d["kind"] == "SEG" for d in detail["deliveries"])
    r = _api(node, "GET", "/studies/1.2.3.4")
    assert r.status_code == 404 and "1.2.3.4" in r.json()["error"]


def test_api_jobs_cancel_and_rerun(node: HttpNode) -> None:
    study, datasets = _store(node, 2)
    ids = _fixture_rows(node, study)
    body = _api(node, "GET", "/jobs").json()
    assert (
        body["total"] == 3
        and [j["id"] for j in body["items"]] == sorted(ids[k] for k in ("done", "pending", "running"))[::-1]
    )
    assert all(j["study_uid"] == study for j in body["items"])
    assert [j["id"] for j in _api(node, "GET", "/jobs", params={"state": "pending,running"}).json()["items"]] == [
        ids["running"],
        ids["pending"],
    ]
    assert _api(node, "GET", "/jobs", params={"pipeline": "other"}).json()["total"] == 1
    r = _api(node, "GET", "/jobs", params={"state": "bogus"})
    assert r.status_code == 400 and "waiting" in r.json()["error"]
    job = _api(node, "GET", f"/jobs/{ids['done']}").json()
    assert job["state"] == "DONE" and [o["id"] for o in job["outputs"]] == [ids["output"]]
    assert len(job["deliveries"]) == 3
    assert _api(node, "GET", "/jobs/99999").status_code == 404

    # Cancel: a PENDING job yes, once; a RUNNING one no.
    r = _api(node, "POST", f"/jobs/{ids['pending']}/cancel")
    assert (
        r.status_code == 200 and r.json()["state"] == "CANCELLED" and r.json()["reason"] == "cancelled by an operator"
    )
    r = _api(node, "POST", f"/jobs/{ids['pending']}/cancel")
    assert r.status_code == 409 and "CANCELLED" in r.json()["error"]
    r = _api(node, "POST", f"/jobs/{ids['running']}/cancel")
    assert r.status_code == 409 and "only WAITING or PENDING" in r.json()["error"]
    with node.db.session() as session:
        assert session.get(Job, ids["running"]).state is JobState.RUNNING

    # Re-run through pacs_node.process.jobs: the DONE job is queued again.
    r = _api(node, "POST", f"/studies/{study}/rerun")
    assert r.status_code == 200
    [line] = [a for a in r.json()["actions"] if "re-run of job" in a]
    assert f"re-run of job {ids['done']}" in line
    with node.db.session() as session:
        newest = session.scalar(select(Job).order_by(Job.id.desc()).limit(1))
        assert newest.state is JobState.PENDING and newest.input_key == "k1#rerun1"
    assert _api(node, "POST", "/studies/1.2.3.4/rerun").status_code == 404
    # A series that never made a job is routed again.
    _other, others = _store(node, 1)
    with node.db.session() as session:
        s = session.scalar(select(Series).where(Series.series_uid == others[0].SeriesInstanceUID))
        s.state = SeriesState.IGNORED
    r = _api(node, "POST", f"/series/{others[0].SeriesInstanceUID}/rerun")
    assert r.json()["actions"] == [f"series {others[0].SeriesInstanceUID} will be routed again"]
    with node.db.session() as session:
        assert session.scalar(select(Series.state).where(Series.series_uid == others[0].SeriesInstanceUID)) is (
            SeriesState.COMPLETE
        )


def test_api_deliveries_retry_and_cancel(node: HttpNode) -> None:
    study, _ = _store(node, 1)
    ids = _fixture_rows(node, study)
    body = _api(node, "GET", "/deliveries").json()
    assert body["total"] == 3 and {d["destination"] for d in body["items"]} == {"a", "b", "c"}
    failed = _api(node, "GET", "/deliveries", params={"state": "failed"}).json()["items"]
    assert [d["id"] for d in failed] == [ids["delivery_failed"]] and failed[0]["last_error"] == "refused"
    assert _api(node, "GET", "/deliveries", params={"study_uid": study, "destination": "b"}).json()["total"] == 1
    assert _api(node, "GET", "/deliveries", params={"state": "lost"}).status_code == 400
    assert _api(node, "GET", f"/deliveries/{ids['delivery_delivered']}").json()["state"] == "delivered"
    assert _api(node, "GET", "/deliveries/99999").status_code == 404

    r = _api(node, "POST", f"/deliveries/{ids['delivery_failed']}/retry")
    assert r.status_code == 200 and r.json()["state"] == "pending" and r.json()["attempts"] == 0
    r = _api(node, "POST", f"/deliveries/{ids['delivery_delivered']}/retry")
    assert r.status_code == 409 and "delivered" in r.json()["error"]
    r = _api(node, "POST", f"/deliveries/{ids['delivery_pending']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = _api(node, "POST", f"/deliveries/{ids['delivery_delivered']}/cancel")
    assert r.status_code == 409
    assert _api(node, "POST", "/deliveries/99999/cancel").status_code == 404
    with node.db.session() as session:
        states = {d.id: d.state for d in session.scalars(select(Delivery))}
    assert states[ids["delivery_failed"]] is DeliveryState.PENDING
    assert states[ids["delivery_pending"]] is DeliveryState.CANCELLED
    assert states[ids["delivery_delivered"]] is DeliveryState.DELIVERED


def test_indexer_and_server_share_one_receive_path(make_settings: Callable[..., Settings]) -> None:
    """STOW-RS and C-STORE end in the same journal and index: an instance sent both ways is one row."""
    from pacs_lab.synthetic import write_series
    from pacs_node.deliver.scu import send_files
    from pacs_node.receive.scp import StorageSCP

    settings = node_settings(make_settings)
    db = Database(settings.db_url)
    db.upgrade()
    store = open_store(settings)
    indexer = Indexer(db, store, linger_s=0.01)
    ingestor = Ingestor(store, indexer.submit)
    indexer.start()
    scp = StorageSCP(settings.dicom, ingestor)
    scp.start()
    server = HttpServer(settings, db, store, ingestor)
    server.start()
    try:
        study = new_uid()
        datasets = list(make_series(2, rows=16, cols=16, study_uid=study))
        files = write_series(Path(settings.data_dir) / "src", datasets)
        assert set(send_files("127.0.0.1", scp.port, [str(f) for f in files], called_ae="PACSNODE").values()) == {0}
        DICOMwebClient(url=server.url + "/dicom-web").store_instances(datasets)
        assert indexer.flush(30)
        with db.session() as session:
            rows = list(session.scalars(select(Series)))
            assert len(rows) == 1 and rows[0].instance_count == 2
            assert sorted(i.receive_count for i in rows[0].instances) == [2, 2]
    finally:
        server.stop()
        scp.stop()
        indexer.stop()
        db.dispose()
