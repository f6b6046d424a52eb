"""Inference benchmark: the node's DICOM-to-labels path against nnU-Net's own predictor, on CPU.

Run from the repository root with the project's virtual environment::

    .venv/bin/python benchmarks/inference.py [--threads 2] [--repeat 1] [--cache benchmarks/out] [--rebuild] [--keep]

This script imports from ``tests/`` (it puts the repository root on ``sys.path``):
``pacs_lab.tiny_nnunet`` builds the model and draws the phantoms, and
``pacs_lab.tiny_nnunet.nnunet_package`` wraps the results folder into a
pacs-node model package.

The model
    The tiny but real nnU-Net v2 results folder of the tests
    (:func:`pacs_lab.tiny_nnunet.build_tiny_nnunet`, seed 0: planned and
    preprocessed by nnU-Net itself, ``3d_fullres``, target spacing 2 x 1 x 1 mm
    z, y, x), built once into ``<cache>/tiny_nnunet`` (about a minute; again
    when it is missing or with ``--rebuild``). ``<cache>`` defaults to
    ``benchmarks/out/``, which git ignores. Both paths run this same folder,
    fold 0, ``checkpoint_final.pth``, tile step 0.5, Gaussian weighting, and
    mirroring (test-time augmentation) OFF.

The cases
    Two phantoms of the tests' family (:func:`pacs_lab.tiny_nnunet.make_case`: a
    bright sphere = label 1 and a box = label 2 in noise), at a realistic size
    and at spacings that differ from the model's, so that nnU-Net resamples
    the image to 2 x 1 x 1 mm and the prediction back (the script checks with
    nnU-Net's own ``compute_new_shape`` that the shapes differ):

    * case 1: (40, 192, 192) voxels z, y, x at (2.5, 0.8, 0.8) mm (``--shape``, ``--spacing``);
    * case 2: (44, 176, 208) voxels at (3.0, 0.75, 0.75) mm (another seed), run
      after case 1 in the same process: the "warm second case".

    Each is written as an axial MR DICOM series (int16, one Part 10 file per
    slice); the NIfTI nnU-Net reads is made from those files by SimpleITK's
    DICOM reader (as ``tests/test_nnunet_dicom.py`` does), so both paths see
    the same image.

What is timed (each path in its own process, started by this script)
    * ``node`` (``inference.py _node``): ``ModelRunner(package, allow_gpu=False)``
      is built first (not timed); then, per case, the timer runs from reading the
      series files with ``pydicom.dcmread`` to ``ModelRunner.run`` returning the
      label volume on the source grid. The per-stage breakdown is ``read`` (the
      dcmread loop) and ``result.timings`` (``preprocess``: volume from the
      datasets; ``predict``: the nnU-Net stage; ``postprocess``: manifest
      post-processing and measurements).
    * ``nnunet`` (``inference.py _nnunet``): ``nnUNetPredictor(use_mirroring=False,
      perform_everything_on_device=False, device=cpu)`` and
      ``initialize_from_trained_model_folder`` first (not timed); then, per case,
      one ``predict_from_files([[nifti]], [output], num_processes_preprocessing=1,
      num_processes_segmentation_export=1)`` call, which reads the NIfTI,
      preprocesses it in a worker process, predicts, and resamples and writes the
      segmentation in an export worker process, as nnU-Net does it. Those
      workers are started by nnU-Net inside the call and are part of its time.

    Interpreter start-up and imports are outside the timed sections. Both
    children get ``torch.set_num_threads(--threads)`` and ``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS`` and ``nnUNet_def_n_proc`` = ``--threads`` (nnU-Net sets
    torch's thread count to ``nnUNet_def_n_proc``, default 8, while it
    resamples the prediction back), so nnU-Net's workers use the same count.

Memory
    Each child reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the RSS
    high-water mark) just before the first timed case (``peak0``; with the
    current RSS from ``/proc/self/status``, ``rss0``: model loaded, imports
    done), and after each case (``peak``). nnU-Net's worker processes are not in
    its RUSAGE_SELF, and RUSAGE_CHILDREN would count the parent's RSS in them
    (a fork + exec child starts with it): a thread in the nnU-Net child polls its
    spawned workers' own ``VmHWM`` every 20 ms, and the largest is printed as
    ``workers``.

CPU time
    ``cpu_s`` is user + system CPU time of the child (and of its workers, once
    they have exited) over the timed case; steadier than wall time on a busy
    machine.

Repeats
    With ``--repeat N`` both children run N times, alternating (node, nnunet,
    node, ...), and every figure is the median of its N values.

Agreement
    The node's label volumes (of the last run) are compared with nnU-Net's
    written segmentations, Dice per label; below 0.99 the script exits 1.

Output
    A table, the node's per-stage breakdown, the Dice figures, then one JSON line::

        {"benchmark": "inference", "node_s": ..., "nnunet_s": ..., "ratio": node/nnunet,
         "warm_second_case_s": ..., "nnunet_warm_second_case_s": ..., ...}

    Wall times move a lot between runs on a small shared machine: use
    ``--repeat 3`` to compare, and run one benchmark at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# this file is named inference.py: its own folder must not shadow the ``inference`` package
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASE2_SHAPE = (44, 176, 208)
CASE2_SPACING = (3.0, 0.75, 0.75)
SEEDS = (11, 12)
FOLDS = (0,)
CHECKPOINT = "checkpoint_final.pth"
TILE_STEP = 0.5


class BenchmarkError(RuntimeError):
    """The benchmark could not produce a valid figure."""


def _mb(kib: float) -> float:
    return round(kib / 1024.0, 1)


def _status(pid: int | str) -> dict[str, float]:
    """VmRSS and VmHWM (MB) of a process, from /proc; empty when it is gone or /proc is absent."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = _mb(float(line.split()[1]))
    except (OSError, ValueError, IndexError):
        pass
    return out


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


