"""Scale-out benchmark: jobs per minute with one and with two `pacs-node worker` processes.

    .venv/bin/python benchmarks/scale.py [--jobs 40] [--pg postgresql://postgres@127.0.0.1:5432/test]
                                         [--broker amqp://guest@127.0.0.1:5672//] [--broker-password guest]

What runs
    The distributed mode as deployed, on this machine: PostgreSQL and RabbitMQ on
    loopback, ``serve`` (a :class:`pacs_node.app.service.Node` in this process: enqueuer,
    lease reaper, router, dispatcher) and one, then two, ``pacs-node worker``
    processes (``--concurrency 1 --threads 1``, ``OMP_NUM_THREADS=1``: one CPU
    thread each), consuming the queue of one pipeline group.

The model and the jobs
    The tests' sphere finder (``pacs_lab/model_packages.py``: a small DynUNet, a
    native model package, built once into ``benchmarks/out/sphere-package``), on
    synthetic MR series of 32 x 32 x 16 voxels, each in a study of its own; a job
    is the whole worker path: read the series from the store, run the model,
    build and store SEG, SR and key image, queue their deliveries (none here),
    about 0.3-0.5 s of CPU. Every job gets a series of its own (no job supersedes
    another's results), received through the node's receive path beforehand.

What is timed
    Per worker count: the workers start and each runs warm-up jobs (models loaded),
    then ``--jobs`` PENDING jobs are created in one transaction and serve is woken
    (as the router does when it makes jobs PENDING). Throughput is jobs / (last
    ``finished_at`` - creation) x 60. Then, with the workers idle, ``--probes``
    jobs are created one at a time: ``enqueue_to_start_ms`` is the median of
    ``started_at - queued_at`` (serve publishing it, the broker, the worker's
    claim): the queueing overhead a job pays when a worker is free.

Checks
    Every job DONE exactly once (``attempts == 1``, one SEG, one SR, one key image,
    no output superseded, no SOP Instance UID twice); otherwise the script exits 1.

Output
    A table, then one JSON line::

        {"benchmark": "scale", "one_worker_jpm": ..., "two_workers_jpm": ..., "ratio": ...,
         "enqueue_to_start_ms": ..., ...}

    Target: ``ratio`` >= 1.6 on a machine with two free cores. The figures drop
    when something else uses the CPU: the script prints the load average, and
    ``worker_cores`` (the workers' CPU seconds over the phase's wall time: 2.0 means
    two full cores) with ``jobs_per_worker_cpu_min`` shows how much CPU they got.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository (for pacs_lab.model_packages), not benchmarks/, first

import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

from pacs_node.app.service import Node  # noqa: E402
from pacs_node.config import Settings, settings_from_mapping  # noqa: E402
from storage.models import Job, JobState, Output, Series, utcnow  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
GROUP = "bench"


class BenchmarkError(RuntimeError):
    """The benchmark could not produce a valid figure."""


def sphere_package() -> Path:
    from pacs_lab.model_packages import build_sphere_package

    folder = OUT / "sphere-package"
    if not (folder / "model.yaml").is_file():
        print("building the sphere model package (a few seconds)...", flush=True)
        build_sphere_package(folder)
    return folder


def make_database(admin_url: str) -> tuple[str, str]:
    import psycopg

    name = f"pacs_node_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rpartition("/")[0] + "/" + name, name


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def receive_series(node: Node, count: int) -> list[str]:
    """``count`` series, each in its own study, through the node's receive path; their UIDs."""
    import io

    from pacs_lab.model_packages import two_spheres
    from pacs_lab.synthetic import make_oriented_series

    uids = []
    for i in range(count):
        series = make_oriented_series(two_spheres(), rows=32, cols=32, slices=16, SeriesDescription=f"bench {i}")
        for ds in series:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            node.receiver.ingestor.receive_bytes(buf.getvalue(), calling_ae="BENCH", called_ae="PACSNODE")
        uids.append(str(series[0].SeriesInstanceUID))
    if not node.indexer.flush(120):
        raise BenchmarkError("the indexer did not catch up within 120 s")
    return uids


def create_jobs(node: Node, series_uids: list[str], tag: str) -> list[int]:
    """PENDING jobs on these series, in one transaction; serve is woken as the router wakes it."""
    ids = []
    with node.db.session() as session:
        rows = {s.series_uid: s for s in session.scalars(select(Series).where(Series.series_uid.in_(series_uids)))}
        now = utcnow()
        for uid in series_uids:
            job = Job(
                study_id=rows[uid].study_id,
                pipeline="spheres",
                route="bench",
                state=JobState.PENDING,
                inputs={"image": uid},
                destinations=[],
                trigger_series_uid=uid,
                input_key=f"bench|{tag}|{uid}",
                queued_at=now,
            )
            session.add(job)
            session.flush()
            ids.append(job.id)
    assert node.enqueuer is not None
    node.enqueuer.wake()
    return ids


