"""Measure what deploy/SIZING.md reports: per demo pipeline, a worker's memory, CPU time per job
and the disk a study takes (inputs received, results stored).

    .venv/bin/python deploy/sizing.py [--threads 1,2] [--pipelines stroke,dentate,kidney] [--gpu]

Each pipeline is measured in a fresh child process per thread count (so that
memory figures are its own): the demo case of ``pacs_node.app.demo.DEMO_CASES`` is
made, ``ModelRunner`` loads the package (RSS after loading), the case runs
twice (the second, warm, run is timed; VmHWM after it is the peak), then SEG,
SR and key image are built and encoded (their sizes are the results' disk).
With ``--gpu`` the model runs on the GPU (``device: auto``) and the peak GPU memory
PyTorch allocated (``torch.cuda.max_memory_allocated``) and reserved are reported too;
the CUDA context itself (a few hundred MB per process) comes on top.
Prints a Markdown table and one JSON line per pipeline and thread count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _status_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = round(float(line.split()[1]) / 1024, 1)
    return out


def _encoded(ds: Any) -> int:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return len(buf.getvalue())


def measure(pipeline: str, threads: int, gpu: bool = False) -> dict[str, Any]:
    """In this process: one pipeline, one thread count (on the GPU with ``gpu``)."""
    import torch

    torch.set_num_threads(threads)
    from inference.pipeline import ModelRunner
    from pacs_lab.tasks import get_task
    from pacs_node.app.demo import DEMO_CASES
    from pacs_node.config import load_settings
    from pacs_node.process.results import build_outputs
    from storage.models import Job

    settings = load_settings(None, environ={})
    spec = settings.pipelines[pipeline]
    task, seed = DEMO_CASES[pipeline]
    case = get_task(task).case(seed)
    inputs = {role: list(series) for role, series in case.inputs.items()}
    input_bytes = sum(_encoded(ds) for series in inputs.values() for ds in series)
    instances = sum(len(series) for series in inputs.values())
    before = _status_mb()
    t0 = time.perf_counter()
    runner = ModelRunner(spec.model, allow_gpu=gpu)
    load_s = time.perf_counter() - t0
    loaded = _status_mb()
    runner.run(inputs)  # cold
    c0, t0 = time.process_time(), time.perf_counter()
    result = runner.run(inputs)
    run_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    job = Job(pipeline=pipeline, route=pipeline, destinations=[])
    built, _ = build_outputs(settings, job, result, inputs, runner.manifest)
    outputs_s = time.perf_counter() - t0
    peak = _status_mb()
    weights = sum(p.stat().st_size for p in Path(spec.model).glob("*.safetensors"))
    extra: dict[str, Any] = {}
    if gpu and torch.cuda.is_available():
        extra = {
            "gpu_peak_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "gpu_peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1),
        }
    return {
        "pipeline": pipeline,
        "threads": threads,
        "instances": instances,
        "input_mb": round(input_bytes / 2**20, 2),
        "results_mb": round(sum(_encoded(b.dataset) for b in built) / 2**20, 2),
        "weights_mb": round(weights / 2**20, 1),
        "load_s": round(load_s, 2),
        "inference_s": round(run_s, 2),
        "inference_cpu_s": round(cpu_s, 2),
        "outputs_s": round(outputs_s, 2),
        "rss_imports_mb": before["VmRSS"],
        "rss_loaded_mb": loaded["VmRSS"],
        "peak_mb": peak["VmHWM"],
        **extra,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--pipelines", default="stroke,dentate,kidney")
    ap.add_argument("--gpu", action="store_true", help="run the models on the GPU and report its memory")
    ap.add_argument("--child", nargs=3, metavar=("PIPELINE", "THREADS", "GPU"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.child[2] == "gpu")))
        return 0
    rows = []
    for pipeline in args.pipelines.split(","):
        if not (ROOT / "models" / pipeline / "model.yaml").is_file():
            print(f"skipping {pipeline}: models/{pipeline} is not there (not trained yet?)", file=sys.stderr)
            continue
        for threads in (int(t) for t in args.threads.split(",")):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
            env = {k: v for k, v in env.items() if not k.startswith("PACS_NODE_")}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", pipeline, str(threads), "gpu" if args.gpu else "cpu"],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({"benchmark": "sizing", **row}), flush=True)
    cols = list(rows[0]) if rows else []
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
