"""The worker inside `pacs-node serve`: jobs run by a real worker process on
series sent over DICOM, failures with reasons while the worker goes on, STAT
first, time limits, and the jobs commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from sqlalchemy import select

from pacs_lab.model_packages import two_spheres
from pacs_lab.synthetic import make_oriented_series, write_series
from pacs_node.config import Settings
from pacs_node.deliver.scu import send_files
from pacs_node.process.jobs import claim_next
from pacs_node.process.worker import RunnerCache
from storage.db import Database
from storage.models import Job, JobState, Study
from tests.conftest import wait_for


def _config(package: Path, **pipeline: Any) -> dict[str, Any]:
    return {
        "pipelines": {
            "spheres": {
                "model": str(package),
                "inputs": {"image": {"match": {"SeriesDescription": "spheres.*"}}},
                **pipeline,
            },
            "missing-model": {
                "model": str(package.parent / "nowhere"),
                "inputs": {"image": {"match": {"SeriesDescription": "nomodel"}}},
            },
        },
        "routes": [
            {"name": "spheres", "pipeline": "spheres", "priority": "normal"},
            {"name": "missing-model", "pipeline": "missing-model"},
        ],
        "worker": {"processes": 1, "poll_interval_s": 0.2},
    }


def _jobs(db: Database) -> list[Job]:
    with db.session() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_worker_runs_jobs_and_survives_failures(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Any], sphere_package: Path, tmp_path: Path
) -> None:
    settings = make_settings(_config(sphere_package))
    node = run_node(settings)
    good = make_oriented_series(two_spheres(), rows=32, cols=32, slices=16, SeriesDescription="spheres ok")
    broken = make_oriented_series(two_spheres(), rows=32, cols=32, slices=16, SeriesDescription="spheres broken")
    del broken[7]  # a slice lost on the way
    nomodel = make_oriented_series(two_spheres(), rows=16, cols=16, slices=4, SeriesDescription="nomodel")
    files = write_series(tmp_path / "in", broken + nomodel + good)
    assert set(send_files("127.0.0.1", node.scp.port, [str(f) for f in files], called_ae="PACSNODE").values()) == {0}

    def finished() -> list[Job] | None:
        jobs = _jobs(node.db)
        return jobs if len(jobs) == 3 and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs) else None

    jobs = wait_for(finished, 120, interval=0.2, what="three jobs to finish")
    by_desc = {}
    with node.db.session() as s:
        for job in jobs:
            study = s.get(Study, job.study_id)
            assert study is not None
            desc = next(x.series_description for x in study.series if x.series_uid in job.inputs.values())
            by_desc[desc] = job
    failed_geometry = by_desc["spheres broken"]
    assert failed_geometry.state is JobState.FAILED and "missing" in (failed_geometry.reason or "")
    failed_model = by_desc["nomodel"]
    assert failed_model.state is JobState.FAILED and "nowhere" in (failed_model.reason or "")
    ok = by_desc["spheres ok"]
    assert ok.state is JobState.DONE, ok.reason
    assert ok.model_name == "test-spheres" and ok.model_version == "1.0.0"
    assert ok.model_checksums and all(len(v) == 64 for v in ok.model_checksums.values())
    assert {"load_model", "read_inputs", "preprocess", "predict", "postprocess", "total"} <= set(ok.timings or {})
    labels = ok.metrics["segments"]  # type: ignore[index]
    assert labels["1"]["volume_ml"] > labels["2"]["volume_ml"] > 0
    img = sitk.ReadImage(str(settings.data_dir / ok.result_path))  # type: ignore[operator]
    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == (16, 32, 32) and set(np.unique(arr)) == {0, 1, 2}
    # The label file carries the source geometry: label 1 (left) lies at patient x > 0.
    idx = np.argwhere(arr == 1)[0]
    assert img.TransformIndexToPhysicalPoint([int(idx[2]), int(idx[1]), int(idx[0])])[0] > 0

    # The administrator's view of the same jobs
    env = dict(os.environ, PACS_NODE_DATABASE_URL=settings.db_url, PACS_NODE_DATA_DIR=str(settings.data_dir))
    out = subprocess.run([sys.executable, "-m", "pacs_node", "jobs", "list"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "FAILED" in out.stdout and "DONE" in out.stdout and "missing" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "pacs_node", "jobs", "show", str(ok.id)], capture_output=True, text=True, env=env
    )
    shown = json.loads(out.stdout)
    assert shown["state"] == "DONE" and shown["metrics"]["segments"]["1"]["name"] == "Left sphere"
    series_uid = ok.inputs["image"]
    out = subprocess.run(
        [sys.executable, "-m", "pacs_node", "jobs", "rerun", "--series", series_uid],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0 and "re-run of job" in out.stdout
    wait_for(lambda: len(_jobs(node.db)) == 4 and _jobs(node.db)[-1].state is JobState.DONE, 60, what="the re-run")


def test_job_past_its_time_limit_is_stopped_and_the_worker_restarted(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Any], sphere_package: Path, tmp_path: Path
) -> None:
    # 0.2 s is less than loading the model takes, so the first job overruns.
    settings = make_settings(_config(sphere_package, time_limit_s=0.2))
    node = run_node(settings)
    series = make_oriented_series(two_spheres(), rows=16, cols=16, slices=8, SeriesDescription="spheres slow")
    files = write_series(tmp_path / "in", series)
    send_files("127.0.0.1", node.scp.port, [str(f) for f in files], called_ae="PACSNODE")
    job = wait_for(
        lambda: next((j for j in _jobs(node.db) if j.state is JobState.FAILED), None), 60, what="the job to be stopped"
    )
    assert "time limit" in (job.reason or "") and "time_limit_s" in (job.reason or "")
    worker = next(iter(node.workers._procs.values()))
    wait_for(worker.is_alive, 30, what="the worker to be restarted")


def test_claim_takes_stat_first_and_only_once(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.upgrade()
    with db.session() as s:
        st = Study(study_uid="1.2.3")
        s.add(st)
        s.flush()
        for i, (prio, rank) in enumerate([("low", 2), ("normal", 1), ("stat", 0), ("normal", 1)]):
            s.add(
                Job(
                    study_id=st.id,
                    pipeline="p",
                    route="r",
                    state=JobState.PENDING,
                    priority=prio,
                    priority_rank=rank,
                    input_key=str(i),
                )
            )
    order = [claim_next(db, "w1") for _ in range(5)]
    with db.session() as s:
        prios = [s.get(Job, i).priority for i in order if i is not None]  # type: ignore[union-attr]
    assert prios == ["stat", "normal", "normal", "low"] and order[-1] is None
    db.dispose()


def test_preload_loads_and_warms_every_pipeline_model_before_the_first_job(
    make_settings: Callable[..., Settings], sphere_package: Path, tmp_path: Path, caplog: Any
) -> None:
    config = _config(sphere_package)
    config["pipelines"]["missing"] = {"model": str(tmp_path / "nowhere"), "inputs": {"image": {}}}
    settings = make_settings(config, worker={"preload": True})
    assert Settings.model_validate({}).worker.preload  # on by default (the tests' settings turn it off)
    runners = RunnerCache()
    with caplog.at_level("INFO"):
        runners.preload(settings)
    # the sphere model is loaded (the next lookup is the same object) and warmed up; the missing one is
    # reported, and the worker starts all the same (its job will fail with the reason)
    loaded = runners(str(sphere_package), True)
    assert runners(str(sphere_package), True) is loaded
    assert any("warmed up" in r.getMessage() for r in caplog.records)
    assert any("missing" in r.getMessage() and "not preloaded" in r.getMessage() for r in caplog.records)
