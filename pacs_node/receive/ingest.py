"""The receive path shared by C-STORE and STOW-RS.

:meth:`Ingestor.receive_file` is all a network handler calls: it checks the
file (size, structure, pixel data, UIDs) with memory bounded whatever the file
holds, makes it durable in the store's journal and hands a record to the
indexer. It returns only once the bytes are fsynced, so the caller may
acknowledge; every refusal is an :class:`~pacs_node.errors.IngestError` that
carries the DIMSE status to answer:

* 0xA700 (out of resources): larger than ``storage.max_instance_mb`` as
  received or once inflated, more decoded pixel data than
  ``storage.max_pixel_mb``, a header over
  :data:`~pacs_node.common.header.MAX_HEADER_BYTES`, free space below
  ``storage.min_free_mb``, a disk that fails;
* 0xA900 (data set does not match): SOP class or instance UID other than the
  command's (the file meta) or the presentation context's, native pixel data
  shorter than Rows x Columns x ..., a SOP instance already stored under
  another study or series;
* 0xC210 (cannot understand): not Part 10, unreadable header, an element cut
  short (pixel data included), a corrupt deflated stream, missing or unsafe UIDs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset
from sqlalchemy import bindparam, select

from pacs_node.common.header import (
    UNDEFINED_LENGTH,
    DatasetTooLarge,
    HeaderError,
    Part10,
    read_part10,
)
from pacs_node.config import StorageSettings
from pacs_node.errors import CannotUnderstand, IngestError, OutOfResources
from storage.db import Database
from storage.errors import InvalidUID, StorageError, StorageFull
from storage.filestore import FileStore, validate_uid
from storage.models import Instance, Series, Study, utcnow

logger = logging.getLogger(__name__)

MIB = 2**20


class DataSetMismatch(IngestError):
    """The data set contradicts its command, its context, its own image description or the store (0xA900)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0xA900)


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """What the receive path accepts (``storage.max_instance_mb``, ``storage.max_pixel_mb``)."""

    max_instance_bytes: int
    max_pixel_bytes: int

    @classmethod
    def from_settings(cls, storage: StorageSettings) -> IngestLimits:
        return cls(max_instance_bytes=storage.max_instance_mb * MIB, max_pixel_bytes=storage.max_pixel_mb * MIB)


#: ``locate(sop_instance_uid) -> (study UID, series UID)`` of the stored instance, or None
Locate = Callable[[str], "tuple[str, str] | None"]


@dataclass(frozen=True, slots=True)
class Received:
    """One acknowledged instance on its way to the index."""

    acked_path: Path
    header: Dataset
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str | None
    size_bytes: int
    received_at: datetime
    calling_ae: str | None = None
    called_ae: str | None = None
    address: str | None = None


def _read(path: Path, max_dataset_bytes: int | None) -> Part10:
    try:
        return read_part10(path, max_dataset_bytes=max_dataset_bytes)
    except DatasetTooLarge as exc:
        raise OutOfResources(f"{exc} (storage.max_instance_mb)") from exc
    except HeaderError as exc:
        raise CannotUnderstand(f"not a readable DICOM data set: {exc}") from exc


def read_header(path: Path) -> Dataset:
    """Read a DICOM file's header (stops before the pixel data), memory bounded whatever the file holds.

    No size limit: recovery reads files the receive path already accepted under
    the limits of its time.

    Raises:
        CannotUnderstand: the file is not DICOM, its header cannot be parsed, or it is cut short.
        OutOfResources: its header is larger than the reader allows.
    """
    return _read(path, None).header


def identify(ds: Dataset) -> tuple[str, str, str, str]:
    """Return (study, series, SOP instance, SOP class) UIDs, validated.

    Raises:
        CannotUnderstand: a UID is missing or not safe to use as a path.
    """
    try:
        study = validate_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
        series = validate_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
        sop = validate_uid(ds.get("SOPInstanceUID"), "SOP Instance UID")
        sop_class = validate_uid(ds.get("SOPClassUID"), "SOP Class UID")
    except InvalidUID as exc:
        raise CannotUnderstand(str(exc)) from exc
    except Exception as exc:  # a malformed UI element raises on access
        raise CannotUnderstand(f"unreadable UID element: {exc}") from exc
    return study, series, sop, sop_class


