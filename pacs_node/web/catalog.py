"""What the node holds, as DICOMweb sees it: received instances (``Instance``
rows in series not purged) and the results it produced (live ``Output`` rows).

Results are not indexed as ``Instance`` rows; they are stored in the same
``<Study>/<Series>/<SOP>.dcm`` layout and joined here. A result the node later
received back (a PACS that routes everything) is listed once, as received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, select
from sqlalchemy.orm import Session

from storage.models import Instance, Output, OutputKind, Series, Study

#: Modality of each kind of result (SEG builder, TID 1500 SR, Secondary Capture key image, notice SR).
OUTPUT_MODALITY: dict[OutputKind, str] = {
    OutputKind.SEG: "SEG",
    OutputKind.SEG_LABELMAP: "SEG",
    OutputKind.SR: "SR",
    OutputKind.NOTICE: "SR",
    OutputKind.KEY_IMAGE: "OT",
}


def kinds_for_modalities(modalities: set[str]) -> list[OutputKind]:
    """Result kinds whose objects carry one of ``modalities``."""
    return [kind for kind, modality in OUTPUT_MODALITY.items() if modality in modalities]


def output_modality_expr() -> Any:
    """SQL expression: the modality of an Output row."""
    return case(*((Output.kind == kind, modality) for kind, modality in OUTPUT_MODALITY.items()), else_="OT")


def live_output() -> ColumnElement[bool]:
    """An Output row that is visible: not superseded, not purged, not also received as an Instance."""
    return and_(
        Output.superseded_at.is_(None),
        Output.purged_at.is_(None),
        ~exists(select(Instance.id).where(Instance.sop_uid == Output.sop_uid)),
    )


def live_output_series() -> ColumnElement[bool]:
    """An Output row whose series is listed as a result series (not also received)."""
    return and_(
        Output.superseded_at.is_(None),
        Output.purged_at.is_(None),
        ~exists(select(Series.id).where(Series.series_uid == Output.series_uid, Series.purged_at.is_(None))),
    )


@dataclass(frozen=True)
class StoredInstance:
    """One retrievable instance and where its file lies in the store."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str | None
    path: str
    frames: int | None
    result: bool


def find_instances(
    session: Session, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[StoredInstance]:
    """Every retrievable instance of a study (optionally one series or one instance), in series and instance order."""
    q = (
        select(
            Series.series_uid,
            Instance.sop_uid,
            Instance.sop_class_uid,
            Instance.transfer_syntax_uid,
            Instance.path,
            Instance.number_of_frames,
        )
        .join(Series, Series.id == Instance.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_uid == study_uid, Series.purged_at.is_(None))
        .order_by(Series.series_number, Series.id, Instance.instance_number, Instance.id)
    )
    if series_uid is not None:
        q = q.where(Series.series_uid == series_uid)
    if sop_uid is not None:
        q = q.where(Instance.sop_uid == sop_uid)
    found = [
        StoredInstance(study_uid, se, sop, cls, ts, path, frames, False)
        for se, sop, cls, ts, path, frames in session.execute(q)
    ]
    oq = (
        select(Output.series_uid, Output.sop_uid, Output.sop_class_uid, Output.path)
        .join(Study, Study.id == Output.study_id)
        .where(Study.study_uid == study_uid, live_output())
        .order_by(Output.series_uid, Output.id)
    )
    if series_uid is not None:
        oq = oq.where(Output.series_uid == series_uid)
    if sop_uid is not None:
        oq = oq.where(Output.sop_uid == sop_uid)
    seen = {i.sop_uid for i in found}
    for se, sop, cls, path in session.execute(oq):
        if sop in seen:
            continue
        seen.add(sop)
        found.append(StoredInstance(study_uid, se, sop, cls, None, path, None, True))
    return found
