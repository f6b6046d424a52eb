"""Loading :class:`~pacs_node.config.model.Settings`: a YAML file or the embedded
defaults, then ``PACS_NODE_*`` environment overrides, validated once.

Validation includes compiling the routing rules (:mod:`pacs_node.config.rules`),
so that a misspelt keyword is reported at load time and not at the first series.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pacs_node.config.defaults import embedded_defaults
from pacs_node.config.model import ENV_PREFIX, Settings
from pacs_node.config.rules import compile_settings
from pacs_node.errors import ConfigError


def _set_nested(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


# PACS_NODE_* variables that are not settings keys: the configuration file, and
# the folder of the demo models (pacs_node.config.defaults).
_NOT_SETTINGS = (ENV_PREFIX + "CONFIG", ENV_PREFIX + "MODELS_DIR")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: not a valid YAML value: {exc}") from exc
        _set_nested(tree, path, value)
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def settings_from_mapping(
    data: Mapping[str, Any], *, source: str = "configuration", environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate a plain mapping into :class:`Settings`.

    Args:
        data: the settings tree.
        source: what it came from, for messages.
        environ: where ``*_env`` secrets of destinations are read (``os.environ`` by default).

    Raises:
        ConfigError: naming each bad key and why it is bad.
    """
    try:
        settings = Settings.model_validate(dict(data), context={"environ": environ})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("dimse", "dicomweb")))
            msg = err["msg"].removeprefix("Value error, ")
            if not loc and re.match(r"^[\w.\[\]]+(, [\w.\[\]]+)*: ", msg):
                lines.append(f"  {msg}")  # a cross-key check that names its key itself
            else:
                lines.append(f"  {_format_loc(loc)}: {msg}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from exc
    # Matchers are validated by the rules compiler so that a bad keyword is
    # reported here, at load time, and not at the first series.
    compile_settings(settings)
    return settings


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load settings from an optional YAML file plus ``PACS_NODE_*`` overrides.

    Args:
        path: YAML file; ``None`` uses the embedded defaults (or ``PACS_NODE_CONFIG``).
        environ: environment to read overrides from (``os.environ`` by default).

    Raises:
        ConfigError: unreadable file, bad YAML, or a key that fails validation.
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    data: dict[str, Any] = embedded_defaults(env)
    source = "embedded defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    overrides = _env_overrides(env)
    if overrides:
        data = _merge(data, overrides)
        source += " + PACS_NODE_* environment"
    return settings_from_mapping(data, source=source, environ=env)
