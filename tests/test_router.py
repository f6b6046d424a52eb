"""Series completion, routing and job assembly, driven through the real receive
path (Ingestor -> journal -> Indexer -> database) with explicit clock ticks, plus
one end-to-end run over a real DICOM association."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import pytest
from pydicom import Dataset
from sqlalchemy import select

from pacs_lab.synthetic import make_series, new_uid, write_series
from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.deliver.scu import send_files
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import Ingestor
from pacs_node.route.router import Router
from storage.db import Database
from storage.models import Job, JobState, Series, SeriesState, utcnow
from tests.conftest import wait_for

PIPELINES: dict[str, Any] = {
    "stroke": {
        "model": "models/stroke",
        "reference": "dwi",
        "optional_grace_s": 10,
        "study_timeout_s": 300,
        "inputs": {
            "dwi": {
                "match": {
                    "Modality": "MR",
                    "SeriesDescription": ".*(dwi|trace).*",
                    "not": {"SeriesDescription": ".*adc.*"},
                }
            },
            "adc": {"match": {"Modality": "MR", "SeriesDescription": ".*adc.*"}},
            "flair": {"required": False, "match": {"Modality": "MR", "SeriesDescription": ".*flair.*"}},
        },
    },
    "kidney": {"model": "models/kidney", "inputs": {"ct": {"match": {"Modality": "CT"}}}},
}
ROUTES = [
    {"name": "stroke", "pipeline": "stroke", "priority": "stat"},
    {
        "name": "kidney-thin",
        "pipeline": "kidney",
        "match": {"SeriesDescription": ".*(portal|venous|pv).*", "SliceThickness": "<= 5"},
    },
]


class Harness:
    """Receive path + router without the network, with a controllable clock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.db_url)
        self.db.upgrade()
        self.store = open_store(settings)
        self.indexer = Indexer(self.db, self.store, linger_s=0.01)
        self.ingestor = Ingestor(self.store, self.indexer.submit)
        self.router = Router(settings, self.db)
        self.indexer.start()

    def send(self, datasets: Iterable[Dataset], calling_ae: str = "PACS1") -> None:
        for ds in datasets:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.ingestor.receive_bytes(buf.getvalue(), calling_ae=calling_ae, called_ae="PACSNODE")
        assert self.indexer.flush(10)

    def tick(self, after_s: float) -> dict[str, int]:
        return self.router.tick(utcnow() + timedelta(seconds=after_s))

    def series(self) -> dict[str, Series]:
        with self.db.session() as s:
            return {row.series_description or "": row for row in s.scalars(select(Series))}

    def jobs(self) -> list[Job]:
        with self.db.session() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def close(self) -> None:
        self.indexer.stop()
        self.db.dispose()


@pytest.fixture
def harness(make_settings: Callable[..., Settings]) -> Iterable[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kw: Any) -> Harness:
        data = {"pipelines": PIPELINES, "routes": ROUTES}
        data.update(kw)
        h = Harness(make_settings(data))
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def mr(n: int, desc: str, study: str, **kw: Any) -> list[Dataset]:
    return list(make_series(n, modality="MR", rows=8, cols=8, study_uid=study, SeriesDescription=desc, **kw))


