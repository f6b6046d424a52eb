"""STOW-RS (PS3.18 10.5): instances posted as multipart/related; type="application/dicom".

Each part is streamed from the socket straight into a temporary file in the
store's ``.incoming`` folder (never held in memory) and, once complete, handed
to the same :meth:`~pacs_node.receive.ingest.Ingestor.receive_file` as a C-STORE: header
check, fsync, rename into the journal, indexing and routing. A part whose first
bytes are not a Part 10 file (no ``DICM`` and File Meta Information with a
Transfer Syntax UID) is refused there and then, and the rest of it is only
scanned for the next boundary, never written or parsed; a deflated part that
would inflate beyond :data:`~pacs_node.web.dicomfile.MAX_INFLATED_BYTES` is
refused before pydicom inflates it. The answer lists
every part: stored ones in ReferencedSOPSequence, refused ones in
FailedSOPSequence with a FailureReason, and the reason in words in a ``299``
Warning header. HTTP status: 200 all stored, 202 some stored, 409 none stored.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom import dcmread
from starlette.concurrency import run_in_threadpool

from pacs_node.errors import IngestError
from pacs_node.receive.ingest import Ingestor
from pacs_node.web.dicomfile import (
    HEAD_BYTES,
    META_START,
    InflateLimitError,
    NotDicomFile,
    check_inflated_size,
    read_file_meta,
)
from pacs_node.web.dicomjson import attributes
from pacs_node.web.multipart import MultipartError, MultipartParser, PartEnd, PartStart, parse_media_type
from storage.errors import StorageFull

logger = logging.getLogger(__name__)

#: FailureReason values used in FailedSOPSequence.
CANNOT_UNDERSTAND = 0xC000  # a part that is not application/dicom, or a body cut short
UNREADABLE = 0xC210  # a part that is not a DICOM file, or whose data set the node does not read (as C-STORE's)
STUDY_MISMATCH = 0xC409  # the instance belongs to another study than the one in the URL
OUT_OF_RESOURCES = 0xA700
#: How much of a part is held before its first bytes are checked (File Meta Information fits in it).
HEAD_CHECK_BYTES = 4096
#: How much of a refused part's file is read to name its instance in the answer.
_NAMING_BYTES = HEAD_BYTES
SPACE_CHECK_BYTES = 64 * 2**20
"""Free space is checked again after this many bytes of one part."""


class StowRequestError(Exception):
    """The request as a whole cannot be processed; carries the HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PartResult:
    """What became of one part."""

    index: int
    sop_class_uid: str | None = None
    sop_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    failure: int | None = None
    message: str | None = None


@dataclass
class StowOutcome:
    """Every part's result, in order."""

    parts: list[PartResult] = field(default_factory=list)
    body_error: str | None = None

    @property
    def stored(self) -> list[PartResult]:
        """Parts stored."""
        return [p for p in self.parts if p.failure is None]

    @property
    def failed(self) -> list[PartResult]:
        """Parts refused."""
        return [p for p in self.parts if p.failure is not None]

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some, 409 none (PS3.18 Table 10.5.3-1)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self, root: str, study_uid: str | None) -> dict[str, Any]:
        """The DICOM JSON answer; ``root`` is the DICOMweb base URL."""
        studies = {p.study_uid for p in self.stored if p.study_uid}
        top: list[tuple[str, Any]] = []
        one_study = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
        if one_study:
            top.append(("RetrieveURL", f"{root}/studies/{one_study}"))
        out = attributes(top)
        if self.stored:
            out["00081199"] = {
                "vr": "SQ",
                "Value": [
                    attributes(
                        [
                            ("ReferencedSOPClassUID", p.sop_class_uid),
                            ("ReferencedSOPInstanceUID", p.sop_uid),
                            (
                                "RetrieveURL",
                                f"{root}/studies/{p.study_uid}/series/{p.series_uid}/instances/{p.sop_uid}",
                            ),
                        ]
                    )
                    for p in self.stored
                ],
            }
        if self.failed:
            out["00081198"] = {
                "vr": "SQ",
                "Value": [
                    attributes(
                        [
                            ("ReferencedSOPClassUID", p.sop_class_uid),
                            ("ReferencedSOPInstanceUID", p.sop_uid),
                            ("FailureReason", p.failure),
                        ]
                    )
                    for p in self.failed
                ],
            }
        return dict(sorted(out.items()))

    def warnings(self) -> list[str]:
        """Human-readable reasons, for ``Warning: 299`` headers."""
        out = [f"part {p.index + 1}: {p.message}" for p in self.failed if p.message]
        if self.body_error:
            out.append(self.body_error)
        return out