def _uid(value: object) -> str:
    return str(value or "").strip().rstrip("\0")


def check_identity(ds: Dataset, sop: str, sop_class: str, context_sop_class: str | None = None) -> None:
    """The data set's SOP class and instance are those of its file meta (for DIMSE: the command's) and of the
    presentation context it came on.

    Raises:
        DataSetMismatch: they differ.
    """
    meta = getattr(ds, "file_meta", None) or Dataset()
    command = "the file meta's (the C-STORE command's)"
    pairs = [
        ("SOP Instance UID", sop, command, meta.get("MediaStorageSOPInstanceUID")),
        ("SOP Class UID", sop_class, command, meta.get("MediaStorageSOPClassUID")),
        ("SOP Class UID", sop_class, "the presentation context's", context_sop_class),
    ]
    for what, mine, whose, theirs in pairs:
        if theirs and _uid(theirs) != mine:
            raise DataSetMismatch(f"the data set's {what} {mine} is not {whose} {_uid(theirs)}")


def _count(ds: Dataset, keyword: str, default: int | None) -> int | None:
    """A non-negative integer element (US, IS) of the header, ``default`` when absent or empty.

    Raises:
        CannotUnderstand: present but not a non-negative integer.
    """
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        number = int(value)
    except Exception as exc:  # IS strings, malformed values
        raise CannotUnderstand(f"{keyword} is not a number") from exc
    if number < 0:
        raise CannotUnderstand(f"{keyword} is negative ({number})")
    return number


def check_pixels(part: Part10, max_pixel_bytes: int) -> None:
    """The image the header describes is within ``max_pixel_bytes`` decoded, and native pixel data holds it.

    Raises:
        OutOfResources: it would decode to more than ``max_pixel_bytes``.
        DataSetMismatch: native Pixel Data shorter than Rows x Columns x Samples x Bits x Frames.
        CannotUnderstand: one of those elements is not a number.
    """
    ds = part.header
    rows, cols, bits = _count(ds, "Rows", None), _count(ds, "Columns", None), _count(ds, "BitsAllocated", None)
    if rows is None or cols is None or bits is None:
        return  # no image described: nothing to decode
    samples = _count(ds, "SamplesPerPixel", 1) or 1
    frames = _count(ds, "NumberOfFrames", 1) or 1
    needed = (rows * cols * samples * frames * bits + 7) // 8
    if needed > max_pixel_bytes:
        raise OutOfResources(
            f"the image decodes to {needed // MIB} MiB ({rows} x {cols} x {samples} samples x {bits} bits x "
            f"{frames} frames), more than storage.max_pixel_mb ({max_pixel_bytes // MIB} MiB)"
        )
    length = part.pixel_data_length
    if length is not None and length != UNDEFINED_LENGTH and length < needed:
        raise DataSetMismatch(
            f"Pixel Data holds {length} bytes; {rows} x {cols} x {samples} samples x {bits} bits x {frames} frames "
            f"need {needed}"
        )


_LOCATE = (
    select(Study.study_uid, Series.series_uid)
    .join(Series, Series.study_id == Study.id)
    .join(Instance, Instance.series_id == Series.id)
    .where(Instance.sop_uid == bindparam("sop"))
)


class StoredLocations:
    """Where the index holds a SOP instance: ``(study UID, series UID)``, or ``None``.

    One indexed read per received instance. When the database cannot answer, the
    receive path goes on without this check for ``pause_s`` (logged), as it goes
    on without the index itself (the journal keeps what is acknowledged).

    Args:
        db: the node's database.
        pause_s: how long to go without the check after the database failed to answer.
    """

    def __init__(self, db: Database, *, pause_s: float = 30.0) -> None:
        self._db = db
        self._pause_s = pause_s
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def __call__(self, sop_uid: str) -> tuple[str, str] | None:
        if time.monotonic() < self._paused_until:
            return None
        try:
            with self._db.engine.connect() as conn:
                row = conn.execute(_LOCATE, {"sop": sop_uid}).first()
        except Exception as exc:  # the driver's errors, whichever database
            with self._lock:
                if time.monotonic() >= self._paused_until:
                    logger.warning(
                        "cannot look up stored instances in the database (%s); re-sends are not checked against "
                        "other studies and series for %g s",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                        self._pause_s,
                    )
                    self._paused_until = time.monotonic() + self._pause_s
            return None
        return (str(row[0]), str(row[1])) if row is not None else None


