"""Support for the distributed-mode tests: brokers on loopback, `pacs-node serve` and
`pacs-node worker` as real child processes, and the node's settings for them.

Brokers: RabbitMQ at ``PACS_NODE_TEST_AMQP`` (default ``amqp://guest@127.0.0.1:5672//``,
password ``PACS_NODE_TEST_AMQP_PASSWORD`` or ``guest``) and Redis at
``PACS_NODE_TEST_REDIS`` (default ``redis://127.0.0.1:6379/0``). When CI is set
they are mandatory: an unreachable broker fails the test instead of skipping it.
Every test gets queues of its own (a random ``queue.queue_prefix``), deleted at
teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import FAST_DISPATCH, free_port, wait_for

AMQP_URL = os.environ.get("PACS_NODE_TEST_AMQP", "amqp://guest@127.0.0.1:5672//")
AMQP_PASSWORD = os.environ.get("PACS_NODE_TEST_AMQP_PASSWORD", "guest")
REDIS_URL = os.environ.get("PACS_NODE_TEST_REDIS", "redis://127.0.0.1:6379/0")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Broker:
    """A reachable broker: its URL (no password) and a file holding the password, if any."""

    url: str
    password_file: Path | None

    def queue_settings(self, prefix: str, **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "celery", "broker_url": self.url, "queue_prefix": prefix, **kw}
        if self.password_file is not None:
            out["broker_password_file"] = str(self.password_file)
        return out


def _reachable(url: str, password: str | None) -> str | None:
    """None when the broker answers, else why not."""
    from kombu import Connection

    full = url
    if password:
        scheme, _, rest = url.partition("://")
        user, _, host = rest.partition("@")
        full = f"{scheme}://{user}:{password}@{host}"
    try:
        with Connection(full, connect_timeout=3, transport_options={"max_retries": 0}) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _require(url: str, password: str | None, name: str) -> None:
    problem = _reachable(url, password)
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} at {url} is not reachable ({problem}); in CI its tests are mandatory")
        pytest.skip(f"{name} at {url} not reachable ({problem})")


@pytest.fixture(scope="session")
def amqp(tmp_path_factory: pytest.TempPathFactory) -> Broker:
    """RabbitMQ on loopback (fails in CI, skips elsewhere, when it is down)."""
    _require(AMQP_URL, AMQP_PASSWORD, "RabbitMQ")
    secret = tmp_path_factory.mktemp("broker") / "amqp-password"
    secret.write_text(AMQP_PASSWORD + "\n")
    secret.chmod(0o600)
    return Broker(AMQP_URL, secret)


@pytest.fixture(scope="session")
def redis_broker() -> Broker:
    """Redis on loopback (fails in CI, skips elsewhere, when it is down)."""
    _require(REDIS_URL, None, "Redis")
    return Broker(REDIS_URL, None)


def new_prefix() -> str:
    """A queue prefix of one test's own."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def drop_queues() -> Iterator[list[Any]]:
    """Append the Settings of each distributed node a test makes: their queues are deleted at teardown."""
    made: list[Any] = []
    yield made
    for settings in made:
        delete_queues(settings)


def delete_queues(settings: Any) -> None:
    """Remove the test's queues from the broker (best effort)."""
    from pacs_node.process.celery_app import is_redis, make_celery

    app = make_celery(settings)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            if is_redis(settings):
                client = conn.default_channel.client
                for group in settings.queue.all_groups:
                    name = settings.queue.queue_name(group)
                    keys = [name, *(f"{name}\x06\x16{p}" for p in range(10))]
                    client.delete(*keys)
            else:
                for group in settings.queue.all_groups:
                    conn.default_channel.queue_delete(settings.queue.queue_name(group))
    except Exception:
        pass
    finally:
        app.close()


def distributed_config(
    tmp_path: Path,
    *,
    database_url: str,
    broker: Broker,
    prefix: str,
    pipelines: dict[str, Any] | None = None,
    routes: list[dict[str, Any]] | None = None,
    groups: dict[str, str] | None = None,
    destinations: dict[str, Any] | None = None,
    queue: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A distributed-mode settings tree with fast test timings (lease 3 s, heartbeat 0.5 s).

    Series sent to it should carry ``ImagesInAcquisition``: they are complete when
    that many have arrived (the quiet period is a minute).
    """
    return {
        "data_dir": str(tmp_path / "data"),
        "database_url": database_url,
        "log_level": "INFO",
        "dicom": {"host": "127.0.0.1", "port": free_port()},
        "http": {"enabled": False},
        "storage": {"min_free_mb": 0},
        # Series complete by their header (ImagesInAcquisition): a slow sender never splits one.
        "routing": {"series_quiet_s": 60, "poll_interval_s": 0.1},
        "retention": {"inputs_days": None, "results_days": None},
        "worker": {"max_attempts": 3},
        "dispatch": FAST_DISPATCH,
        "queue": broker.queue_settings(
            prefix, groups=groups or {}, lease_s=3.0, heartbeat_s=0.5, poll_interval_s=0.1, **(queue or {})
        ),
        "destinations": destinations or {},
        "pipelines": pipelines or {},
        "routes": routes or [],
        **extra,
    }


def _child_env(threads: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_NODE_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    return env


class ChildProcess:
    """``python -m pacs_node --config CFG <args>`` in its own process group, logging to a file."""

    def __init__(self, config: Path, args: list[str], log_dir: Path, name: str) -> None:
        self.config = config
        self.args = args
        self.log_dir = log_dir
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.runs}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(
            (self.log_dir / f"{self.name}-{i}.log").read_text(errors="replace")
            for i in range(1, self.runs + 1)
            if (self.log_dir / f"{self.name}-{i}.log").exists()
        )

    def spawn(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        self.runs += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pacs_node", "--config", str(self.config), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                cwd=self.log_dir,
                start_new_session=True,  # its own process group: kill() takes its pool processes too
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-6000:]}")

    def wait_log(self, needle: str, timeout: float, what: str | None = None) -> None:
        def seen() -> bool:
            self.check_alive()
            return needle in self.log()

        wait_for(seen, timeout, 0.1, what or f"{self.name} to log {needle!r}")

    def kill(self) -> None:
        """SIGKILL to the whole process group: as if the host died; no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (warm shutdown) and wait; SIGKILL when it does not stop in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        try:  # pool processes left behind, if any
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return int(self.proc.returncode)


@pytest.fixture
def children() -> Iterator[list[ChildProcess]]:
    """Every child process a test starts is killed at teardown, whatever happened."""
    made: list[ChildProcess] = []
    yield made
    for child in made:
        child.kill()


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_worker(
    children: list[ChildProcess],
    config: Path,
    log_dir: Path,
    name: str,
    queues: str,
    *,
    wait: bool = False,
    timeout: float = 90,
) -> ChildProcess:
    """``pacs-node worker --queues QUEUES --concurrency 1 --threads 1 --name NAME@test``."""
    worker = ChildProcess(
        config,
        [
            "worker",
            "--queues",
            queues,
            "--concurrency",
            "1",
            "--threads",
            "1",
            "--name",
            f"{name}@test",
            "--wait",
            "60",
        ],
        log_dir,
        name,
    )
    children.append(worker)
    worker.spawn()
    if wait:
        worker.wait_log(f"worker {name}@test ready", timeout)
    return worker
