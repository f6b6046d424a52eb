"""DICOM TLS both ways, with a test PKI made by ``cryptography``: dcmtk's ``storescu``
sends to the node's TLS SCP, the node's dispatcher sends to dcmtk's ``storescp``
and to a pynetdicom TLS SCP, and clients or servers that are not trusted are refused.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE

from pacs_lab.synthetic import make_series, write_series
from pacs_node.app.service import Node
from pacs_node.common.dicomnet import client_ssl_context, server_ssl_context
from pacs_node.config import Settings
from pacs_node.deliver.dispatcher import Dispatcher
from pacs_node.errors import ConfigError
from storage.models import DeliveryState, Instance
from tests.conftest import Certs, Env, RecordingSCP, dimse, free_port, require_program, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """TLS does not depend on the database: SQLite only here (test_dispatch covers both)."""
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


@pytest.fixture
def tls_node(make_settings: Callable[..., Settings], run_node: Callable[[Settings], Node], certs: Certs) -> Node:
    """A node whose SCP speaks DICOM TLS and requires client certificates signed by the test CA."""
    return run_node(
        make_settings(
            dicom={
                "tls": {
                    "cert_file": str(certs.server_cert),
                    "key_file": str(certs.server_key),
                    "ca_file": str(certs.ca),
                    "handshake_timeout_s": 5,
                }
            }
        )
    )


def _stored(node: Node) -> set[str]:
    assert node.indexer.flush(30)
    with node.db.session() as s:
        return {i.sop_uid for i in s.query(Instance)}


def _storescu(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    exe = require_program("storescu")
    cmd = [exe, "-aet", "MODALITY", "-aec", "PACSNODE", "-to", "10", "-ta", "10", "-td", "10", *tls]
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_storescu_over_tls_with_a_trusted_client_certificate_is_stored(
    tls_node: Node, certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_series(tmp_path / "in", make_series(3, rows=16, cols=16))
    caplog.set_level(logging.INFO, logger="pacs_node.receive.scp")
    proc = _storescu(
        tls_node.scp.port, files, "+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert _stored(tls_node) == sent
    assert any(
        "TLS connection from 127.0.0.1" in r.getMessage() and "CN=modality" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    ("who", "options"),
    [
        ("a client certificate from another CA", ("+tls", "rogue_key", "rogue_cert", "+cf", "ca")),
        ("no client certificate", ("+tla", "+cf", "ca")),
        ("no TLS at all", ()),
    ],
)
def test_untrusted_clients_are_refused(
    tls_node: Node,
    certs: Certs,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    who: str,
    options: tuple[str, ...],
) -> None:
    files = write_series(tmp_path / "in", make_series(1, rows=16, cols=16))
    args = [str(getattr(certs, o)) if hasattr(certs, o) else o for o in options]
    proc = _storescu(tls_node.scp.port, files, *args)
    assert proc.returncode != 0, f"{who}: storescu succeeded\n{proc.stdout}{proc.stderr}"
    assert _stored(tls_node) == set(), who
    if options:  # a TLS client: the node logs why it refused the handshake
        wait_for(
            lambda: any("TLS handshake with 127.0.0.1 failed" in r.getMessage() for r in caplog.records),
            what="the refused handshake in the log",
        )


def test_a_client_that_never_handshakes_does_not_block_others(tls_node: Node, certs: Certs) -> None:
    """The handshake runs on each connection's thread, not on the accept thread."""
    with socket.create_connection(("127.0.0.1", tls_node.scp.port)):  # connects, says nothing
        ctx = client_ssl_context(
            _client_tls(certs, cert=True), where="test"
        )  # a second client, with a good certificate
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 3
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", tls_node.scp.port, ae_title="PACSNODE", tls_args=(ctx, "localhost"))
        try:
            assert assoc.is_established, "a silent client held up the next one"
            status = assoc.send_c_echo()
            assert status.Status == 0
        finally:
            if assoc.is_established:
                assoc.release()


def _client_tls(certs: Certs, *, cert: bool, ca: Path | None = None) -> Any:
    from pacs_node.config import TlsClientSettings

    return TlsClientSettings(
        ca_file=ca or certs.ca,
        cert_file=certs.client_cert if cert else None,
        key_file=certs.client_key if cert else None,
    )


