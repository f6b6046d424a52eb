"""Operator actions on deliveries: retry, cancel.

Plain functions on a SQLAlchemy session, shared by the CLI and the HTTP API
(both read deliveries through :mod:`pacs_node.query`). They change rows only;
the dispatcher picks a re-queued delivery up at its next poll. The caller
commits (``Database.session()`` does on success).
"""

from __future__ import annotations

import logging

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