def check_content_type(value: str | None) -> str:
    """The boundary of a STOW-RS request body.

    Raises:
        StowRequestError: 415 for anything but multipart/related with
            application/dicom parts, 400 without a boundary.
    """
    if not value:
        raise StowRequestError('Content-Type is missing; send multipart/related; type="application/dicom"', 415)
    try:
        media = parse_media_type(value)
    except MultipartError as exc:
        raise StowRequestError(str(exc), 415) from exc
    if media.type != "multipart/related":
        raise StowRequestError(
            f'Content-Type {media.type} is not supported; send multipart/related; type="application/dicom"', 415
        )
    part_type = (media.param("type") or "application/dicom").lower()
    if part_type != "application/dicom":
        raise StowRequestError(
            f"multipart/related with type={part_type!r} is not supported: this node accepts only "
            "application/dicom parts (Part 10 files), not metadata with bulk data",
            415,
        )
    boundary = media.param("boundary")
    if not boundary:
        raise StowRequestError("the multipart Content-Type has no boundary parameter", 400)
    return boundary


def _uids_of(path: Path) -> tuple[str | None, str | None, str | None, str | None]:
    """(study, series, SOP class, SOP instance) read as far as possible from the file's first
    :data:`_NAMING_BYTES`, for the answer (a header longer than that names nothing: the part may be
    anything at all, and pydicom would parse all of it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_NAMING_BYTES)
        if read_file_meta(head).deflated:
            return None, None, None, None
        ds = dcmread(
            io.BytesIO(head),
            stop_before_pixels=True,
            force=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"],
        )
    except Exception:  # the part may be anything at all
        return None, None, None, None

    def get(name: str) -> str | None:
        try:
            value = ds.get(name)
        except Exception:
            return None
        text = str(value).strip() if value else ""
        return text[:64] or None

    return get("StudyInstanceUID"), get("SeriesInstanceUID"), get("SOPClassUID"), get("SOPInstanceUID")


class StowReceiver:
    """Receives one STOW-RS request body.

    Args:
        ingestor: the node's receive path.
        study_uid: the study in the URL (instances of others are refused), or None.
        address: the client's address (recorded with the series like a DIMSE peer's).
    """

    def __init__(self, ingestor: Ingestor, study_uid: str | None, address: str | None) -> None:
        self.ingestor = ingestor
        self.store = ingestor.store
        self.study_uid = study_uid
        self.address = address
        self.outcome = StowOutcome()
        self._part: PartResult | None = None
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._written = 0
        self._next_check = 0
        self._head: bytearray | None = None

    async def run(self, boundary: str, chunks: AsyncIterator[bytes]) -> StowOutcome:
        """Consume the body; every complete part is ingested before the next is read on."""
        parser = MultipartParser(boundary)
        try:
            async for chunk in chunks:
                for event in parser.feed(chunk):
                    await self._on(event)
                if parser.done:
                    break
            parser.close()
        except MultipartError as exc:
            self._abandon_part(f"the request body is malformed: {exc}")
            self.outcome.body_error = f"the request body is malformed: {exc}"
        finally:
            self._discard_file()
        return self.outcome

    async def _on(self, event: PartStart | bytes | PartEnd) -> None:
        if isinstance(event, PartStart):
            self._start(event)
        elif isinstance(event, PartEnd):
            await self._end()
        else:
            self._data(event)

    def _start(self, event: PartStart) -> None:
        part = PartResult(event.index)
        self._part = part
        ctype = event.content_type
        if ctype is not None:
            try:
                media = parse_media_type(ctype).type
            except MultipartError:
                media = ctype
            if media != "application/dicom":
                part.failure = CANNOT_UNDERSTAND
                part.message = f"Content-Type {ctype!r} is not application/dicom; the part was not stored"
                return
        try:
            self.store.check_space()
        except StorageFull as exc:
            part.failure = OUT_OF_RESOURCES
            part.message = str(exc)
            return
        self._path = self.store.new_incoming_path()
        self._file = open(self._path, "wb")  # noqa: SIM115 - closed in _end or _discard_file
        self._written = 0
        self._next_check = SPACE_CHECK_BYTES
        self._head = bytearray()

    def _data(self, data: bytes) -> None:
        if self._file is None:
            return  # a refused part: its bytes are read and dropped
        if self._head is not None:
            self._head += data
            if len(self._head) < HEAD_CHECK_BYTES:
                return
            data = self._flush_head()
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as exc:
            self._fail_file(OUT_OF_RESOURCES, f"cannot write the part to disk: {exc.strerror}")
            return
        self._written += len(data)
        limit = self.ingestor.limits.max_instance_bytes
        if self._written > limit:  # refused while it streams in, as over C-STORE (Ingestor.guard)
            self._fail_file(
                OUT_OF_RESOURCES, f"the instance is larger than storage.max_instance_mb ({limit >> 20} MiB); not stored"
            )
            return
        if self._written >= self._next_check:
            self._next_check += SPACE_CHECK_BYTES
            try:
                self.store.check_space(max_age_s=0)
            except StorageFull as exc:
                self._fail_file(OUT_OF_RESOURCES, str(exc))

    def _flush_head(self) -> bytes:
        """The part's first bytes, with the Part 10 preamble added when a sender left it out; or, when they
        are not a Part 10 file, nothing: the part is refused and its file dropped at once."""
        head = bytes(self._head or b"")
        self._head = None
        if head[128:META_START] != b"DICM" and head[:2] == b"\x02\x00":
            # File meta information without the 128-byte preamble and "DICM" (as
            # pydicom writes a plain Dataset): make it a Part 10 file.
            head = bytes(128) + b"DICM" + head
        try:
            read_file_meta(head)
        except NotDicomFile as exc:
            self._fail_file(UNREADABLE, f"not a DICOM file ({exc}); the part was not stored")
            return b""
        return head

    def _fail_file(self, reason: int, message: str) -> None:
        if self._part is not None:
            self._part.failure = reason
            self._part.message = message
        self._discard_file()

    def _discard_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    def _abandon_part(self, message: str) -> None:
        """The body broke off inside a part: that part is refused."""
        part = self._part
        if part is not None and part not in self.outcome.parts:
            if part.failure is None:
                part.failure = CANNOT_UNDERSTAND
                part.message = message
            self.outcome.parts.append(part)
        self._part = None

    async def _end(self) -> None:
        part = self._part
        if part is None:
            return
        self.outcome.parts.append(part)
        try:
            if self._file is not None and self._head is not None:
                self._write(self._flush_head())  # a part shorter than a preamble
            if self._file is None or self._path is None:
                self._log_failure(part)
                return
            path = self._path
            try:
                self._file.close()
            except OSError as exc:
                self._file = None
                self._fail_file(OUT_OF_RESOURCES, f"cannot write the part to disk: {exc.strerror}")
                self._log_failure(part)
                return
            self._file = None
            try:
                await run_in_threadpool(self._ingest, path, part)
            finally:
                path.unlink(missing_ok=True)  # moved into the journal on success
                self._path = None
            if part.failure is not None:
                self._log_failure(part)
        finally:
            self._part = None

    def _ingest(self, path: Path, part: PartResult) -> None:
        try:
            check_inflated_size(path)
        except InflateLimitError as exc:
            part.failure, part.message = UNREADABLE, f"not stored: {exc}"
            return
        except OSError as exc:
            part.failure, part.message = OUT_OF_RESOURCES, f"cannot read the part back from disk: {exc.strerror}"
            return
        if self.study_uid is not None:
            study, series, sop_class, sop = _uids_of(path)
            part.study_uid, part.series_uid, part.sop_class_uid, part.sop_uid = study, series, sop_class, sop
            if study is not None and study != self.study_uid:
                part.failure = STUDY_MISMATCH
                part.message = (
                    f"instance {sop} belongs to study {study}, not to study {self.study_uid} "
                    "of the request URL; not stored"
                )
                return
        try:
            rec = self.ingestor.receive_file(path, address=self.address)
        except IngestError as exc:
            part.failure = exc.status
            part.message = f"not stored: {exc}"
            if part.sop_uid is None:  # name what we can of the instance in the answer
                part.study_uid, part.series_uid, part.sop_class_uid, part.sop_uid = _uids_of(path)
            return
        part.study_uid, part.series_uid = rec.study_uid, rec.series_uid
        part.sop_class_uid, part.sop_uid = rec.sop_class_uid, rec.sop_uid

    def _log_failure(self, part: PartResult) -> None:
        logger.warning(
            "STOW-RS from %s: part %d (SOP instance %s) refused with 0x%04X: %s",
            self.address,
            part.index + 1,
            part.sop_uid or "unknown",
            part.failure or 0,
            part.message,
        )
