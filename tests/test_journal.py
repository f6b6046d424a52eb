"""The receive journal (storage.journal): slots and commit logs, and what a restart recovers from them.

A power loss cannot be staged in a test; what it can leave behind can. After an
acknowledgement the instance is under its journal name in ``.acked/`` or, when the
rename had not reached the disk, still under its slot name. These tests build each
state on a real filesystem and check what the node's start (``clean_incoming``,
then recovery) makes of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage import journal as journal_mod
from storage.filestore import FileStore
from storage.journal import RECORD_BYTES, decode_record, encode_record


def _receive(store: FileStore, data: bytes) -> Path:
    slot = store.new_incoming_path()
    assert slot.parent == store.journal.slots_dir and slot.stat().st_size == 0
    with open(slot, "r+b") as f:
        f.write(data)
    return slot


def _logs(store: FileStore) -> list[Path]:
    return sorted(store.journal.log_dir.glob("*.log"))


def test_an_acknowledged_slot_is_renamed_into_the_journal_and_recorded(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    slot = _receive(store, b"dicom bytes")
    acked = store.acknowledge(slot, "1.2.3")
    assert not slot.exists() and acked.parent == store.acked_dir and acked.read_bytes() == b"dicom bytes"
    assert store.pending() == [acked]
    (log,) = _logs(store)
    records = [decode_record(log.read_bytes()[i : i + RECORD_BYTES]) for i in range(0, 4 * RECORD_BYTES, RECORD_BYTES)]
    assert records == [(slot.name, acked.name), None, None, None]
    assert not list(store.incoming_dir.iterdir())


def test_restart_recovers_an_acknowledged_instance_whose_rename_was_lost(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s")
    slot = _receive(store, b"acknowledged")
    acked = store.acknowledge(slot, "1.2.3")
    os.rename(acked, slot)  # what a power loss leaves when the rename had not reached the disk
    unused = store.new_incoming_path()
    partial = _receive(store, b"half a transf")  # a transfer cut off: never acknowledged, no record

    restarted = FileStore(tmp_path / "s")
    assert restarted.clean_incoming() == 1  # the partial transfer; unused slots are not counted
    assert [p.name for p in restarted.pending()] == [acked.name]
    assert acked.read_bytes() == b"acknowledged"
    assert not partial.exists() and not unused.exists() and not list(restarted.journal.slots_dir.iterdir())
    assert _logs(restarted) == []  # replayed logs are retired


def test_a_full_log_is_retired_when_the_next_one_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "LOG_RECORDS", 3)
    store = FileStore(tmp_path / "s")
    acked = [store.acknowledge(_receive(store, f"i{i}".encode()), f"1.2.{i}") for i in range(7)]
    (log,) = _logs(store)  # logs 1 and 2 are full and gone; log 3 holds the 7th record
    assert decode_record(log.read_bytes()[:RECORD_BYTES]) is not None
    assert decode_record(log.read_bytes()[RECORD_BYTES : 2 * RECORD_BYTES]) is None
    assert [p.read_bytes() for p in acked] == [f"i{i}".encode() for i in range(7)]


def test_torn_or_foreign_records_are_ignored() -> None:
    good = encode_record("123-ab-000000001.slot", "0001-1.2.3.dcm")
    assert decode_record(good) == ("123-ab-000000001.slot", "0001-1.2.3.dcm")
    assert decode_record(bytes(RECORD_BYTES)) is None
    torn = good[:20] + bytes(RECORD_BYTES - 20)
    assert decode_record(torn) is None
    flipped = bytearray(good)
    flipped[12] ^= 0x01
    assert decode_record(bytes(flipped)) is None
    assert decode_record(encode_record("../x", "0001-1.2.3.dcm")) is None  # names never leave their folder


def test_without_fsync_the_store_uses_plain_temporary_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "s", fsync=False)
    tmp = store.new_incoming_path()
    assert tmp.parent == store.incoming_dir
    tmp.write_bytes(b"x")
    assert store.acknowledge(tmp, "1.2.3").read_bytes() == b"x"
    assert _logs(store) == []
