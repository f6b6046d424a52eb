"""Turn a finished segmentation into the DICOM objects clinicians see, store
them, and record them as the job's outputs.

Glue only: the builders live in :mod:`inference.outputs`; this module decides
which objects a job needs (SEG types by destination, the key image, a notice
for an input failure), writes them into the file store under their study,
marks an earlier job's results for the same study and pipeline as superseded
(cancelling their deliveries not yet sent), and queues a delivery per output and
destination in the same transaction as the outputs.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_node import __version__
from pacs_node.common.destinations import create_deliveries, delivery_targets
from pacs_node.config import Settings
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Delivery, DeliveryState, Instance, Job, JobState, Output, OutputKind, Series, utcnow

if TYPE_CHECKING:  # torch loads only in worker processes
    from inference.manifest import Manifest
    from inference.pipeline import SegmentationResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltOutput:
    """One object ready to store."""

    kind: OutputKind
    dataset: Dataset
    png: bytes | None = None


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def seg_kinds(settings: Settings, destinations: Sequence[str], route: str | None = None) -> list[OutputKind]:
    """SEG types to build: always the BINARY SEG (the SR references it; only it carries overlapping
    segments), and the LABELMAP SEG when a destination (or the route's return to sender) asks for one."""
    kinds = [OutputKind.SEG]
    if any(seg_type == "labelmap" for _name, seg_type in delivery_targets(settings, destinations, route)):
        kinds.append(OutputKind.SEG_LABELMAP)
    return kinds


def include_unvalidated(settings: Settings, route: str | None) -> bool:
    """Whether the job's route asks for the segments a model card does not validate."""
    return any(r.name == route and r.include_unvalidated for r in settings.routes)


def build_outputs(
    settings: Settings,
    job: Job,
    result: SegmentationResult,
    inputs: dict[str, list[Dataset]],
    manifest: Manifest,
) -> tuple[list[BuiltOutput], dict[str, Any]]:
    """SEG(s), the TID 1500 SR and the key image for a DONE job, and the metrics they report.

    ``result`` is what the model produced from ``inputs``, the datasets the job
    read, by role; ``manifest`` the model package's manifest. Segments the model
    card does not validate are left out unless the job's route includes them
    (:func:`inference.segments.for_output`); the metrics returned are those of the
    segments sent, numbered as the SEG numbers them, for the job's record.
    """
    from inference.outputs.common import ResultIdentity
    from inference.outputs.keyimage import build_key_image_sc, compose_key_image, png_bytes
    from inference.outputs.seg import build_seg
    from inference.outputs.sr import build_sr
    from inference.segments import for_output

    out = settings.outputs
    segments, metrics = for_output(
        result.segments, result.metrics, include_unvalidated=include_unvalidated(settings, job.route)
    )
    identity = ResultIdentity.of(
        (str(ds.SOPInstanceUID) for datasets in inputs.values() for ds in datasets),
        job.pipeline,
        manifest.name,
        manifest.version,
    )
    sources = inputs[manifest.reference]
    segs = {
        kind: build_seg(
            result.labels,
            sources,
            manifest,
            identity if kind is OutputKind.SEG else identity.variant("labelmap"),
            pipeline=job.pipeline,
            node_version=__version__,
            seg_type="labelmap" if kind is OutputKind.SEG_LABELMAP else "binary",
            series_number=out.seg_series_number,
            segments=segments,
        )
        for kind in seg_kinds(settings, job.destinations or [], job.route)
    }
    built = [BuiltOutput(kind, seg) for kind, seg in segs.items()]
    sr = build_sr(
        segs[OutputKind.SEG],  # the BINARY SEG: its segments are the full masks the SR measured
        sources,
        metrics,
        manifest,
        identity,
        pipeline=job.pipeline,
        node_version=__version__,
        series_number=out.sr_series_number,
        segments=segments,
    )
    built.append(BuiltOutput(OutputKind.SR, sr))
    if out.key_image:
        image = result.channels[manifest.reference]
        key = compose_key_image(
            image,
            result.labels,
            manifest,
            metrics,
            title=f"AI {job.pipeline}: {manifest.name} {manifest.version}",
            demo=manifest.demo,
            segments=segments,
        )
        sc = build_key_image_sc(
            key,
            sources,
            identity,
            pipeline=job.pipeline,
            manifest=manifest,
            node_version=__version__,
            series_number=out.key_image_series_number,
        )
        built.append(BuiltOutput(OutputKind.KEY_IMAGE, sc, png=png_bytes(key)))
    return built, metrics


def store_outputs(
    settings: Settings,
    db: Database,
    store: FileStore,
    job_id: int,
    built: Sequence[BuiltOutput],
    *,
    fence: Callable[[Session], None] | None = None,
) -> list[Output]:
    """Write objects to the store, record them and queue their deliveries; supersede earlier results.

    Earlier live outputs of the same study and pipeline (another job) are marked
    superseded: a re-run with the same inputs wrote the same UIDs over them, a
    new model version or late instances made new ones that replace them. Their
    deliveries still PENDING are cancelled (one being sent finishes).

    ``fence`` runs in the transaction that records the outputs and deliveries,
    just before it commits: the worker moves the job to DONE there
    (:func:`pacs_node.process.jobs.finish_job`), so that outputs, deliveries and
    DONE commit together. Whatever it raises rolls all of it back and propagates.

    Raises:
        ValueError: the job is not in the database.
    """
    rows: list[Output] = []
    written: list[tuple[BuiltOutput, str, int, str | None]] = []
    results_dir = settings.results_dir / str(job_id)
    for item in built:
        ds = item.dataset
        rel = store.relpath(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        data = _encode(ds)
        store.write_file(rel, data)
        png_rel = None
        if item.png is not None:
            results_dir.mkdir(parents=True, exist_ok=True)
            png_path = results_dir / "key-image.png"
            png_path.write_bytes(item.png)
            png_rel = _rel(png_path, settings.data_dir)
        written.append((item, rel, len(data), png_rel))
    now = utcnow()
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ValueError(f"job {job_id} vanished")
        earlier = (
            select(Output.id)
            .join(Job, Job.id == Output.job_id)
            .where(
                Output.study_id == job.study_id,
                Job.pipeline == job.pipeline,
                Output.job_id != job_id,
                Output.superseded_at.is_(None),
            )
        )
        ids = list(session.scalars(earlier)) if any(b.kind is not OutputKind.NOTICE for b in built) else []
        if ids:
            session.execute(
                update(Output).where(Output.id.in_(ids)).values(superseded_at=now, superseded_by_job_id=job_id)
            )
            cancelled = session.execute(
                update(Delivery)
                .where(Delivery.output_id.in_(ids), Delivery.state == DeliveryState.PENDING)
                .values(
                    state=DeliveryState.CANCELLED,
                    next_attempt_at=None,
                    updated_at=now,
                    last_error=f"superseded by the results of job {job_id} before it was sent",
                )
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            logger.info(
                "job %d supersedes %d earlier outputs of pipeline %s in its study (%d unsent deliveries cancelled)",
                job_id,
                len(ids),
                job.pipeline,
                cancelled,
            )
        for item, rel, size, png_rel in written:
            ds = item.dataset
            row = Output(
                job_id=job_id,
                study_id=job.study_id,
                kind=item.kind,
                sop_class_uid=str(ds.SOPClassUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_uid=str(ds.SOPInstanceUID),
                path=rel,
                png_path=png_rel,
                size_bytes=size,
            )
            session.add(row)
            rows.append(row)
        session.flush()
        create_deliveries(session, settings, job, rows)
        if fence is not None:
            fence(session)
    return rows


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def emit_notices(settings: Settings, db: Database, store: FileStore) -> int:
    """Write a "not processed" SR for jobs that failed for their input on routes that ask for one.

    Returns the number of notices written. Idempotent: a job gets one notice.
    """
    from pydicom import dcmread

    from inference.outputs.common import ResultIdentity
    from inference.outputs.notice import build_not_processed_notice

    routes = {r.name: r for r in settings.routes if r.not_processed_notice}
    if not routes:
        return 0
    n = 0
    with db.session() as session:
        jobs = session.scalars(
            select(Job).where(
                Job.state == JobState.FAILED,
                Job.failure_kind == "input",
                Job.route.in_(list(routes)),
                ~Job.outputs.any(),
            )
        ).all()
        pending = [(j.id, j.pipeline, j.reason or "", j.study_id, dict(j.inputs or {})) for j in jobs]
    for job_id, pipeline, reason, study_id, job_inputs in pending:
        with db.session() as session:
            series_ids = [s.id for s in session.scalars(select(Series).where(Series.study_id == study_id))]
            uids = [uid for uid in job_inputs.values()]
            paths = session.scalars(
                select(Instance.path).where(Instance.series_id.in_(series_ids)).order_by(Instance.id)
            ).all()
            sop_uids = session.scalars(select(Instance.sop_uid).where(Instance.series_id.in_(series_ids))).all()
        if not paths:
            continue
        sources = [dcmread(store.path(paths[0]), stop_before_pixels=True)]
        key = ResultIdentity.of(sop_uids, pipeline, "notice", "1").key + "|" + ",".join(sorted(uids))
        notice = build_not_processed_notice(
            sources,
            reason,
            pipeline=pipeline,
            node_version=__version__,
            identity_key=key,
            series_number=settings.outputs.notice_series_number,
        )
        store_outputs(settings, db, store, job_id, [BuiltOutput(OutputKind.NOTICE, notice)])
        logger.info("job %d: not-processed notice written (%s)", job_id, reason)
        n += 1
    return n
