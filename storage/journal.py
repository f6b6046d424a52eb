"""Acknowledging a received instance without a directory fsync: named slots and a commit log.

The plain way to make a new file durable under a new name costs two journal commits
of the filesystem: one for the file's data and size (fdatasync), one for its name
(fsync of the directory after the rename). With a sender that waits for each
response, both sit in series with every instance. This module keeps the guarantee
(an acknowledged instance survives a crash or power loss) with one of them:

* **Slots.** Received bytes go into *slots*: empty files created ahead of time in
  batches of :data:`SLOT_BATCH`, whose names are made durable by one fsync of
  ``.slots/`` per batch. Writing into a slot and fdatasyncing it makes its data
  durable under a name that already was.
* **Commit log.** Acknowledging then renames the slot to its journal name in
  ``.acked/`` (not fsynced) and writes a record naming both into a commit log, a
  file of :data:`LOG_RECORDS` records written with zeros and fsynced when it was
  created: a record changes no metadata, so its fdatasync is a plain data write.

After a crash the instance is under its journal name (the rename persisted) or
still under its slot name; :meth:`Journal.replay` (at start, before unfinished
transfers are cleared) renames the second kind into ``.acked/``, where the normal
recovery finds both. A slot without a record was never acknowledged and is
removed. Every rename a log names happened before its record was written, so when
a log is full one fsync of ``.acked/`` makes all of them durable and the log is
deleted (rotation).

Layout under the store root::

    .slots/<token>-<n>.slot     empty or being received; token = process id + random
    .journal/<token>-<k>.log    commit logs of RECORD_BYTES-byte records
"""

from __future__ import annotations

import logging
import os
import secrets
import struct
import threading
import zlib
from pathlib import Path

logger = logging.getLogger(__name__)

#: bytes per commit record (one disk sector: a record is written whole or not at all)
RECORD_BYTES = 512
#: records per commit log (2 MiB)
LOG_RECORDS = 4096
#: slots created (and their folder fsynced) at a time
SLOT_BATCH = 64

_MAGIC = b"PNJ1"
_HEAD = struct.Struct(">4sIH")  # magic, crc32 of the body, body length


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: creations, renames, removals)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def datasync(fd: int) -> None:
    """fdatasync where there is one (it skips timestamps but flushes the size of a grown file)."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def datasync_path(path: Path) -> None:
    """fdatasync the file at ``path`` (its data and size)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        datasync(fd)
    finally:
        os.close(fd)


def encode_record(slot_name: str, journal_name: str) -> bytes:
    """One commit record: the slot's file name and the journal name it was renamed to."""
    body = f"{slot_name}\0{journal_name}".encode("ascii")
    record = _HEAD.pack(_MAGIC, zlib.crc32(body), len(body)) + body
    if len(record) > RECORD_BYTES:
        raise ValueError(f"commit record of {len(record)} bytes exceeds {RECORD_BYTES}")
    return record.ljust(RECORD_BYTES, b"\0")


def decode_record(record: bytes) -> tuple[str, str] | None:
    """(slot name, journal name), or None for an unused, torn or foreign record."""
    if len(record) < _HEAD.size:
        return None
    magic, crc, n = _HEAD.unpack_from(record)
    body = record[_HEAD.size : _HEAD.size + n]
    if magic != _MAGIC or len(body) != n or zlib.crc32(body) != crc:
        return None
    slot, sep, journal = body.decode("ascii", "replace").partition("\0")
    if not sep or "/" in slot or "/" in journal or not slot or not journal:
        return None
    return slot, journal