def wait_done(node: Node, ids: list[int], timeout: float, workers: list[subprocess.Popen[bytes]]) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        with node.db.session() as session:
            jobs = list(session.scalars(select(Job).where(Job.id.in_(ids))))
        states = Counter(j.state for j in jobs)
        if states[JobState.FAILED]:
            bad = next(j for j in jobs if j.state is JobState.FAILED)
            raise BenchmarkError(f"job {bad.id} FAILED: {bad.reason}")
        if states[JobState.DONE] == len(ids):
            return jobs
        for proc in workers:
            if proc.poll() is not None:
                raise BenchmarkError(f"a worker exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"jobs not done within {timeout} s: {dict(states)}")
        time.sleep(0.25)  # the figures come from the rows' times, not from this loop


def check_once(node: Node, jobs: list[Job]) -> None:
    """Every job ran once and has one live set of outputs."""
    ids = [j.id for j in jobs]
    reruns = [j.id for j in jobs if j.attempts != 1]
    if reruns:
        raise BenchmarkError(f"jobs run more than once: {reruns}")
    with node.db.session() as session:
        outputs = list(session.scalars(select(Output).where(Output.job_id.in_(ids))))
    per_job = Counter((o.job_id, o.kind.value) for o in outputs)
    if len(per_job) != 3 * len(ids) or set(per_job.values()) != {1}:
        raise BenchmarkError(f"outputs not once per job and kind: {len(outputs)} outputs for {len(ids)} jobs")
    if len({o.sop_uid for o in outputs}) != len(outputs) or any(o.superseded_at for o in outputs):
        raise BenchmarkError("a SOP Instance UID was stored twice, or an output was superseded")


def _tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants still running (from /proc)."""
    hz = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / hz
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def start_workers(config: Path, count: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    for i in range(count):
        log = open(log_dir / f"worker-{count}-{i}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pacs_node", "--config", str(config), "worker", "--queues", GROUP]
                + ["--concurrency", "1", "--threads", "1", "--name", f"w{i}@bench"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + 180
    try:
        for i, proc in enumerate(procs):
            path = log_dir / f"worker-{count}-{i}.log"
            while f"worker w{i}@bench ready" not in path.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchmarkError(f"worker {i} did not start:\n{path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)
    except BaseException:
        stop_workers(procs)
        raise
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_phase(
    node: Node, config: Path, workers: int, series: list[str], n_jobs: int, probes: int, log_dir: Path
) -> dict[str, Any]:
    procs = start_workers(config, workers, log_dir)
    try:
        warm = series[: 2 * workers]
        rest = series[2 * workers :]
        warm_jobs = wait_done(node, create_jobs(node, warm, f"warm{workers}"), 180, procs)
        ran = {(j.worker_id or "").split("/")[0] for j in warm_jobs}
        if len(ran) < workers:
            extra = create_jobs(node, rest[: 2 * workers], f"warm{workers}b")
            rest = rest[2 * workers :]
            wait_done(node, extra, 180, procs)
        timed_series, probe_series = rest[:n_jobs], rest[n_jobs : n_jobs + probes]
        cpu0 = sum(_tree_cpu_s(p.pid) for p in procs)
        t0 = time.time()
        ids = create_jobs(node, timed_series, f"timed{workers}")
        jobs = wait_done(node, ids, 60 + 10 * n_jobs, procs)
        cpu_s = sum(_tree_cpu_s(p.pid) for p in procs) - cpu0
        last = max(j.finished_at for j in jobs if j.finished_at is not None).timestamp()
        elapsed = last - t0
        check_once(node, jobs)
        per_worker = Counter((j.worker_id or "?").split("/")[0] for j in jobs)
        totals = [float((j.timings or {}).get("total", 0.0)) for j in jobs]
        waits = []
        for i, uid in enumerate(probe_series):
            (probe,) = wait_done(node, create_jobs(node, [uid], f"probe{workers}-{i}"), 60, procs)
            if probe.started_at is None or probe.queued_at is None:
                raise BenchmarkError(f"probe job {probe.id} has no started_at/queued_at")
            waits.append((probe.started_at - probe.queued_at).total_seconds() * 1000)
        return {
            "workers": workers,
            "jobs": len(jobs),
            "seconds": round(elapsed, 2),
            "jpm": round(len(jobs) / elapsed * 60, 1),
            "job_s_median": round(statistics.median(totals), 3),
            # CPU the workers got: on a busy machine fewer cores than workers
            "worker_cores": round(cpu_s / (time.time() - t0), 2),
            "jobs_per_worker_cpu_min": round(len(jobs) / cpu_s * 60, 1) if cpu_s > 0 else None,
            "per_worker": dict(per_worker),
            "enqueue_to_start_ms": round(statistics.median(waits), 1) if waits else None,
        }
    finally:
        stop_workers(procs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--probes", type=int, default=8, help="sequential jobs timed for enqueue-to-start")
    parser.add_argument(
        "--pg", default=os.environ.get("PACS_NODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    )
    parser.add_argument("--broker", default="amqp://guest@127.0.0.1:5672//")
    parser.add_argument("--broker-password", default="guest")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and database")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    busy = subprocess.run(["pgrep", "-f", "pacs_lab.training"], capture_output=True, text=True).stdout.split()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    if busy:
        print(f"note: a model is training on this machine (pids {' '.join(busy)}): the figures are low", flush=True)

    package = sphere_package()
    workdir = Path(tempfile.mkdtemp(prefix="pacs-node-scale-"))
    db_url, db_name = make_database(args.pg)
    secret = workdir / "broker-password"
    secret.write_text(args.broker_password)
    cfg: dict[str, Any] = {
        "data_dir": str(workdir / "data"),
        "database_url": db_url,
        "log_level": "INFO",  # for the workers' log files (this process logs warnings only)
        "dicom": {"host": "127.0.0.1", "port": 0},
        "http": {"enabled": False},
        "storage": {"min_free_mb": 0},
        "routing": {"series_quiet_s": 3600, "poll_interval_s": 1.0},
        "retention": {"inputs_days": None, "results_days": None},
        "dispatch": {"enabled": False},
        "queue": {
            "backend": "celery",
            "broker_url": args.broker,
            "broker_password_file": str(secret),
            "groups": {"spheres": GROUP},
            "queue_prefix": f"bench{uuid.uuid4().hex[:6]}.",
            "lease_s": 30,
            "heartbeat_s": 5,
            "poll_interval_s": 0.5,
        },
        "pipelines": {"spheres": {"model": str(package)}},
    }
    config = workdir / "pacs-node.yaml"
    config.write_text(yaml.safe_dump(cfg))
    settings: Settings = settings_from_mapping(cfg, environ={})
    node = Node(settings)
    node.start()
    results: list[dict[str, Any]] = []
    try:
        per_phase = 4 * 2 + args.jobs + args.probes
        print(f"receiving {2 * per_phase} series...", flush=True)
        series = receive_series(node, 2 * per_phase)
        for workers, chunk in ((1, series[:per_phase]), (2, series[per_phase:])):
            print(f"{workers} worker(s): {args.jobs} jobs...", flush=True)
            results.append(run_phase(node, config, workers, chunk, args.jobs, args.probes, workdir))
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        node.stop()
        from pacs_node.process.celery_app import make_celery

        app = make_celery(settings)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(settings.queue.queue_name(GROUP))
        app.close()
        if not args.keep:
            drop_database(args.pg, db_name)
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir} and database {db_name}")

    one, two = results
    print()
    print(
        f"{'workers':>7}  {'jobs':>4}  {'seconds':>7}  {'jobs/min':>8}  {'job s (median)':>14}  "
        f"{'enqueue->start ms':>17}  {'worker cores':>12}  per worker"
    )
    for r in results:
        print(
            f"{r['workers']:>7}  {r['jobs']:>4}  {r['seconds']:>7}  {r['jpm']:>8}  {r['job_s_median']:>14}  "
            f"{r['enqueue_to_start_ms']:>17}  {r['worker_cores']:>12}  {r['per_worker']}"
        )
    ratio = round(two["jpm"] / one["jpm"], 2)
    print(f"\nratio two/one workers: {ratio} (target >= 1.6 with two free cores); no job lost or run twice")
    waits = [r["enqueue_to_start_ms"] for r in results if r["enqueue_to_start_ms"] is not None]
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "one_worker_jpm": one["jpm"],
                "two_workers_jpm": two["jpm"],
                "ratio": ratio,
                "enqueue_to_start_ms": round(statistics.median(waits), 1) if waits else None,
                "jobs": args.jobs,
                "job_s_median": [one["job_s_median"], two["job_s_median"]],
                "worker_cores": [one["worker_cores"], two["worker_cores"]],
                "jobs_per_worker_cpu_min": [one["jobs_per_worker_cpu_min"], two["jobs_per_worker_cpu_min"]],
                "load_average": [round(x, 2) for x in load],
                "cpus": os.cpu_count(),
                "training_running": bool(busy),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
