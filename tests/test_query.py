"""The read layer the CLI, the JSON API and the dashboard share, on a real SQLite database.

Each test inserts rows as the stages would leave them and checks what a person
reading a list or a page would check: counts by state, filters, order, paging.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from pacs_node import query
from pacs_node.config import RETURN_TO_SENDER, settings_from_mapping
from pacs_node.query.base import parse_states
from pacs_node.query.overview import RECENT
from storage.db import Database
from storage.models import Delivery, DeliveryState, Job, JobState, Output, OutputKind, Series, SeriesState, Study

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    database.upgrade()
    yield database
    database.dispose()


@dataclass
class Rows:
    """The ids of what :func:`populate` inserted, by a name a test can read."""

    ids: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.ids[name]


def _add(session: Session, rows: Rows, name: str, obj: Any) -> Any:
    session.add(obj)
    session.flush()
    rows.ids[name] = obj.id
    return obj


def _study(
    uid: str,
    name: str,
    patient_id: str,
    date: str,
    accession: str | None = None,
    description: str | None = None,
    *,
    days: float = 0.0,
) -> Study:
    return Study(
        study_uid=uid,
        patient_name=name,
        patient_id=patient_id,
        accession_number=accession,
        study_date=date,
        study_description=description,
        created_at=NOW - timedelta(days=days),
    )


def _output(job: Job, kind: OutputKind, n: int, **kw: Any) -> Output:
    return Output(
        job_id=job.id,
        study_id=job.study_id,
        kind=kind,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        series_uid=f"2.25.{job.id}{n}",
        sop_uid=f"2.25.{job.id}{n}1",
        path=f"outputs/{job.id}/{n}.dcm",
        size_bytes=1000 + n,
        **kw,
    )


def _delivery(out: Output, destination: str, state: DeliveryState, **kw: Any) -> Delivery:
    return Delivery(
        output_id=out.id, job_id=out.job_id, study_id=out.study_id, destination=destination, state=state, **kw
    )


@pytest.fixture
def rows(db: Database) -> Rows:
    """Three studies, oldest first:

    - ``jane``: two series (numbers 2 and 1, 3 and 5 instances); a DONE stroke job with a SEG,
      a key image (with a preview) and an SR, delivered to ``pacs``, failed at ``web`` and pending at
      ``pacs``; a FAILED stroke job; a PENDING dentate job.
    - ``richard``: one CT series of 10; a RUNNING kidney job, no outputs.
    - ``ann``: nothing but the study (the newest).
    """
    r = Rows()
    with db.session() as s:
        jane = _add(s, r, "jane", _study("1.2.3.1", "Doe^Jane", "P1", "20230105", "ACC1", "MR BRAIN 100%", days=3))
        dwi = _add(
            s,
            r,
            "dwi",
            Series(series_uid="1.2.3.1.1", study_id=jane.id, series_number=2, modality="MR", instance_count=3),
        )
        _add(
            s,
            r,
            "adc",
            Series(
                series_uid="1.2.3.1.2",
                study_id=jane.id,
                series_number=1,
                modality="MR",
                instance_count=5,
                state=SeriesState.ROUTED,
            ),
        )
        richard = _add(
            s, r, "richard", _study("1.2.3.2", "Roe^Richard", "P2", "20240102", "ACC2", "CT ABDOMEN", days=5 / 24)
        )
        _add(s, r, "ct", Series(series_uid="1.2.3.2.1", study_id=richard.id, modality="CT", instance_count=10))
        _add(s, r, "ann", _study("1.2.3.3", "O'Neil^Ann", "P3", "20241231"))

        done = _add(
            s,
            r,
            "done",
            Job(
                study_id=jane.id,
                pipeline="stroke",
                route="stroke-mr",
                state=JobState.DONE,
                inputs={"dwi": dwi.series_uid, "adc": "1.2.3.1.2", "gone": "9.9.9"},
                created_at=NOW - timedelta(minutes=10),
                queued_at=NOW - timedelta(minutes=10),
                started_at=NOW - timedelta(minutes=8),
                finished_at=NOW - timedelta(minutes=7),
                timings={"predict": 2.0, "load_model": 1.0, "stage_coarse": 1.5, "total": 4.0},
                metrics={"labels": {"1": {"name": "Lesion", "volume_ml": 12.5, "count": 2}}},
            ),
        )
        _add(s, r, "failed", Job(study_id=jane.id, pipeline="stroke", route="stroke-mr", state=JobState.FAILED))
        _add(s, r, "pending", Job(study_id=jane.id, pipeline="dentate", route="qsm", state=JobState.PENDING))
        _add(s, r, "running", Job(study_id=richard.id, pipeline="kidney", route="ct", state=JobState.RUNNING))

        seg = _add(s, r, "seg", _output(done, OutputKind.SEG, 1))
        key = _add(s, r, "key", _output(done, OutputKind.KEY_IMAGE, 2, png_path="previews/key.png"))
        _add(s, r, "sr", _output(done, OutputKind.SR, 3))
        _add(s, r, "delivered", _delivery(seg, "pacs", DeliveryState.DELIVERED, last_status=0x0000))
        _add(s, r, "refused", _delivery(seg, "web", DeliveryState.FAILED, last_status=409, last_error="conflict"))
        _add(s, r, "waiting", _delivery(key, "pacs", DeliveryState.PENDING))
    return r


# -- studies -----------------------------------------------------------------------------------------------------------


def test_studies_newest_first_with_counts_by_state(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        page = query.list_studies(s)
        assert [row.study.study_uid for row in page.items] == ["1.2.3.3", "1.2.3.2", "1.2.3.1"]
        assert page.total == 3 and (page.page, page.pages) == (1, 1)
        ann, richard, jane = page.items
        assert (jane.series, jane.instances) == (2, 8)
        assert jane.jobs == {"DONE": 1, "FAILED": 1, "PENDING": 1}
        assert jane.deliveries == {"delivered": 1, "failed": 1, "pending": 1}
        assert (richard.series, richard.instances, richard.jobs, richard.deliveries) == (1, 10, {"RUNNING": 1}, {})
        assert (ann.series, ann.instances, ann.jobs, ann.deliveries) == (0, 0, {}, {})
        assert query.study_dict(jane)["jobs"] == {"done": 1, "failed": 1, "pending": 1}, "the JSON view: lower case"


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"patient_id": "P2"}, ["1.2.3.2"]),
        ({"patient_name": "doe*"}, ["1.2.3.1"]),
        ({"patient_name": "?OE^*"}, ["1.2.3.2", "1.2.3.1"]),
        ({"patient_name": "doe"}, []),  # no wildcard: the whole name, in any case
        ({"accession_number": "ACC1"}, ["1.2.3.1"]),
        ({"study_uid": "1.2.3.3"}, ["1.2.3.3"]),
        ({"study_date": "20240102"}, ["1.2.3.2"]),
        ({"study_date": "20240101-20241231"}, ["1.2.3.3", "1.2.3.2"]),
        ({"study_date": "-20231231"}, ["1.2.3.1"]),
        ({"study_date": "20240103-"}, ["1.2.3.3"]),
        ({"text": "richard"}, ["1.2.3.2"]),  # a part of the name
        ({"text": " abdomen "}, ["1.2.3.2"]),  # a part of the description, spaces aside
        ({"text": "100%"}, ["1.2.3.1"]),  # % is a character, not a wildcard
        ({"text": "P"}, []),  # patient ID, accession and UID: exact only
        ({"text": "ACC1"}, ["1.2.3.1"]),
        ({"text": "1.2.3.3"}, ["1.2.3.3"]),
        ({"text": "   "}, ["1.2.3.3", "1.2.3.2", "1.2.3.1"]),
        ({"patient_id": "P1", "study_date": "2024-"}, []),  # filters combine with AND
    ],
)
def test_study_filters(db: Database, rows: Rows, filters: dict[str, str], expected: list[str]) -> None:
    with db.sessions() as s:
        page = query.list_studies(s, **filters)
        assert [row.study.study_uid for row in page.items] == expected and page.total == len(expected)


def test_studies_are_paged(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        first = query.list_studies(s, limit=2)
        second = query.list_studies(s, limit=2, offset=2)
        assert [r.study.study_uid for r in first.items] == ["1.2.3.3", "1.2.3.2"]
        assert [r.study.study_uid for r in second.items] == ["1.2.3.1"]
        assert (first.total, first.page, first.pages) == (3, 1, 2)
        assert (second.total, second.page, second.pages) == (3, 2, 2)
        assert second.items[0].jobs == {"DONE": 1, "FAILED": 1, "PENDING": 1}, "counts on a later page too"
        empty = query.list_studies(s, limit=0)
        assert (empty.items, empty.total, empty.pages) == ([], 3, 3)


def test_series_by_study_in_arrival_order(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        found = query.series_by_study(s, [rows["jane"], rows["ann"]])
        assert [x.id for x in found[rows["jane"]]] == [rows["dwi"], rows["adc"]]
        assert found[rows["ann"]] == []


def test_study_detail(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        assert query.study_detail(s, "9.9.9") is None
        detail = query.study_detail(s, "1.2.3.1")
        assert detail is not None
        assert [x.series_number for x in detail.series] == [1, 2], "by series number"
        assert [row.job.id for row in detail.jobs] == [rows["pending"], rows["failed"], rows["done"]], "newest first"
        assert [o.id for o in detail.outputs] == [rows["seg"], rows["key"], rows["sr"]]
        assert [d.id for d in detail.deliveries] == [rows["delivered"], rows["refused"], rows["waiting"]]

        view = query.study_detail_dict(detail)
        assert (view["series_count"], view["instance_count"]) == (2, 8)
        assert view["jobs"] == {"done": 1, "failed": 1, "pending": 1}
        assert [x["series_uid"] for x in view["series"]] == ["1.2.3.1.1", "1.2.3.1.2"], "the JSON view: id order"
        assert [j["id"] for j in view["job_list"]] == [rows["done"], rows["failed"], rows["pending"]]
        assert all(j["study_uid"] == "1.2.3.1" for j in view["job_list"])
        assert [o["kind"] for o in view["outputs"]] == ["SEG", "KEY_IMAGE", "SR"]
        assert [(d["destination"], d["kind"]) for d in view["deliveries"]] == [
            ("pacs", "SEG"),
            ("web", "SEG"),
            ("pacs", "KEY_IMAGE"),
        ]


# -- jobs --------------------------------------------------------------------------------------------------------------


def test_jobs_newest_first_with_their_study(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        page = query.list_jobs(s)
        assert [r.job.id for r in page.items] == [rows[k] for k in ("running", "pending", "failed", "done")]
        assert [r.study.study_uid if r.study else None for r in page.items] == ["1.2.3.2"] + ["1.2.3.1"] * 3
        assert all(r.outputs == [] and r.delivery_counts is None for r in page.items), "no cards unless asked"


LISTS: dict[str, tuple[Any, Any]] = {
    "jobs": (query.list_jobs, lambda row: row.job.id),
    "deliveries": (query.list_deliveries, lambda row: row.delivery.id),
}


@pytest.mark.parametrize(
    ("listed", "filters", "expected"),
    [
        ("jobs", {"states": ["done"]}, ["done"]),
        ("jobs", {"states": [" Pending ", JobState.RUNNING]}, ["running", "pending"]),
        ("jobs", {"pipeline": "stroke"}, ["failed", "done"]),
        ("jobs", {"study_uid": "1.2.3.2"}, ["running"]),
        ("jobs", {"study_uid": "1.2.3.3"}, []),
        ("jobs", {"states": ["failed"], "pipeline": "dentate"}, []),
        ("deliveries", {"states": ["failed"]}, ["refused"]),
        ("deliveries", {"states": ["FAILED", DeliveryState.PENDING]}, ["waiting", "refused"]),
        ("deliveries", {"destination": "pacs"}, ["waiting", "delivered"]),
        ("deliveries", {"study_uid": "1.2.3.1", "destination": "web"}, ["refused"]),
        ("deliveries", {"study_uid": "1.2.3.2"}, []),
        ("deliveries", {"job_id": "done"}, ["waiting", "refused", "delivered"]),
        ("deliveries", {"job_id": "failed"}, []),
    ],
)
def test_job_and_delivery_filters(
    db: Database, rows: Rows, listed: str, filters: dict[str, Any], expected: list[str]
) -> None:
    lister, row_id = LISTS[listed]
    if "job_id" in filters:
        filters = {**filters, "job_id": rows[filters["job_id"]]}
    with db.sessions() as s:
        page = lister(s, **filters)
        assert [row_id(r) for r in page.items] == [rows[k] for k in expected] and page.total == len(expected)


def test_jobs_paged_and_unknown_state_refused(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        page = query.list_jobs(s, limit=3, offset=3)
        assert [r.job.id for r in page.items] == [rows["done"]] and (page.total, page.page, page.pages) == (4, 2, 2)
        with pytest.raises(query.FilterError, match="'lost': not one of waiting, pending, running, done"):
            query.list_jobs(s, states=["done", "lost"])


def test_job_cards_brief_and_full(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        brief = {r.job.id: r for r in query.list_jobs(s, cards=True).items}
        done = brief[rows["done"]]
        assert [o.id for o in done.outputs] == [rows["key"]], "lists show the key image only"
        assert done.delivery_states == {"delivered": 1, "failed": 1, "pending": 1}
        assert done.preview is not None and done.preview.id == rows["key"]
        assert brief[rows["running"]].delivery_states == {} and brief[rows["running"]].preview is None

        assert query.job_detail(s, 999) is None
        full = query.job_detail(s, rows["done"])
        assert full is not None and full.study is not None and full.study.study_uid == "1.2.3.1"
        assert [o.id for o in full.outputs] == [rows["seg"], rows["key"], rows["sr"]]
        assert [d.id for d in full.deliveries] == [rows["delivered"], rows["refused"], rows["waiting"]]
        assert {role: x.id for role, x in full.inputs.items()} == {"dwi": rows["dwi"], "adc": rows["adc"]}
        assert full.delivery_states == {"delivered": 1, "failed": 1, "pending": 1}
        assert full.stages == [("load_model", 1.0), ("predict", 2.0)] and full.model_stages == [("coarse", 1.5)]
        assert (full.total_s, full.queue_s) == (4.0, 120.0)
        assert [(v["name"], v["volume_ml"], v["count"]) for v in full.volumes] == [("Lesion", 12.5, 2)]

        view = query.job_card_dict(full)
        assert view["study_uid"] == "1.2.3.1" and view["state"] == "DONE"
        assert [o["id"] for o in view["outputs"]] == [rows["seg"], rows["key"], rows["sr"]]
        assert [d["kind"] for d in view["deliveries"]] == ["SEG", "SEG", "KEY_IMAGE"]


def test_pipelines_seen_and_previews(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        assert query.pipelines_seen(s) == ["dentate", "kidney", "stroke"]
        assert query.output_png(s, rows["key"]) == "previews/key.png"
        assert query.output_png(s, rows["seg"]) is None and query.output_png(s, 999) is None
    with db.session() as s:
        key = s.get(Output, rows["key"])
        assert key is not None
        key.purged_at = NOW
    with db.sessions() as s:
        assert query.output_png(s, rows["key"]) is None, "a purged preview is gone"


# -- deliveries --------------------------------------------------------------------------------------------------------


def test_deliveries_newest_first_with_output_and_study(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        page = query.list_deliveries(s)
        assert [r.delivery.id for r in page.items] == [rows["waiting"], rows["refused"], rows["delivered"]]
        assert [r.output.kind if r.output else None for r in page.items] == [
            OutputKind.KEY_IMAGE,
            *[OutputKind.SEG] * 2,
        ]
        assert {r.study.study_uid if r.study else None for r in page.items} == {"1.2.3.1"}
        delivery, output, study = page.items[0]  # the dashboard's templates unpack the rows
        assert (delivery.id, output, study) == (rows["waiting"], page.items[0].output, page.items[0].study)


def test_deliveries_paged_counted_and_found(db: Database, rows: Rows) -> None:
    with db.sessions() as s:
        page = query.list_deliveries(s, limit=2, offset=2)
        assert [r.delivery.id for r in page.items] == [rows["delivered"]] and page.total == 3
        with pytest.raises(query.FilterError, match="'lost': not one of pending, in_progress, delivered"):
            query.list_deliveries(s, states=["lost"])
        assert query.delivery_summary(s) == {"pacs": {"delivered": 1, "pending": 1}, "web": {"failed": 1}}
        assert query.get_delivery(s, 999) is None
        found = query.get_delivery(s, rows["refused"])
        assert found is not None and found.output is not None and found.output.id == rows["seg"]
        view = query.delivery_dict(found.delivery, found.output)
        assert (view["state"], view["last_status"], view["last_error"], view["kind"]) == (
            "failed",
            409,
            "conflict",
            "SEG",
        )
        assert "kind" not in query.delivery_dict(found.delivery), "no output, no kind"


def test_statuses_are_written_as_their_protocol_writes_them(db: Database, rows: Rows, tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {
            "data_dir": str(tmp_path / "data"),
            "destinations": {
                "pacs": {"type": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"},
                "web": {"type": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web"},
            },
        }
    )
    with db.sessions() as s:
        refused = s.get(Delivery, rows["refused"])
        delivered = s.get(Delivery, rows["delivered"])
        waiting = s.get(Delivery, rows["waiting"])
        assert refused is not None and delivered is not None and waiting is not None
        assert query.shown_status(settings, refused) == "409"
        assert query.shown_status(settings, delivered) == "0x0000"
        assert query.shown_status(settings, waiting) is None, "no answer yet"
    for name in (RETURN_TO_SENDER, "removed-from-config"):  # DIMSE, or last known as a DICOM status
        assert query.shown_status(settings, Delivery(destination=name, last_status=0xA900)) == "0xA900"


# -- overview and helpers ----------------------------------------------------------------------------------------------


def test_overview(db: Database, rows: Rows) -> None:
    with db.session() as s:  # more jobs than the overview lists
        for _ in range(RECENT):
            s.add(Job(study_id=rows["ann"], pipeline="stroke", route="r", state=JobState.WAITING))
    with db.sessions() as s:
        data = query.overview(s, now=NOW)
        assert (data.studies, data.studies_today) == (3, 2)
        assert data.jobs == {"DONE": 1, "FAILED": 1, "PENDING": 1, "RUNNING": 1, "WAITING": RECENT}
        assert data.deliveries == {"pacs": {"delivered": 1, "pending": 1}, "web": {"failed": 1}}
        assert len(data.recent_jobs) == RECENT and all(r.job.state is JobState.WAITING for r in data.recent_jobs)
        assert all(r.delivery_counts == {} for r in data.recent_jobs), "brief cards"
        assert [
            (d.id, out.kind if out else None, st.study_uid if st else None) for d, out, st in data.failed_deliveries
        ] == [(rows["refused"], OutputKind.SEG, "1.2.3.1")]


def test_parse_states_and_like_patterns() -> None:
    assert parse_states(JobState, ["done", " Failed", JobState.RUNNING]) == [
        JobState.DONE,
        JobState.FAILED,
        JobState.RUNNING,
    ]
    assert parse_states(DeliveryState, ["IN_PROGRESS"]) == [DeliveryState.IN_PROGRESS]
    with pytest.raises(query.FilterError, match="state '': not one of"):
        parse_states(DeliveryState, [""])
    assert query.like_pattern("Doe*^J?n_100%\\") == "Doe%^J_n\\_100\\%\\\\"