class WorkerSampler:
    """Polls this process's spawned worker processes (nnU-Net's) every 20 ms for their RSS high-water marks.

    ``ru_maxrss`` of RUSAGE_CHILDREN cannot be used for them: a child created by fork + exec starts
    with the parent's RSS counted in its high-water mark. A spawned worker's own ``VmHWM`` (read from
    /proc while it lives) is its own. Forked helpers (multiprocessing's Manager) are left out.
    """

    def __init__(self) -> None:
        import threading

        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> WorkerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            todo, seen = _children(me), set()
            while todo:
                pid = todo.pop()
                if pid in seen:
                    continue
                seen.add(pid)
                todo += _children(pid)
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"multiprocessing" not in cmdline:  # spawned workers: python -c 'from multiprocessing...'
                    continue
                hwm = _status(pid).get("VmHWM")
                if hwm is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)
            self._stop.wait(0.02)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _memory() -> dict[str, float]:
    """Current RSS and the high-water mark so far (MB)."""
    out = {"maxrss_mb": _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}
    rss = _status("self").get("VmRSS")
    if rss is not None:
        out["rss_mb"] = rss
    return out


# ---------------------------------------------------------------------------
# children: one path each, in its own process
# ---------------------------------------------------------------------------
def node_main(argv: Sequence[str]) -> int:
    """``inference.py _node PACKAGE RESULT_JSON LABELS_DIR DICOM_DIR...``: the node's path."""
    parser = argparse.ArgumentParser(prog="inference.py _node")
    parser.add_argument("package")
    parser.add_argument("result")
    parser.add_argument("labels_dir")
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)

    import pydicom
    import torch

    from inference.pipeline import ModelRunner

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    runner = ModelRunner(args.package, allow_gpu=False)
    load_s = time.perf_counter() - t
    files = [sorted(Path(c).glob("*.dcm")) for c in args.cases]
    out: dict[str, Any] = {"load_s": round(load_s, 3), "before": _memory(), "cases": []}
    for i, case_files in enumerate(files):
        c0, t0 = _cpu_s(), time.perf_counter()
        datasets = [pydicom.dcmread(p) for p in case_files]
        t1 = time.perf_counter()
        result = runner.run({"image": datasets})
        t2, c2 = time.perf_counter(), _cpu_s()
        labels = result.labels.array
        np.save(Path(args.labels_dir) / f"case{i + 1}.npy", np.asarray(labels, dtype=np.uint8))
        out["cases"].append(
            {
                "seconds": round(t2 - t0, 3),
                "cpu_s": round(c2 - c0, 3),
                "stages": {"read": round(t1 - t0, 3), **result.timings},
                "after": _memory(),
                "shape": list(labels.shape),
            }
        )
        del datasets, result, labels
    out["threads"] = torch.get_num_threads()
    out["torchvision_imported"] = "torchvision" in sys.modules
    Path(args.result).write_text(json.dumps(out))
    return 0


