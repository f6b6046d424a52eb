"""Operator actions on deliveries: list, retry, cancel.

Plain functions on a SQLAlchemy session, shared by the CLI and the HTTP API.
They change rows only; the dispatcher picks a re-queued delivery up at its next
poll. The caller commits (``Database.session()`` does on success).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_node.errors import PacsNodeError
from storage.models import Delivery, DeliveryState, Output, utcnow

logger = logging.getLogger(__name__)

#: States an operator may re-queue.
RETRYABLE_STATES = (DeliveryState.FAILED, DeliveryState.CANCELLED)
#: States an operator may cancel (an IN_PROGRESS send is not interrupted; see :func:`cancel_delivery`).
CANCELLABLE_STATES = (DeliveryState.PENDING, DeliveryState.FAILED)


class DeliveryNotFound(PacsNodeError):
    """No delivery has the given id."""


class DeliveryStateError(PacsNodeError):
    """The delivery is in a state that does not allow the action; the message says which and why."""


def _get(session: Session, delivery_id: int) -> Delivery:
    row = session.get(Delivery, delivery_id, with_for_update=True)
    if row is None:
        raise DeliveryNotFound(f"no delivery with id {delivery_id}")
    return row


def retry_delivery(session: Session, delivery_id: int) -> Delivery:
    """Re-queue a FAILED or CANCELLED delivery: attempts reset, due now.

    The output is sent again with the same SOP Instance UID, so a destination
    that already holds it replaces or keeps its copy rather than duplicating it.

    Raises:
        DeliveryNotFound: no delivery with that id.
        DeliveryStateError: the delivery is pending, in progress or delivered, or its
            output was superseded by a later job (retry that job's delivery instead).
    """
    row = _get(session, delivery_id)
    if row.state not in RETRYABLE_STATES:
        raise DeliveryStateError(
            f"delivery {delivery_id} is {row.state.value}; only failed or cancelled deliveries can be retried"
        )
    output = session.get(Output, row.output_id)
    if output is not None and output.superseded_at is not None:
        raise DeliveryStateError(
            f"delivery {delivery_id}: its output was superseded by job {output.superseded_by_job_id}; "
            "retry the deliveries of that job instead"
        )
    now = utcnow()
    row.state = DeliveryState.PENDING
    row.attempts = 0
    row.next_attempt_at = now
    row.permanent = False
    row.worker_id = None
    row.lease_until = None
    row.updated_at = now
    session.flush()
    logger.info("delivery %d to %s re-queued by an operator", delivery_id, row.destination)
    return row


def cancel_delivery(session: Session, delivery_id: int) -> Delivery:
    """Cancel a PENDING (waiting or backing off) or FAILED delivery; it is not sent again on its own.

    An IN_PROGRESS delivery cannot be cancelled: its association or request is
    already under way.

    Raises:
        DeliveryNotFound: no delivery with that id.
        DeliveryStateError: the delivery is in progress, delivered or already cancelled.
    """
    row = _get(session, delivery_id)
    if row.state not in CANCELLABLE_STATES:
        why = " (it is being sent now)" if row.state is DeliveryState.IN_PROGRESS else ""
        raise DeliveryStateError(
            f"delivery {delivery_id} is {row.state.value}{why}; only pending or failed deliveries can be cancelled"
        )
    now = utcnow()
    row.state = DeliveryState.CANCELLED
    row.next_attempt_at = None
    row.worker_id = None
    row.lease_until = None
    row.updated_at = now
    session.flush()
    logger.info("delivery %d to %s cancelled by an operator", delivery_id, row.destination)
    return row


def list_deliveries(
    session: Session,
    *,
    states: Sequence[DeliveryState | str] = (),
    destination: str | None = None,
    study_id: int | None = None,
    job_id: int | None = None,
    limit: int = 100,
) -> list[Delivery]:
    """Deliveries, newest first, optionally filtered.

    Raises:
        ValueError: a state is not one of :class:`DeliveryState`'s values.
    """
    q = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
    if states:
        q = q.where(Delivery.state.in_([DeliveryState(s) for s in states]))
    if destination is not None:
        q = q.where(Delivery.destination == destination)
    if study_id is not None:
        q = q.where(Delivery.study_id == study_id)
    if job_id is not None:
        q = q.where(Delivery.job_id == job_id)
    return list(session.scalars(q))


def delivery_dict(row: Delivery, output: Output | None = None) -> dict[str, Any]:
    """A JSON-ready view of a delivery (times in ISO 8601 UTC); no patient data."""

    def iso(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

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
