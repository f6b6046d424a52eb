"""Settings: embedded defaults, YAML, environment overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_node.config import LateInstancePolicy, Priority, load_settings
from pacs_node.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "pacs-node.example.yaml"


def test_embedded_defaults_need_no_file() -> None:
    s = load_settings(None, environ={})
    assert s.data_dir == Path("pacs-node-data")
    assert s.dicom.ae_title == "PACSNODE" and s.dicom.port == 11112 and s.dicom.host == "0.0.0.0"
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8080)
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("pacs-node-data/pacs-node.db")
    assert s.routing.series_quiet_s == 30 and s.routing.late_instances is LateInstancePolicy.RERUN
    # the three demo pipelines, routed to no destination until a site configures one
    assert [r.name for r in s.routes] == ["stroke-mr", "dentate-qsm", "kidney-ct-mr"]
    assert all(r.destinations == () for r in s.routes)
    models = Path(__file__).resolve().parent.parent / "models"
    expected = {k: models / k for k in ("stroke", "dentate", "kidney")}
    assert {k: Path(p.model) for k, p in s.pipelines.items()} == expected
    assert s.pipelines["stroke"].inputs["flair"].required is False


def test_settings_are_immutable() -> None:
    s = load_settings(None, environ={})
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        s.dicom.port = 1  # type: ignore[misc]


def test_commented_example_loads_and_env_overrides_nested_keys() -> None:
    env = {
        "PACS_NODE_DICOM__PORT": "104",
        "PACS_NODE_DICOM__ALLOWED_CALLING_AES": "[PACS9]",
        "PACS_NODE_ROUTING__LATE_INSTANCES": "ignore",
        "PACS_NODE_DATA_DIR": "/srv/pn",
    }
    s = load_settings(EXAMPLE, environ=env)
    assert s.dicom.port == 104
    assert s.dicom.allowed_calling_aes == ("PACS9",)
    assert s.routing.late_instances is LateInstancePolicy.IGNORE
    assert s.data_dir == Path("/srv/pn")
    assert [r.name for r in s.routes] == ["stroke-mr", "dentate-qsm", "kidney-ct-mr"]
    assert s.routes[0].priority is Priority.STAT
    stroke = s.pipelines["stroke"]
    assert stroke.reference_role == "dwi" and not stroke.per_series
    assert stroke.inputs["flair"].required is False and stroke.optional_grace_s == 10
    assert s.destinations["main-pacs"].type == "dimse"


def test_config_path_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dicom:\n  ae_title: NODE2\n")
    assert load_settings(None, environ={"PACS_NODE_CONFIG": str(cfg)}).dicom.ae_title == "NODE2"


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        ("dicom:\n  port: 70000\n", "dicom.port"),
        ("dicom:\n  prot: 104\n", "dicom.prot"),
        ("dicom:\n  ae_title: 'WAY_TOO_LONG_AE_TITLE'\n", "dicom.ae_title"),
        ("dicom:\n  allowed_hosts: ['10.0.0.0/33']\n", "dicom.allowed_hosts"),
        ("routing:\n  late_instances: sometimes\n", "routing.late_instances"),
        ("routes:\n  - name: r\n    pipeline: nope\n", "routes[0].pipeline"),
        (
            "pipelines:\n  p:\n    model: m\nroutes:\n  - name: r\n    pipeline: p\n    destinations: [pacs]\n",
            "routes[0].destinations",
        ),
        ("pipelines:\n  p:\n    model: m\n    reference: flair\n", "reference"),
        ("destinations:\n  d:\n    type: dicomweb\n    url: ftp://x\n", "destinations.d.url"),
        ("destinations:\n  d:\n    type: carrier-pigeon\n", "destinations.d"),
        (
            "pipelines:\n  p:\n    model: m\nroutes:\n  - name: r\n    pipeline: p\n"
            "    match:\n      SeriesDescriptoin: x\n",
            "routes[0].match.SeriesDescriptoin",
        ),
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, yaml_text: str, needle: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert needle in str(info.value), str(info.value)


def test_bad_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="dicom.port"):
        load_settings(None, environ={"PACS_NODE_DICOM__PORT": "eleven"})


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("dicom: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad, environ={})
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad, environ={})
