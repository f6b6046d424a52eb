"""Batches acknowledged instances into the database, then files them in the store.

The C-STORE handler only appends to an in-memory queue; this thread turns many
records into one transaction (studies, series, instances, series counters and
reopen on late arrival), commits, and only then moves each file from the store's
journal to ``<Study>/<Series>/<SOP>.dcm``. A crash anywhere leaves the file in
the journal, where :meth:`Indexer.recover` picks it up on the next start.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pacs_node.common.header import header_from_dataset
from pacs_node.errors import IngestError
from pacs_node.receive.ingest import Received, identify, read_header
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, Series, SeriesState, Study, utcnow

logger = logging.getLogger(__name__)

ENHANCED_HINT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
}


def _text(ds: Dataset, keyword: str, limit: int = 256) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:
        return None


def frames_of(ds: Dataset) -> int:
    """Number of frames an instance contributes (1 for single-frame)."""
    n = _int(ds, "NumberOfFrames")
    return n if n and n > 0 else 1


def expected_frames_hint(ds: Dataset, sop_class_uid: str) -> int | None:
    """Frames the whole series will hold, when the header says so.

    ``ImagesInAcquisition`` (times ``NumberOfTemporalPositions`` when present:
    over-estimating only delays completion to the quiet period, never routes an
    incomplete series); a multi-frame enhanced instance without that hint is
    taken as the whole series.
    """
    images = _int(ds, "ImagesInAcquisition")
    if images and images > 0:
        temporal = _int(ds, "NumberOfTemporalPositions") or 1
        return images * max(temporal, 1)
    if sop_class_uid in ENHANCED_HINT_CLASSES and frames_of(ds) > 1:
        return frames_of(ds)
    return None


class Indexer:
    """Background indexer.

    Args:
        db: the database.
        store: the file store whose journal the records point into.
        batch_max: most records per transaction.
        linger_s: how long to wait for more records before committing a batch.
            Acknowledgement never waits for the index and series completion
            waits far longer, so fewer, larger transactions cost nothing
            visible and leave the interpreter to the associations.
    """

    def __init__(self, db: Database, store: FileStore, *, batch_max: int = 512, linger_s: float = 0.25) -> None:
        self.db = db
        self.store = store
        self.batch_max = batch_max
        self.linger_s = linger_s
        self._queue: queue.Queue[Received | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._outstanding = 0
        self.indexed_total = 0

    # -- producer side ---------------------------------------------------------
    def submit(self, rec: Received) -> None:
        """Queue an acknowledged record (called from network handlers)."""
        with self._idle:
            self._outstanding += 1
        self._queue.put(rec)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Index what is queued, then stop."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted record is indexed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._outstanding:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.batch_max:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._index_with_retry(batch)
            with self._idle:
                self._outstanding -= len(batch)
                self._idle.notify_all()

    def _index_with_retry(self, batch: list[Received]) -> None:
        delay = 0.2
        for attempt in range(8):
            try:
                self.index_batch(batch)
                return
            except IntegrityError:
                # Another receive process inserted the same study or series
                # first; the next attempt finds its row.
                logger.debug("concurrent insert of the same study/series; retrying the batch")
                continue
            except Exception:
                logger.exception(
                    "indexing a batch of %d instances failed (attempt %d); files stay in the journal",
                    len(batch),
                    attempt + 1,
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        logger.error("giving up on a batch of %d instances for now; they are indexed at the next start", len(batch))

    # -- the work ---------------------------------------------------------------
    def index_batch(self, batch: Sequence[Received], *, sync: bool = False) -> None:
        """Record ``batch`` in one transaction, then move the files into place.

        ``sync`` fsyncs the touched folders afterwards (recovery does; the hot
        path need not, see :meth:`FileStore.promote`).
        """
        if not batch:
            return
        # Within a batch the last copy of a SOP instance wins (journal order).
        latest: dict[str, Received] = {}
        copies: dict[str, int] = {}
        superseded: list[Received] = []
        for rec in sorted(batch, key=lambda r: r.acked_path.name):
            if rec.sop_uid in latest:
                superseded.append(latest[rec.sop_uid])
            latest[rec.sop_uid] = rec
            copies[rec.sop_uid] = copies.get(rec.sop_uid, 0) + 1
        with self.db.session() as session:
            self._write_rows(session, list(latest.values()), copies)
        dirs: set[Path] = set()
        for rec in latest.values():
            final = self.store.promote(rec.acked_path, self.store.relpath(rec.study_uid, rec.series_uid, rec.sop_uid))
            dirs.add(final.parent)
        for rec in superseded:
            rec.acked_path.unlink(missing_ok=True)
        if sync:
            self.store.sync_dirs(dirs)
        self.indexed_total += len(latest)
        logger.debug("indexed %d instances", len(latest))

    def _write_rows(self, session: Session, recs: list[Received], copies: dict[str, int]) -> None:
        studies = _get_or_create_studies(session, recs)
        series_rows = _get_or_create_series(session, recs, studies)
        existing = {
            inst.sop_uid: inst
            for inst in session.scalars(select(Instance).where(Instance.sop_uid.in_([r.sop_uid for r in recs])))
        }
        touched: dict[int, Series] = {}
        for rec in recs:
            series = series_rows[rec.series_uid]
            touched[series.id] = series
            rel = self.store.relpath(rec.study_uid, rec.series_uid, rec.sop_uid)
            inst = existing.get(rec.sop_uid)
            if inst is None:
                inst = Instance(sop_uid=rec.sop_uid, series_id=series.id, receive_count=0)
                session.add(inst)
            elif inst.series_id != series.id:
                # Same SOP instance re-sent under another series: follow the latest.
                if inst.series_id not in touched:
                    old = session.get(Series, inst.series_id)
                    if old is not None:
                        touched[old.id] = old
                inst.series_id = series.id
            inst.sop_class_uid = rec.sop_class_uid
            inst.transfer_syntax_uid = rec.transfer_syntax_uid
            inst.instance_number = _int(rec.header, "InstanceNumber")
            inst.number_of_frames = frames_of(rec.header)
            inst.path = rel
            inst.size_bytes = rec.size_bytes
            inst.received_at = rec.received_at
            inst.receive_count = (inst.receive_count or 0) + copies.get(rec.sop_uid, 1)
            inst.calling_ae = rec.calling_ae
            hint = expected_frames_hint(rec.header, rec.sop_class_uid)
            if hint is not None:
                series.expected_frames = max(series.expected_frames or 0, hint)
            if series.last_received_at is None or rec.received_at > series.last_received_at:
                series.last_received_at = rec.received_at
            if series.state is not SeriesState.RECEIVING:
                logger.info("series %s reopened by a late instance (was %s)", rec.series_uid, series.state.value)
                series.state = SeriesState.RECEIVING
                series.reopen_count += 1
                series.completed_at = None
            series.purged_at = None
        session.flush()
        counts = session.execute(
            select(Instance.series_id, func.count(Instance.id), func.coalesce(func.sum(Instance.number_of_frames), 0))
            .where(Instance.series_id.in_(list(touched)))
            .group_by(Instance.series_id)
        ).all()
        by_id = {sid: (n, frames) for sid, n, frames in counts}
        for sid, series in touched.items():
            n, frames = by_id.get(sid, (0, 0))
            series.instance_count = int(n)
            series.frames_received = int(frames)

    # -- recovery ---------------------------------------------------------------
    def recover(self) -> int:
        """Index every acknowledged-but-unindexed file left in the journal.

        Returns the number of files indexed. Files that cannot be read are
        quarantined with a reason, never deleted.
        """
        pending = self.store.pending()
        if not pending:
            return 0
        logger.info("recovery: %d acknowledged instances were not indexed before the last stop", len(pending))
        recs: list[Received] = []
        for path in pending:
            try:
                ds = read_header(path)
                study, series, sop, sop_class = identify(ds)
            except IngestError as exc:
                self.store.quarantine(path, str(exc))
                continue
            meta = getattr(ds, "file_meta", None)
            recs.append(
                Received(
                    acked_path=path,
                    header=ds,
                    study_uid=study,
                    series_uid=series,
                    sop_uid=sop,
                    sop_class_uid=sop_class,
                    transfer_syntax_uid=str(meta.TransferSyntaxUID) if meta and "TransferSyntaxUID" in meta else None,
                    size_bytes=path.stat().st_size,
                    received_at=utcnow(),
                )
            )
        for chunk in _chunks(recs, self.batch_max):
            self.index_batch(chunk, sync=True)
        return len(recs)


def _chunks(items: Sequence[Received], n: int) -> Iterable[Sequence[Received]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _get_or_create_studies(session: Session, recs: list[Received]) -> dict[str, Study]:
    uids = {r.study_uid for r in recs}
    found = {s.study_uid: s for s in session.scalars(select(Study).where(Study.study_uid.in_(uids)))}
    filled: set[str] = set()
    for rec in recs:
        study = found.get(rec.study_uid)
        if study is None:
            study = Study(study_uid=rec.study_uid)
            session.add(study)
            found[rec.study_uid] = study
        if rec.study_uid not in filled:
            _fill_study(study, rec.header)
            filled.add(rec.study_uid)
    session.flush()
    return found


def _fill_study(study: Study, ds: Dataset) -> None:
    fields: dict[str, Any] = {
        "patient_name": _text(ds, "PatientName"),
        "patient_id": _text(ds, "PatientID", 64),
        "patient_birth_date": _text(ds, "PatientBirthDate", 16),
        "patient_sex": _text(ds, "PatientSex", 16),
        "accession_number": _text(ds, "AccessionNumber", 64),
        "study_date": _text(ds, "StudyDate", 16),
        "study_description": _text(ds, "StudyDescription"),
    }
    cs = ds.get("SpecificCharacterSet")
    if cs:
        values = [cs] if isinstance(cs, str) else [str(v) for v in cs]
        fields["specific_character_set"] = "\\".join(values)[:128]
    for key, value in fields.items():
        if value is not None and getattr(study, key) is None:
            setattr(study, key, value)


def _get_or_create_series(session: Session, recs: list[Received], studies: dict[str, Study]) -> dict[str, Series]:
    uids = {r.series_uid for r in recs}
    # Lock the series rows (PostgreSQL; SQLite serialises writers anyway) so that
    # two receive processes indexing the same series take turns: each batch's
    # instance count must see the other's committed rows.
    found = {
        s.series_uid: s
        for s in session.scalars(
            select(Series).where(Series.series_uid.in_(uids)).order_by(Series.series_uid).with_for_update()
        )
    }
    for rec in recs:
        if rec.series_uid in found:
            continue
        ds = rec.header
        series = Series(
            series_uid=rec.series_uid,
            study_id=studies[rec.study_uid].id,
            modality=_text(ds, "Modality", 16),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription"),
            protocol_name=_text(ds, "ProtocolName"),
            header=header_from_dataset(ds),
            state=SeriesState.RECEIVING,
            instance_count=0,
            frames_received=0,
            calling_ae=rec.calling_ae,
            called_ae=rec.called_ae,
            source_address=rec.address,
            first_received_at=rec.received_at,
            last_received_at=rec.received_at,
            reopen_count=0,
        )
        session.add(series)
        found[rec.series_uid] = series
    session.flush()
    return found
