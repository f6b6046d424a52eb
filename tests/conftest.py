"""Shared fixtures: settings in a temporary folder, a running node on a free
port, and databases (SQLite file and PostgreSQL).

PostgreSQL tests use ``PACS_NODE_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/test``). When CI is set they are
mandatory: an unreachable server fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pacs_node.config import Settings, settings_from_mapping

if TYPE_CHECKING:
    from pydicom import Dataset

    from pacs_node.process.results import BuiltOutput
    from storage.db import Database
    from storage.filestore import FileStore

PG_URL = os.environ.get("PACS_NODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
    details: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``.

    ``details``, when given, is called on a timeout and its text added to the failure (the state seen last).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"; last seen: {details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(interval)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build Settings rooted in tmp_path, with fast test timings; kwargs deep-merge."""

    def factory(data: dict[str, Any] | None = None, *, environ: dict[str, str] | None = None, **kw: Any) -> Settings:
        base: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "dicom": {"host": "127.0.0.1", "port": 0},
            "http": {"port": 0},
            "storage": {"min_free_mb": 0},
            "routing": {"series_quiet_s": 1.0, "poll_interval_s": 0.1},
            "retention": {"inputs_days": None},
            # preload off: on 2 cores a worker loading torch at start competes with the SCP and indexer
            # that the tests time series completion against (test_worker checks preload on its own)
            "worker": {"processes": 0, "poll_interval_s": 0.1, "preload": False},
        }
        merged = _deep_merge(base, data or {})
        merged = _deep_merge(merged, kw)
        return settings_from_mapping(merged, source="test settings", environ=environ if environ is not None else {})

    return factory


@pytest.fixture
def run_node() -> Iterator[Callable[[Settings], Any]]:
    """Start a Node in-process (SCP on a free port); stopped at teardown."""
    from pacs_node.app.service import Node

    nodes: list[Node] = []

    def start(settings: Settings) -> Node:
        node = Node(settings)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def _pg_available(url: str) -> bool:
    try:
        import psycopg

        with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    if not _pg_available(PG_URL):
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_URL} is not reachable; in CI its tests are mandatory")
        pytest.skip(f"PostgreSQL at {PG_URL} not reachable")
    return PG_URL


