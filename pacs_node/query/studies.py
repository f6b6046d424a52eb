"""Studies as the faces show them: lists with counts, one study with its series and job cards, JSON views."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from pacs_node.query.base import Page, fetch_page, iso, like_pattern
from pacs_node.query.deliveries import delivery_dict
from pacs_node.query.jobs import JobRow, job_cards, job_dict, output_dict
from storage.models import Delivery, Job, Output, Series, Study

logger = logging.getLogger(__name__)


@dataclass
class StudyRow:
    """A study in a list: its series and instance counts, its jobs and deliveries by state."""

    study: Study
    series: int = 0
    instances: int = 0
    #: job state value (``DONE``) -> count
    jobs: dict[str, int] = field(default_factory=dict)
    #: delivery state value (``failed``) -> count
    deliveries: dict[str, int] = field(default_factory=dict)


def _text_search(text: str) -> ColumnElement[bool]:
    like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_").lower() + "%"
    return or_(
        func.lower(Study.patient_name).like(like, escape="\\"),
        Study.patient_id == text,
        Study.accession_number == text,
        Study.study_uid == text,
        func.lower(Study.study_description).like(like, escape="\\"),
    )


def _date_range(value: str) -> list[ColumnElement[bool]]:
    lo, sep, hi = value.partition("-")
    if not sep:
        return [Study.study_date == lo]
    return ([Study.study_date >= lo] if lo else []) + ([Study.study_date <= hi] if hi else [])


def list_studies(
    session: Session,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    accession_number: str | None = None,
    study_uid: str | None = None,
    study_date: str | None = None,
    text: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Page[StudyRow]:
    """Studies, newest first, with series/instance counts and job and delivery states.

    Filters (all optional, combined with AND): ``patient_id``, ``accession_number``
    and ``study_uid`` exact; ``patient_name`` case-insensitive with wildcards ``*``
    and ``?``; ``study_date`` ``YYYYMMDD`` or a range ``A-B`` (either end may be
    empty); ``text`` a search box: patient name and description contain it, or
    patient ID, accession number or Study UID equal it.
    """
    conds: list[ColumnElement[bool]] = []
    if patient_id:
        conds.append(Study.patient_id == patient_id)
    if patient_name:
        conds.append(func.lower(Study.patient_name).like(like_pattern(patient_name.lower()), escape="\\"))
    if accession_number:
        conds.append(Study.accession_number == accession_number)
    if study_uid:
        conds.append(Study.study_uid == study_uid)
    if study_date:
        conds.extend(_date_range(study_date))
    if text and text.strip():
        conds.append(_text_search(text.strip()))
    total, studies = fetch_page(session, select(Study).where(*conds), Study.id.desc(), limit=limit, offset=offset)
    rows = {s.id: StudyRow(s) for s in studies}
    ids = list(rows)
    if ids:
        for sid, n, inst in session.execute(
            select(Series.study_id, func.count(Series.id), func.coalesce(func.sum(Series.instance_count), 0))
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        ):
            rows[sid].series, rows[sid].instances = int(n), int(inst)
        for sid, state, n in session.execute(
            select(Job.study_id, Job.state, func.count()).where(Job.study_id.in_(ids)).group_by(Job.study_id, Job.state)
        ):
            rows[sid].jobs[state.value] = int(n)
        for sid, d_state, n in session.execute(
            select(Delivery.study_id, Delivery.state, func.count())
            .where(Delivery.study_id.in_(ids))
            .group_by(Delivery.study_id, Delivery.state)
        ):
            rows[sid].deliveries[d_state.value] = int(n)
    return Page(list(rows.values()), total, limit, offset)


def series_by_study(session: Session, study_ids: Sequence[int]) -> dict[int, list[Series]]:
    """The series of each study, in the order they arrived (one IN query)."""
    out: dict[int, list[Series]] = {i: [] for i in study_ids}
    for s in session.scalars(select(Series).where(Series.study_id.in_(list(study_ids))).order_by(Series.id)):
        out[s.study_id].append(s)
    return out


@dataclass
class StudyDetail:
    """A study with its series (by series number) and its jobs' full cards (newest first)."""

    study: Study
    series: list[Series]
    jobs: list[JobRow]

    @property
    def outputs(self) -> list[Output]:
        """Every result object of the study's jobs, in id order."""
        return sorted((o for row in self.jobs for o in row.outputs), key=lambda o: o.id)

    @property
    def deliveries(self) -> list[Delivery]:
        """Every delivery of the study's jobs, in id order."""
        return sorted((d for row in self.jobs for d in row.deliveries), key=lambda d: d.id)


def study_detail(session: Session, study_uid: str) -> StudyDetail | None:
    """A study by its UID, or None."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return None
    series = list(
        session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id))
    )
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())))
    return StudyDetail(study, series, job_cards(session, jobs, studies={study.id: study}))


def _summary_dict(study: Study, series_count: int, instance_count: int, jobs: dict[str, int]) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "series_count": series_count,
        "instance_count": instance_count,
        "jobs": {state.lower(): n for state, n in jobs.items()},
        "created_at": iso(study.created_at),
        "updated_at": iso(study.updated_at),
    }


def study_dict(row: StudyRow) -> dict[str, Any]:
    """A JSON-ready view of a study in a list (job states in lower case)."""
    return _summary_dict(row.study, row.series, row.instances, row.jobs)


def series_dict(s: Series) -> dict[str, Any]:
    """A JSON-ready view of one series of a study."""
    return {
        "series_uid": s.series_uid,
        "modality": s.modality,
        "series_number": s.series_number,
        "series_description": s.series_description,
        "state": s.state.value,
        "instance_count": s.instance_count,
        "frames_received": s.frames_received,
        "calling_ae": s.calling_ae,
        "first_received_at": iso(s.first_received_at),
        "last_received_at": iso(s.last_received_at),
        "completed_at": iso(s.completed_at),
        "routed_at": iso(s.routed_at),
        "route_note": s.route_note,
        "purged_at": iso(s.purged_at),
    }


def study_detail_dict(detail: StudyDetail) -> dict[str, Any]:
    """A JSON-ready view of a study with its series, jobs, outputs and deliveries, each in id order."""
    series = sorted(detail.series, key=lambda s: s.id)
    jobs = sorted((row.job for row in detail.jobs), key=lambda j: j.id)
    states: dict[str, int] = {}
    for j in jobs:
        states[j.state.value] = states.get(j.state.value, 0) + 1
    outputs = detail.outputs
    by_id = {o.id: o for o in outputs}
    out = _summary_dict(detail.study, len(series), sum(s.instance_count for s in series), states)
    out.update(
        {
            "patient_birth_date": detail.study.patient_birth_date,
            "patient_sex": detail.study.patient_sex,
            "series": [series_dict(s) for s in series],
            "job_list": [job_dict(j, detail.study.study_uid) for j in jobs],
            "outputs": [output_dict(o) for o in outputs],
            "deliveries": [delivery_dict(d, by_id.get(d.output_id)) for d in detail.deliveries],
        }
    )
    return out
