"""Dashboard benchmark: server time of the main pages over a large database.

Run from the repository root with the project's virtual environment::

    .venv/bin/python benchmarks/dashboard.py [--studies 10000] [--jobs 30000] [--repeat 20] [--pg URL] [--keep]

What it does
    1. Creates a fresh database (a SQLite file in a temporary folder, or a new
       PostgreSQL database on the server ``--pg`` names, dropped at the end) and
       migrates it to head, as ``pacs-node serve`` does.
    2. Fills it with bulk inserts (SQLAlchemy Core ``executemany``, 5,000 rows a
       statement): ``--studies`` studies with 2 series each; ``--jobs`` jobs spread
       over them (newest first in id order, as they arrive), 88% DONE, 5% FAILED and
       the rest CANCELLED, PENDING, WAITING or RUNNING, each DONE job with the metrics
       and stage timings a worker writes and three outputs (SEG, SR, key image with
       a PNG preview path); every output has a delivery to ``pacs`` (97% delivered,
       the rest failed or pending) and every tenth one to ``archive`` as well.
    3. Starts the node's HTTP application (uvicorn on 127.0.0.1, a free port,
       embedded default pipelines so that the models page has its three models) and
       requests each page ``--repeat`` times after two warm-up requests, reading
       the ``Server-Timing: app;dur=`` header the application sets (time until
       the answer's headers go out; the pages are rendered before that).
    4. Prints a table (median and 95th percentile of the server time, the client's
       median, the page's size) and ends with one JSON line::

           {"benchmark": "dashboard", "max_ms": ..., "pages": {"<page>": ms, ...}, ...}

       where each page's figure is the median server time; the target is every
       page under 200 ms.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

# Run as a script, this folder is on sys.path, where benchmarks/inference.py would
# shadow the ``inference`` package: the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from sqlalchemy import insert

from pacs_node.common.store import open_store
from pacs_node.config import Settings, settings_from_mapping
from pacs_node.config.defaults import embedded_defaults
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import Ingestor
from pacs_node.web import HttpServer
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
)

CHUNK = 5000
NAMES = ["Smith", "Jones", "Garcia", "Müller", "Rossi", "Dubois", "Kowalski", "Nakamura", "Silva", "Jansen"]
PIPELINES = ("stroke", "dentate", "kidney")


def _uid(prefix: str, i: int) -> str:
    return f"1.2.826.0.1.3680043.10.1453.9.{prefix}.{i}"


def _chunks(rows: list[dict[str, Any]]) -> Any:
    for start in range(0, len(rows), CHUNK):
        yield rows[start : start + CHUNK]


def fill(db: Database, studies: int, jobs: int, seed: int = 0) -> dict[str, Any]:
    """Bulk-insert the benchmark's rows; returns what the pages will be asked about."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    t0 = now - timedelta(days=60)
    step = timedelta(days=60) / max(1, studies)
    study_rows, series_rows = [], []
    for i in range(1, studies + 1):
        created = t0 + i * step
        study_rows.append(
            {
                "id": i,
                "study_uid": _uid("1", i),
                "patient_name": f"{NAMES[i % len(NAMES)]}^Patient{i}",
                "patient_id": f"P{i:07d}",
                "patient_birth_date": "19600101",
                "patient_sex": "O",
                "accession_number": f"A{i:08d}",
                "study_date": created.strftime("%Y%m%d"),
                "study_description": rng.choice(["MRI HEAD STROKE", "MR BRAIN QSM", "CT ABDOMEN PV"]),
                "created_at": created,
                "updated_at": created,
            }
        )
        for k in range(2):
            series_rows.append(
                {
                    "id": 2 * i - 1 + k,
                    "series_uid": _uid("2", 2 * i - 1 + k),
                    "study_id": i,
                    "modality": "MR",
                    "series_number": k + 1,
                    "series_description": ["DWI", "ADC"][k],
                    "header": {},
                    "state": SeriesState.ROUTED,
                    "instance_count": 24,
                    "frames_received": 24,
                    "first_received_at": created,
                    "last_received_at": created,
                    "completed_at": created,
                    "routed_at": created,
                    "reopen_count": 0,
                }
            )
    states = [JobState.DONE] * 88 + [JobState.FAILED] * 5 + [JobState.CANCELLED] * 3
    states += [JobState.PENDING] * 2 + [JobState.WAITING, JobState.RUNNING]
    job_rows, output_rows, delivery_rows = [], [], []
    out_id = 0
    for j in range(1, jobs + 1):
        study_id = min(studies, 1 + (j - 1) * studies // jobs)
        created = t0 + study_id * step + timedelta(seconds=j % 60)
        state = rng.choice(states)
        pipeline = PIPELINES[j % 3]
        done = state is JobState.DONE
        job_rows.append(
            {
                "id": j,
                "study_id": study_id,
                "pipeline": pipeline,
                "route": f"{pipeline}-route",
                "state": state,
                "priority": "normal",
                "priority_rank": 1,
                "inputs": {"dwi": _uid("2", 2 * study_id - 1), "adc": _uid("2", 2 * study_id)},
                "destinations": ["pacs"],
                "input_key": f"{pipeline}|{j}",
                "reason": "input: no series matched the required role adc" if state is JobState.FAILED else None,
                "created_at": created,
                "updated_at": created,
                "started_at": created + timedelta(seconds=2) if state is not JobState.WAITING else None,
                "finished_at": created + timedelta(seconds=20) if state.terminal else None,
                "attempts": 1,
                "metrics": {
                    "voxel_volume_ml": 0.001,
                    "labels": {
                        "1": {"name": "Stroke lesion", "voxels": 5300, "volume_ml": round(rng.uniform(0.1, 40), 3)}
                    },
                }
                if done
                else None,
                "timings": {
                    "load_model": 0.01,
                    "read_inputs": 0.4,
                    "preprocess": 0.3,
                    "predict": round(rng.uniform(2, 9), 3),
                    "postprocess": 0.1,
                    "outputs": 1.1,
                    "total": 12.0,
                }
                if done
                else None,
                "model_name": f"demo-{pipeline}" if done else None,
                "model_version": "1.0.0" if done else None,
            }
        )
        if not done:
            continue
        for kind in (OutputKind.SEG, OutputKind.SR, OutputKind.KEY_IMAGE):
            out_id += 1
            output_rows.append(
                {
                    "id": out_id,
                    "job_id": j,
                    "study_id": study_id,
                    "kind": kind,
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
                    "series_uid": _uid(f"3.{kind.value}", j),
                    "sop_uid": _uid(f"4.{kind.value}", j),
                    "path": f"{study_id}/{j}/{kind.value}.dcm",
                    "png_path": f"results/{j}/key-image.png" if kind is OutputKind.KEY_IMAGE else None,
                    "size_bytes": 100_000,
                    "created_at": created,
                }
            )
            roll = rng.random()
            d_state = (
                DeliveryState.DELIVERED
                if roll < 0.97
                else DeliveryState.FAILED
                if roll < 0.99
                else DeliveryState.PENDING
            )
            for dest in ("pacs", "archive") if out_id % 10 == 0 else ("pacs",):
                delivery_rows.append(
                    {
                        "output_id": out_id,
                        "job_id": j,
                        "study_id": study_id,
                        "destination": dest,
                        "state": d_state,
                        "attempts": 1 if d_state is DeliveryState.DELIVERED else 5,
                        "created_at": created,
                        "updated_at": created,
                        "delivered_at": created + timedelta(seconds=25) if d_state is DeliveryState.DELIVERED else None,
                        "last_status": 0 if d_state is DeliveryState.DELIVERED else None,
                        "last_error": None if d_state is DeliveryState.DELIVERED else "cannot connect to pacs",
                        "permanent": False,
                    }
                )
    start = time.perf_counter()
    with db.session() as s:
        for model, rows in (
            (Study, study_rows),
            (Series, series_rows),
            (Job, job_rows),
            (Output, output_rows),
            (Delivery, delivery_rows),
        ):
            for chunk in _chunks(rows):
                s.execute(insert(model.__table__), chunk)  # Core executemany: no ORM bookkeeping
    seconds = time.perf_counter() - start
    if db.dialect == "postgresql":
        with db.engine.begin() as conn:
            for table in ("study", "series", "job", "output", "delivery"):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )
            conn.exec_driver_sql("ANALYZE")
    else:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return {
        "rows": {
            "study": len(study_rows),
            "series": len(series_rows),
            "job": len(job_rows),
            "output": len(output_rows),
            "delivery": len(delivery_rows),
        },
        "insert_s": round(seconds, 2),
        "study_uid": study_rows[len(study_rows) // 2]["study_uid"],
        "job_id": job_rows[len(job_rows) // 2]["id"],
        "name": NAMES[3],
    }


def pages(info: dict[str, Any]) -> dict[str, str]:
    """The pages timed: each list's first page and a deep one, a search, a detail page of each kind."""
    return {
        "overview": "/ui/",
        "studies": "/ui/studies",
        "studies page 100": "/ui/studies?page=100",
        "studies search": f"/ui/studies?q={info['name']}",
        "study": f"/ui/studies/{info['study_uid']}",
        "jobs": "/ui/jobs",
        "jobs failed": "/ui/jobs?state=failed",
        "jobs page 300": "/ui/jobs?page=300",
        "job": f"/ui/jobs/{info['job_id']}",
        "deliveries": "/ui/deliveries",
        "deliveries failed": "/ui/deliveries?state=failed",
        "rules": "/ui/rules",
        "models": "/ui/models",
        "overview refresh": "/ui/?partial=1",
    }


def measure(url: str, paths: dict[str, str], repeat: int) -> dict[str, dict[str, float]]:
    """Median and 95th percentile of each page's server time (ms), the client's median and the page's size."""
    out: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, path in paths.items():
            server, wall, size = [], [], 0
            for i in range(repeat + 2):
                t = time.perf_counter()
                r = client.get(path)
                elapsed = (time.perf_counter() - t) * 1000
                if r.status_code != 200:
                    raise SystemExit(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
                if i < 2:
                    continue  # warm-up
                timing = r.headers.get("server-timing", "")
                server.append(float(timing.split("dur=")[1]) if "dur=" in timing else elapsed)
                wall.append(elapsed)
                size = len(r.content)
            server.sort()
            out[name] = {
                "median_ms": round(statistics.median(server), 1),
                "p95_ms": round(server[min(len(server) - 1, int(0.95 * len(server)))], 1),
                "client_ms": round(statistics.median(wall), 1),
                "kb": round(size / 1024, 1),
            }
    return out


def _settings(data_dir: Path, url: str) -> Settings:
    tree = embedded_defaults()
    tree.update(
        {
            "data_dir": str(data_dir),
            "database_url": url,
            "log_level": "WARNING",
            "http": {"host": "127.0.0.1", "port": 0, "dashboard_refresh_s": 0},
            "storage": {"min_free_mb": 0},
            "destinations": {
                "pacs": {"type": "dimse", "host": "127.0.0.1", "port": 11112, "ae_title": "PACS"},
                "archive": {"type": "dimse", "host": "127.0.0.1", "port": 11113, "ae_title": "ARCHIVE"},
            },
        }
    )
    return settings_from_mapping(tree, source="benchmark settings")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--pg", help="PostgreSQL server URL (a database is created there and dropped)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (and database)")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="pacs-node-dashboard-bench-"))
    pg_name = None
    if args.pg:
        import psycopg

        pg_name = f"pacs_node_bench_{uuid.uuid4().hex[:10]}"
        admin = args.pg.replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
        url = args.pg.rsplit("/", 1)[0] + "/" + pg_name
    else:
        url = f"sqlite:///{tmp / 'pacs-node.db'}"
    db = Database(url)
    server = None
    try:
        db.upgrade()
        info = fill(db, args.studies, args.jobs)
        settings = _settings(tmp, url)
        store = open_store(settings)
        ingestor = Ingestor(store, Indexer(db, store).submit)
        server = HttpServer(settings, db, store, ingestor)
        server.start()
        results = measure(server.url, pages(info), args.repeat)
    finally:
        if server is not None:
            server.stop()
        db.dispose()
        if pg_name and not args.keep:
            import psycopg

            with psycopg.connect(args.pg.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}"')
        if args.keep:
            print(f"kept {tmp}" + (f" and database {pg_name}" if pg_name else ""))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    dialect = "postgresql" if args.pg else "sqlite"
    rows = ", ".join(f"{n} {k}" for k, n in info["rows"].items())
    print(f"database: {dialect}; {rows}; bulk insert {info['insert_s']} s")
    print(f"{'page':<20} {'server median ms':>16} {'p95 ms':>8} {'client ms':>10} {'KiB':>7}")
    for name, r in results.items():
        print(f"{name:<20} {r['median_ms']:>16.1f} {r['p95_ms']:>8.1f} {r['client_ms']:>10.1f} {r['kb']:>7.1f}")
    figures = {name: r["median_ms"] for name, r in results.items()}
    print(
        json.dumps(
            {
                "benchmark": "dashboard",
                "database": dialect,
                "max_ms": max(figures.values()),
                "pages": figures,
                "p95_ms": {name: r["p95_ms"] for name, r in results.items()},
                "rows": info["rows"],
                "insert_s": info["insert_s"],
                "repeat": args.repeat,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
