"""A database outage loses nothing and routes every series once, whole (issue 14).

The node runs in-process (``pacs_node.app.service.Node``: its own SCP, indexer
and router) on a real PostgreSQL reached through a TCP proxy the test controls
(:class:`pacs_lab.abuse.TcpProxy`). Part of a series is indexed, then the proxy
resets every connection and refuses new ones for longer than the indexer used to
retry (about 21 s) while a real C-STORE SCU sends the rest of that series and a
second one. Every instance is acknowledged during the outage; once the database
is back every one of them is indexed and each series is routed once, with all
of its instances.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import select

from pacs_lab.abuse import TcpProxy
from pacs_lab.synthetic import make_series, new_uid, write_series
from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.deliver.scu import echo, send_files
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import Ingestor
from pacs_node.route.router import Router
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, Job, Series, SeriesState, utcnow
from tests.conftest import wait_for

#: longer than the old indexer's give-up (8 attempts, 0.2 s doubling to 5 s: about 21 s)
OUTAGE_S = 23.0

PIPELINES: dict[str, Any] = {"kidney": {"model": "models/kidney", "inputs": {"ct": {"match": {"Modality": "CT"}}}}}
ROUTES = [{"name": "ct", "pipeline": "kidney"}]


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A TCP proxy in front of the test's PostgreSQL database, and the URL that goes through it."""
    parts = urlsplit(pg_url)
    with TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432)) as proxy:
        netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else f"127.0.0.1:{proxy.port}"
        yield proxy, urlunsplit(parts._replace(netloc=netloc))


def _indexer_messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pacs_node.receive.indexer" and text in r.getMessage()]


