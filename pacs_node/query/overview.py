"""The node at a glance: counts by state, the latest jobs, the latest failed deliveries."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_node.query.deliveries import DeliveryRow, delivery_rows, delivery_summary
from pacs_node.query.jobs import JobRow, job_cards
from storage.models import Delivery, DeliveryState, Job, Study, utcnow

logger = logging.getLogger(__name__)

#: how many of the latest jobs and failed deliveries the overview lists
RECENT = 8


@dataclass
class Overview:
    """The front page's figures."""

    studies: int
    studies_today: int
    #: job state value -> count
    jobs: dict[str, int]
    #: destination -> delivery state value -> count
    deliveries: dict[str, dict[str, int]]
    recent_jobs: list[JobRow]
    failed_deliveries: list[DeliveryRow]


def overview(session: Session, now: datetime | None = None) -> Overview:
    """Counts by state, the :data:`RECENT` latest jobs (brief cards) and failed deliveries; no totals of lists."""
    now = now or utcnow()
    studies = int(session.scalar(select(func.count(Study.id))) or 0)
    today = int(session.scalar(select(func.count(Study.id)).where(Study.created_at >= now - timedelta(days=1))) or 0)
    jobs = {state.value: int(n) for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}
    recent = list(session.scalars(select(Job).order_by(Job.id.desc()).limit(RECENT)))
    failed = list(
        session.scalars(
            select(Delivery).where(Delivery.state == DeliveryState.FAILED).order_by(Delivery.id.desc()).limit(RECENT)
        )
    )
    return Overview(
        studies=studies,
        studies_today=today,
        jobs=jobs,
        deliveries=delivery_summary(session),
        recent_jobs=job_cards(session, recent, brief=True),
        failed_deliveries=delivery_rows(session, failed),
    )