def nnunet_main(argv: Sequence[str]) -> int:
    """``inference.py _nnunet MODEL_FOLDER RESULT_JSON OUT_DIR NIFTI...``: nnU-Net's own predictor."""
    parser = argparse.ArgumentParser(prog="inference.py _nnunet")
    parser.add_argument("model_folder")
    parser.add_argument("result")
    parser.add_argument("out_dir")
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    predictor = nnUNetPredictor(
        tile_step_size=TILE_STEP,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(args.model_folder, use_folds=FOLDS, checkpoint_name=CHECKPOINT)
    load_s = time.perf_counter() - t
    out: dict[str, Any] = {"load_s": round(load_s, 3), "before": _memory(), "cases": []}
    for i, nifti in enumerate(args.cases):
        ofile = str(Path(args.out_dir) / f"case{i + 1}")
        with WorkerSampler() as workers:
            c0, t0 = _cpu_s(), time.perf_counter()
            predictor.predict_from_files(
                [[nifti]],
                [ofile],
                save_probabilities=False,
                overwrite=True,
                num_processes_preprocessing=1,
                num_processes_segmentation_export=1,
            )
            t1, c1 = time.perf_counter(), _cpu_s()
        out["cases"].append(
            {
                "seconds": round(t1 - t0, 3),
                "cpu_s": round(c1 - c0, 3),
                "after": _memory(),
                "workers_peak_mb": sorted(workers.peaks.values(), reverse=True),
            }
        )
    out["threads"] = torch.get_num_threads()
    out["use_mirroring"] = bool(predictor.use_mirroring)
    Path(args.result).write_text(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------
# the parent: model, cases, children, report
# ---------------------------------------------------------------------------
def ensure_model(cache: Path, rebuild: bool) -> Path:
    """The tiny nnU-Net root (``nnUNet_results`` inside), built when missing or asked to."""
    from pacs_lab.tiny_nnunet import DATASET_NAME, TRAINER_FOLDER, build_tiny_nnunet

    root = cache / "tiny_nnunet"
    checkpoint = root / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER / f"fold_{FOLDS[0]}" / CHECKPOINT
    if rebuild or not checkpoint.is_file():
        if root.exists():
            shutil.rmtree(root)
        print(f"building the tiny nnU-Net results folder in {root} (about a minute) ...", flush=True)
        t = time.perf_counter()
        build_tiny_nnunet(root, seed=0)
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    if not checkpoint.is_file():
        raise BenchmarkError(f"{checkpoint} missing after the build")
    return root


def write_case(image: np.ndarray, spacing_zyx: tuple[float, float, float], folder: Path) -> tuple[Path, Path]:
    """The phantom as an axial MR DICOM series (increasing z), and its NIfTI made by SimpleITK from the files."""
    import SimpleITK as sitk

    from pacs_lab.synthetic import make_series, write_series

    nz, ny, nx = image.shape
    sz, sy, sx = spacing_zyx
    series = list(make_series(nz, modality="MR", rows=ny, cols=nx, spacing=(sx, sy, sz), pixels=False))
    for k, ds in enumerate(series):
        ds.ImagePositionPatient = [-nx * sx / 2, -ny * sy / 2, 10.0 + k * sz]
        ds.PixelRepresentation = 1
        ds.PixelData = np.rint(image[k]).astype(np.int16).tobytes()
        ds.InstanceNumber = k + 1
    files = write_series(folder / "dicom", series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(files[0].parent)))
    (folder / "nifti").mkdir()
    nifti = folder / "nifti" / "case_0000.nii.gz"
    sitk.WriteImage(reader.Execute(), str(nifti))
    return folder / "dicom", nifti


def check_resampling(model_folder: Path, shape: Sequence[int], spacing: Sequence[float]) -> tuple[list[int], bool]:
    """The shape nnU-Net resamples the case to (its own compute_new_shape), and whether it splits off z."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, determine_do_sep_z_and_axis

    plans = json.loads((model_folder / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    target = [float(s) for s in cfg["spacing"]]
    spacing_t = [spacing[i] for i in plans["transpose_forward"]]
    shape_t = [shape[i] for i in plans["transpose_forward"]]
    new_shape = [int(v) for v in compute_new_shape(shape_t, spacing_t, target)]
    if new_shape == shape_t:
        raise BenchmarkError(f"case {tuple(shape)} at {tuple(spacing)} mm: nnU-Net would not resample ({target} mm)")
    kwargs = cfg["resampling_fn_probabilities_kwargs"]
    separate_z, _ = determine_do_sep_z_and_axis(kwargs.get("force_separate_z"), target, spacing_t)
    return new_shape, bool(separate_z)


def run_child(args: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run([sys.executable, __file__, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        raise BenchmarkError(f"the {what} child failed (exit {proc.returncode}):\n{tail}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both paths (default 2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each path N times (alternating node, nnunet, ...) and report medians (default 1)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "benchmarks" / "out",
        help="folder for the tiny nnU-Net model (default benchmarks/out)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the tiny nnU-Net model")
    parser.add_argument("--shape", type=int, nargs=3, default=(40, 192, 192), metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8), metavar=("Z", "Y", "X"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (series, NIfTI, outputs)")
    args = parser.parse_args()
    if args.threads < 1 or args.repeat < 1:
        parser.error("--threads and --repeat must be at least 1")

    import SimpleITK as sitk
    import torch

    from pacs_lab.tiny_nnunet import DATASET_NAME, TRAINER_FOLDER, make_case, nnunet_env, nnunet_package

    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    tiny_root = ensure_model(cache, args.rebuild)
    model_folder = tiny_root / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER
    plans = json.loads((model_folder / "plans.json").read_text())
    target = tuple(plans["configurations"]["3d_fullres"]["spacing"])

    cases = [(tuple(args.shape), tuple(args.spacing)), (CASE2_SHAPE, CASE2_SPACING)]
    runs: dict[str, list[dict[str, Any]]] = {"node": [], "nnunet": []}
    work = Path(tempfile.mkdtemp(prefix="inference-", dir=cache))
    try:
        package = nnunet_package(tiny_root, work / "package", mirroring=False)
        dicom_dirs, niftis, truths, resampled = [], [], [], []
        for i, ((shape, spacing), seed) in enumerate(zip(cases, SEEDS, strict=True)):
            new_shape, separate_z = check_resampling(model_folder, shape, spacing)
            resampled.append((new_shape, separate_z))
            image, truth = make_case(np.random.default_rng(seed), shape, spacing)
            d, n = write_case(image, spacing, work / f"case{i + 1}")
            dicom_dirs.append(str(d))
            niftis.append(str(n))
            truths.append(truth)
        (work / "labels").mkdir()
        (work / "nnunet_out").mkdir()

        env = nnunet_env(tiny_root)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "nnUNet_def_n_proc"):
            env[var] = str(args.threads)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        thr = ["--threads", str(args.threads)]
        for _ in range(args.repeat):
            run_child(
                ["_node", str(package), str(work / "node.json"), str(work / "labels"), *dicom_dirs, *thr], env, "node"
            )
            runs["node"].append(json.loads((work / "node.json").read_text()))
            run_child(
                ["_nnunet", str(model_folder), str(work / "nnunet.json"), str(work / "nnunet_out"), *niftis, *thr],
                env,
                "nnunet",
            )
            runs["nnunet"].append(json.loads((work / "nnunet.json").read_text()))
        if any(r["torchvision_imported"] for r in runs["node"]):
            raise BenchmarkError("the node's path imported torchvision")

        agreement: list[dict[str, float]] = []
        learnt: list[dict[str, float]] = []
        for i, truth in enumerate(truths):
            ours = np.load(work / "labels" / f"case{i + 1}.npy")
            theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "nnunet_out" / f"case{i + 1}.nii.gz")))
            if ours.shape != theirs.shape:
                raise BenchmarkError(f"case {i + 1}: node labels {ours.shape}, nnU-Net's {theirs.shape}")
            agreement.append({str(lab): round(dice(ours == lab, theirs == lab), 4) for lab in (1, 2)})
            learnt.append({str(lab): round(dice(ours == lab, truth == lab), 4) for lab in (1, 2)})
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    def med(path: str, case: int, key: str) -> float:
        return _median([r["cases"][case][key] for r in runs[path]])

    def med_top(path: str, key: str) -> float:
        return _median([r["before"].get(key, float("nan")) for r in runs[path]])

    def peak(path: str, case: int) -> float:
        return _median([r["cases"][case]["after"]["maxrss_mb"] for r in runs[path]])

    def worker_peak(case: int) -> float:
        return _median([max(r["cases"][case]["workers_peak_mb"], default=float("nan")) for r in runs["nnunet"]])

    from importlib.metadata import version

    stat = f"median of {args.repeat} runs" if args.repeat > 1 else "one run"
    print(
        f"inference benchmark, CPU, torch {torch.__version__}, nnunetv2 {version('nnunetv2')}, "
        f"{os.cpu_count()} CPUs, threads {args.threads}, {stat}; model: tiny nnU-Net 3d_fullres, "
        f"target spacing {target} mm, folds {list(FOLDS)}, mirroring (TTA) off"
    )
    for i, ((shape, spacing), (new_shape, sep)) in enumerate(zip(cases, resampled, strict=True)):
        print(
            f"  case {i + 1}: {shape} at {spacing} mm -> nnU-Net grid {tuple(new_shape)} and back"
            f"{' (z resampled separately)' if sep else ''}"
        )
    print()
    header = ["path", "case", "seconds", "cpu_s", "rss0_mb", "peak0_mb", "peak_mb", "workers_mb", "load_s"]
    rows = []
    for name in ("node", "nnunet"):
        for i in range(len(cases)):
            rows.append(
                [
                    name,
                    f"{i + 1}{' warm' if i else ''}",
                    f"{med(name, i, 'seconds'):.2f}",
                    f"{med(name, i, 'cpu_s'):.1f}",
                    f"{med_top(name, 'rss_mb'):.0f}",
                    f"{med_top(name, 'maxrss_mb'):.0f}",
                    f"{peak(name, i):.0f}",
                    f"{worker_peak(i):.0f}" if name == "nnunet" else "-",
                    f"{_median([r['load_s'] for r in runs[name]]):.2f}",
                ]
            )
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))
    print(
        "  rss0: RSS just before the first timed case (model loaded); peak0: RSS high-water mark then; "
        "peak: high-water mark after the case (ru_maxrss);"
    )
    print(
        "  workers: largest high-water mark among nnU-Net's spawned worker processes during the case; "
        "cpu_s: user+system CPU of the path and its workers"
    )
    print()
    stage_names = list(runs["node"][0]["cases"][0]["stages"])
    for i in range(len(cases)):
        print(
            f"node stages, case {i + 1} (s): "
            + ", ".join(f"{k} {_median([r['cases'][i]['stages'][k] for r in runs['node']]):.2f}" for k in stage_names)
        )
    for i, (agr, lrn) in enumerate(zip(agreement, learnt, strict=True)):
        print(
            f"Dice node vs nnU-Net, case {i + 1}: "
            + ", ".join(f"label {k} {v:.4f}" for k, v in agr.items())
            + "; node vs phantom truth: "
            + ", ".join(f"label {k} {v:.4f}" for k, v in lrn.items())
        )
    print()
    node_s, nnunet_s = med("node", 0, "seconds"), med("nnunet", 0, "seconds")
    warm_node, warm_nnunet = med("node", 1, "seconds"), med("nnunet", 1, "seconds")
    line = {
        "benchmark": "inference",
        "node_s": round(node_s, 3),
        "nnunet_s": round(nnunet_s, 3),
        "ratio": round(node_s / nnunet_s, 3),
        "warm_second_case_s": round(warm_node, 3),
        "nnunet_warm_second_case_s": round(warm_nnunet, 3),
        "warm_ratio": round(warm_node / warm_nnunet, 3),
        "node_cpu_s": round(med("node", 0, "cpu_s"), 2),
        "nnunet_cpu_s": round(med("nnunet", 0, "cpu_s"), 2),
        "node_stages_s": {
            k: round(_median([r["cases"][0]["stages"][k] for r in runs["node"]]), 3) for k in stage_names
        },
        "node_rss_before_mb": med_top("node", "rss_mb"),
        "node_peak_mb": peak("node", 0),
        "nnunet_rss_before_mb": med_top("nnunet", "rss_mb"),
        "nnunet_peak_mb": peak("nnunet", 0),
        "nnunet_workers_peak_mb": worker_peak(0),
        "min_dice_vs_nnunet": min(min(a.values()) for a in agreement),
        "shape": list(cases[0][0]),
        "spacing": list(cases[0][1]),
        "second_shape": list(cases[1][0]),
        "second_spacing": list(cases[1][1]),
        "target_spacing": list(target),
        "threads": args.threads,
        "repeat": args.repeat,
        "folds": list(FOLDS),
        "mirroring": False,
    }
    print(json.dumps(line))
    if line["min_dice_vs_nnunet"] < 0.99:
        print(
            f"FAIL: the node's labels differ from nnU-Net's (Dice {line['min_dice_vs_nnunet']} < 0.99)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_node":
        sys.exit(node_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_nnunet":
        sys.exit(nnunet_main(sys.argv[2:]))
    sys.exit(main())
