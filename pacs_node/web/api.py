"""The JSON API under ``/api/``: studies, jobs and deliveries for a dashboard or a script.

Handlers are thin: they parse the request, call plain functions of this module
(which take a session and return JSON-ready dicts) or the node's own
operations (:func:`pacs_node.process.jobs.rerun`, :mod:`pacs_node.deliver.ledger`), and
answer. Lists are paged with ``limit`` (at most :data:`MAX_LIMIT`) and
``offset`` and carry the ``total`` that matched.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from pacs_node.deliver.ledger import (
    DeliveryNotFound,
    DeliveryStateError,
    cancel_delivery,
    delivery_dict,
    retry_delivery,
)
from pacs_node.errors import PacsNodeError
from pacs_node.web.qido import like_pattern
from storage.models import Delivery, DeliveryState, Job, JobState, Output, Series, Study, utcnow

logger = logging.getLogger(__name__)

MAX_LIMIT = 500
CANCELLABLE_JOB_STATES = (JobState.WAITING, JobState.PENDING)


class ApiError(PacsNodeError):
    """A request the API refuses; carries the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def paging(params: dict[str, str], default: int = 50) -> tuple[int, int]:
    """``(limit, offset)`` from query parameters.

    Raises:
        ApiError: 400 for values that are not non-negative integers.
    """
    try:
        limit = int(params.get("limit", default))
        offset = int(params.get("offset", 0))
    except ValueError as exc:
        raise ApiError("limit and offset must be integers", 400) from exc
    if limit < 0 or offset < 0:
        raise ApiError("limit and offset must not be negative", 400)
    return min(limit, MAX_LIMIT), offset


def _page(session: Session, stmt: Any, order: Any, limit: int, offset: int) -> tuple[int, list[Any]]:
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    rows = list(session.scalars(stmt.order_by(order).offset(offset).limit(limit)))
    return int(total), rows


# -- studies -----------------------------------------------------------------------------------------------------------


def study_summary(study: Study, series_count: int, instance_count: int, jobs: dict[str, int]) -> dict[str, Any]:
    """The list view of a study."""
    return {
        "study_uid": study.study_uid,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "series_count": series_count,
        "instance_count": instance_count,
        "jobs": jobs,
        "created_at": _iso(study.created_at),
        "updated_at": _iso(study.updated_at),
    }


def list_studies(session: Session, params: dict[str, str]) -> dict[str, Any]:
    """Studies, newest first; filters: ``patient_id``, ``patient_name`` (wildcards ``*``/``?``),
    ``accession_number``, ``study_date`` (YYYYMMDD or a range A-B), ``study_uid``."""
    limit, offset = paging(params)
    conds: list[ColumnElement[bool]] = []
    if params.get("patient_id"):
        conds.append(Study.patient_id == params["patient_id"])
    if params.get("patient_name"):
        conds.append(func.lower(Study.patient_name).like(like_pattern(params["patient_name"].lower()), escape="\\"))
    if params.get("accession_number"):
        conds.append(Study.accession_number == params["accession_number"])
    if params.get("study_uid"):
        conds.append(Study.study_uid == params["study_uid"])
    if params.get("study_date"):
        lo, sep, hi = params["study_date"].partition("-")
        if not sep:
            conds.append(Study.study_date == lo)
        else:
            if lo:
                conds.append(Study.study_date >= lo)
            if hi:
                conds.append(Study.study_date <= hi)
    total, studies = _page(session, select(Study).where(*conds), Study.id.desc(), limit, offset)
    ids = [s.id for s in studies]
    counts = {
        sid: (int(n), int(inst))
        for sid, n, inst in session.execute(
            select(Series.study_id, func.count(Series.id), func.coalesce(func.sum(Series.instance_count), 0))
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        )
    }
    jobs: dict[int, dict[str, int]] = {}
    for sid, state, n in session.execute(
        select(Job.study_id, Job.state, func.count()).where(Job.study_id.in_(ids)).group_by(Job.study_id, Job.state)
    ):
        jobs.setdefault(sid, {})[state.value.lower()] = int(n)
    items = [study_summary(s, *counts.get(s.id, (0, 0)), jobs.get(s.id, {})) for s in studies]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


