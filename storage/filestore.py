"""The file store: received instances as DICOM files, written durably.

Layout under ``root``::

    .incoming/                    temporary files being received (same filesystem)
    .acked/<ns>-<SOPUID>.dcm      acknowledged, fsynced, not yet indexed: the journal
    .quarantine/                  files recovery could not index (kept, never deleted)
    <StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm

An instance is acknowledged only after its bytes are fsynced and renamed into
``.acked/`` and that directory is fsynced. The indexer records it in the database
and then moves it to its final place. On start, whatever is still in ``.acked/``
was acknowledged but not indexed: recovery indexes it (idempotently) without
walking the whole store.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path

from storage.errors import InvalidUID, StorageError, StorageFull

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def validate_uid(uid: object, what: str = "UID") -> str:
    """Return ``uid`` as a string if it is safe to use as a path component.

    Digits and dots only, at most 64 characters, no empty components. Leading
    zeros in a component (not allowed by PS3.5 but seen in the wild) are
    accepted, since they cannot escape the store.

    Raises:
        InvalidUID: missing, too long, or containing anything but digits and dots.
    """
    if uid is None:
        raise InvalidUID(f"{what} is missing")
    text = str(uid).strip().rstrip("\x00")
    if not text:
        raise InvalidUID(f"{what} is empty")
    if len(text) > 64:
        raise InvalidUID(f"{what} is {len(text)} characters long (at most 64)")
    if not _UID_RE.match(text):
        raise InvalidUID(f"{what} {text[:70]!r} is not a UID (digits and dots only)")
    return text


def _datasync(fd: int) -> None:
    # fdatasync skips timestamps but still flushes the size of a new file.
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Durable, atomic storage of DICOM files keyed by their UIDs.

    Args:
        root: store directory; created if missing.
        fsync: fsync files and directories (turn off only for throw-away tests).
        min_free_bytes: refuse new files when the filesystem has less free space.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.incoming_dir = self.root / ".incoming"
        self.acked_dir = self.root / ".acked"
        self.quarantine_dir = self.root / ".quarantine"
        for d in (self.root, self.incoming_dir, self.acked_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._space_lock = threading.Lock()
        self._space_checked = 0.0
        self._space_free = 0

    # -- paths -----------------------------------------------------------------
    @staticmethod
    def relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The store-relative path of an instance (UIDs must be validated)."""
        return f"{study_uid}/{series_uid}/{sop_uid}.dcm"

    def path(self, rel: str) -> Path:
        """Absolute path of a store-relative path, refusing anything outside the store.

        Raises:
            StorageError: the path would leave the store.
        """
        p = (self.root / rel).resolve()
        if self.root not in p.parents:
            raise StorageError(f"path {rel!r} is outside the store")
        return p

    # -- free space ------------------------------------------------------------
    def free_bytes(self) -> int:
        """Free bytes for unprivileged writers on the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, *, max_age_s: float = 0.5) -> None:
        """Raise if free space is below the watermark (statvfs cached briefly).

        Raises:
            StorageFull: below ``min_free_bytes``.
        """
        if self.min_free_bytes <= 0:
            return
        now = time.monotonic()
        with self._space_lock:
            if now - self._space_checked > max_age_s:
                self._space_free = self.free_bytes()
                self._space_checked = now
            free = self._space_free
        if free < self.min_free_bytes:
            raise StorageFull(
                f"only {free // 2**20} MiB free on the store's filesystem, below the "
                f"watermark of {self.min_free_bytes // 2**20} MiB (storage.min_free_mb)"
            )

    # -- writing ---------------------------------------------------------------
    def new_incoming_path(self) -> Path:
        """A fresh temporary path on the store's filesystem."""
        return self.incoming_dir / f"{uuid.uuid4().hex}.part"

    def acknowledge(self, tmp_path: Path, sop_uid: str) -> Path:
        """Make a fully written temporary file durable in the journal directory.

        ``tmp_path`` must be on the store's filesystem. After this returns, the
        file survives a crash or power loss and recovery will index it.

        Raises:
            StorageFull: the disk filled up.
            StorageError: any other I/O failure.
        """
        target = self.acked_dir / f"{time.time_ns():020d}-{sop_uid}.dcm"
        try:
            if self.fsync:
                fd = os.open(tmp_path, os.O_RDONLY)
                try:
                    _datasync(fd)
                finally:
                    os.close(fd)
            os.rename(tmp_path, target)
            if self.fsync:
                _fsync_dir(self.acked_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"disk full while storing {sop_uid}") from exc
            raise StorageError(f"cannot store {sop_uid}: {exc.strerror}") from exc
        return target

    def write_file(self, rel: str, data: bytes) -> Path:
        """Write a file the node produced at ``rel`` atomically and durably (replacing).

        Raises:
            StorageFull: the disk filled up.
            StorageError: any other I/O failure.
        """
        final = self.path(rel)
        tmp = self.new_incoming_path()
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.fsync:
                    _datasync(fh.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"disk full while writing {rel}") from exc
            raise StorageError(f"cannot write {rel}: {exc.strerror}") from exc
        return final

    def promote(self, acked_path: Path, rel: str) -> Path:
        """Move an indexed file from the journal to its final place (replacing).

        Returns the final path. No fsync is needed here: the move is atomic,
        and one lost in a crash leaves the file in the journal, where recovery
        indexes it again (idempotently) and moves it anew.
        """
        final = self.path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(acked_path, final)
        return final

    def sync_dirs(self, dirs: set[Path]) -> None:
        """fsync directories and their parents (used after recovery, not per batch)."""
        if not self.fsync:
            return
        for d in sorted(dirs):
            _fsync_dir(d)
            _fsync_dir(d.parent)
        _fsync_dir(self.root)
        _fsync_dir(self.acked_dir)

    def quarantine(self, path: Path, reason: str) -> Path:
        """Set a file aside that cannot be indexed (never deleted automatically)."""
        target = self.quarantine_dir / path.name
        os.replace(path, target)
        target.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        logger.error("quarantined %s: %s", target, reason)
        return target

    # -- recovery and housekeeping ---------------------------------------------
    def pending(self) -> list[Path]:
        """Acknowledged-but-unindexed files, oldest first."""
        return sorted(p for p in self.acked_dir.iterdir() if p.suffix == ".dcm")

    def clean_incoming(self) -> int:
        """Remove temporary files of transfers that never completed.

        Call only when no association is running (at start).
        """
        n = 0
        for p in self.incoming_dir.iterdir():
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        return n

    def delete(self, rel: str) -> bool:
        """Delete an instance file and prune its empty series/study folders."""
        p = self.path(rel)
        try:
            p.unlink()
        except FileNotFoundError:
            return False
        for parent in (p.parent, p.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
        return True