class Ingestor:
    """Durably accepts received files and queues them for indexing.

    Args:
        store: the file store (its ``incoming_dir`` holds in-flight transfers).
        submit: called with each :class:`Received` after it is durable.
        limits: sizes the receive path accepts (default: ``storage``'s defaults).
        locate: where an instance is already stored (:class:`StoredLocations`); a
            re-send under another study or series is refused. None: not checked.
    """

    def __init__(
        self,
        store: FileStore,
        submit: Callable[[Received], None],
        *,
        limits: IngestLimits | None = None,
        locate: Locate | None = None,
    ) -> None:
        self.store = store
        self._submit = submit
        self.limits = limits or IngestLimits.from_settings(StorageSettings.model_validate({}))
        self._locate = locate

    def guard(self, written: int) -> None:
        """Check an instance while it streams in (``written`` bytes so far): size and free space.

        Raises:
            OutOfResources: larger than ``storage.max_instance_mb``, or free space below the watermark.
        """
        if written > self.limits.max_instance_bytes:
            raise OutOfResources(
                f"the instance is larger than storage.max_instance_mb ({self.limits.max_instance_bytes // MIB} MiB)"
            )
        try:
            self.store.check_space()
        except StorageFull as exc:
            raise OutOfResources(str(exc)) from exc

    def receive_file(
        self,
        path: Path,
        *,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        address: str | None = None,
        context_sop_class: str | None = None,
    ) -> Received:
        """Accept a complete DICOM file written on the store's filesystem.

        On success the file has been moved into the store's journal. On failure
        the file is left where it is for the caller to remove.

        Args:
            path: the Part 10 file.
            calling_ae, called_ae, address: the sender, recorded with the series.
            context_sop_class: the abstract syntax of the presentation context it came on (DIMSE).

        Raises:
            CannotUnderstand: unreadable or cut short, or missing/invalid UIDs (0xC210).
            DataSetMismatch: contradicts its command, context or pixel description, or is stored
                under another study or series (0xA900).
            OutOfResources: too large, or the disk is full or below the watermark (0xA700).
        """
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise IngestError(f"cannot read the received file: {exc.strerror}", 0xA700) from exc
        self.guard(size)
        part = _read(path, self.limits.max_instance_bytes)
        ds = part.header
        study, series, sop, sop_class = identify(ds)
        check_identity(ds, sop, sop_class, context_sop_class)
        check_pixels(part, self.limits.max_pixel_bytes)
        stored = self._locate(sop) if self._locate is not None else None
        if stored is not None and stored != (study, series):
            raise DataSetMismatch(
                f"SOP instance {sop} is stored in study {stored[0]} series {stored[1]}; this copy names study "
                f"{study} series {series} (a re-send keeps its study and series; delete the stored one to move it)"
            )
        try:
            acked = self.store.acknowledge(path, sop)
        except StorageFull as exc:
            raise OutOfResources(str(exc)) from exc
        except (StorageError, OSError) as exc:
            raise IngestError(f"cannot store instance: {exc}", 0xA700) from exc
        rec = Received(
            acked_path=acked,
            header=ds,
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            sop_class_uid=sop_class,
            transfer_syntax_uid=part.transfer_syntax or None,
            size_bytes=size,
            received_at=utcnow(),
            calling_ae=calling_ae,
            called_ae=called_ae,
            address=address,
        )
        self._submit(rec)
        return rec

    def receive_bytes(
        self,
        data: bytes,
        *,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        address: str | None = None,
    ) -> Received:
        """Accept a whole DICOM file given as bytes (Part 10, with preamble).

        Raises:
            CannotUnderstand, DataSetMismatch, OutOfResources: as :meth:`receive_file`.
        """
        tmp = self.store.new_incoming_path()
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutOfResources(f"cannot write incoming file: {exc.strerror}") from exc
        try:
            return self.receive_file(tmp, calling_ae=calling_ae, called_ae=called_ae, address=address)
        finally:
            tmp.unlink(missing_ok=True)
