"""Outputs benchmark: writing the DICOM SEG of a CT label volume, pacs-node against dcmqi.

Run from the repository root with the project's virtual environment::

    .venv/bin/python benchmarks/outputs.py [--slices 300] [--size 512] [--repeat 3] [--keep]

What is segmented
    ``--slices`` synthetic CT instances of ``--size`` x ``--size`` int16 pixels
    (one series, made with :func:`pacs_lab.synthetic.make_series`, written as
    Part 10 files to a temp dir), and a uint8 label volume on their grid with 5
    labels of varied sizes: a large box (liver-sized), a sphere, an ellipsoid, a
    small box and a tiny box (a few slices each for the last ones), as a
    5-label model would produce. Everything is deleted at the end unless ``--keep``.

What is timed (wall clock, one process, files in the page cache for everyone)
    Each case runs from the source DICOM files on disk to a SEG file on disk:

    * ``node`` (the default path, BINARY): read the source headers with
      ``pydicom.dcmread(path, stop_before_pixels=True)`` (also reported alone
      as ``read_sources_s``), :func:`inference.outputs.seg.build_seg`, write
      the file with ``save_as``. The label volume is in memory, as it is in the
      worker after inference.
    * ``labelmap``: the same with ``seg_type="labelmap"`` (Label Map SEG IOD).
    * ``dcmqi``: ``itkimage2segimage`` (QIICR dcmqi, the C++ writer 3D Slicer
      uses) with ``--inputDICOMDirectory`` (the series folder), the label
      volume as NRRD and a JSON metadata file with the same segment attributes
      (``--skip 1``, its default: empty frames left out, like the node). Only
      the converter's run is timed; writing the NRRD and JSON beforehand is not
      (reported as ``nrrd_write_s``), which favours dcmqi.

    Each case first runs once untimed (warm-up: the node's worker is a
    long-lived process that pays imports and first-call costs once; dcmqi's
    binary gets into the page cache); its times are printed as the cold figures
    (``node_cold_s``). Then every case runs ``--repeat`` times (default 3,
    interleaved) and the medians are reported.

Checks
    Every output is read back with ``highdicom.seg.segread``; the node's BINARY
    and LABELMAP SEGs and dcmqi's SEG must each reproduce the label volume
    exactly when reconstructed per source instance, or the benchmark fails.

Output
    One line per case with seconds and file size, then one JSON line:
    ``{"benchmark": "outputs", "node_s": ..., "dcmqi_s": ..., "ratio": node/dcmqi,
    "labelmap_s": ..., "read_sources_s": ..., "node_bytes": ..., "dcmqi_bytes": ...,
    "labelmap_bytes": ...}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk

# Run as a script, this folder is sys.path[0], where benchmarks/inference.py would
# shadow the ``inference`` package: put the repository root first instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "benchmarks")]

from inference.manifest import Manifest  # noqa: E402
from inference.outputs.common import ResultIdentity  # noqa: E402
from inference.outputs.keyimage import build_key_image_sc, compose_key_image, png_bytes  # noqa: E402
from inference.outputs.seg import build_seg, segment_numbers  # noqa: E402
from inference.outputs.sr import build_sr  # noqa: E402
from inference.volume import Volume, volume_from_datasets  # noqa: E402
from pacs_lab.synthetic import make_series, new_uid, write_series  # noqa: E402

DCMQI = Path(sys.executable).parent / "itkimage2segimage"

LABELS: dict[int, dict[str, Any]] = {
    1: {"name": "Liver", "type": {"value": "10200004", "meaning": "Liver"}, "color": [221, 130, 101]},
    2: {"name": "Spleen", "type": {"value": "78961009", "meaning": "Spleen"}, "color": [157, 108, 162]},
    3: {
        "name": "Left kidney",
        "type": {"value": "64033007", "meaning": "Kidney"},
        "laterality": "left",
        "color": [185, 102, 83],
    },
    4: {"name": "Gallbladder", "type": {"value": "28231008", "meaning": "Gallbladder"}, "color": [139, 150, 98]},
    5: {
        "name": "Lesion",
        "category": {"value": "49755003", "meaning": "Morphologically Altered Structure"},
        "type": {"value": "52988006", "meaning": "Lesion"},
        "color": [255, 255, 0],
    },
}


def manifest() -> Manifest:
    return Manifest.model_validate(
        {
            "name": "bench-ct5",
            "version": "1.0.0",
            "intended_use": "benchmark only",
            "inputs": [{"role": "ct"}],
            "reference": "ct",
            "labels": LABELS,
            "stages": [
                {
                    "name": "s",
                    "label_map": {k: k for k in LABELS},
                    "model": {"backend": "nnunet", "folders": "x"},
                }
            ],
        }
    )


def label_array(shape: tuple[int, int, int]) -> np.ndarray:
    """Five labelled blobs of varied sizes on a (z, y, x) grid."""
    z, y, x = shape
    labels = np.zeros(shape, dtype=np.uint8)
    # 1: large box, half the slices
    labels[z // 4 : 3 * z // 4, y // 5 : 3 * y // 5, x // 8 : x // 2] = 1
    zz, yy, xx = np.ogrid[:z, :y, :x]
    # 2: sphere
    sphere = ((zz - z // 2) / (z / 6)) ** 2 + ((yy - 0.55 * y) / (y / 10)) ** 2 + ((xx - 0.7 * x) / (x / 10)) ** 2
    labels[sphere <= 1.0] = 2
    # 3: ellipsoid
    ellipsoid = ((zz - 0.4 * z) / (z / 10)) ** 2 + ((yy - 0.75 * y) / (y / 14)) ** 2 + ((xx - 0.3 * x) / (x / 20)) ** 2
    labels[ellipsoid <= 1.0] = 3
    # 4: small box
    labels[z // 2 : z // 2 + max(z // 20, 1), y // 2 : y // 2 + y // 16, x // 2 + 10 : x // 2 + 10 + x // 16] = 4
    # 5: tiny box, 3 slices
    labels[z // 3 : z // 3 + 3, 3 * y // 4 : 3 * y // 4 + 6, 3 * x // 4 : 3 * x // 4 + 6] = 5
    return labels


def dcmqi_metadata(m: Manifest) -> dict[str, Any]:
    numbers = segment_numbers(m)
    segments = []
    for value in sorted(m.labels):
        spec = m.labels[value]
        item: dict[str, Any] = {
            "labelID": value,
            "SegmentLabel": spec.name,
            "SegmentDescription": spec.name,
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": m.name,
            "SegmentedPropertyCategoryCodeSequence": _code(spec.category),
            "SegmentedPropertyTypeCodeSequence": _code(spec.type),
            "recommendedDisplayRGBValue": list(spec.color),
        }
        if spec.laterality:
            item["SegmentedPropertyTypeModifierCodeSequence"] = {
                "CodeValue": "7771000" if spec.laterality == "left" else "24028007",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": spec.laterality.capitalize(),
            }
        assert numbers[value] == value
        segments.append(item)
    return {
        "ContentCreatorName": "pacs-node^benchmark",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "ClinicalTrialCoordinatingCenterName": "pacs-node",
        "ContentLabel": "AI_BENCH",
        "ContentDescription": f"{m.name} {m.version}",
        "SeriesDescription": "AI bench SEG",
        "SeriesNumber": "9002",
        "InstanceNumber": "1",
        "segmentAttributes": [segments],
    }


def _code(code: Any) -> dict[str, str]:
    return {"CodeValue": code.value, "CodingSchemeDesignator": code.scheme, "CodeMeaning": code.meaning}


def make_sources(folder: Path, slices: int, size: int) -> tuple[list[Path], Volume]:
    study = new_uid()
    datasets = list(
        make_series(
            slices,
            rows=size,
            cols=size,
            spacing=(0.78, 0.78, 1.5),
            study_uid=study,
            FrameOfReferenceUID=new_uid(),
        )
    )
    paths = write_series(folder, datasets)
    volume = volume_from_datasets(datasets)
    return paths, volume


def node_case(paths: Sequence[Path], labels: Volume, m: Manifest, out: Path, seg_type: str) -> tuple[float, float, int]:
    """(total seconds, header-read seconds, file bytes)."""
    start = time.perf_counter()
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    read = time.perf_counter() - start
    identity = ResultIdentity.of((str(ds.SOPInstanceUID) for ds in sources), "bench", m.name, m.version)
    seg = build_seg(labels, sources, m, identity, pipeline="bench", node_version="bench", seg_type=seg_type)
    seg.save_as(out, enforce_file_format=True)
    total = time.perf_counter() - start
    return total, read, out.stat().st_size


def sr_and_key_image_case(
    paths: Sequence[Path], seg_path: Path, image: Volume, labels: Volume, m: Manifest
) -> tuple[float, float]:
    """Seconds to build the TID 1500 SR and the key image (SC + PNG) once the SEG exists.

    The image volume is already in memory in a worker (it was the model's input),
    so only building is timed.
    """
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    seg = pydicom.dcmread(seg_path)
    identity = ResultIdentity.of((str(ds.SOPInstanceUID) for ds in sources), "bench", m.name, m.version)
    counts = np.bincount(labels.array.ravel(), minlength=6)
    voxel_ml = labels.voxel_volume_ml
    metrics = {
        "voxel_volume_ml": voxel_ml,
        "labels": {
            str(v): {"name": spec.name, "voxels": int(counts[v]), "volume_ml": float(counts[v] * voxel_ml)}
            for v, spec in m.labels.items()
        },
    }
    start = time.perf_counter()
    sr = build_sr(seg, sources, metrics, m, identity, pipeline="bench", node_version="bench")
    sr.save_as(seg_path.with_name("sr.dcm"), enforce_file_format=True)
    sr_s = time.perf_counter() - start
    start = time.perf_counter()
    key = compose_key_image(image, labels, m, metrics, title="bench", demo=True)
    sc = build_key_image_sc(key, sources, identity, pipeline="bench", manifest=m, node_version="bench")
    sc.save_as(seg_path.with_name("sc.dcm"), enforce_file_format=True)
    seg_path.with_name("key.png").write_bytes(png_bytes(key))
    return sr_s, time.perf_counter() - start


def dcmqi_case(tool: Path, series_dir: Path, nrrd: Path, meta: Path, out: Path) -> tuple[float, int]:
    cmd = [
        str(tool),
        "--inputImageList",
        str(nrrd),
        "--inputDICOMDirectory",
        str(series_dir),
        "--inputMetadata",
        str(meta),
        "--outputDICOM",
        str(out),
        "--skip",
        "1",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"itkimage2segimage failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, out.stat().st_size


def check_seg(path: Path, labels: Volume, what: str) -> hd.seg.Segmentation:
    """The SEG read back reproduces the label volume slice by slice (by source SOP Instance UID)."""
    seg = hd.seg.segread(path)
    if len(seg.SegmentSequence) - (1 if seg.SegmentationType == "LABELMAP" else 0) != 5:
        raise SystemExit(f"{what}: expected 5 segments, found {len(seg.SegmentSequence)}")
    got = seg.get_pixels_by_source_instance(
        list(labels.sop_uids),
        combine_segments=True,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,  # dcmqi references only the instances it has frames for
        skip_overlap_checks=True,
        dtype=np.uint8,
    )
    if not np.array_equal(got, labels.array):
        diff = int(np.count_nonzero(got != labels.array))
        raise SystemExit(f"{what}: read back differs from the label volume in {diff} voxels")
    return seg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    if not DCMQI.exists() and shutil.which("itkimage2segimage") is None:
        raise SystemExit("itkimage2segimage (dcmqi) not found: pip install dcmqi")
    dcmqi = DCMQI if DCMQI.exists() else Path(str(shutil.which("itkimage2segimage")))

    tmp = Path(tempfile.mkdtemp(prefix="pacs-node-bench-outputs-"))
    try:
        series_dir = tmp / "series"
        print(f"writing {args.slices} CT instances {args.size}x{args.size} to {series_dir} ...", flush=True)
        paths, image = make_sources(series_dir, args.slices, args.size)
        labels = image.with_array(label_array(image.shape))

        m = manifest()
        counts = np.bincount(labels.array.ravel(), minlength=6)
        print("label voxels: " + ", ".join(f"{k}: {int(counts[k])}" for k in range(1, 6)))

        start = time.perf_counter()
        nrrd = tmp / "labels.nrrd"
        sitk.WriteImage(labels.to_sitk(), str(nrrd), useCompression=False)
        nrrd_s = time.perf_counter() - start
        meta = tmp / "meta.json"
        meta.write_text(json.dumps(dcmqi_metadata(m), indent=2))

        node_s: list[float] = []
        read_s: list[float] = []
        labelmap_s: list[float] = []
        dcmqi_s: list[float] = []
        sizes: dict[str, int] = {}
        outs = {"node": tmp / "node.dcm", "labelmap": tmp / "labelmap.dcm", "dcmqi": tmp / "dcmqi.dcm"}
        # Warm-up, untimed: the worker is a long-lived process that pays import and
        # first-call costs once; dcmqi's binary and libraries get into the page cache.
        node_cold, _, _ = node_case(paths, labels, m, outs["node"], "binary")
        labelmap_cold, _, _ = node_case(paths, labels, m, outs["labelmap"], "labelmap")
        dcmqi_cold, _ = dcmqi_case(dcmqi, series_dir, nrrd, meta, outs["dcmqi"])
        print(
            f"warm-up (first call in this process, untimed): node BINARY {node_cold:.2f} s, "
            f"LABELMAP {labelmap_cold:.2f} s, dcmqi {dcmqi_cold:.2f} s"
        )
        for _ in range(args.repeat):
            for out in outs.values():
                out.unlink(missing_ok=True)
            total, read, sizes["node"] = node_case(paths, labels, m, outs["node"], "binary")
            node_s.append(total)
            read_s.append(read)
            total, _, sizes["labelmap"] = node_case(paths, labels, m, outs["labelmap"], "labelmap")
            labelmap_s.append(total)
            total, sizes["dcmqi"] = dcmqi_case(dcmqi, series_dir, nrrd, meta, outs["dcmqi"])
            dcmqi_s.append(total)

        node, dcmqi_med = statistics.median(node_s), statistics.median(dcmqi_s)
        labelmap, read = statistics.median(labelmap_s), statistics.median(read_s)
        print(f"node BINARY  : {node:6.2f} s  ({read:.2f} s reading headers)  {sizes['node']:>11,d} bytes")
        print(f"node LABELMAP: {labelmap:6.2f} s  {sizes['labelmap']:>11,d} bytes")
        print(f"dcmqi        : {dcmqi_med:6.2f} s  {sizes['dcmqi']:>11,d} bytes  (+{nrrd_s:.2f} s NRRD write, untimed)")

        sr_s, key_s = sr_and_key_image_case(paths, outs["node"], image, labels, m)
        print(f"then TID 1500 SR: {sr_s:.2f} s, key image (SC + PNG): {key_s:.2f} s  (target: both under 2 s)")

        for what, path in outs.items():
            seg = check_seg(path, labels, what)
            print(f"check {what}: segread OK, {seg.SegmentationType}, {int(seg.NumberOfFrames)} frames, matches labels")

        print(
            json.dumps(
                {
                    "benchmark": "outputs",
                    "node_s": round(node, 3),
                    "dcmqi_s": round(dcmqi_med, 3),
                    "ratio": round(node / dcmqi_med, 3),
                    "labelmap_s": round(labelmap, 3),
                    "read_sources_s": round(read, 3),
                    "node_bytes": sizes["node"],
                    "dcmqi_bytes": sizes["dcmqi"],
                    "labelmap_bytes": sizes["labelmap"],
                    "sr_s": round(sr_s, 3),
                    "key_image_s": round(key_s, 3),
                    "nrrd_write_s": round(nrrd_s, 3),
                    "node_cold_s": round(node_cold, 3),
                    "node_runs_s": [round(v, 3) for v in node_s],
                    "dcmqi_runs_s": [round(v, 3) for v in dcmqi_s],
                    "slices": args.slices,
                    "size": args.size,
                    "repeat": args.repeat,
                }
            )
        )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