def test_quiet_period_completes_and_single_input_route_makes_one_job_per_series(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    study = new_uid()
    h.send(make_series(3, rows=8, cols=8, study_uid=study, SeriesDescription="Abdomen 3.0 B30f PV", SliceThickness=3))
    h.send(make_series(2, rows=8, cols=8, study_uid=study, SeriesDescription="PORTAL VENOUS 7mm", SliceThickness=7))
    assert h.tick(0.5)["completed"] == 0, "a series must not complete before its quiet period"
    h.tick(1.5)
    series = h.series()
    thin, thick = series["Abdomen 3.0 B30f PV"], series["PORTAL VENOUS 7mm"]
    assert thin.state is SeriesState.ROUTED and thin.instance_count == 3
    assert thick.state is SeriesState.IGNORED
    assert "SliceThickness" in (thick.route_note or ""), thick.route_note
    jobs = h.jobs()
    assert [(j.pipeline, j.state, j.inputs) for j in jobs] == [("kidney", JobState.PENDING, {"ct": thin.series_uid})]
    # Routing again changes nothing (idempotent).
    h.tick(5)
    assert len(h.jobs()) == 1


def test_header_hint_completes_before_quiet_period(harness: Callable[..., Harness]) -> None:
    h = harness(routing={"series_quiet_s": 600})
    h.send(make_series(4, rows=8, cols=8, SeriesDescription="PV 2mm", ImagesInAcquisition=4))
    h.send(make_series(3, rows=8, cols=8, SeriesDescription="PV 3mm", ImagesInAcquisition=5))
    h.tick(0)
    series = h.series()
    assert series["PV 2mm"].state is SeriesState.ROUTED, "all announced images arrived: complete at once"
    assert series["PV 3mm"].state is SeriesState.RECEIVING, "2 of 5 announced images missing: keep waiting"


def test_multi_series_job_waits_for_required_then_optional_grace(harness: Callable[..., Harness]) -> None:
    h = harness()
    study = new_uid()
    h.send(mr(3, "ep2d_diff_3scan_trace_p2", study))
    h.tick(2)
    [job] = h.jobs()
    assert job.state is JobState.WAITING and job.priority == "stat"
    h.send(mr(3, "ep2d_diff_3scan_trace_p2_ADC", study))
    h.tick(2)  # ADC complete now; FLAIR optional: grace period starts
    [job] = h.jobs()
    assert job.state is JobState.WAITING, "optional FLAIR gets its grace period"
    h.tick(2 + 11)
    [job] = h.jobs()
    assert job.state is JobState.PENDING
    assert set(job.inputs) == {"dwi", "adc"}
    assert job.inputs["dwi"] == h.series()["ep2d_diff_3scan_trace_p2"].series_uid


def test_multi_series_job_takes_optional_input_that_arrives_in_time(harness: Callable[..., Harness]) -> None:
    h = harness()
    study = new_uid()
    h.send(mr(2, "DWI", study) + mr(2, "ADC", study) + mr(2, "Ax T2 FLAIR", study))
    h.tick(2)
    [job] = h.jobs()
    assert job.state is JobState.PENDING, "all roles present: no grace wait"
    assert set(job.inputs) == {"dwi", "adc", "flair"}


def test_missing_required_input_fails_with_actionable_reason(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.send(mr(3, "DWI", new_uid()))
    h.tick(2)
    h.tick(200)
    [job] = h.jobs()
    assert job.state is JobState.WAITING
    h.tick(2 + 301)
    [job] = h.jobs()
    assert job.state is JobState.FAILED
    assert job.reason is not None and job.reason.startswith("required input ADC not received within 300 s")


def test_loop_guard_never_routes_localizers_or_our_own_output(harness: Callable[..., Harness]) -> None:
    h = harness()
    study = new_uid()
    h.send(
        make_series(
            2,
            rows=8,
            cols=8,
            study_uid=study,
            SeriesDescription="PV loc",
            ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        )
    )
    h.send(make_series(2, rows=8, cols=8, study_uid=study, SeriesDescription="PV result", Manufacturer="pacs-node"))
    h.tick(2)
    notes = {d: s.route_note or "" for d, s in h.series().items()}
    assert all(s.state is SeriesState.IGNORED for s in h.series().values())
    assert "never routed" in notes["PV loc"] and "never routed" in notes["PV result"]
    assert h.jobs() == []


@pytest.mark.parametrize("policy,expected_jobs", [("rerun", 2), ("ignore", 1)])
def test_late_instance_reopens_series(harness: Callable[..., Harness], policy: str, expected_jobs: int) -> None:
    h = harness(routing={"series_quiet_s": 1.0, "poll_interval_s": 0.1, "late_instances": policy})
    study, series_uid = new_uid(), new_uid()
    h.send(make_series(3, rows=8, cols=8, study_uid=study, series_uid=series_uid, SeriesDescription="PV"))
    h.tick(2)
    assert len(h.jobs()) == 1
    late = list(make_series(1, rows=8, cols=8, study_uid=study, series_uid=series_uid, SeriesDescription="PV", seed=5))
    h.send(late)
    row = h.series()["PV"]
    assert row.state is SeriesState.RECEIVING and row.reopen_count == 1 and row.instance_count == 4
    h.tick(4)
    assert len(h.jobs()) == expected_jobs
    assert h.series()["PV"].state is SeriesState.ROUTED


def test_resent_identical_series_makes_no_duplicate_job(harness: Callable[..., Harness]) -> None:
    h = harness()
    datasets = list(make_series(3, rows=8, cols=8, SeriesDescription="PV"))
    h.send(datasets)
    h.tick(2)
    h.send(datasets)  # the PACS sends the same instances again
    assert h.series()["PV"].instance_count == 3
    h.tick(4)
    assert len(h.jobs()) == 1


def test_calling_ae_condition(harness: Callable[..., Harness]) -> None:
    routes = [{"name": "from-pacs1", "pipeline": "kidney", "calling_ae": "PACS1"}]
    h = harness(routes=routes)
    h.send(make_series(2, rows=8, cols=8, SeriesDescription="A"), calling_ae="PACS1")
    h.send(make_series(2, rows=8, cols=8, SeriesDescription="B"), calling_ae="OTHER")
    h.tick(2)
    series = h.series()
    assert series["A"].state is SeriesState.ROUTED
    assert series["B"].state is SeriesState.IGNORED


def test_series_completed_while_node_was_down_is_routed_at_start(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Any], tmp_path: Any
) -> None:
    settings = make_settings({"pipelines": PIPELINES, "routes": ROUTES})
    h = Harness(settings)
    h.send(make_series(2, rows=8, cols=8, SeriesDescription="PV"))
    h.close()  # the node "stops" before the quiet period passes
    node = run_node(settings)

    def routed() -> bool:
        with node.db.session() as s:
            return bool(s.scalars(select(Job)).all())

    wait_for(routed, 15, what="the router to route the series after restart")


def test_end_to_end_over_dicom_association(
    make_settings: Callable[..., Settings], run_node: Callable[[Settings], Any], tmp_path: Any
) -> None:
    """DWI + ADC sent by C-STORE become one PENDING stroke job, STAT first."""
    settings = make_settings({"pipelines": PIPELINES, "routes": ROUTES, "dicom": {"ae_title": "PACSNODE"}})
    node = run_node(settings)
    study = new_uid()
    files = write_series(tmp_path / "in", mr(3, "DWI", study) + mr(3, "ADC", study))
    statuses = send_files("127.0.0.1", node.scp.port, [str(f) for f in files], called_ae="PACSNODE")
    assert set(statuses.values()) == {0}

    def pending() -> list[Job]:
        with node.db.session() as s:
            return [j for j in s.scalars(select(Job)) if j.state is JobState.PENDING]

    def advance() -> list[Job]:
        # Jump the clock past the quiet period, then past FLAIR's 10 s grace.
        node.router.tick(utcnow() + timedelta(seconds=5))
        node.router.tick(utcnow() + timedelta(seconds=20))
        return pending()

    wait_for(advance, 20, what="a PENDING job")
    [job] = pending()
    assert job.pipeline == "stroke" and set(job.inputs) == {"dwi", "adc"} and job.priority_rank == 0