def series_view(s: Series) -> dict[str, Any]:
    """One series of a study."""
    return {
        "series_uid": s.series_uid,
        "modality": s.modality,
        "series_number": s.series_number,
        "series_description": s.series_description,
        "state": s.state.value,
        "instance_count": s.instance_count,
        "frames_received": s.frames_received,
        "calling_ae": s.calling_ae,
        "first_received_at": _iso(s.first_received_at),
        "last_received_at": _iso(s.last_received_at),
        "completed_at": _iso(s.completed_at),
        "routed_at": _iso(s.routed_at),
        "route_note": s.route_note,
        "purged_at": _iso(s.purged_at),
    }


def job_view(job: Job, study_uid: str | None = None) -> dict[str, Any]:
    """One job, as the CLI's ``jobs show`` prints it."""
    return {
        "id": job.id,
        "state": job.state.value,
        "pipeline": job.pipeline,
        "route": job.route,
        "priority": job.priority,
        "study_uid": study_uid,
        "inputs": job.inputs,
        "destinations": job.destinations,
        "reason": job.reason,
        "failure_kind": job.failure_kind,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "required_complete_at": _iso(job.required_complete_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "attempts": job.attempts,
        "worker": job.worker_id,
        "model": {"name": job.model_name, "version": job.model_version, "sha256": job.model_checksums},
        "timings_s": job.timings,
        "metrics": job.metrics,
    }


def output_view(o: Output) -> dict[str, Any]:
    """One result object."""
    return {
        "id": o.id,
        "job_id": o.job_id,
        "kind": o.kind.value,
        "sop_class_uid": o.sop_class_uid,
        "series_uid": o.series_uid,
        "sop_instance_uid": o.sop_uid,
        "size_bytes": o.size_bytes,
        "created_at": _iso(o.created_at),
        "superseded_at": _iso(o.superseded_at),
        "superseded_by_job_id": o.superseded_by_job_id,
        "purged_at": _iso(o.purged_at),
    }


def study_detail(session: Session, study_uid: str) -> dict[str, Any]:
    """A study with its series, jobs, outputs and deliveries.

    Raises:
        ApiError: 404 for an unknown study.
    """
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise ApiError(f"no study {study_uid}", 404)
    series = list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)))
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))
    outputs = list(session.scalars(select(Output).where(Output.study_id == study.id).order_by(Output.id)))
    deliveries = list(session.scalars(select(Delivery).where(Delivery.study_id == study.id).order_by(Delivery.id)))
    by_id = {o.id: o for o in outputs}
    job_states: dict[str, int] = {}
    for j in jobs:
        job_states[j.state.value.lower()] = job_states.get(j.state.value.lower(), 0) + 1
    out = study_summary(study, len(series), sum(s.instance_count for s in series), job_states)
    out.update(
        {
            "patient_birth_date": study.patient_birth_date,
            "patient_sex": study.patient_sex,
            "series": [series_view(s) for s in series],
            "job_list": [job_view(j, study.study_uid) for j in jobs],
            "outputs": [output_view(o) for o in outputs],
            "deliveries": [delivery_dict(d, by_id.get(d.output_id)) for d in deliveries],
        }
    )
    return out


# -- jobs --------------------------------------------------------------------------------------------------------------


def list_jobs(session: Session, params: dict[str, str]) -> dict[str, Any]:
    """Jobs, newest first; filters: ``state`` (comma-separated), ``pipeline``, ``study_uid``.

    Raises:
        ApiError: 400 for an unknown state.
    """
    limit, offset = paging(params)
    stmt = select(Job)
    if params.get("state"):
        try:
            states = [JobState(s.strip().upper()) for s in params["state"].split(",") if s.strip()]
        except ValueError as exc:
            known = ", ".join(s.value.lower() for s in JobState)
            raise ApiError(f"state {params['state']!r}: not one of {known}", 400) from exc
        stmt = stmt.where(Job.state.in_(states))
    if params.get("pipeline"):
        stmt = stmt.where(Job.pipeline == params["pipeline"])
    if params.get("study_uid"):
        stmt = stmt.where(Job.study_id.in_(select(Study.id).where(Study.study_uid == params["study_uid"])))
    total, jobs = _page(session, stmt, Job.id.desc(), limit, offset)
    uids = dict(
        session.execute(select(Study.id, Study.study_uid).where(Study.id.in_({j.study_id for j in jobs}))).all()
    )
    return {
        "total": total,
        "limit": limit,
        "offset": offset,
        "items": [job_view(j, uids.get(j.study_id)) for j in jobs],
    }