def test_database_outage_loses_no_acknowledged_instance_and_routes_each_series_once_whole(
    pg_proxy: tuple[TcpProxy, str],
    run_node: Callable[[Settings], Any],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pacs_node")
    proxy, url = pg_proxy
    settings = make_settings(
        {
            "database_url": url,
            "pipelines": PIPELINES,
            "routes": ROUTES,
            "dicom": {"ae_title": "PACSNODE"},
            "routing": {"series_quiet_s": 3.0, "poll_interval_s": 0.2},
            "dispatch": {"enabled": False},
        }
    )
    node = run_node(settings)
    study = new_uid()
    first = write_series(tmp_path / "a", make_series(12, rows=8, cols=8, study_uid=study, SeriesDescription="A"))
    second = write_series(tmp_path / "b", make_series(5, rows=8, cols=8, study_uid=study, SeriesDescription="B"))
    port = node.scp.port

    def send(files: list[Path]) -> dict[str, int]:
        return send_files("127.0.0.1", port, [str(f) for f in files], called_ae="PACSNODE")

    acked = send(first[:4])
    assert node.indexer.flush(15), "the first part of series A was not indexed"

    cut_at = time.monotonic()
    proxy.cut()
    acked |= send(first[4:])
    acked |= send(second)
    assert sorted(acked.values()) == [0] * 17, f"not every instance was acknowledged during the outage: {acked}"

    # The outage lasts past the old give-up; the node keeps answering meanwhile.
    while time.monotonic() - cut_at < OUTAGE_S:
        assert echo("127.0.0.1", port, calling_ae="PROBE", called_ae="PACSNODE", timeout=5) == 0
        time.sleep(1.0)
    assert node.indexer.database_down, "the indexer never noticed the outage"
    assert node.indexer.outstanding == 13, "acknowledged instances were dropped during the outage"
    assert len(node.store.pending()) == 13, "the journal must hold every acknowledged, unindexed instance"
    attempts = node.indexer.unreachable_attempts
    assert 3 <= attempts <= 15, f"{attempts} attempts in {OUTAGE_S:g} s: the retry is not a capped backoff"
    proxy.restore()

    def routed() -> list[Series]:
        with node.db.session() as s:
            rows = list(s.scalars(select(Series).order_by(Series.series_description)))
        return rows if len(rows) == 2 and all(r.state is SeriesState.ROUTED for r in rows) else []

    def state() -> str:
        with node.db.session() as s:
            rows = s.scalars(select(Series)).all()
            return ", ".join(f"{r.series_description}: {r.state.value} {r.instance_count}" for r in rows)

    series = wait_for(routed, 15, 0.1, "both series to be routed after the outage", state)
    assert node.indexer.flush(5)
    assert node.store.pending() == []

    with node.db.session() as s:
        stored = {i.sop_uid: i.path for i in s.scalars(select(Instance))}
        jobs = list(s.scalars(select(Job)))
    assert set(stored) == set(acked), "an acknowledged instance is missing from the index"
    assert all(node.store.path(rel).is_file() for rel in stored.values())
    a, b = series
    assert (a.series_description, a.instance_count, a.reopen_count) == ("A", 12, 0)
    assert (b.series_description, b.instance_count, b.reopen_count) == ("B", 5, 0)
    by_series = sorted((j.trigger_series_uid, j.input_key.rsplit(":", 1)[1]) for j in jobs if j.input_key)
    assert by_series == sorted([(a.series_uid, "12"), (b.series_uid, "5")]), (
        f"each series must be routed once with all of its instances: {[j.input_key for j in jobs]}"
    )

    gone = _indexer_messages(caplog, "database unreachable")
    back = _indexer_messages(caplog, "database reachable again")
    assert len(gone) == 1 and len(back) == 1, (gone, back)
    assert "indexing the 13 acknowledged instances" in back[0], back[0]


def _part10(ds: Any) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_long_outage_keeps_only_a_bounded_number_of_headers_in_memory(
    pg_proxy: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    """Past ``held_max`` (and the batch being retried) the headers wait in the journal; they are read again."""
    proxy, url = pg_proxy
    db = Database(url)
    db.upgrade()
    store = FileStore(tmp_path / "store", fsync=False)
    indexer = Indexer(db, store, batch_max=4, linger_s=0.01, retry_max_s=0.3, held_max=3)
    ingestor = Ingestor(store, indexer.submit)
    indexer.start()
    try:
        proxy.cut()
        datasets = list(make_series(10, rows=4, cols=4, SeriesDescription="held"))
        for ds in datasets:
            ingestor.receive_bytes(_part10(ds))
        wait_for(lambda: indexer.unreachable_attempts >= 3, 10, what="three attempts during the outage")
        assert indexer.outstanding == 10 and indexer._with_header <= 3 + 4  # held_max, plus the batch read back
        proxy.restore()
        assert indexer.flush(15)
        with db.session() as s:
            [series] = s.scalars(select(Series)).all()
            assert (series.instance_count, series.series_description) == (10, "held")
            assert {i.sop_uid for i in s.scalars(select(Instance))} == {str(d.SOPInstanceUID) for d in datasets}
        assert store.pending() == []
    finally:
        indexer.stop()
        db.dispose()


def test_a_record_that_cannot_be_indexed_is_set_aside_and_the_others_go_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.upgrade()
    store = FileStore(tmp_path / "store", fsync=False)
    indexer = Indexer(db, store, linger_s=0.2)
    datasets = list(make_series(4, rows=4, cols=4))
    bad = str(datasets[2].SOPInstanceUID)
    real = Indexer._write_rows

    def write_rows(self: Indexer, session: Any, recs: list[Any], copies: dict[str, int]) -> None:
        if any(r.sop_uid == bad for r in recs):
            raise ValueError("a value the database refuses")
        real(self, session, recs, copies)

    monkeypatch.setattr(Indexer, "_write_rows", write_rows)
    ingestor = Ingestor(store, indexer.submit)
    indexer.start()
    try:
        for ds in datasets:
            ingestor.receive_bytes(_part10(ds))
        assert indexer.flush(10)
        with db.session() as s:
            assert {i.sop_uid for i in s.scalars(select(Instance))} == {str(d.SOPInstanceUID) for d in datasets} - {bad}
        assert indexer.set_aside == 1 and store.pending() == []
        [kept] = [p for p in store.quarantine_dir.iterdir() if p.suffix == ".dcm"]
        assert bad in kept.name
        assert "a value the database refuses" in kept.with_suffix(".reason.txt").read_text()
    finally:
        indexer.stop()
        db.dispose()


def test_the_router_completes_no_series_while_the_journal_holds_unindexed_instances(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings({"pipelines": PIPELINES, "routes": ROUTES})
    db = Database(settings.db_url)
    db.upgrade()
    store = open_store(settings)
    indexer = Indexer(db, store, linger_s=0.01)
    ingestor = Ingestor(store, indexer.submit)
    router = Router(settings, db, store=store)
    indexer.start()
    try:
        for ds in make_series(2, rows=4, cols=4):
            ingestor.receive_bytes(_part10(ds))
        assert indexer.flush(10)
        # An instance acknowledged a minute ago that the indexer has not taken yet (the database was away).
        late = store.acked_dir / f"{time.time_ns() - 60 * 10**9:020d}-{new_uid()}.dcm"
        late.write_bytes(b"")
        later = utcnow() + timedelta(seconds=30)
        assert router.tick(later)["completed"] == 0, "a series was called complete while the journal lagged"
        late.unlink()
        assert router.tick(later)["completed"] == 1
    finally:
        indexer.stop()
        db.dispose()
