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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_node.config import Settings, settings_from_mapping

PG_URL = os.environ.get("PACS_NODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Build Settings rooted in tmp_path, with fast test timings; kwargs deep-merge."""

    def factory(data: dict[str, Any] | None = None, **kw: Any) -> Settings:
        base: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "dicom": {"host": "127.0.0.1", "port": 0},
            "storage": {"min_free_mb": 0},
            "routing": {"series_quiet_s": 1.0, "poll_interval_s": 0.1},
            "retention": {"inputs_days": None},
            "worker": {"processes": 0, "poll_interval_s": 0.1},
        }
        merged = _deep_merge(base, data or {})
        merged = _deep_merge(merged, kw)
        return settings_from_mapping(merged, source="test settings")

    return factory


@pytest.fixture
def run_node() -> Iterator[Callable[[Settings], Any]]:
    """Start a Node in-process (SCP on a free port); stopped at teardown."""
    from pacs_node.service import Node

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
    from tests.model_packages import build_sphere_package

    return build_sphere_package(tmp_path_factory.mktemp("sphere-package"))


@pytest.fixture(scope="session")
def tiny_nnunet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, real nnU-Net v2 results folder planned by nnU-Net and trained briefly (about a minute)."""
    import importlib.util

    if importlib.util.find_spec("nnunetv2") is None:
        if os.environ.get("CI"):
            pytest.fail("nnunetv2 is not installed; CI installs it (scripts/install.sh --dev)")
        pytest.skip("nnunetv2 is not installed")
    from tests.tiny_nnunet import build_tiny_nnunet

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