def job_detail(session: Session, job_id: int) -> dict[str, Any]:
    """A job with its outputs and deliveries.

    Raises:
        ApiError: 404 for an unknown job.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(f"no job {job_id}", 404)
    out = job_view(job, job.study.study_uid)
    outputs = list(session.scalars(select(Output).where(Output.job_id == job_id).order_by(Output.id)))
    by_id = {o.id: o for o in outputs}
    out["outputs"] = [output_view(o) for o in outputs]
    out["deliveries"] = [
        delivery_dict(d, by_id.get(d.output_id))
        for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id))
    ]
    return out


def cancel_job(session: Session, job_id: int) -> dict[str, Any]:
    """Cancel a WAITING or PENDING job (a conditional update: a worker that claims it first wins).

    Raises:
        ApiError: 404 unknown job, 409 a job in another state.
    """
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(CANCELLABLE_JOB_STATES))
        .values(state=JobState.CANCELLED, finished_at=now, updated_at=now, reason="cancelled by an operator")
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        job = session.get(Job, job_id)
        if job is None:
            raise ApiError(f"no job {job_id}", 404)
        raise ApiError(f"job {job_id} is {job.state.value}; only WAITING or PENDING jobs can be cancelled", 409)
    logger.info("job %d cancelled by an operator", job_id)
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job_view(job, job.study.study_uid)


# -- deliveries --------------------------------------------------------------------------------------------------------


def list_deliveries_page(session: Session, params: dict[str, str]) -> dict[str, Any]:
    """Deliveries, newest first; filters: ``state`` (comma-separated), ``destination``, ``study_uid``, ``job_id``.

    Raises:
        ApiError: 400 for an unknown state or a job_id that is not an integer.
    """
    limit, offset = paging(params)
    stmt = select(Delivery)
    if params.get("state"):
        try:
            states = [DeliveryState(s.strip().lower()) for s in params["state"].split(",") if s.strip()]
        except ValueError as exc:
            known = ", ".join(s.value for s in DeliveryState)
            raise ApiError(f"state {params['state']!r}: not one of {known}", 400) from exc
        stmt = stmt.where(Delivery.state.in_(states))
    if params.get("destination"):
        stmt = stmt.where(Delivery.destination == params["destination"])
    if params.get("study_uid"):
        stmt = stmt.where(Delivery.study_id.in_(select(Study.id).where(Study.study_uid == params["study_uid"])))
    if params.get("job_id"):
        try:
            stmt = stmt.where(Delivery.job_id == int(params["job_id"]))
        except ValueError as exc:
            raise ApiError("job_id must be an integer", 400) from exc
    total, rows = _page(session, stmt, Delivery.id.desc(), limit, offset)
    outputs = {o.id: o for o in session.scalars(select(Output).where(Output.id.in_({d.output_id for d in rows})))}
    items = [delivery_dict(d, outputs.get(d.output_id)) for d in rows]
    return {"total": total, "limit": limit, "offset": offset, "items": items}


def delivery_detail(session: Session, delivery_id: int) -> dict[str, Any]:
    """One delivery.

    Raises:
        ApiError: 404 for an unknown delivery.
    """
    row = session.get(Delivery, delivery_id)
    if row is None:
        raise ApiError(f"no delivery {delivery_id}", 404)
    return delivery_dict(row, session.get(Output, row.output_id))


def act_on_delivery(session: Session, delivery_id: int, action: str) -> dict[str, Any]:
    """``retry`` or ``cancel`` a delivery through :mod:`pacs_node.deliver.ledger`.

    Raises:
        ApiError: 404 unknown delivery, 409 a state that does not allow the action.
    """
    try:
        row = retry_delivery(session, delivery_id) if action == "retry" else cancel_delivery(session, delivery_id)
    except DeliveryNotFound as exc:
        raise ApiError(str(exc), 404) from exc
    except DeliveryStateError as exc:
        raise ApiError(str(exc), 409) from exc
    return delivery_dict(row, session.get(Output, row.output_id))