def test_contexts_require_tls_1_2_and_verify_by_default(certs: Certs, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        dicom={
            "tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), "ca_file": str(certs.ca)}
        }
    )
    assert settings.dicom.tls is not None
    server = server_ssl_context(settings.dicom.tls)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2 and server.verify_mode == ssl.CERT_REQUIRED
    client = client_ssl_context(_client_tls(certs, cert=False), where="destinations.x.tls")
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_tls_file_errors_name_the_key(certs: Certs, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    missing = make_settings(
        dicom={"tls": {"cert_file": str(tmp_path / "nope.pem"), "key_file": str(certs.server_key), "ca_file": "x"}}
    )
    with pytest.raises(ConfigError, match=r"dicom\.tls\.cert_file: no such file"):
        Node(missing)
    wrong_key = make_settings(
        dicom={"tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.client_key), "ca_file": "x"}}
    )
    with pytest.raises(ConfigError, match=r"dicom\.tls\.cert_file/key_file: cannot load"):
        Node(wrong_key)
    bad_ca = make_settings(
        dicom={
            "tls": {
                "cert_file": str(certs.server_cert),
                "key_file": str(certs.server_key),
                "ca_file": str(tmp_path / "no-ca.pem"),
            }
        }
    )
    with pytest.raises(ConfigError, match=r"dicom\.tls\.ca_file: cannot load CA certificates"):
        Node(bad_ca)
    with pytest.raises(ConfigError, match=r"dicom\.tls: ca_file: needed to verify client certificates"):
        make_settings(dicom={"tls": {"cert_file": "a", "key_file": "b"}})


# -- the node sends over TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def tls_storescp(certs: Certs, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp with TLS, requiring a client certificate signed by the test CA."""
    exe = require_program("storescp")
    port = free_port()
    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [exe, "-aet", "DCMTK", "-od", str(out), "+tls", str(certs.server_key), str(certs.server_cert)]
        + ["+cf", str(certs.ca), "-ta", "10", "-td", "10", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"storescp exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, what="storescp to listen")
        yield port, out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_dispatcher_sends_to_dcmtk_storescp_over_tls_with_a_client_certificate(
    queued: Callable[..., Env], certs: Certs, tls_storescp: tuple[int, Path]
) -> None:
    port, out = tls_storescp
    tls = {"ca_file": str(certs.ca), "cert_file": str(certs.client_cert), "key_file": str(certs.client_key)}
    env = queued(
        {
            "dcmtk": {"type": "dimse", "host": "127.0.0.1", "port": port, "ae_title": "DCMTK", "tls": tls},
            "no-cert": {
                "type": "dimse",
                "host": "127.0.0.1",
                "port": port,
                "ae_title": "DCMTK",
                "tls": {"ca_file": str(certs.ca)},
            },
        },  # fmt: skip
        dispatch={"max_attempts": 1},
    )
    assert Dispatcher(env.settings, env.db, env.store).run_once() == 6
    states = {(d.destination, d.state) for d in env.deliveries()}
    assert states == {("dcmtk", DeliveryState.DELIVERED), ("no-cert", DeliveryState.FAILED)}
    received = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in out.iterdir() if f.is_file()}
    assert received == env.sop_uids("dcmtk")


def test_dispatcher_refuses_a_server_it_does_not_trust(
    queued: Callable[..., Env], certs: Certs, recording_scp: Callable[..., RecordingSCP], tmp_path: Path
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    scp = recording_scp("TLSPEER", ssl_context=ctx).start()
    env = queued(
        {
            "trusting": dimse(scp, tls={"ca_file": str(certs.ca)}),
            "distrusting": dimse(scp, tls={"ca_file": str(certs.rogue_ca)}),
            "wrong-name": dimse(scp, tls={"ca_file": str(certs.ca), "server_name": "pacs.example.org"}),
        },
        dispatch={"max_attempts": 1},
    )
    Dispatcher(env.settings, env.db, env.store).run_once()
    by_dest = {d.destination: d for d in env.deliveries()}
    assert by_dest["trusting"].state is DeliveryState.DELIVERED
    for name in ("distrusting", "wrong-name"):
        d = by_dest[name]
        assert d.state is DeliveryState.FAILED
        assert "certificate is not trusted" in (d.last_error or ""), d.last_error
    assert scp.uids == env.sop_uids("trusting")
