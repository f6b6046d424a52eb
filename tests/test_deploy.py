"""deploy/: the compose file validates with docker-compose, the Dockerfile installs like
scripts/install.sh, the example configurations load and agree with the code, and the
systemd units are well-formed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pacs_node.app.cli import build_parser
from pacs_node.config import Settings, load_settings
from pacs_node.config.defaults import embedded_defaults
from pacs_node.errors import ConfigError
from tests.conftest import require_program

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SECRETS = {"POSTGRES_PASSWORD": "pg-test", "RABBITMQ_PASSWORD": "mq-test", "HTTP_TOKEN": "token-test"}


def _compose(*args: str, env: dict[str, str], overlays: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    exe = require_program("docker-compose")  # Debian's docker-compose; `config` needs no engine
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("COMPOSE_")}
    files = [arg for name in ("docker-compose.yml", *overlays) for arg in ("-f", str(DEPLOY / name))]
    return subprocess.run(
        [exe, *files, *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=REPO,
        timeout=60,
    )


def _load(name: str, **environ: str) -> Settings:
    return load_settings(DEPLOY / name, environ=environ)


def test_compose_file_validates_and_describes_the_site() -> None:
    proc = _compose("config", env=SECRETS)
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    services = config["services"]
    assert set(services) == {"node", "worker", "db", "broker", "orthanc"}
    node, worker = services["node"], services["worker"]
    assert node["command"] == ["serve"]
    # node and worker share the data volume at data_dir and run with deploy/distributed.yaml
    settings = _load("distributed.yaml", RABBITMQ_PASSWORD="x")
    for svc in (node, worker):
        volumes = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert volumes[str(settings.data_dir)] == "pacs-data"
        assert Path(volumes["/etc/pacs-node/pacs-node.yaml"]).resolve() == DEPLOY / "distributed.yaml"
        # the secrets the settings name come from the environment compose fills in
        assert svc["environment"][settings.queue.broker_password_env] == "mq-test"
        assert svc["environment"]["PGPASSWORD"] == "pg-test"
    assert node["environment"]["HTTP_TOKEN"] == "token-test" and settings.http.token_env == "HTTP_TOKEN"
    # the worker has a GPU and consumes every group a pipeline goes to
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    args = build_parser().parse_args(["--config", "x", *worker["command"]])
    assert args.func.__name__ == "cmd_worker" and args.concurrency == 1
    assert set(args.queues.split(",")) == {settings.queue.group_of(p) for p in settings.pipelines}
    assert "cu1" in worker["build"]["args"]["TORCH_INDEX_URL"]
    assert node["build"]["dockerfile"] == worker["build"]["dockerfile"] == "deploy/Dockerfile"
    # the database and broker the settings point at are the compose services
    assert "@db:5432/pacsnode" in (settings.database_url or "")
    assert services["db"]["environment"]["POSTGRES_DB"] == "pacsnode"
    assert (settings.queue.broker_url or "").startswith("amqp://pacsnode@broker:5672/")
    assert services["broker"]["environment"]["RABBITMQ_DEFAULT_VHOST"] == settings.queue.broker_url.rsplit("/", 1)[1]
    # Orthanc: DICOMweb on, pacs-node known as a modality, the settings' destination
    orthanc = services["orthanc"]["environment"]
    assert orthanc["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert yaml.safe_load(orthanc["ORTHANC__DICOM_MODALITIES"])["pacsnode"][0] == settings.dicom.ae_title
    dest = settings.destinations["orthanc"]
    assert (dest.type, getattr(dest, "host", None), getattr(dest, "ae_title", None)) == ("dimse", "orthanc", "ORTHANC")


def test_compose_refuses_to_start_without_its_secrets() -> None:
    proc = _compose("config", env={k: v for k, v in SECRETS.items() if k != "POSTGRES_PASSWORD"})
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


def test_the_viewer_overlay_gives_the_node_the_ohif_the_tests_use() -> None:
    """deploy/ohif/compose.viewer.yml on top of the site: OHIF fetched once into a volume the node serves."""
    proc = _compose("config", env=SECRETS, overlays=("ohif/compose.viewer.yml",))
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert set(services) == {"node", "worker", "db", "broker", "orthanc", "ohif-fetch"}
    node, fetch = services["node"], services["ohif-fetch"]
    # the same OHIF release scripts/install_viewer.sh installs for the viewer tests
    pinned = re.search(r'OHIF_VERSION="\$\{OHIF_VERSION:-([\d.]+)\}"', (REPO / "scripts/install_viewer.sh").read_text())
    assert pinned is not None
    script = " ".join(fetch["command"])
    assert f"@ohif/app@{pinned.group(1)}" in script
    viewer_dir = node["environment"]["PACS_NODE_HTTP__VIEWER_DIR"]
    assert viewer_dir == f"/opt/ohif/{pinned.group(1)}/dist" and f"mv package/dist {viewer_dir}" in script
    assert "ohif:/opt/ohif:ro" in node["volumes"] and fetch["volumes"] == ["ohif:/opt/ohif:rw"]
    assert "pacs-data:/var/lib/pacs-node:rw" in node["volumes"]  # the site's own mounts stay
    assert node["depends_on"]["ohif-fetch"]["condition"] == "service_completed_successfully"
    # the variable is the node's own setting, and the worker does not need the viewer
    settings = _load("distributed.yaml", RABBITMQ_PASSWORD="x", PACS_NODE_HTTP__VIEWER_DIR=viewer_dir)
    assert str(settings.http.viewer_dir) == viewer_dir
    assert "PACS_NODE_HTTP__VIEWER_DIR" not in services["worker"].get("environment", {})


def _pip_steps(lines: list[str]) -> list[str]:
    """The pip install commands in order: 'torch==X' for the torch step, 'project' for the node."""
    steps = []
    for line in lines:
        if "pip install" not in line or "--upgrade pip" in line:
            continue
        if m := re.search(r"\btorch==([\w.+]+)", line):
            steps.append(f"torch=={m.group(1)}")
        elif "-c constraints.txt" in line:
            steps.append("project")
    return steps


def _logical_lines(text: str) -> list[str]:
    return [ln for ln in text.replace("\\\n", " ").splitlines() if not ln.strip().startswith("#")]


def test_dockerfile_installs_like_install_sh() -> None:
    dockerfile = _logical_lines((DEPLOY / "Dockerfile").read_text())
    install_sh = _logical_lines((REPO / "scripts" / "install.sh").read_text())
    (pin,) = [ln.strip() for ln in (REPO / "constraints.txt").read_text().splitlines() if ln.startswith("torch==")]
    runs = [ln for ln in dockerfile if ln.startswith("RUN ")]
    assert _pip_steps(runs) == [pin, "project"], runs
    assert _pip_steps(install_sh)[:1] == [pin] and set(_pip_steps(install_sh)[1:]) == {"project"}, install_sh
    # the image installs the project from its source (not editable) with the same constraints
    project = next(ln for ln in runs if "-c constraints.txt" in ln)
    assert "-e " not in project and '"$spec"' in project
    assert any(ln.startswith("COPY constraints.txt") for ln in dockerfile)
    # CPU by default, CUDA by build argument
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    torch_step = next(ln for ln in runs if "torch==" in ln)
    assert '--index-url "$TORCH_INDEX_URL"' in torch_step
    # the demo models are where the image's settings and PACS_NODE_MODELS_DIR expect them
    assert any("PACS_NODE_MODELS_DIR=/opt/pacs-node/models" in ln for ln in dockerfile)
    settings = _load("distributed.yaml", RABBITMQ_PASSWORD="x")
    assert all(p.model.startswith("/opt/pacs-node/models/") for p in settings.pipelines.values())


@pytest.mark.parametrize("name", ["embedded.yaml", "distributed.yaml", "pacs-node.example.yaml"])
def test_example_configurations_load_and_carry_the_demo_pipelines(name: str) -> None:
    settings = _load(name, RABBITMQ_PASSWORD="x", HTTP_TOKEN="t", ARCHIVE_TOKEN="t")
    assert settings.distributed is (name == "distributed.yaml")
    if name == "pacs-node.example.yaml":
        return
    defaults = embedded_defaults({})
    for pipeline, spec in defaults["pipelines"].items():
        ours = settings.pipelines[pipeline]
        assert {r: i.match for r, i in ours.inputs.items()} == {r: i["match"] for r, i in spec["inputs"].items()}
        assert Path(ours.model).name == pipeline
    assert [r.name for r in settings.routes] == [r["name"] for r in defaults["routes"]]


def test_distributed_example_needs_its_broker_password() -> None:
    settings = _load("distributed.yaml")
    with pytest.raises(ConfigError, match="queue.broker_password_env: environment variable RABBITMQ_PASSWORD"):
        settings.queue.broker_connection_url()


def test_systemd_units_are_valid_and_run_the_documented_commands(tmp_path: Path) -> None:
    serve = (DEPLOY / "systemd" / "pacs-node-serve.service").read_text()
    worker = (DEPLOY / "systemd" / "pacs-node-worker@.service").read_text()
    exec_serve = re.search(r"^ExecStart=(.*)$", serve, re.M)
    exec_worker = re.search(r"^ExecStart=(.*)$", worker, re.M)
    assert exec_serve and exec_worker
    assert shlex.split(exec_serve.group(1))[1:] == ["serve"]
    argv = shlex.split(exec_worker.group(1).replace("${QUEUES}", "neuro").replace("${CONCURRENCY}", "1"))
    args = build_parser().parse_args(argv[1:])
    assert args.func.__name__ == "cmd_worker" and args.queues == "neuro" and args.concurrency == 1
    assert "Environment=QUEUES=%i" in worker and "KillSignal=SIGTERM" in worker
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (the units' commands were checked)")
    exe = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "pacs-node")
    for name, text in (("pacs-node-serve.service", serve), ("pacs-node-worker@neuro.service", worker)):
        (tmp_path / name).write_text(text.replace("/opt/pacs-node/.venv/bin/pacs-node", exe))
    proc = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / n) for n in os.listdir(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 0 and not problems, problems
