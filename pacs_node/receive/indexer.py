"""Batches acknowledged instances into the database, then files them in the store.

The C-STORE handler only appends to an in-memory queue; this thread turns many
records into one transaction (studies, series, instances, series counters and
reopen on late arrival), commits, and only then moves each file from the store's
journal to ``<Study>/<Series>/<SOP>.dcm``. A crash anywhere leaves the file in
the journal, where :meth:`Indexer.recover` picks it up on the next start.

A database outage of any length loses nothing and needs no restart: the indexer
holds every acknowledged record and retries with a capped backoff until the
database is back. While it holds them their files stay in the journal, which is
what tells the router (:mod:`pacs_node.route.router`) not to call any series
complete before they are indexed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
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

_FIRST_RETRY_S = 0.5
_INSERT_RACE_RETRIES = 8
#: stands for a header dropped from memory during a long outage (read again from the journal)
_SPILLED = Dataset()


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be reached now (retried for as long as that lasts).

    Connection refused or cut, a pool that cannot hand out a connection, a
    locked SQLite file: none of these is the record's fault.
    """
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _first_line(exc: BaseException) -> str:
    """The driver's message, without SQLAlchemy's statement and parameters."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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

    Every acknowledged record is held (in memory, its file in the store's
    journal) until the database has taken it. When the database cannot be
    reached the indexer keeps the records and retries with a backoff capped at
    ``retry_max_s`` for as long as the outage lasts; it logs once when the
    database goes away and once when it is back, with counts. Past
    ``held_max`` records it drops the headers of the newer ones and reads them
    again from the journal when their turn comes, so that memory stays bounded
    however long the outage. A record that fails for another reason (not the
    database's absence) is retried alone and, failing again, set aside in the
    store's quarantine with the reason, so that one bad record never holds up
    the others (nor, through the journal, series completion).

    Args:
        db: the database.
        store: the file store whose journal the records point into.
        batch_max: most records per transaction.
        linger_s: how long to wait for more records before committing a batch.
            Acknowledgement never waits for the index and series completion
            waits far longer, so fewer, larger transactions cost nothing
            visible and leave the interpreter to the associations.
        retry_max_s: the longest wait between two attempts while the database
            cannot be reached (the wait doubles from 0.5 s up to this).
        held_max: records held with their header in memory (besides the batch
            being retried); the rest keep only their journal path and
            identifiers until they are indexed.
    """

    def __init__(
        self,
        db: Database,
        store: FileStore,
        *,
        batch_max: int = 512,
        linger_s: float = 0.25,
        retry_max_s: float = 5.0,
        held_max: int = 4096,
    ) -> None:
        self.db = db
        self.store = store
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.retry_max_s = retry_max_s
        self.held_max = held_max
        self._queue: queue.Queue[Received | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._outstanding = 0
        # Only the indexer thread touches these.
        self._held: deque[Received] = deque()  # taken from the queue, not yet indexed; oldest first
        self._with_header = 0  # records in _held that still carry their header
        self._delay = _FIRST_RETRY_S
        self._down_since: float | None = None  # monotonic time of the first failed attempt of an outage
        self._failed_attempts = 0
        self.indexed_total = 0
        #: attempts that found the database unreachable, over the indexer's life
        self.unreachable_attempts = 0
        #: records set aside in the quarantine because they could not be indexed
        self.set_aside = 0

    # -- producer side ---------------------------------------------------------
    def submit(self, rec: Received) -> None:
        """Queue an acknowledged record (called from network handlers)."""
        with self._idle:
            self._outstanding += 1
        self._queue.put(rec)

    @property
    def outstanding(self) -> int:
        """Records submitted and not yet indexed (or set aside)."""
        with self._idle:
            return self._outstanding

    @property
    def database_down(self) -> bool:
        """Whether the last attempt found the database unreachable."""
        return self._down_since is not None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="indexer", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Index what is queued, then stop.

        While the database cannot be reached, one more attempt is made and what
        it could not index stays in the journal, indexed at the next start.
        """
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

    # -- the loop ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception:  # a bug must not end indexing: what is held stays held, and is retried
                logger.exception("the indexer failed; %d acknowledged instances held, retrying", self._waiting())
                time.sleep(self.retry_max_s)

    def _loop(self) -> None:
        stopping = False
        while True:
            if not self._held:
                if stopping:
                    return
                item = self._queue.get()
                if item is None:
                    return
                self._hold(item)
                stopping = self._gather(time.monotonic() + self.linger_s)
            else:
                stopping = self._gather(None) or stopping
            if self._index_front():
                continue
            if stopping:
                logger.warning(
                    "stopping while the database cannot be reached: %d acknowledged instances stay in the "
                    "journal and are indexed at the next start",
                    len(self._held),
                )
                return
            stopping = self._pause()

    def _hold(self, rec: Received) -> None:
        if rec.header is not _SPILLED:
            if self._with_header >= self.held_max:
                rec = replace(rec, header=_SPILLED)  # the journal keeps the header; read it again later
            else:
                self._with_header += 1
        self._held.append(rec)

    def _gather(self, deadline: float | None) -> bool:
        """Hold what is queued; with a deadline, wait for a full batch until then. True on stop."""
        while True:
            if deadline is None or len(self._held) >= self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return False
            else:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    return False
            if item is None:
                return True
            self._hold(item)

    def _pause(self) -> bool:
        """Wait one backoff step, holding what arrives meanwhile; True when asked to stop."""
        deadline = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, self.retry_max_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if item is None:
                return True
            self._hold(item)

    def _done(self, n: int) -> None:
        with self._idle:
            self._outstanding -= n
            self._idle.notify_all()

    def _take_front(self) -> list[Received]:
        """Take the oldest held records (a batch), each with its header; unreadable ones are set aside."""
        batch: list[Received] = []
        while self._held and len(batch) < self.batch_max:
            rec = self._held.popleft()
            if rec.header is not _SPILLED:
                self._with_header -= 1
                batch.append(rec)
                continue
            try:
                batch.append(replace(rec, header=read_header(rec.acked_path)))
            except Exception as exc:  # IngestError, or whatever else a damaged file raises
                self._set_aside(rec.acked_path, f"header unreadable: {exc}")
                self._done(1)
        return batch

    def _put_back(self, batch: list[Received]) -> None:
        self._held.extendleft(reversed(batch))
        self._with_header += len(batch)

    def _index_front(self) -> bool:
        """Index the oldest held records (a batch); False when the database cannot be reached."""
        batch = self._take_front()
        error = self._attempt(batch)
        if error is None:
            self._note_reachable(len(batch))
            self._done(len(batch))
            return True
        if _unreachable(error):
            self._put_back(batch)
            self._note_unreachable(error)
            return False
        # Not the database's absence: something in these records. One at a time,
        # so that the others go in and only what fails again is set aside.
        logger.warning(
            "indexing a batch of %d instances failed (%s: %s); indexing them one at a time",
            len(batch),
            type(error).__name__,
            _first_line(error),
        )
        for i, rec in enumerate(batch):
            error = self._attempt([rec])
            if error is not None and _unreachable(error):
                self._put_back(batch[i:])
                self._note_unreachable(error)
                return False
            if error is not None:
                self._set_aside(rec.acked_path, f"could not be indexed: {type(error).__name__}: {_first_line(error)}")
            self._done(1)
        self._note_reachable(len(batch))
        return True

    def _attempt(self, recs: list[Received]) -> Exception | None:
        """Index ``recs`` in one transaction; the error, or None when they are in."""
        error: Exception | None = None
        for _ in range(_INSERT_RACE_RETRIES):
            try:
                self.index_batch(recs)
                return None
            except IntegrityError as exc:
                # Another receive process inserted the same study or series
                # first; the next attempt finds its row.
                logger.debug("concurrent insert of the same study/series; retrying the batch")
                error = exc
            except Exception as exc:
                return exc
        return error

    def _set_aside(self, path: Path, reason: str) -> None:
        self.set_aside += 1
        if not path.exists():
            logger.error("acknowledged file %s left the journal before it was indexed: %s", path.name, reason)
            return
        try:
            self.store.quarantine(path, reason)
        except OSError as exc:
            logger.error("could not quarantine %s (%s): %s", path.name, exc, reason)

    def _waiting(self) -> int:
        return len(self._held) + self._queue.qsize()

    def _note_unreachable(self, error: Exception) -> None:
        self.unreachable_attempts += 1
        self._failed_attempts += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "database unreachable (%s): %d acknowledged instances wait in the journal; retrying every "
                "%g s at most until it is back",
                _first_line(error),
                self._waiting(),
                self.retry_max_s,
            )
        else:
            logger.debug("database still unreachable (attempt %d): %s", self._failed_attempts, _first_line(error))

    def _note_reachable(self, indexed: int) -> None:
        if self._down_since is not None:
            logger.info(
                "database reachable again after %.1f s (%d failed attempts): indexing the %d acknowledged "
                "instances held meanwhile",
                time.monotonic() - self._down_since,
                self._failed_attempts,
                indexed + self._waiting(),
            )
        self._down_since = None
        self._failed_attempts = 0
        self._delay = _FIRST_RETRY_S

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