class Journal:
    """The slots and commit logs of one process's receive path.

    Args:
        root: the store's root (``.slots``, ``.journal`` and ``.acked`` live under it).
    """

    def __init__(self, root: Path) -> None:
        self.slots_dir = root / ".slots"
        self.log_dir = root / ".journal"
        self.acked_dir = root / ".acked"
        for d in (self.slots_dir, self.log_dir, self.acked_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._free: list[Path] = []
        self._made = 0
        self._log_fd = -1
        self._log_path: Path | None = None
        self._log_next = 0
        self._logs = 0

    # -- slots ------------------------------------------------------------------------------------
    def take_slot(self) -> Path:
        """An empty file whose name is durable, for one transfer."""
        with self._lock:
            if not self._free:
                self._make_slots()
            return self._free.pop()

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is one of this journal's slots."""
        return path.parent == self.slots_dir and path.name.startswith(f"{self._token}-")

    def _make_slots(self) -> None:
        made: list[Path] = []
        for _ in range(SLOT_BATCH):
            self._made += 1
            path = self.slots_dir / f"{self._token}-{self._made:09d}.slot"
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            made.append(path)
        fsync_dir(self.slots_dir)
        self._free.extend(reversed(made))  # pop() hands them out in creation order

    # -- acknowledging ----------------------------------------------------------------------------
    def commit(self, slot: Path, target: Path) -> None:
        """Make the fully written ``slot`` durable as ``target`` (in ``.acked/``).

        fdatasync of the slot, rename, then a commit record fdatasynced in the log.
        Raises what the system calls raise (OSError).
        """
        datasync_path(slot)
        os.rename(slot, target)
        record = encode_record(slot.name, target.name)
        with self._lock:
            if self._log_fd < 0 or self._log_next >= LOG_RECORDS:
                self._rotate()
            os.pwrite(self._log_fd, record, self._log_next * RECORD_BYTES)
            self._log_next += 1
            datasync(self._log_fd)

    def _rotate(self) -> None:
        """Start a new commit log; retire the full one (its renames made durable first)."""
        self._logs += 1
        path = self.log_dir / f"{self._token}-{self._logs:06d}.log"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            zeros = bytes(RECORD_BYTES * 256)
            for offset in range(0, RECORD_BYTES * LOG_RECORDS, len(zeros)):
                os.pwrite(fd, zeros, offset)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        fsync_dir(self.log_dir)
        old_fd, old_path = self._log_fd, self._log_path
        self._log_fd, self._log_path, self._log_next = fd, path, 0
        if old_fd >= 0 and old_path is not None:
            fsync_dir(self.acked_dir)  # every rename the old log names is now durable
            os.close(old_fd)
            old_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Retire the current log (its renames made durable first); later commits start a new one."""
        with self._lock:
            if self._log_fd >= 0 and self._log_path is not None:
                fsync_dir(self.acked_dir)
                os.close(self._log_fd)
                self._log_path.unlink(missing_ok=True)
            self._log_fd, self._log_path, self._log_next = -1, None, 0

    # -- recovery ---------------------------------------------------------------------------------
    def replay(self) -> int:
        """Move acknowledged instances still under their slot name into ``.acked/``; retire every log.

        Call at start, when no transfer runs, before :meth:`clear_slots`. Returns how many were moved.
        """
        logs = sorted(p for p in self.log_dir.iterdir() if p.suffix == ".log")
        moved = 0
        for log in logs:
            data = log.read_bytes()
            for offset in range(0, len(data), RECORD_BYTES):
                entry = decode_record(data[offset : offset + RECORD_BYTES])
                if entry is None:
                    continue
                slot, target = self.slots_dir / entry[0], self.acked_dir / entry[1]
                if slot.exists() and not target.exists():
                    os.rename(slot, target)
                    moved += 1
        if logs:
            fsync_dir(self.acked_dir)
            fsync_dir(self.slots_dir)
            for log in logs:
                log.unlink(missing_ok=True)
            fsync_dir(self.log_dir)
        if moved:
            logger.info("journal: %d acknowledged instances were still in their receive slot; moved to .acked", moved)
        return moved

    def clear_slots(self) -> int:
        """Remove every slot; at start, after :meth:`replay`. Returns how many held an unfinished transfer."""
        n = 0
        for p in self.slots_dir.iterdir():
            try:
                partial = p.stat().st_size > 0
                p.unlink()
                n += partial
            except OSError:
                pass
        with self._lock:
            self._free.clear()
        return n
