"""End to end with a real Orthanc: from Orthanc's store command to the results in Orthanc.

    .venv/bin/python benchmarks/e2e.py [--quiet-s 30] [--pipelines stroke,dentate,kidney]

For each demo pipeline, one after the other:

1. the phantom study (the demo's case) is uploaded to Orthanc over its REST API;
2. the clock starts and Orthanc is asked to C-STORE the study to pacs-node
   (``POST /modalities/pacsnode/store``), exactly what a PACS auto-route does;
3. the clock stops when Orthanc holds the SEG, the SR and the key image in that study.

pacs-node runs in this process on its embedded defaults (the three demo pipelines
and routes), with one destination, Orthanc, and the quiet period given (the
node's default is 30 s; a site tunes it to its scanners). The per-stage breakdown
comes from the node's ``/metrics`` (receive -> series complete, queue wait,
inference, delivery: the histogram sums added by this pipeline's study).

Prints one JSON line per pipeline:
``{"benchmark": "e2e", "pipeline": ..., "seconds": ..., "stages": {...}}``.
Target on a 2-core CPU: results in Orthanc within 60 s of the last instance.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, not benchmarks/, first

from pacs_lab.phantoms.brain import save_series
from pacs_lab.tasks import get_task
from pacs_node.app.demo import DEMO_CASES
from pacs_node.config import settings_from_mapping
from pacs_node.config.defaults import embedded_defaults

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SEG, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.7"
HISTOGRAMS = {
    "pacs_node_series_receive_seconds": "receive_to_series_complete",
    "pacs_node_job_queue_wait_seconds": "queue_wait",
    "pacs_node_job_inference_seconds": "inference",
    "pacs_node_delivery_seconds": "delivery",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric_sums(url: str) -> dict[str, float]:
    """Sum of each stage histogram's ``_sum`` over all its label sets."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out = dict.fromkeys(HISTOGRAMS.values(), 0.0)
    for line in text.splitlines():
        m = re.match(r"^(\w+)_sum(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m and m.group(1) in HISTOGRAMS:
            out[HISTOGRAMS[m.group(1)]] += float(m.group(2))
    return out


def start_orthanc(root: Path, node_port: int) -> tuple[subprocess.Popen[bytes], str, int]:
    http_port, dicom_port = free_port(), free_port()
    config = {
        "Name": "pacs-node-e2e",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomModalities": {"pacsnode": ["PACSNODE", "127.0.0.1", node_port]},
        "OverwriteInstances": True,
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/system", timeout=2).status_code == 200:
                return proc, url, dicom_port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"Orthanc did not start; see {root / 'orthanc.log'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quiet-s", type=float, default=30.0, help="routing.series_quiet_s (node default 30)")
    ap.add_argument("--pipelines", default=",".join(DEMO_CASES))
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pacs_node.app.service import Node

    tmp = Path(tempfile.mkdtemp(prefix="pacs-node-e2e-"))
    node_port = free_port()
    orthanc_proc, orthanc, orthanc_dicom = start_orthanc(tmp / "orthanc", node_port)
    tree: dict[str, Any] = embedded_defaults()
    tree.update(
        data_dir=str(tmp / "node"),
        dicom={"host": "127.0.0.1", "port": node_port},
        http={"host": "127.0.0.1", "port": 0},
        routing={"series_quiet_s": args.quiet_s, "poll_interval_s": 0.25},
        worker={"processes": 1, "poll_interval_s": 0.2},
        dispatch={"poll_interval_s": 0.25},
        destinations={"orthanc": {"type": "dimse", "host": "127.0.0.1", "port": orthanc_dicom, "ae_title": "ORTHANC"}},
    )
    for route in tree["routes"]:
        route["destinations"] = ["orthanc"]
    node = Node(settings_from_mapping(tree, source="e2e benchmark"))
    node.start()
    assert node.http is not None
    results = []
    try:
        for name in [p for p in args.pipelines.split(",") if p]:
            task, seed = DEMO_CASES[name]
            case = get_task(task).case(seed)
            files: list[Path] = []
            for role, datasets in case.inputs.items():
                files += save_series(tmp / "inputs" / name / role, datasets)
            study_uid = str(next(iter(case.inputs.values()))[0].StudyInstanceUID)
            for f in files:
                httpx.post(orthanc + "/instances", content=f.read_bytes(), timeout=60).raise_for_status()
            study_id = httpx.post(orthanc + "/tools/lookup", content=study_uid, timeout=30).json()[0]["ID"]
            before = metric_sums(node.http.url)
            t0 = time.monotonic()
            httpx.post(
                orthanc + "/modalities/pacsnode/store",
                json={"Resources": [study_id], "Synchronous": True},
                timeout=600,
            ).raise_for_status()
            t_sent = time.monotonic()
            got: set[str] = set()
            while time.monotonic() - t0 < args.timeout:
                got = set()
                for inst in httpx.get(f"{orthanc}/studies/{study_id}/instances", timeout=30).json():
                    tags = httpx.get(f"{orthanc}/instances/{inst['ID']}/simplified-tags", timeout=30).json()
                    if tags.get("SOPClassUID") == SEG:
                        got.add("SEG")
                    elif tags.get("Modality") == "SR":
                        got.add("SR")
                    elif tags.get("SOPClassUID") == SC:
                        got.add("SC")
                if got >= {"SEG", "SR", "SC"}:
                    break
                time.sleep(0.5)
            t_done = time.monotonic()
            after = metric_sums(node.http.url)
            ok = got >= {"SEG", "SR", "SC"}
            record = {
                "benchmark": "e2e",
                "pipeline": name,
                "seconds": round(t_done - t0, 2),
                "after_last_instance_s": round(t_done - t_sent, 2),
                "ok": ok,
                "quiet_s": args.quiet_s,
                "instances": len(files),
                "stages": {k: round(after[k] - before[k], 2) for k in after} | {"c_store": round(t_sent - t0, 2)},
            }
            results.append(record)
            print(json.dumps(record), flush=True)
    finally:
        node.stop()
        orthanc_proc.terminate()
        orthanc_proc.wait(30)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
