"""Fuzzing the receive path with hypothesis (issue 14).

Mutated Part 10 files (synthetic CT in three transfer syntaxes, one of them
deflated, and small pydicom test files: cut short, bytes flipped, inserted or
deleted, lengths overwritten with absurd values) go to the
:class:`~pacs_node.receive.ingest.Ingestor` through its public API, and what it
accepts goes on to the indexer. Whatever the bytes: nothing but the node's own
:class:`~pacs_node.errors.IngestError` family comes out, a refused file leaves
nothing behind in the store, an accepted one sits whole in the journal and is
indexed without an error. Mutated P-DATA-TF PDUs go to the transport's plain
PDU parsers (``_pdvs``, ``_command`` in :mod:`pacs_node.common.dul`), which
answer None for what they cannot parse and never raise.

Bounded: a fixed number of derandomized examples with a deadline each, so the
file runs in a few seconds.
"""

from __future__ import annotations

import io
import struct
import tempfile
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_lab.abuse import c_store_pdus, deflate_bomb, sample_files, split_part10
from pacs_lab.synthetic import make_series
from pacs_node.common.dul import _command, _pdvs
from pacs_node.errors import IngestError
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import Ingestor, Received, identify, read_header
from storage.db import Database
from storage.filestore import FileStore

FUZZ = settings(
    max_examples=120,
    deadline=timedelta(milliseconds=1500),
    derandomize=True,
    database=None,  # nothing written under .hypothesis/ in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _part10(ds: Dataset, syntax: UID) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    ct = list(make_series(2, rows=8, cols=8, SeriesDescription="fuzz"))
    seeds = [_part10(ct[0], ExplicitVRLittleEndian), _part10(ct[1], ImplicitVRLittleEndian)]
    seeds.append(deflate_bomb(96 << 10, label="small deflated").data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = [p for p in sample_files(limit_bytes=24 << 10) if split_part10(p) is not None]
    seeds += [p.read_bytes() for p in small[:6]]
    return seeds


SEEDS = _seeds()
LENGTHS = [0, 1, 2, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF, 1 << 20]

#: (kind, position, argument); flips, the mildest change, weigh four times as much as each of the others:
#: a file with a few changed bytes is often still acceptable, which exercises the accepting path and the index too
Mutation = tuple[str, int, int | bytes]
mutation: st.SearchStrategy[Mutation] = st.one_of(
    *[st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 255))] * 4,
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 64)),
    st.tuples(st.just("length"), st.integers(0, 1 << 16), st.sampled_from(LENGTHS)),
)


def _mutate(data: bytes, ops: list[Mutation]) -> bytes:
    raw = bytearray(data)
    for kind, position, arg in ops:
        at = position % (len(raw) + 1)
        if kind == "cut":
            del raw[at:]
        elif kind == "insert" and isinstance(arg, bytes):
            raw[at:at] = arg
        elif isinstance(arg, int) and kind == "flip" and at < len(raw):
            raw[at] = arg
        elif isinstance(arg, int) and kind == "delete":
            del raw[at : at + arg]
        elif isinstance(arg, int) and kind == "length":
            raw[at : at + 4] = struct.pack("<L", arg)
    return bytes(raw)


files = st.builds(_mutate, st.sampled_from(SEEDS), st.lists(mutation, min_size=1, max_size=3))


@pytest.fixture(scope="module")
def index_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'index.db'}")
    db.upgrade()
    yield db
    db.dispose()


def _everything_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@FUZZ
@given(data=files)
def test_mutated_part10_files_are_refused_cleanly_or_stored_whole(index_db: Database, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStore(tmp, fsync=False)
        submitted: list[Received] = []
        ingestor = Ingestor(store, submitted.append)
        try:
            rec: Received | None = ingestor.receive_bytes(data, calling_ae="FUZZ")
        except IngestError as exc:
            assert 0 < exc.status <= 0xFFFF
            event(f"refused with 0x{exc.status:04X}")  # --hypothesis-show-statistics
            rec = None
        left = _everything_under(store.root)
        if rec is None:
            assert left == set() and submitted == [], f"a refused file left {left} behind"
            return
        event("accepted")
        assert submitted == [rec] and left == {rec.acked_path}, f"an accepted file left {left}"
        assert rec.acked_path.read_bytes() == data, "the journal holds other bytes than were received"
        again = read_header(rec.acked_path)
        assert identify(again) == (rec.study_uid, rec.series_uid, rec.sop_uid, rec.sop_class_uid)
        # What was acknowledged must also go into the index: anything else would be lost to routing.
        Indexer(index_db, store).index_batch([rec])
        assert _everything_under(store.root) == {store.path(store.relpath(rec.study_uid, rec.series_uid, rec.sop_uid))}


_GOOD_PDUS = c_store_pdus(SEEDS[0][132:], "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", max_pdu=1024)


def _check_pdvs(pdu: bytearray) -> None:
    items = _pdvs(pdu)
    if items is None:
        return
    assert sum(len(value) + 6 for _, _, value in items) == len(pdu) - 6
    for _, _, value in items:
        command = _command(value)
        assert command is None or all(isinstance(v, bytes) for v in command.values())


@FUZZ
@given(body=st.binary(max_size=512))
def test_pdv_parsing_of_arbitrary_p_data_never_raises(body: bytes) -> None:
    _check_pdvs(bytearray(struct.pack(">BBL", 0x04, 0, len(body)) + body))


@FUZZ
@given(index=st.integers(0, len(_GOOD_PDUS) - 1), ops=st.lists(mutation, min_size=1, max_size=4))
def test_pdv_parsing_of_mutated_c_store_pdus_never_raises(index: int, ops: list[Mutation]) -> None:
    pdu = bytearray(_mutate(_GOOD_PDUS[index], ops))
    if len(pdu) >= 6:
        _check_pdvs(pdu)


@FUZZ
@given(value=st.binary(max_size=256))
def test_command_parsing_of_arbitrary_bytes_never_raises(value: bytes) -> None:
    command = _command(memoryview(value))
    assert command is None or sum(len(v) + 8 for v in command.values()) <= len(value)
