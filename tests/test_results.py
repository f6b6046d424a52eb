"""Jobs produce their DICOM results: SEG, SR and key image join the source study,
are stored and recorded, re-runs replace rather than duplicate, a new model
version supersedes, and an input failure yields a "not processed" notice."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
import yaml
from pydicom import dcmread
from sqlalchemy import select

from inference.outputs.sr import volumes_from_sr
from inference.volume import volume_from_datasets
from pacs_lab.model_packages import two_spheres
from pacs_lab.synthetic import make_oriented_series
from pacs_node.config import Settings
from pacs_node.process.jobs import claim_next
from pacs_node.process.results import emit_notices
from pacs_node.process.worker import RunnerCache, execute_job
from storage.models import Delivery, DeliveryState, Job, JobState, Output, OutputKind
from tests.conftest import dciodvfy
from tests.test_router import Harness


def _settings(make_settings: Callable[..., Settings], package: Path, **route: Any) -> Settings:
    return make_settings(
        {
            "pipelines": {"spheres": {"model": str(package), "inputs": {"image": {}}}},
            "destinations": {
                "pacs": {"type": "dimse", "host": "127.0.0.1", "port": 11113, "ae_title": "PACS"},
                "viewer": {"type": "dicomweb", "url": "http://127.0.0.1:9/dicom-web", "seg_type": "labelmap"},
            },
            "routes": [{"name": "spheres", "pipeline": "spheres", "destinations": ["pacs", "viewer"], **route}],
            "routing": {"series_quiet_s": 0.0},
        }
    )


def _run_all(h: Harness, runners: RunnerCache) -> list[Job]:
    h.tick(1)
    while (job_id := claim_next(h.db, "test-worker")) is not None:
        execute_job(job_id, h.settings, h.db, h.store, runners)
    with h.db.session() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def _deliveries(h: Harness) -> list[Delivery]:
    with h.db.session() as s:
        return list(s.scalars(select(Delivery).order_by(Delivery.id)))


def _by_id(h: Harness) -> dict[int, Output]:
    return {o.id: o for o in _outputs(h)}


def _outputs(h: Harness) -> list[Output]:
    with h.db.session() as s:
        return list(s.scalars(select(Output).order_by(Output.id)))


def test_done_job_stores_seg_sr_and_key_image_in_the_source_study(
    make_settings: Callable[..., Settings], sphere_package: Path
) -> None:
    h = Harness(_settings(make_settings, sphere_package))
    runners = RunnerCache()
    try:
        series = make_oriented_series(
            two_spheres(), rows=32, cols=32, slices=16, PatientName="Müller^Jürgen", SeriesDescription="spheres"
        )
        h.send(series)
        [job] = _run_all(h, runners)
        assert job.state is JobState.DONE, job.reason
        outs = _outputs(h)
        assert sorted(o.kind.value for o in outs) == ["KEY_IMAGE", "SEG", "SEG_LABELMAP", "SR"]
        study_uid = series[0].StudyInstanceUID
        by_kind = {o.kind: o for o in outs}
        for out in outs:
            ds = dcmread(h.store.path(out.path))
            assert ds.StudyInstanceUID == study_uid and ds.Manufacturer == "pacs-node"
            assert str(ds.PatientName) == "Müller^Jürgen"
            assert ds.SOPInstanceUID == out.sop_uid and ds.SeriesInstanceUID == out.series_uid
        seg = hd.seg.segread(h.store.path(by_kind[OutputKind.SEG].path))
        assert seg.SeriesDescription == "AI spheres SEG"
        assert seg.number_of_segments == 2
        assert hd.seg.segread(h.store.path(by_kind[OutputKind.SEG_LABELMAP].path)).SegmentationType == "LABELMAP"
        sr = hd.sr.srread(h.store.path(by_kind[OutputKind.SR].path))
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        for kind in (OutputKind.SEG, OutputKind.SR, OutputKind.KEY_IMAGE):
            dciodvfy(h.store.path(by_kind[kind].path))
        # The SR's volumes are the SEG's voxel counts times the voxel volume (within 0.1 %).
        volume = volume_from_datasets(series)
        sr_volumes = volumes_from_sr(sr)
        for number in (1, 2):
            voxels = int(seg.get_pixels_by_source_instance(
                [(s.SOPInstanceUID) for s in series], segment_numbers=[number]
            ).sum())  # fmt: skip
            assert sr_volumes[number] == pytest.approx(voxels * volume.voxel_volume_ml, rel=1e-3)
        png = by_kind[OutputKind.KEY_IMAGE].png_path
        assert png and (h.settings.data_dir / png).read_bytes().startswith(b"\x89PNG")

        # One delivery per output and destination, with the SEG type each destination asked for
        # (a LABELMAP destination also gets the BINARY SEG that the SR references).
        by_id = _by_id(h)
        wanted = {(d.destination, by_id[d.output_id].kind.value) for d in _deliveries(h)}
        assert wanted == {
            ("pacs", "SEG"), ("pacs", "SR"), ("pacs", "KEY_IMAGE"),
            ("viewer", "SEG_LABELMAP"), ("viewer", "SEG"), ("viewer", "SR"), ("viewer", "KEY_IMAGE"),
        }  # fmt: skip
        assert {d.state for d in _deliveries(h)} == {DeliveryState.PENDING}

        # Re-running the same inputs writes the same UIDs and supersedes the first run's rows.
        with h.db.session() as s:
            s.add(Job(study_id=job.study_id, pipeline="spheres", route="spheres", state=JobState.PENDING,
                      inputs=job.inputs, destinations=job.destinations, input_key="rerun"))  # fmt: skip
        jobs = _run_all(h, runners)
        assert jobs[-1].state is JobState.DONE
        outs2 = _outputs(h)
        first = {o.kind: o.sop_uid for o in outs2 if o.job_id == job.id}
        second = {o.kind: o.sop_uid for o in outs2 if o.job_id == jobs[-1].id}
        assert first == second, "re-processing the same input must yield the same UIDs"
        assert all(o.superseded_at is not None for o in outs2 if o.job_id == job.id)
        assert all(o.superseded_at is None for o in outs2 if o.job_id == jobs[-1].id)
        # The first run's deliveries, never sent, are cancelled; the re-run's are queued.
        states = {(d.job_id, d.state) for d in _deliveries(h)}
        assert states == {(job.id, DeliveryState.CANCELLED), (jobs[-1].id, DeliveryState.PENDING)}
    finally:
        h.close()


def test_new_model_version_makes_new_uids(
    make_settings: Callable[..., Settings], sphere_package: Path, tmp_path: Path
) -> None:
    bumped = tmp_path / "bumped"
    shutil.copytree(sphere_package, bumped)
    manifest = yaml.safe_load((bumped / "model.yaml").read_text())
    manifest["version"] = "1.0.1"
    (bumped / "model.yaml").write_text(yaml.safe_dump(manifest))
    series = make_oriented_series(two_spheres(), rows=24, cols=24, slices=12, SeriesDescription="spheres")
    uids = []
    for package in (sphere_package, bumped):
        h = Harness(_settings(make_settings, package))
        try:
            h.send(series)
            _run_all(h, RunnerCache())
            uids.append({o.kind: o.sop_uid for o in _outputs(h)})
        finally:
            h.close()
        shutil.rmtree(h.settings.data_dir)
    assert set(uids[0].values()).isdisjoint(uids[1].values())


def test_input_failure_yields_a_not_processed_notice(
    make_settings: Callable[..., Settings], sphere_package: Path
) -> None:
    h = Harness(_settings(make_settings, sphere_package, not_processed_notice=True))
    try:
        series = make_oriented_series(two_spheres(), rows=24, cols=24, slices=12, SeriesDescription="spheres")
        del series[5]
        h.send(series)
        [job] = _run_all(h, RunnerCache())
        assert job.state is JobState.FAILED and job.failure_kind == "input"
        assert emit_notices(h.settings, h.db, h.store) == 1
        assert emit_notices(h.settings, h.db, h.store) == 0, "one notice per job"
        [notice] = _outputs(h)
        assert notice.kind is OutputKind.NOTICE
        assert {(d.output_id, d.destination) for d in _deliveries(h)} == {(notice.id, "pacs"), (notice.id, "viewer")}
        ds = dcmread(h.store.path(notice.path))
        assert ds.StudyInstanceUID == series[0].StudyInstanceUID and ds.Manufacturer == "pacs-node"
        texts = [item.TextValue for item in ds.ContentSequence if "TextValue" in item]
        assert any("was not run on this study" in t and "missing" in t for t in texts), texts
    finally:
        h.close()


def test_no_notice_unless_the_route_asks(make_settings: Callable[..., Settings], sphere_package: Path) -> None:
    h = Harness(_settings(make_settings, sphere_package))
    try:
        series = make_oriented_series(two_spheres(), rows=24, cols=24, slices=12, SeriesDescription="spheres")
        del series[5]
        h.send(series)
        _run_all(h, RunnerCache())
        assert emit_notices(h.settings, h.db, h.store) == 0
    finally:
        h.close()
