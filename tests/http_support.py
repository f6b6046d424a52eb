"""Helpers for the HTTP tests: a receive path plus the HTTP server on a free
127.0.0.1 port, multipart bodies built and split independently of the
server's own code, and a strict reader of the Prometheus text format."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset

from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import Ingestor
from pacs_node.web import HttpServer
from storage.db import Database
from storage.filestore import FileStore
from tests.conftest import free_port


@dataclass
class HttpNode:
    """The receive path (store, indexer, ingestor) and a running HTTP server."""

    settings: Settings
    db: Database
    store: FileStore
    indexer: Indexer
    ingestor: Ingestor
    server: HttpServer

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return self.server.url

    @property
    def dicomweb(self) -> str:
        """DICOMweb root."""
        return self.server.url + "/dicom-web"

    def flush(self) -> None:
        """Wait (with a deadline) until every acknowledged instance is indexed."""
        assert self.indexer.flush(30), "the indexer did not catch up within 30 s"


def node_settings(
    make_settings: Callable[..., Settings],
    db_url: str | None = None,
    *,
    extra: dict[str, Any] | None = None,
    **http: Any,
) -> Settings:
    """Settings with the HTTP server on a free port; public_url names that port (dicomweb-client
    sends a Host header without the port, so URLs built from Host alone would point at port 80).
    ``http`` keywords go to the ``http`` section, ``extra`` to the top level."""
    port = free_port()
    data: dict[str, Any] = {"http": {"port": port, "public_url": f"http://127.0.0.1:{port}", **http}}
    if db_url is not None:
        data["database_url"] = db_url
    data.update(extra or {})
    return make_settings(data)


@contextmanager
def http_node(settings: Settings, **server_kw: Any) -> Iterator[HttpNode]:
    """Start the receive path and the HTTP server; everything is stopped on exit."""
    db = Database(settings.db_url)
    db.upgrade()
    store = open_store(settings)
    indexer = Indexer(db, store, linger_s=0.01)
    ingestor = Ingestor(store, indexer.submit)
    indexer.start()
    server = None
    try:
        server = HttpServer(settings, db, store, ingestor, **server_kw)
        server.start()
        yield HttpNode(settings, db, store, indexer, ingestor, server)
    finally:
        if server is not None:
            server.stop()
        indexer.stop()
        db.dispose()


def part10(ds: Dataset) -> bytes:
    """A dataset encoded as a Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart_body(
    parts: Iterable[tuple[str | None, bytes]], boundary: str = "test-boundary-1234"
) -> tuple[str, bytes]:
    """(Content-Type, body) of a multipart/related request; each part is (its Content-Type or None, bytes)."""
    out = io.BytesIO()
    for ctype, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        if ctype is not None:
            out.write(f"Content-Type: {ctype}\r\n".encode())
        out.write(b"\r\n")
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f'multipart/related; type="application/dicom"; boundary={boundary}', out.getvalue()


def split_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart response: (headers, content), by plain splitting on the delimiter."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    assert match, f"no boundary in {content_type!r}"
    delimiter = b"--" + match.group(1).encode()
    chunks = body.split(b"\r\n" + delimiter)
    first = chunks[0]
    assert first.startswith(delimiter) or first == b"", "the body must open with the delimiter"
    chunks[0] = first[len(delimiter) :]
    assert chunks[-1].startswith(b"--"), "the body must end with the closing delimiter"
    parts = []
    for chunk in chunks[:-1]:
        head, sep, content = chunk.partition(b"\r\n\r\n")
        assert sep, "a part without a blank line after its headers"
        headers = {}
        for line in head.split(b"\r\n"):
            if line.strip():
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>[-+]?(?:[0-9.eE+-]+|Inf|NaN))$"
)
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_prometheus(text: str) -> dict[str, Any]:
    """Parse the text exposition strictly: every sample belongs to a family declared
    with HELP and TYPE before it. Returns ``{family: {"type": ..., "samples": [(name, labels, value)]}}``."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Any] = {}
    current: str | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in families, f"family {name} declared twice"
            families[name] = {"type": None, "samples": []}
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name == current, f"TYPE {name} without its HELP just before"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), kind
            families[name]["type"] = kind
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group("name")
        assert current is not None and families[current]["type"], f"sample {name} before any TYPE"
        kind = families[current]["type"]
        allowed = {current} | (
            {f"{current}_bucket", f"{current}_sum", f"{current}_count"} if kind == "histogram" else set()
        )
        assert name in allowed, f"sample {name} does not belong to family {current}"
        labels = {}
        raw = m.group("labels") or ""
        pos = 0
        while pos < len(raw):
            lm = _LABEL.match(raw, pos)
            assert lm, f"bad labels in {line!r}"
            labels[lm.group(1)] = lm.group(2)
            pos = lm.end()
        families[current]["samples"].append((name, labels, float(m.group("value").replace("Inf", "inf"))))
    return families


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of one sample (family found from the sample name)."""
    for family in families.values():
        for sname, slabels, value in family["samples"]:
            if sname == name and slabels == labels:
                return float(value)
    raise KeyError(f"no sample {name} {labels}")
