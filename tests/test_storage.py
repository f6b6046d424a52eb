"""Storage on both databases (SQLite file in WAL mode, PostgreSQL) and the file store."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import inspect, select, text

from pacs_lab.synthetic import make_series, new_uid
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import Ingestor
from storage.db import Database
from storage.errors import InvalidUID, StorageError, StorageFull
from storage.filestore import FileStore, validate_uid
from storage.models import Instance, Job, JobState, Series, SeriesState, Study


def _bytes(ds: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def _alembic_head() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from storage.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def test_migrations_create_schema_and_are_idempotent(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    db.upgrade()
    tables = set(inspect(db.engine).get_table_names())
    assert {"study", "series", "instance", "job", "alembic_version"} <= tables
    with db.engine.connect() as conn:
        assert conn.execute(text("select version_num from alembic_version")).scalar() == _alembic_head()
    db.dispose()


def test_sqlite_runs_in_wal_mode_with_busy_timeout(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 10_000
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    db.dispose()


def test_indexer_records_studies_series_instances(db_url: str, tmp_path: Path) -> None:
    db = Database(db_url)
    db.upgrade()
    store = FileStore(tmp_path / "store")
    indexer = Indexer(db, store)
    ingestor = Ingestor(store, indexer.submit)
    study = new_uid()
    ct = list(
        make_series(5, rows=8, cols=8, study_uid=study, PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100")
    )
    mr = list(make_series(3, modality="MR", rows=8, cols=8, study_uid=study))
    for ds in ct + mr:
        ingestor.receive_bytes(_bytes(ds), calling_ae="PACS1", called_ae="PACSNODE", address="127.0.0.1")
    indexer.start()
    assert indexer.flush(10)
    indexer.stop()
    with db.session() as s:
        [st] = s.scalars(select(Study)).all()
        assert st.study_uid == study and st.patient_name == "Müller^Jürgen"
        assert st.specific_character_set == "ISO_IR 100"
        series = {x.modality: x for x in s.scalars(select(Series))}
        assert series["CT"].instance_count == 5 and series["MR"].instance_count == 3
        assert series["CT"].state is SeriesState.RECEIVING and series["CT"].calling_ae == "PACS1"
        assert series["CT"].header["SeriesDescription"] == "Abdomen 3.0 B30f PV"
        assert series["CT"].last_received_at.tzinfo is not None
        insts = s.scalars(select(Instance)).all()
        assert len(insts) == 8
        for inst in insts:
            path = store.path(inst.path)
            assert path.exists() and dcmread(path).SOPInstanceUID == inst.sop_uid
            assert inst.path.startswith(f"{study}/")
    assert store.pending() == [], "the journal is empty once everything is indexed"
    db.dispose()


def test_job_rows_and_timezones_round_trip(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    when = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
    with db.session() as s:
        st = Study(study_uid="1.2.3")
        s.add(st)
        s.flush()
        s.add(
            Job(
                study_id=st.id,
                pipeline="p",
                route="r",
                state=JobState.PENDING,
                inputs={"ct": "1.2.3.4"},
                deadline_at=when,
            )
        )
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert job.state is JobState.PENDING and job.inputs == {"ct": "1.2.3.4"}
        assert job.deadline_at == when and job.deadline_at.tzinfo is not None
    db.dispose()


def test_two_indexers_write_concurrently_without_losing_rows(db_url: str, tmp_path: Path) -> None:
    """Two receive processes share one database (dicom.processes > 1)."""
    db_a, db_b = Database(db_url), Database(db_url)
    db_a.upgrade()
    store = FileStore(tmp_path / "store", fsync=False)
    study = new_uid()
    datasets = list(make_series(120, rows=4, cols=4, study_uid=study))
    halves = [datasets[::2], datasets[1::2]]

    def run(db: Database, part: list[object]) -> None:
        idx = Indexer(db, store, batch_max=16, linger_s=0)
        ing = Ingestor(store, idx.submit)
        idx.start()
        for ds in part:
            ing.receive_bytes(_bytes(ds))
        assert idx.flush(30)
        idx.stop()

    threads = [threading.Thread(target=run, args=(db, part)) for db, part in zip((db_a, db_b), halves, strict=False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with db_a.session() as s:
        assert s.scalar(select(Study.id).where(Study.study_uid == study)) is not None
        assert len(s.scalars(select(Instance)).all()) == 120
        [series] = s.scalars(select(Series)).all()
        assert series.instance_count == 120
    db_a.dispose()
    db_b.dispose()


def test_db_upgrade_command(db_url: str, tmp_path: Path) -> None:
    env = dict(os.environ, PACS_NODE_DATABASE_URL=db_url, PACS_NODE_DATA_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "pacs_node", "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "latest schema" in out.stdout
    db = Database(db_url)
    assert "job" in inspect(db.engine).get_table_names()
    db.dispose()


@pytest.mark.parametrize(
    "uid",
    ["", None, "1.2.3/../../etc", "../x", "1.2.a", "1." + "2" * 70, "1..2", "/abs", "1.2 3"],
)
def test_uids_that_could_escape_the_store_are_refused(uid: object) -> None:
    with pytest.raises(InvalidUID):
        validate_uid(uid)


def test_valid_uid_accepted() -> None:
    assert validate_uid("1.2.840.10008.5.1.4.1.1.2 ") == "1.2.840.10008.5.1.4.1.1.2"


def test_store_refuses_paths_outside(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    with pytest.raises(StorageError):
        store.path("../../etc/passwd")


def test_acknowledge_is_a_rename_into_the_journal(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    tmp = store.new_incoming_path()
    tmp.write_bytes(b"x" * 100)
    acked = store.acknowledge(tmp, "1.2.3")
    assert not tmp.exists() and acked.parent == store.acked_dir and acked.read_bytes() == b"x" * 100
    assert store.pending() == [acked]
    final = store.promote(acked, store.relpath("1", "2", "1.2.3"))
    assert final == store.root / "1" / "2" / "1.2.3.dcm" and store.pending() == []
    assert store.delete("1/2/1.2.3.dcm") and not (store.root / "1").exists()


def test_watermark_refuses(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", min_free_bytes=1 << 60)
    with pytest.raises(StorageFull, match="min_free_mb"):
        store.check_space()


def test_models_match_migrations(db_url: str) -> None:
    """A model change without its Alembic migration fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from storage.models import Base

    db = Database(db_url)
    db.upgrade()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.dispose()
    assert diff == [], diff
