"""Deliveries as the faces show them: lists with their output and study, counts per destination, JSON views."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_node.config import Settings
from pacs_node.query.base import Page, fetch_page, in_states, iso, of_study
from storage.models import Delivery, DeliveryState, Output, Study

logger = logging.getLogger(__name__)


class DeliveryRow(NamedTuple):
    """A delivery with the output it sends and the study it belongs to (None when gone)."""

    delivery: Delivery
    output: Output | None
    study: Study | None


def delivery_rows(session: Session, deliveries: list[Delivery]) -> list[DeliveryRow]:
    """``deliveries`` with their outputs and studies, in two IN queries, in the given order."""
    outputs = {o.id: o for o in session.scalars(select(Output).where(Output.id.in_({d.output_id for d in deliveries})))}
    studies = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_({d.study_id for d in deliveries})))}
    return [DeliveryRow(d, outputs.get(d.output_id), studies.get(d.study_id)) for d in deliveries]


def list_deliveries(
    session: Session,
    *,
    states: Iterable[DeliveryState | str] = (),
    destination: str | None = None,
    study_uid: str | None = None,
    job_id: int | None = None,
    limit: int = 100,
    offset: int = 0,
) -> Page[DeliveryRow]:
    """Deliveries, newest first, in any of ``states``, to one destination, of one study or one job.

    Raises:
        FilterError: a state is not a delivery state.
    """
    conds = [*in_states(Delivery.state, DeliveryState, states), *of_study(Delivery.study_id, study_uid)]
    if destination:
        conds.append(Delivery.destination == destination)
    if job_id is not None:
        conds.append(Delivery.job_id == job_id)
    total, rows = fetch_page(session, select(Delivery).where(*conds), Delivery.id.desc(), limit=limit, offset=offset)
    return Page(delivery_rows(session, rows), total, limit, offset)


def get_delivery(session: Session, delivery_id: int) -> DeliveryRow | None:
    """One delivery with its output and study, or None."""
    row = session.get(Delivery, delivery_id)
    return delivery_rows(session, [row])[0] if row is not None else None


def delivery_summary(session: Session) -> dict[str, dict[str, int]]:
    """destination -> state -> count, destinations in name order."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for dest, state, n in session.execute(
        select(Delivery.destination, Delivery.state, func.count()).group_by(Delivery.destination, Delivery.state)
    ):
        out[dest][state.value] = int(n)
    return dict(sorted(out.items()))


def shown_status(settings: Settings, delivery: Delivery) -> str | None:
    """The last status the destination answered, written as its protocol writes it (None: no answer yet).

    DICOM statuses, of DIMSE destinations (return to sender included) and of a
    destination no longer configured, read as ``0xA900``; every other
    protocol's (HTTP for STOW-RS) as the plain number.
    """
    status = delivery.last_status
    if status is None:
        return None
    dest = settings.destinations.get(delivery.destination)
    return f"0x{status:04X}" if dest is None or dest.type == "dimse" else str(status)


def delivery_dict(row: Delivery, output: Output | None = None) -> dict[str, Any]:
    """A JSON-ready view of a delivery (times in ISO 8601 UTC); no patient data."""
    out: dict[str, Any] = {
        "id": row.id,
        "output_id": row.output_id,
        "job_id": row.job_id,
        "study_id": row.study_id,
        "destination": row.destination,
        "state": row.state.value,
        "attempts": row.attempts,
        "next_attempt_at": iso(row.next_attempt_at),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "started_at": iso(row.started_at),
        "delivered_at": iso(row.delivered_at),
        "last_status": row.last_status,
        "last_error": row.last_error,
        "permanent": row.permanent,
        "worker_id": row.worker_id,
        "lease_until": iso(row.lease_until),
    }
    if output is not None:
        out["kind"] = output.kind.value
        out["sop_instance_uid"] = output.sop_uid
    return out
