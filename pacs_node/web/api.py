"""The JSON API under ``/api/``: studies, jobs and deliveries for a dashboard or a script.

Handlers are thin: they parse the request, read through :mod:`pacs_node.query`
(the read layer the CLI and the dashboard share) or call the node's own
operations (:func:`pacs_node.process.jobs.rerun`, :mod:`pacs_node.deliver.ledger`), and
answer. Lists are paged with ``limit`` (at most :data:`MAX_LIMIT`) and
``offset`` and carry the ``total`` that matched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from pacs_node import query
from pacs_node.deliver.ledger import DeliveryNotFound, DeliveryStateError, cancel_delivery, retry_delivery
from pacs_node.errors import PacsNodeError
from pacs_node.query.base import MAX_OFFSET, parse_count, parse_id
from storage.models import Job, JobState, utcnow

logger = logging.getLogger(__name__)

MAX_LIMIT = 500
CANCELLABLE_JOB_STATES = (JobState.WAITING, JobState.PENDING)


class ApiError(PacsNodeError):
    """A request the API refuses; carries the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def paging(params: dict[str, str], default: int = 50) -> tuple[int, int]:
    """``(limit, offset)`` from query parameters (a limit above :data:`MAX_LIMIT` is cut to it).

    Raises:
        ApiError: 400 for values that are not whole numbers, or an offset above
            :data:`pacs_node.query.base.MAX_OFFSET`.
    """
    try:
        limit = parse_count(params.get("limit"), "limit", default=default, maximum=MAX_OFFSET)
        offset = parse_count(params.get("offset"), "offset", default=0, maximum=MAX_OFFSET)
    except query.FilterError as exc:
        raise ApiError(str(exc), 400) from exc
    return min(limit, MAX_LIMIT), offset


def row_id(value: str | int, what: str) -> int:
    """A row id from the path or a parameter.

    Raises:
        ApiError: 400 for anything but a whole number from 1 to :data:`pacs_node.query.base.MAX_ID`.
    """
    try:
        return parse_id(value, what)
    except query.FilterError as exc:
        raise ApiError(str(exc), 400) from exc


def _envelope(page: query.Page[Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"total": page.total, "limit": page.limit, "offset": page.offset, "items": items}


def _listed(
    lister: Callable[..., query.Page[Any]], session: Session, params: dict[str, str], **filters: Any
) -> query.Page[Any]:
    """A page from a lister of :mod:`pacs_node.query` with the ``state`` (comma-separated), ``study_uid`` and paging
    parameters and ``filters``.

    Raises:
        ApiError: 400 for bad paging values or an unknown state.
    """
    limit, offset = paging(params)
    states = [s for s in params.get("state", "").split(",") if s.strip()]
    try:
        return lister(session, states=states, study_uid=params.get("study_uid"), limit=limit, offset=offset, **filters)
    except query.FilterError as exc:
        raise ApiError(str(exc), 400) from exc


# -- studies -----------------------------------------------------------------------------------------------------------


def list_studies(session: Session, params: dict[str, str]) -> dict[str, Any]:
    """Studies, newest first; filters: ``patient_id``, ``patient_name`` (wildcards ``*``/``?``),
    ``accession_number``, ``study_date`` (YYYYMMDD or a range A-B), ``study_uid``.

    Raises:
        ApiError: 400 for bad paging values.
    """
    limit, offset = paging(params)
    page = query.list_studies(
        session,
        patient_id=params.get("patient_id"),
        patient_name=params.get("patient_name"),
        accession_number=params.get("accession_number"),
        study_uid=params.get("study_uid"),
        study_date=params.get("study_date"),
        limit=limit,
        offset=offset,
    )
    return _envelope(page, [query.study_dict(row) for row in page.items])


def study_detail(session: Session, study_uid: str) -> dict[str, Any]:
    """A study with its series, jobs, outputs and deliveries.

    Raises:
        ApiError: 404 for an unknown study.
    """
    detail = query.study_detail(session, study_uid)
    if detail is None:
        raise ApiError(f"no study {study_uid}", 404)
    return query.study_detail_dict(detail)


# -- jobs --------------------------------------------------------------------------------------------------------------


def list_jobs(session: Session, params: dict[str, str]) -> dict[str, Any]:
    """Jobs, newest first; filters: ``state`` (comma-separated), ``pipeline``, ``study_uid``.

    Raises:
        ApiError: 400 for an unknown state.
    """
    page = _listed(query.list_jobs, session, params, pipeline=params.get("pipeline"))
    return _envelope(page, [query.job_dict(row.job, row.study.study_uid if row.study else None) for row in page.items])


def job_detail(session: Session, job_id: int) -> dict[str, Any]:
    """A job with its outputs and deliveries.

    Raises:
        ApiError: 404 for an unknown job.
    """
    row = query.job_detail(session, job_id)
    if row is None:
        raise ApiError(f"no job {job_id}", 404)
    return query.job_card_dict(row)


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
    return query.job_dict(job, job.study.study_uid)


# -- deliveries --------------------------------------------------------------------------------------------------------


def list_deliveries_page(session: Session, params: dict[str, str]) -> dict[str, Any]:
    """Deliveries, newest first; filters: ``state`` (comma-separated), ``destination``, ``study_uid``, ``job_id``.

    Raises:
        ApiError: 400 for an unknown state, a job_id that is not an id, or bad paging values.
    """
    job_id = row_id(params["job_id"], "job_id") if params.get("job_id") else None
    page = _listed(query.list_deliveries, session, params, destination=params.get("destination"), job_id=job_id)
    return _envelope(page, [query.delivery_dict(r.delivery, r.output) for r in page.items])


def delivery_detail(session: Session, delivery_id: int) -> dict[str, Any]:
    """One delivery.

    Raises:
        ApiError: 404 for an unknown delivery.
    """
    row = query.get_delivery(session, delivery_id)
    if row is None:
        raise ApiError(f"no delivery {delivery_id}", 404)
    return query.delivery_dict(row.delivery, row.output)


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
    return delivery_detail(session, row.id)
