"""The receive path shared by C-STORE (and later STOW-RS).

:meth:`Ingestor.receive_file` is all a network handler calls: it reads the
header (never the pixel data), validates the UIDs that become paths, makes the
file durable in the store's journal and hands a record to the indexer. It
returns only once the bytes are fsynced, so the caller may acknowledge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset, dcmread

from pacs_node.errors import CannotUnderstand, IngestError, OutOfResources
from storage.errors import InvalidUID, StorageError, StorageFull
from storage.filestore import FileStore, validate_uid
from storage.models import utcnow

logger = logging.getLogger(__name__)


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


def read_header(path: Path) -> Dataset:
    """Read a DICOM file's header (stops before the pixel data).

    Raises:
        CannotUnderstand: the file is not DICOM or its header cannot be parsed.
    """
    try:
        return dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for malformed data
        raise CannotUnderstand(f"not a readable DICOM dataset: {exc}") from exc


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


class Ingestor:
    """Durably accepts received files and queues them for indexing.

    Args:
        store: the file store (its ``incoming_dir`` holds in-flight transfers).
        submit: called with each :class:`Received` after it is durable.
    """

    def __init__(self, store: FileStore, submit: Callable[[Received], None]) -> None:
        self.store = store
        self._submit = submit

    def receive_file(
        self,
        path: Path,
        *,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        address: str | None = None,
    ) -> Received:
        """Accept a complete DICOM file written on the store's filesystem.

        On success the file has been moved into the store's journal. On failure
        the file is left where it is for the caller to remove.

        Raises:
            CannotUnderstand: unreadable header or missing/invalid UIDs (0xC210).
            OutOfResources: the disk is full or below the watermark (0xA700).
        """
        ds = read_header(path)
        study, series, sop, sop_class = identify(ds)
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else None
        try:
            self.store.check_space()
            size = path.stat().st_size
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
            transfer_syntax_uid=ts,
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
            CannotUnderstand: unreadable header or missing/invalid UIDs.
            OutOfResources: the disk is full or below the watermark.
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
