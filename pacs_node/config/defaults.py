"""The embedded defaults: what ``pacs-node serve`` runs with no configuration file.

``defaults.yaml`` (beside this module) holds the three demo pipelines and their
routes; ``{models}`` in a model path is the folder of the shipped demo models
(``models/`` beside the source tree, or ``PACS_NODE_MODELS_DIR``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pacs_node.errors import ConfigError

__all__ = ["DEFAULTS_FILE", "embedded_defaults", "models_dir"]

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")


def models_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the shipped demo model packages are."""
    env = os.environ if environ is None else environ
    if env.get("PACS_NODE_MODELS_DIR"):
        return Path(env["PACS_NODE_MODELS_DIR"]).resolve()
    return Path(__file__).resolve().parents[2] / "models"  # pacs_node/config/ -> the source tree


def embedded_defaults(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The default settings tree (pipelines and routes of the demo models)."""
    text = DEFAULTS_FILE.read_text(encoding="utf-8").replace("{models}", str(models_dir(environ)))
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{DEFAULTS_FILE}: the embedded defaults are not a mapping (a broken installation)")
    return data
