"""Which outputs of a job go where: the delivery ledger's rows, written when a job's outputs are stored.

The process stage calls :func:`create_deliveries` in the same transaction as
the outputs (nothing is sent from there); the deliver stage claims the rows
and sends them. :func:`delivery_targets` also tells the process stage which
SEG types to build.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_node.config import RETURN_TO_SENDER, Settings
from storage.models import Delivery, DeliveryState, Job, Output, OutputKind, utcnow

logger = logging.getLogger(__name__)


def delivery_targets(settings: Settings, destinations: Sequence[str], route: str | None) -> list[tuple[str, str]]:
    """(destination name, SEG type) for a job: its route's destinations, plus return to sender.

    A name no longer configured keeps its place (its deliveries fail with that
    reason, visibly) and takes binary SEGs.
    """
    out: dict[str, str] = {}
    for name in destinations:
        dest = settings.destinations.get(name)
        out.setdefault(name, dest.seg_type if dest is not None else "binary")
    route_settings = next((r for r in settings.routes if r.name == route), None)
    if route_settings is not None and route_settings.return_to_sender is not None:
        out[RETURN_TO_SENDER] = route_settings.return_to_sender.seg_type
    return list(out.items())


def wants(kind: OutputKind, seg_type: str) -> bool:
    """Whether a destination taking ``seg_type`` SEGs receives an output of ``kind``.

    Every destination gets the BINARY SEG, because the SR references it: a LABELMAP
    SEG holds one segment per voxel and cannot carry overlapping segments (a whole
    kidney and its parenchyma), so the SR's volumes are those of the BINARY SEG's
    full masks. A ``labelmap`` destination gets the LABELMAP SEG as well.
    """
    if kind is OutputKind.SEG_LABELMAP:
        return seg_type == "labelmap"
    return True


def create_deliveries(session: Session, settings: Settings, job: Job, outputs: Sequence[Output]) -> list[Delivery]:
    """Add a PENDING delivery for each output and each destination that wants it (in the caller's transaction).

    Outputs must be flushed (have ids). Idempotent per (output, destination).
    """
    targets = delivery_targets(settings, list(job.destinations or []), job.route)
    if not targets:
        return []
    now = utcnow()
    ids = [o.id for o in outputs]
    existing = set(
        (row[0], row[1])
        for row in session.execute(select(Delivery.output_id, Delivery.destination).where(Delivery.output_id.in_(ids)))
    )
    made: list[Delivery] = []
    for out in outputs:
        for name, seg_type in targets:
            if (out.id, name) in existing or not wants(out.kind, seg_type):
                continue
            row = Delivery(
                output_id=out.id,
                job_id=job.id,
                study_id=out.study_id,
                destination=name,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
                permanent=False,
            )
            session.add(row)
            made.append(row)
    if made:
        session.flush()
        logger.info(
            "job %d: %d deliveries queued to %s", job.id, len(made), ", ".join(sorted({d.destination for d in made}))
        )
    return made
