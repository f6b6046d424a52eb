"""One bad peer cannot stop the node (issue 14), on the HTTP side, over a real uvicorn server on 127.0.0.1.

What an attacker or a careless client observes: a Host that only starts like a
local name reads nothing; junk and decompression bombs posted to STOW-RS or
the rule tester are refused in milliseconds with their reason, and the node
answers meanwhile; out-of-range pages and ids are 400s that say why, not 500s;
weak tokens stop the server at start; a logged-out session cookie replayed opens
nothing; credentials never go to a plain-http peer unless a person said so.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from sqlalchemy import select

from pacs_lab.synthetic import make_series, new_uid
from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.errors import ConfigError
from pacs_node.query.base import MAX_ID, MAX_OFFSET
from pacs_node.receive.ingest import IngestLimits, Ingestor
from pacs_node.web import HttpServer
from pacs_node.web.auth import SESSION_COOKIE, Sessions
from pacs_node.web.conformance import conformance_statement
from pacs_node.web.dashboard import views
from pacs_node.web.dicomfile import DEFLATED_EXPLICIT_LE, MAX_INFLATED_BYTES
from storage.db import Database
from storage.models import Instance
from tests.conftest import wait_for
from tests.http_support import HttpNode, http_node, multipart_body, node_settings, part10

PATIENT = "Synthetic"
TOKEN = "abuse-test-token-5c1d9e07"
STOW_HEADERS = {"Accept": "application/dicom+json"}


@pytest.fixture
def node(make_settings: Callable[..., Settings]) -> Iterator[HttpNode]:
    with http_node(node_settings(make_settings)) as n:
        yield n


def _stow(node: HttpNode, parts: list[tuple[str | None, bytes]], timeout: float = 60) -> httpx.Response:
    ctype, body = multipart_body(parts)
    return httpx.post(
        f"{node.dicomweb}/studies", content=body, headers={"Content-Type": ctype, **STOW_HEADERS}, timeout=timeout
    )


def _store_study(node: HttpNode) -> tuple[str, list[Any]]:
    study = new_uid()
    series = list(make_series(2, rows=16, cols=16, study_uid=study))
    assert _stow(node, [("application/dicom", part10(ds)) for ds in series]).status_code == 200
    node.flush()
    return study, series


def _reasons(answer: dict[str, Any]) -> list[int]:
    return [item["00081197"]["Value"][0] for item in answer.get("00081198", {}).get("Value", [])]


@functools.cache
def deflate_bomb(inflated: int = MAX_INFLATED_BYTES + (16 << 20)) -> bytes:
    """A Part 10 file in Deflated Explicit VR Little Endian of ~1 MiB whose data set inflates to ``inflated``
    bytes (a Pixel Data element of zeros)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = new_uid()
    meta.TransferSyntaxUID = DEFLATED_EXPLICIT_LE
    out = io.BytesIO()
    out.write(bytes(128) + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    sop_class = b"1.2.840.10008.5.1.4.1.1.7\0"
    length = inflated - 8 - len(sop_class) - 12
    head = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", len(sop_class)) + sop_class
    head += struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(deflater.compress(head))
    zeros = bytes(1 << 20)
    for _ in range(length >> 20):
        out.write(deflater.compress(zeros))
    out.write(deflater.compress(bytes(length & ((1 << 20) - 1))))
    out.write(deflater.flush())
    return out.getvalue()


def _answers_quickly(node: HttpNode) -> None:
    start = time.monotonic()
    assert httpx.get(f"{node.url}/healthz", timeout=10).status_code == 200
    assert time.monotonic() - start < 2.0, "the node was slow to answer /healthz"


# -- Host: an exact name, not a prefix (DNS rebinding) ---------------------------------------------------------------


def test_the_host_header_must_name_the_node_exactly(make_settings: Callable[..., Settings]) -> None:
    with http_node(node_settings(make_settings)) as node:
        study, _ = _store_study(node)
        port = node.server.port
        other = port + 1 if port < 65535 else port - 1
        client = httpx.Client(timeout=30)  # one client: a new one per request costs an SSL context each
        refused = [
            "127.0.0.1.nip.io",  # resolves to 127.0.0.1 through DNS: a page of that site could read the node
            f"127.0.0.1.nip.io:{port}",
            "127.0.0.1.attacker.example",
            "localhost.attacker.example",
            f"localhost:{other}",
            f"127.0.0.1:{other}",
            "attacker.example",
            "127.0.0.1:notaport",
            "::1",  # an IPv6 address without brackets is not a Host
        ]
        for host in refused:
            for path in ("/api/studies", "/dicom-web/studies", "/ui/studies", f"/api/studies/{study}"):
                r = client.get(node.url + path, headers={"Host": host})
                assert r.status_code in (400, 403), (host, path, r.status_code)
                assert PATIENT not in r.text and study not in r.text, (host, path)
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", f"[::1]:{port}", "LOCALHOST."):
            r = client.get(f"{node.url}/api/studies", headers={"Host": host})
            assert r.status_code == 200 and r.json()["items"][0]["study_uid"] == study, host
        client.close()
    # Behind a proxy without a token: the public URL's host, with its port or none, is the only other name.
    with http_node(node_settings(make_settings, public_url="https://node.example")) as node:
        for host, status in (("node.example", 200), ("node.example:443", 200), ("node.example:8443", 403),
                             ("node.example.attacker.example", 403), ("example", 403)):  # fmt: skip
            assert httpx.get(f"{node.url}/api/studies", headers={"Host": host}).status_code == status, host


# -- STOW-RS: junk and bombs are refused for the price of a few reads -----------------------------------------------


def test_junk_and_bombs_posted_to_stow_are_refused_at_once(node: HttpNode) -> None:
    """16 MiB of zeros cost the node 20-40 s of CPU before (pydicom parsing them as elements), a deflated
    part inflated whole in memory; now each is refused from its first bytes, the good part is stored."""
    study = new_uid()
    [good] = make_series(1, rows=16, cols=16, study_uid=study)
    zeros = bytes(16 << 20)
    parts = [
        ("application/dicom", zeros),
        ("application/dicom", bytes(128) + b"DICM" + zeros),
        ("application/dicom", part10(good)),
        ("application/dicom", deflate_bomb()),
    ]
    start = time.monotonic()
    r = _stow(node, parts)
    took = time.monotonic() - start
    assert r.status_code == 202, r.text
    assert took < 15, f"STOW-RS of 32 MiB of junk and a bomb took {took:.1f} s"
    answer = r.json()
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [good.SOPInstanceUID]
    assert _reasons(answer) == [0xC210, 0xC210, 0xC210]
    warnings = r.headers.get_list("warning")
    assert any("part 1: not a DICOM file (no 'DICM'" in w for w in warnings), warnings
    assert any("part 2: not a DICOM file (no File Meta Information" in w for w in warnings), warnings
    assert any("part 4" in w and f"inflates to more than {MAX_INFLATED_BYTES >> 20} MiB" in w for w in warnings)
    assert list(node.store.incoming_dir.iterdir()) == [], "nothing of the refused parts is left on disk"
    # Junk alone: 409, every part named.
    r = _stow(node, [("application/dicom", b"\x00" * 1000), ("application/dicom", b"GIF89a" + bytes(500))])
    assert r.status_code == 409 and _reasons(r.json()) == [0xC210, 0xC210]
    _answers_quickly(node)
    node.flush()
    with node.db.sessions() as session:
        assert session.scalars(select(Instance.sop_uid)).all() == [good.SOPInstanceUID]


def test_a_stow_part_over_the_instance_size_limit_is_refused_while_it_streams_in(
    make_settings: Callable[..., Settings],
) -> None:
    settings = node_settings(make_settings, extra={"storage": {"max_instance_mb": 1}})
    with http_node(settings) as n:
        n.ingestor.limits = IngestLimits.from_settings(settings.storage)  # as serve builds it
        study = new_uid()
        [good] = make_series(1, rows=16, cols=16, study_uid=study)
        [big] = make_series(1, rows=1024, cols=1024, study_uid=study)  # 2 MiB of pixels
        r = _stow(n, [("application/dicom", part10(big)), ("application/dicom", part10(good))])
        assert r.status_code == 202, r.text
        answer = r.json()
        assert _reasons(answer) == [0xA700]
        assert any("larger than storage.max_instance_mb (1 MiB)" in w for w in r.headers.get_list("warning"))
        assert list(n.store.incoming_dir.iterdir()) == [], "the refused part is not left on disk"
        n.flush()
        with n.db.sessions() as session:
            assert session.scalars(select(Instance.sop_uid)).all() == [good.SOPInstanceUID]


def test_a_bomb_on_disk_is_not_inflated_by_wado(node: HttpNode) -> None:
    """A stored file replaced by a deflate bomb (another writer, a restored backup): WADO-RS answers
    without inflating it, and the node goes on answering."""
    study, series = _store_study(node)
    with node.db.sessions() as session:
        rel = session.scalars(select(Instance.path).where(Instance.sop_uid == series[0].SOPInstanceUID)).one()
    node.store.path(rel).write_bytes(deflate_bomb())
    base = f"{node.dicomweb}/studies/{study}/series/{series[0].SeriesInstanceUID}/instances/{series[0].SOPInstanceUID}"
    start = time.monotonic()
    answers = {
        "metadata": httpx.get(base + "/metadata", timeout=30),
        "frames": httpx.get(base + "/frames/1", timeout=30),
        "bulk": httpx.get(base + "/bulk/7FE00010", timeout=30),
        "retrieve": httpx.get(base, timeout=30),
    }
    assert time.monotonic() - start < 20
    assert answers["metadata"].status_code == 200 and answers["metadata"].json() == []
    for what in ("frames", "bulk"):
        assert answers[what].status_code == 404 and "inflates to more than" in answers[what].text, what
    # the stored bytes may go out as they are (never inflated), or not at all
    assert answers["retrieve"].status_code in (200, 404, 406), answers["retrieve"].status_code
    study_meta = httpx.get(f"{node.dicomweb}/studies/{study}/metadata", timeout=30)
    assert study_meta.status_code == 200 and len(study_meta.json()) == 1, "the other instance is still served"
    _answers_quickly(node)


# -- the rule tester: off the event loop, bounded in size, time and slots ---------------------------------------------


def test_the_rule_tester_never_holds_up_the_node(make_settings: Callable[..., Settings], monkeypatch: Any) -> None:
    release = threading.Event()
    original = views._read_header

    def slow(data: bytes) -> Any:  # a file whose header takes forever to read
        if data.startswith(b"SLOW"):
            release.wait(60)
        return original(data)

    monkeypatch.setattr(views, "_read_header", slow)
    monkeypatch.setattr(views, "RULE_TEST_TIMEOUT_S", 1.0)
    with http_node(node_settings(make_settings)) as node:
        test_url = f"{node.url}/ui/rules/test"
        results: list[httpx.Response] = []
        posts = [
            threading.Thread(target=lambda: results.append(httpx.post(test_url, content=b"SLOW", timeout=30)))
            for _ in range(views.RULE_TEST_SLOTS)
        ]
        try:
            for post in posts:
                post.start()
            # Both files are being read; the node answers everything else meanwhile.
            _answers_quickly(node)
            assert httpx.get(f"{node.url}/api/studies", timeout=5).status_code == 200
            for post in posts:
                post.join(30)
            assert [r.status_code for r in results] == [503] * views.RULE_TEST_SLOTS
            assert all("took more than 1 s" in r.text for r in results)
            # The abandoned reads still hold their slots: a third file is told so at once.
            start = time.monotonic()
            r = httpx.post(test_url, content=b"SLOW", timeout=30)
            assert r.status_code == 503 and "busy" in r.text and time.monotonic() - start < 2
        finally:
            release.set()
        wait_for(
            lambda: httpx.post(test_url, content=b"not dicom", timeout=30).status_code == 200,
            timeout=20,
            what="the rule tester's slots to come back",
        )
        # A decompression bomb and a large junk file are refused before pydicom sees them.
        for content, reason in (
            (deflate_bomb(), f"inflates to more than {MAX_INFLATED_BYTES >> 20} MiB"),
            (bytes(32 << 20), "not a DICOM file"),
            (bytes(128) + b"DICM" + bytes(32 << 20), "not a DICOM file"),
        ):
            start = time.monotonic()
            r = httpx.post(test_url, content=content, timeout=60)
            assert r.status_code == 200 and reason in r.text, r.text
            assert time.monotonic() - start < 10
        r = httpx.post(test_url, content=bytes(views.MAX_TEST_BYTES + 1), timeout=60)
        assert r.status_code == 413
        _answers_quickly(node)


# -- paging and ids: validated at the boundary ------------------------------------------------------------------------


def test_out_of_range_pages_and_ids_are_400s_that_say_why(node: HttpNode) -> None:
    huge = "9" * 40
    cases = [
        ("/api/studies", {"offset": huge}, "offset"),
        ("/api/studies", {"limit": huge}, "limit"),
        ("/api/studies", {"offset": "-1"}, "offset"),
        ("/api/studies", {"offset": str(MAX_OFFSET + 1)}, "offset"),
        ("/api/jobs", {"offset": "9" * 5000}, "offset"),
        ("/api/deliveries", {"offset": huge}, "offset"),
        ("/api/deliveries", {"job_id": huge}, "job_id"),
        ("/api/deliveries", {"job_id": "1.5"}, "job_id"),
        (f"/api/jobs/{huge}", {}, "job id"),
        (f"/api/jobs/{MAX_ID + 1}", {}, "job id"),
        (f"/api/deliveries/{huge}", {}, "delivery id"),
        ("/dicom-web/studies", {"offset": huge}, "offset"),
        ("/dicom-web/studies", {"limit": huge}, "limit"),
        ("/dicom-web/series", {"offset": "x"}, "offset"),
        ("/ui/studies", {"page": huge}, "page"),
        ("/ui/jobs", {"page": "-2"}, "page"),
        ("/ui/deliveries", {"page": "1e9"}, "page"),
        (f"/ui/jobs/{huge}", {}, "job id"),
        (f"/ui/outputs/{huge}/preview.png", {}, "output id"),
    ]
    client = httpx.Client(timeout=30)
    for path, params, name in cases:
        r = client.get(node.url + path, params=params, headers={"Accept": "application/dicom+json, */*"})
        assert r.status_code == 400, (path, params, r.status_code, r.text[:200])
        assert name in r.text, (path, params, r.text[:200])
    for path in (f"/api/jobs/{huge}/cancel", f"/api/deliveries/{huge}/retry"):
        r = client.post(node.url + path)
        assert r.status_code == 400 and "id" in r.json()["error"], path
    # The largest values are answered (empty), and the node goes on.
    r = httpx.get(f"{node.url}/api/studies", params={"offset": str(MAX_OFFSET), "limit": huge[:9]})
    assert r.status_code == 200 and r.json()["items"] == [] and r.json()["limit"] == 500
    assert httpx.get(f"{node.url}/api/jobs/{MAX_ID}").status_code == 404
    assert httpx.get(f"{node.url}/ui/studies", params={"page": ""}).status_code == 200
    client.close()
    _answers_quickly(node)


# -- tokens and sessions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("x", "1 characters long"),
        ("correct-horse", "13 characters long"),
        ("a" * 40, "only 1 different characters"),
        ("ab" * 20, "only 2 different characters"),
    ],
)
def test_weak_tokens_stop_the_server_at_start(
    make_settings: Callable[..., Settings], tmp_path: Path, token: str, why: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    for http, environ, key in (
        ({"token_file": str(token_file)}, {}, "http.token_file"),
        ({"token_env": "NODE_TOKEN"}, {"NODE_TOKEN": token}, "http.token_env"),
    ):
        settings = make_settings({"http": {"port": 0, **http}})
        db = Database(settings.db_url)
        store = open_store(settings)
        try:
            with pytest.raises(ConfigError) as err:
                HttpServer(settings, db, store, Ingestor(store, lambda rec: None), environ=environ)
        finally:
            db.dispose()
        message = str(err.value)
        assert message.startswith(key) and why in message and "openssl rand" in message, message
        if len(token) > 2:
            assert token not in message, "the token is never shown"


def _login(node: HttpNode) -> str:
    r = httpx.post(f"{node.url}/ui/login", data={"token": TOKEN, "next": "/ui/"})
    assert r.status_code == 303, r.text
    value = r.cookies.get(SESSION_COOKIE)
    assert value and TOKEN not in value
    return str(value)


def test_logout_ends_the_session_on_the_server(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with http_node(node_settings(make_settings, token_file=str(token_file))) as node:
        first, second = _login(node), _login(node)
        assert first != second, "each login opens its own session"
        for value in (first, second):
            assert httpx.get(f"{node.url}/api/studies", cookies={SESSION_COOKIE: value}).status_code == 200
        own = {"Origin": node.url}
        r = httpx.post(f"{node.url}/ui/logout", cookies={SESSION_COOKIE: first}, headers=own)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        # The logged-out cookie, replayed by whoever copied it, opens nothing; the other session lives on.
        r = httpx.get(f"{node.url}/api/studies", cookies={SESSION_COOKIE: first})
        assert r.status_code == 401
        r = httpx.get(f"{node.url}/ui/studies", cookies={SESSION_COOKIE: first})
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
        assert httpx.get(f"{node.url}/api/studies", cookies={SESSION_COOKIE: second}).status_code == 200
        # A cookie made up from the token (the old HMAC scheme) is nothing either.
        forged = hmac.new(TOKEN.encode(), b"pacs-node dashboard session v1", hashlib.sha256).hexdigest()
        assert httpx.get(f"{node.url}/api/studies", cookies={SESSION_COOKIE: forged}).status_code == 401


def test_sessions_expire_and_are_bounded_in_number() -> None:
    now = [0.0]
    sessions = Sessions(max_age_s=100, max_sessions=3, clock=lambda: now[0])
    values = [sessions.open() for _ in range(4)]
    assert not sessions.valid(values[0]), "the oldest session made way for the fourth"
    assert all(sessions.valid(v) for v in values[1:]) and len(sessions) == 3
    now[0] = 99.0
    assert sessions.valid(values[1])
    now[0] = 100.0
    assert not any(sessions.valid(v) for v in values) and len(sessions) == 0
    assert not sessions.valid("") and not sessions.valid(None) and not sessions.valid("x" * 10_000)
    assert not sessions.close(values[1])


# -- secrets never go to a plain-http peer unless a person says so ------------------------------------------------


def test_credentials_over_plain_http_need_allow_insecure(
    make_settings: Callable[..., Settings], tmp_path: Path, caplog: Any
) -> None:
    secret = tmp_path / "archive.token"
    secret.write_text("archive-secret-token-1234")
    bearer = {"type": "dicomweb", "auth": "bearer", "token_file": str(secret)}
    basic = {"type": "dicomweb", "auth": "basic", "username": "u", "password_file": str(secret)}
    for dest in ({**bearer, "url": "http://archive.example/dicom-web"}, {**basic, "url": "http://10.0.0.5:8042"}):
        with pytest.raises(ConfigError) as err:
            make_settings({"destinations": {"archive": dest}})
        message = str(err.value)
        assert "destinations.archive: url: an http:// URL would send the" in message, message
        assert "in clear text" in message and "allow_insecure: true" in message and "https://" in message
    # https, this machine, or no secret at all: loaded as before.
    make_settings({"destinations": {"a": {**bearer, "url": "https://archive.example/dicom-web"}}})
    make_settings({"destinations": {"a": {**bearer, "url": "http://127.0.0.1:8042/dicom-web"}}})
    make_settings({"destinations": {"a": {**basic, "url": "http://localhost:8042/dicom-web"}}})
    make_settings({"destinations": {"a": {"type": "dicomweb", "url": "http://archive.example/dicom-web"}}})
    # Allowed explicitly: loaded with a warning, and said in the conformance statement and on the dashboard.
    with caplog.at_level(logging.WARNING, logger="pacs_node.config.model"):
        settings = node_settings(
            make_settings,
            extra={"destinations": {"archive": {**bearer, "url": "http://archive.example/x", "allow_insecure": True}}},
        )
    assert any("archive.example" in r.getMessage() and "plain http" in r.getMessage() for r in caplog.records)
    text = conformance_statement(settings)
    assert "credentials go over plain HTTP (allow_insecure: true) to: archive" in text
    with http_node(settings) as node:
        r = httpx.get(f"{node.url}/ui/deliveries")
        assert r.status_code == 200 and "credentials sent over plain HTTP" in r.text
        assert "credentials go over plain HTTP" in httpx.get(f"{node.url}/conformance").text
