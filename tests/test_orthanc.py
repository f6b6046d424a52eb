"""End to end with a real Orthanc (and its DICOMweb plugin) as the PACS.

Orthanc holds a phantom study, C-STOREs it to a running pacs-node (SCP, router,
a worker process with the sphere test model, dispatcher), and must end up with
the SEG, the SR and the key image in the same study, the SEG referencing the
source series. A re-run of the job re-sends the same SOP Instance UIDs: Orthanc
(``OverwriteInstances: true``) replaces them and the study does not grow. A
second test delivers results by STOW-RS into Orthanc's DICOMweb endpoint.

Orthanc runs as a subprocess with a configuration written here: HTTP on
loopback only (``RemoteAccessAllowed: false``), free ports, storage in tmp_path.
Orthanc 1.10 has no option to bind its DICOM port to loopback; it listens on a
free port for the test's duration. Missing Orthanc fails the test in CI
(``CI`` set) and skips it elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from pacs_node.app.service import Node
from pacs_node.config import Settings
from pacs_node.deliver.dispatcher import Dispatcher
from storage.models import Delivery, DeliveryState, Job, JobState
from tests.conftest import FAST_DISPATCH, Env, Made, free_port, wait_for

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SEG, SR_CLASSES, SC = (
    "1.2.840.10008.5.1.4.1.1.66.4",
    {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"},
    "1.2.840.10008.5.1.4.1.1.7",
)


def _require(path: str, what: str) -> str:
    found = shutil.which(path) or (path if os.path.exists(path) else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{what} ({path}) is not installed; .ci/run installs orthanc and orthanc-dicomweb")
        pytest.skip(f"{what} ({path}) not installed")
    return found


@dataclass
class Orthanc:
    """A running Orthanc: its REST API and its DICOM port."""

    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        r = httpx.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, content: bytes | str, timeout: float = 60) -> Any:
        r = httpx.post(self.url + path, content=content, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def study_instances(self, study_id: str) -> dict[str, dict[str, Any]]:
        """SOP Instance UID -> simplified tags of every instance of a study."""
        out = {}
        for inst in self.get(f"/studies/{study_id}/instances"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out[tags["SOPInstanceUID"]] = tags
        return out


@pytest.fixture
def start_orthanc(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start Orthanc with a loopback-only HTTP API and ``DicomModalities`` given; stopped at teardown."""
    exe = _require(ORTHANC, "Orthanc")
    plugin = _require(DICOMWEB_PLUGIN, "the Orthanc DICOMweb plugin")
    procs: list[subprocess.Popen[bytes]] = []

    def launch(orthanc: Orthanc, modalities: dict[str, Any]) -> subprocess.Popen[bytes] | None:
        root = tmp_path / "orthanc"
        config = {
            "Name": "pacs-node-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpPort": orthanc.http_port,
            "DicomServerEnabled": True,
            "DicomAet": orthanc.aet,
            "DicomPort": orthanc.dicom_port,
            "DicomModalities": modalities,
            # A site that accepts corrected results overwrites an instance re-sent with the same UID.
            "OverwriteInstances": True,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        cfg = tmp_path / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log_path = tmp_path / "orthanc.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)

        def up() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return httpx.get(orthanc.url + "/system", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, what="Orthanc's REST API")
        if proc.poll() is None:
            return proc
        text = log_path.read_text(errors="replace")
        if "already in use" in text:
            return None  # a free port was taken meanwhile: try others
        raise AssertionError(f"Orthanc exited:\n{text}")

    def start(modalities: dict[str, Any] | None = None) -> Orthanc:
        for _ in range(3):
            orthanc = Orthanc(http_port=free_port(), dicom_port=free_port())
            if launch(orthanc, modalities or {}) is not None:
                return orthanc
        raise AssertionError("Orthanc found no free ports in three tries")

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _upload(orthanc: Orthanc, datasets: list[Any]) -> str:
    """POST each data set to Orthanc's /instances; returns the Orthanc id of their study."""
    study = ""
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        study = orthanc.post("/instances", buf.getvalue())["ParentStudy"]
    return study


def _check_results(orthanc: Orthanc, study_id: str, source_series: str, n_source: int) -> dict[str, dict[str, Any]]:
    instances = orthanc.study_instances(study_id)
    by_class: dict[str, list[dict[str, Any]]] = {}
    for tags in instances.values():
        by_class.setdefault(tags["SOPClassUID"], []).append(tags)
    [seg] = by_class[SEG]
    assert [t for c in SR_CLASSES for t in by_class.get(c, [])], "no SR"
    assert len(by_class[SC]) == 1, "one key image"
    assert len(instances) == n_source + 3
    assert seg["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == source_series
    return instances


def test_orthanc_sends_a_study_and_gets_seg_sr_and_key_image_back(
    start_orthanc: Callable[..., Orthanc],
    make_settings: Callable[..., Settings],
    run_node: Callable[[Settings], Node],
    sphere_package: Path,
    made: Made,
) -> None:
    orthanc = start_orthanc()
    settings = make_settings(
        {
            "pipelines": {"spheres": {"model": str(sphere_package), "device": "cpu"}},
            "destinations": {
                "orthanc": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": "ORTHANC"}
            },
            "routes": [{"name": "spheres", "pipeline": "spheres", "destinations": ["orthanc"]}],
            "routing": {"series_quiet_s": 1.0},
            "worker": {"processes": 1},
            "dispatch": FAST_DISPATCH,
        }
    )
    node = run_node(settings)
    modality = {"AET": "PACSNODE", "Host": "127.0.0.1", "Port": node.scp.port}
    httpx.put(f"{orthanc.url}/modalities/pacsnode", json=modality, timeout=30).raise_for_status()
    study_id = _upload(orthanc, made.series)
    n_source = len(made.series)
    job = orthanc.post("/modalities/pacsnode/store", json.dumps({"Resources": [study_id], "Synchronous": True}))
    assert job.get("FailedInstancesCount", 0) == 0, job

    source_series = str(made.series[0].SeriesInstanceUID)
    wait_for(
        lambda: len(orthanc.get(f"/studies/{study_id}/instances")) >= n_source + 3,
        timeout=240,
        interval=0.5,
        what="SEG, SR and key image to reach Orthanc",
    )
    first = _check_results(orthanc, study_id, source_series, n_source)
    with node.db.session() as s:
        deliveries = s.query(Delivery).all()
        assert len(deliveries) == 3 and {d.state for d in deliveries} == {DeliveryState.DELIVERED}
        study_uid = s.query(Job).one().study.study_uid
    assert {t["StudyInstanceUID"] for t in first.values()} == {study_uid}

    # A re-run makes the same UIDs; Orthanc overwrites them: the study does not grow.
    from pacs_node.process.jobs import rerun

    before = {uid: t.get("InstanceCreationTime") for uid, t in first.items()}
    assert rerun(node.db, study_uid=study_uid)

    def second_delivered() -> bool:
        with node.db.session() as s:
            jobs = s.query(Job).order_by(Job.id).all()
            done = len(jobs) == 2 and jobs[-1].state is JobState.DONE
            sent = s.query(Delivery).filter(Delivery.job_id == jobs[-1].id).all()
            return done and len(sent) == 3 and all(d.state is DeliveryState.DELIVERED for d in sent)

    wait_for(second_delivered, timeout=240, interval=0.5, what="the re-run's results to be delivered")
    again = _check_results(orthanc, study_id, source_series, n_source)
    assert set(again) == set(before), "a re-sent result must replace, not add"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite here: the database side of dispatching is covered on both in test_dispatch."""
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


def test_stow_rs_into_orthanc_dicomweb(
    start_orthanc: Callable[..., Orthanc], queued: Callable[..., Env], made: Made
) -> None:
    orthanc = start_orthanc()
    study_id = _upload(orthanc, made.series)
    env = queued({"orthanc-web": {"type": "dicomweb", "url": f"{orthanc.url}/dicom-web"}})
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 3
    assert env.states() == {"delivered": 3}, [d.last_error for d in env.deliveries()]
    instances = _check_results(orthanc, study_id, str(made.series[0].SeriesInstanceUID), len(made.series))
    assert env.sop_uids("orthanc-web") <= set(instances)
    # What Orthanc holds is what the node stored, byte for byte in its pixel data.
    outs = {o.sop_uid: o for o in env.outputs().values()}
    for uid in env.sop_uids("orthanc-web"):
        orthanc_id = httpx.post(
            orthanc.url + "/tools/lookup", content=uid, timeout=30
        ).json()[0]["ID"]  # fmt: skip
        served = dcmread(io.BytesIO(httpx.get(f"{orthanc.url}/instances/{orthanc_id}/file", timeout=30).content))
        local = dcmread(env.store.path(outs[uid].path))
        assert served.SOPInstanceUID == local.SOPInstanceUID
        if "PixelData" in local:
            assert served.PixelData == local.PixelData