@pytest.fixture
def pg_url(pg_base_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    import psycopg

    name = f"pacs_node_t_{uuid.uuid4().hex[:12]}"
    admin = pg_base_url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both databases the node supports: a SQLite file and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def testdata() -> Callable[[str], str]:
    """Path of a pydicom (or pydicom-data) test file by name."""
    from pydicom.data import get_testdata_file

    def get(name: str) -> str:
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(name)
        return str(path)

    return get


def have(program: str) -> bool:
    return shutil.which(program) is not None


def require_program(program: str) -> str:
    """Path of a program the test needs; fail in CI, skip elsewhere."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed; .ci/run installs it")
        pytest.skip(f"{program} not installed")
    return path


@pytest.fixture(scope="session")
def sphere_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A native model package trained in a few seconds to find spheres (left/right labels)."""
    from pacs_lab.model_packages import build_sphere_package

    return build_sphere_package(tmp_path_factory.mktemp("sphere-package"))


@pytest.fixture(scope="session")
def tiny_nnunet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, real nnU-Net v2 results folder planned by nnU-Net and trained briefly (about a minute)."""
    import importlib.util

    if importlib.util.find_spec("nnunetv2") is None:
        if os.environ.get("CI"):
            pytest.fail("nnunetv2 is not installed; CI installs it (scripts/install.sh --dev)")
        pytest.skip("nnunetv2 is not installed")
    from pacs_lab.tiny_nnunet import build_tiny_nnunet

    root = tmp_path_factory.mktemp("tiny_nnunet")
    build_tiny_nnunet(root, seed=0)
    return root


def dciodvfy(path: Path | str) -> str:
    """Run dicom3tools' validator on a file; fail on any Error line (warnings allowed).

    Returns the report. Skips where dciodvfy is missing, except in CI.
    """
    import subprocess

    exe = require_program("dciodvfy")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy reports errors for {path}:\n{report}"
    return report


# -- peers the node sends to ----------------------------------------------------------------------------------------


class RecordingSCP:
    """A real pynetdicom Storage SCP on 127.0.0.1 that records what it receives.

    Args:
        ae_title: its AE title (associations calling another are rejected, permanent).
        port: the port (default: a free one); the SCP may be started later on it.
        status: the C-STORE status to answer, or a function of the data set returning one.
        ssl_context: serve DICOM TLS with this server context.
    """

    def __init__(
        self,
        ae_title: str = "DEST",
        *,
        port: int | None = None,
        status: int | Callable[[Any], int] = 0x0000,
        ssl_context: Any = None,
    ) -> None:
        import threading
        from collections import Counter

        self.ae_title = ae_title
        self.port = port or free_port()
        self.status = status
        self.ssl_context = ssl_context
        self.received: list[Any] = []  # decoded data sets with file_meta, in order
        self.requests: Counter[str] = Counter()  # SOP Instance UID -> C-STORE requests
        self.calling_aes: list[str] = []
        self._lock = threading.Lock()
        self._server: Any = None
        self._ae: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        status = self.status(ds) if callable(self.status) else self.status
        with self._lock:
            self.requests[str(ds.SOPInstanceUID)] += 1
            self.calling_aes.append(str(event.assoc.requestor.ae_title))
            if status in (0x0000, 0xB000, 0xB006, 0xB007):
                self.received.append(ds)
        return status

    def start(self) -> RecordingSCP:
        from pynetdicom import AE, evt

        from pacs_node.common.dicomnet import VERIFICATION
        from pacs_node.receive.scp import storage_sop_classes

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        ae.maximum_associations = 8
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.add_supported_context(VERIFICATION, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=self.ssl_context,
        )
        self._ae = ae
        return self

    def stop(self) -> None:
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    @property
    def uids(self) -> set[str]:
        with self._lock:
            return {str(ds.SOPInstanceUID) for ds in self.received}


@pytest.fixture
def recording_scp() -> Iterator[Callable[..., RecordingSCP]]:
    """Make RecordingSCPs (not started); all are stopped at teardown."""
    made: list[RecordingSCP] = []

    def make(*args: Any, **kw: Any) -> RecordingSCP:
        scp = RecordingSCP(*args, **kw)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.stop()


# -- certificates -------------------------------------------------------------------------------------------------


class Certs:
    """PEM files of a test PKI: a CA, a server certificate for 127.0.0.1/localhost, a client
    certificate, and a client certificate from another (untrusted) CA."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca.pem"
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        self.client_cert, self.client_key = root / "client.pem", root / "client.key"
        self.rogue_ca = root / "rogue-ca.pem"
        self.rogue_cert, self.rogue_key = root / "rogue.pem", root / "rogue.key"


def make_certs(root: Path) -> Certs:
    """Generate the test PKI with ``cryptography`` (EC P-256, valid for a day)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    certs = Certs(root)
    now = dt.datetime.now(dt.timezone.utc)

    def key_pem(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),  # fmt: skip
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(cn: str, issuer: tuple[Any, Any], *, server: bool) -> tuple[bytes, bytes]:
        ca_key, ca_cert = issuer
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    good = ca("pacs-node test CA")
    rogue = ca("untrusted test CA")
    certs.ca.write_bytes(good[1].public_bytes(serialization.Encoding.PEM))
    certs.rogue_ca.write_bytes(rogue[1].public_bytes(serialization.Encoding.PEM))
    for (cert_path, key_path), (cn, issuer, server) in {
        (certs.server_cert, certs.server_key): ("localhost", good, True),
        (certs.client_cert, certs.client_key): ("modality", good, False),
        (certs.rogue_cert, certs.rogue_key): ("intruder", rogue, False),
    }.items():
        cert_pem, key_bytes = leaf(cn, issuer, server=server)
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_bytes)
        key_path.chmod(0o600)
    return certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A test PKI (CA, server, client, untrusted client), generated once per session."""
    return make_certs(tmp_path_factory.mktemp("pki"))


FAST_DISPATCH: dict[str, Any] = {
    "poll_interval_s": 0.05,
    "backoff_base_s": 0.05,
    "backoff_max_s": 0.2,
    "timeout_s": 5,
    "lease_s": 5,
    "max_attempts": 4,
    "permanent_max_attempts": 2,
}


# -- results made once, and a database with their deliveries queued ------------------------------------------------


@dataclass(frozen=True)
class Made:
    """A source series and the results the pipeline built for it (binary and labelmap SEG, SR, key image)."""

    series: list[Dataset]
    built: list[BuiltOutput]


@pytest.fixture(scope="session")
def made(sphere_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Made:
    from pacs_lab.model_packages import two_spheres
    from pacs_lab.synthetic import make_oriented_series
    from pacs_node.process.results import build_outputs
    from pacs_node.process.worker import RunnerCache
    from storage.models import Job

    series = make_oriented_series(two_spheres(), rows=32, cols=32, slices=16, SeriesDescription="spheres")
    settings = settings_from_mapping(
        {
            "data_dir": str(tmp_path_factory.mktemp("made")),
            "pipelines": {"spheres": {"model": str(sphere_package)}},
            "destinations": {
                "a": {"type": "dimse", "host": "127.0.0.1", "port": 1, "ae_title": "A"},
                "b": {"type": "dimse", "host": "127.0.0.1", "port": 1, "ae_title": "B", "seg_type": "labelmap"},
            },
        }
    )
    runner = RunnerCache()(str(sphere_package), False)
    result = runner.run({"image": series})
    job = Job(pipeline="spheres", route="spheres", destinations=["a", "b"])
    built, _ = build_outputs(settings, job, result, {"image": series}, runner.manifest)
    assert sorted(b.kind.value for b in built) == ["KEY_IMAGE", "SEG", "SEG_LABELMAP", "SR"]
    return Made(series, built)


@dataclass
class Env:
    settings: Settings
    db: Database
    store: FileStore
    job_id: int

    def deliveries(self) -> list[Any]:
        from sqlalchemy import select

        from storage.models import Delivery

        with self.db.session() as s:
            return list(s.scalars(select(Delivery).order_by(Delivery.id)))

    def outputs(self) -> dict[int, Any]:
        from sqlalchemy import select

        from storage.models import Output

        with self.db.session() as s:
            return {o.id: o for o in s.scalars(select(Output))}

    def sop_uids(self, destination: str) -> set[str]:
        outs = self.outputs()
        return {outs[d.output_id].sop_uid for d in self.deliveries() if d.destination == destination}

    def states(self) -> Counter[str]:
        return Counter(d.state.value for d in self.deliveries())


def ingest(settings: Settings, db: Database, store: FileStore, series: list[Dataset], calling_ae: str) -> None:
    """Receive ``series`` through the real receive path (journal, indexer), from ``calling_ae`` at 127.0.0.1."""
    import io

    from pacs_node.receive.indexer import Indexer
    from pacs_node.receive.ingest import Ingestor

    indexer = Indexer(db, store, linger_s=0.01)
    ingestor = Ingestor(store, indexer.submit)
    indexer.start()
    try:
        for ds in series:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            ingestor.receive_bytes(buf.getvalue(), calling_ae=calling_ae, called_ae="PACSNODE", address="127.0.0.1")
        assert indexer.flush(10)
    finally:
        indexer.stop()


@pytest.fixture
def queued(
    make_settings: Callable[..., Settings], made: Made, sphere_package: Path, db_url: str
) -> Iterator[Callable[..., Env]]:
    """Make a node database with the results of one job stored and their deliveries queued.

    ``make(destinations, route=..., **settings)``: a destination named ``gone`` is
    put on the job but left out of the settings (as if removed since).
    """
    from sqlalchemy import select

    from pacs_node.common.store import open_store
    from pacs_node.process.results import store_outputs
    from storage.db import Database
    from storage.models import Job, JobState, Series

    envs: list[Env] = []

    def make(destinations: dict[str, Any], *, route: dict[str, Any] | None = None, **settings_kw: Any) -> Env:
        names = [n for n in destinations if n != "gone"]
        settings = make_settings(
            {
                "database_url": db_url,
                "pipelines": {"spheres": {"model": str(sphere_package)}},
                "destinations": {k: v for k, v in destinations.items() if k != "gone"},
                "routes": [{"name": "spheres", "pipeline": "spheres", "destinations": names, **(route or {})}],
                "dispatch": FAST_DISPATCH,
            },
            **settings_kw,
        )
        db = Database(settings.db_url)
        db.upgrade()
        store = open_store(settings)
        ingest(settings, db, store, made.series, "MODALITY")
        series_uid = str(made.series[0].SeriesInstanceUID)
        with db.session() as s:
            series = s.scalars(select(Series)).one()
            job = Job(
                study_id=series.study_id,
                pipeline="spheres",
                route="spheres",
                state=JobState.DONE,
                inputs={"image": series_uid},
                destinations=list(destinations),
                trigger_series_uid=series_uid,
            )
            s.add(job)
            s.flush()
            job_id = job.id
        store_outputs(settings, db, store, job_id, made.built)
        env = Env(settings, db, store, job_id)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.db.dispose()


def dimse(scp: RecordingSCP, **kw: Any) -> dict[str, Any]:
    """A DIMSE destination entry for a RecordingSCP."""
    return {"type": "dimse", "host": "127.0.0.1", "port": scp.port, "ae_title": scp.ae_title, **kw}


# the demo, run once per session; output tests reuse its received SEG/SR/key images
from tests.demo_support import demo_run  # noqa: E402,F401
