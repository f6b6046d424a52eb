"""Typed, immutable settings for the node.

One :class:`Settings` object is loaded once in ``main()`` (from a YAML file given
with ``--config``, then ``PACS_NODE_*`` environment overrides) and passed down.
Nothing in the node reads the environment or a config global anywhere else.

Environment overrides use ``__`` to reach nested keys and are parsed as YAML
scalars, so ``PACS_NODE_DICOM__PORT=11113`` sets ``dicom.port`` to the integer
11113 and ``PACS_NODE_DICOM__ALLOWED_CALLING_AES='[PACS1, PACS2]'`` sets a list.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pacs_node.errors import ConfigError

ENV_PREFIX = "PACS_NODE_"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1-16


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Priority(str, enum.Enum):
    """Job priority; STAT jobs are claimed first."""

    STAT = "stat"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Smaller runs first."""
        return {"stat": 0, "normal": 1, "low": 2}[self.value]


class LateInstancePolicy(str, enum.Enum):
    """What to do when an instance arrives after its series was routed."""

    RERUN = "rerun"
    IGNORE = "ignore"


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value


class DicomSettings(_Frozen):
    """The DIMSE side: the SCP that PACS send to."""

    ae_title: str = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535, description="0 picks a free port (tests)")
    max_associations: int = Field(16, ge=1, description="concurrent associations before rejecting")
    max_pdu_size: int = Field(
        262_144, ge=4096, le=16_777_216, description="largest P-DATA PDU we accept; longer ones abort"
    )
    allowed_calling_aes: tuple[str, ...] = Field(
        (), description="calling AE titles allowed to associate; empty allows any (logged at start)"
    )
    allowed_hosts: tuple[str, ...] = Field(
        (), description="source addresses or networks (CIDR) allowed; empty allows any"
    )
    require_called_ae: bool = True
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    processes: int = Field(
        1, ge=1, le=64, description="SCP processes sharing the port (SO_REUSEPORT); 1 keeps everything in one"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae(x) for x in v)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from exc
        return v


class HttpSettings(_Frozen):
    """The HTTP side (DICOMweb, API, dashboard; served from a later issue on)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)


class StorageSettings(_Frozen):
    """The file store under ``data_dir``."""

    min_free_mb: int = Field(
        1024, ge=0, description="refuse instances (out of resources) when free space falls below this"
    )
    fsync: bool = Field(True, description="fsync every instance before acknowledging it (keep on in production)")


class RoutingSettings(_Frozen):
    """Series completion and routing."""

    series_quiet_s: float = Field(30.0, ge=0, description="a series quiet this long is complete")
    late_instances: LateInstancePolicy = LateInstancePolicy.RERUN
    poll_interval_s: float = Field(1.0, gt=0)


class WorkerSettings(_Frozen):
    """The inference worker processes that ``pacs-node serve`` supervises."""

    processes: int = Field(1, ge=0, le=64, description="worker processes; 0 runs no inference in serve")
    poll_interval_s: float = Field(0.5, gt=0)
    max_attempts: int = Field(2, ge=1, description="runs of a job whose worker died before it is failed")


class OutputSettings(_Frozen):
    """Result objects: series numbers (the same for every study, so viewers sort them last)."""

    seg_series_number: int = Field(9001, ge=1)
    sr_series_number: int = Field(9002, ge=1)
    key_image_series_number: int = Field(9003, ge=1)
    notice_series_number: int = Field(9004, ge=1)
    key_image: bool = Field(True, description="burn the overlay into a Secondary Capture for viewers without SEG")


class RetentionSettings(_Frozen):
    """Purging of received inputs and produced results; ``null`` keeps forever."""

    inputs_days: float | None = Field(7.0, ge=0, description="days after a study's jobs finished")
    results_days: float | None = Field(7.0, ge=0, description="days after results were delivered")
    interval_s: float = Field(3600.0, gt=0)


class DimseDestination(_Frozen):
    """A DIMSE C-STORE peer (sending comes in a later issue)."""

    type: Literal["dimse"]
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str
    seg_type: Literal["binary", "labelmap"] = "binary"

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class DicomwebDestination(_Frozen):
    """A DICOMweb STOW-RS endpoint (sending comes in a later issue)."""

    type: Literal["dicomweb"]
    url: str
    seg_type: Literal["binary", "labelmap"] = "binary"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("must start with http:// or https://")
        return v


Destination = Annotated[DimseDestination | DicomwebDestination, Field(discriminator="type")]

# A matcher is a mapping of DICOM keywords (or the combinators all/any/not) to
# conditions; pacs_node.rules validates and compiles it.
Matcher = dict[str, Any]


class PipelineInput(_Frozen):
    """One series role a pipeline consumes."""

    match: Matcher = Field(default_factory=dict)
    required: bool = True


class PipelineSettings(_Frozen):
    """A segmentation pipeline: the model package and the series it needs."""

    model: str = Field(description="path of the model package folder")
    inputs: dict[str, PipelineInput] = Field(
        default_factory=lambda: {"image": PipelineInput()},
        description="role name -> matcher; one role means one job per series, several mean one per study",
    )
    reference: str | None = Field(None, description="role whose grid the results live on (default: first required)")
    optional_grace_s: float = Field(10.0, ge=0)
    study_timeout_s: float = Field(300.0, gt=0, description="how long to wait for required inputs")
    time_limit_s: float = Field(900.0, gt=0, description="a job running longer is stopped and failed")
    device: Literal["auto", "cpu"] = Field("auto", description="auto uses a GPU when present")

    @model_validator(mode="after")
    def _roles(self) -> PipelineSettings:
        if not self.inputs:
            raise ValueError("inputs: at least one role is needed")
        if not any(i.required for i in self.inputs.values()):
            raise ValueError("inputs: at least one role must be required")
        if self.reference is not None and self.reference not in self.inputs:
            raise ValueError(f"reference: {self.reference!r} is not one of the inputs {sorted(self.inputs)}")
        return self

    @property
    def reference_role(self) -> str:
        """The role whose grid results live on."""
        if self.reference:
            return self.reference
        return next(name for name, i in self.inputs.items() if i.required)

    @property
    def per_series(self) -> bool:
        """One job per matching series (single input) rather than one per study."""
        return len(self.inputs) == 1


class RouteSettings(_Frozen):
    """A routing rule: which series go to which pipeline and where results go."""

    name: str
    match: Matcher = Field(default_factory=dict)
    calling_ae: str | None = Field(None, description="regex (full match, case-insensitive) on the calling AE")
    called_ae: str | None = Field(None, description="regex (full match, case-insensitive) on the called AE")
    pipeline: str
    destinations: tuple[str, ...] = ()
    priority: Priority = Priority.NORMAL
    not_processed_notice: bool = Field(
        False, description="when a job fails for its input, send a short SR saying the AI did not run and why"
    )

    @field_validator("calling_ae", "called_ae")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
        return v


class Settings(_Frozen):
    """Everything the node needs, validated once."""

    data_dir: Path = Path("./pacs-node-data")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dicom: DicomSettings = Field(default_factory=DicomSettings)  # type: ignore[arg-type]
    http: HttpSettings = Field(default_factory=HttpSettings)  # type: ignore[arg-type]
    storage: StorageSettings = Field(default_factory=StorageSettings)  # type: ignore[arg-type]
    routing: RoutingSettings = Field(default_factory=RoutingSettings)  # type: ignore[arg-type]
    retention: RetentionSettings = Field(default_factory=RetentionSettings)  # type: ignore[arg-type]
    worker: WorkerSettings = Field(default_factory=WorkerSettings)  # type: ignore[arg-type]
    outputs: OutputSettings = Field(default_factory=OutputSettings)  # type: ignore[arg-type]
    destinations: dict[str, Destination] = Field(default_factory=dict)
    pipelines: dict[str, PipelineSettings] = Field(default_factory=dict)
    routes: tuple[RouteSettings, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> Settings:
        names = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                raise ValueError(f"routes[{i}].name: duplicate route name {route.name!r}")
            names.add(route.name)
            if route.pipeline not in self.pipelines:
                raise ValueError(
                    f"routes[{i}].pipeline: {route.pipeline!r} is not defined under pipelines "
                    f"(known: {sorted(self.pipelines) or 'none'})"
                )
            for dest in route.destinations:
                if dest not in self.destinations:
                    raise ValueError(
                        f"routes[{i}].destinations: {dest!r} is not defined under destinations "
                        f"(known: {sorted(self.destinations) or 'none'})"
                    )
        return self

    # -- derived paths -------------------------------------------------------
    @property
    def store_dir(self) -> Path:
        """Root of the file store."""
        return self.data_dir / "store"

    @property
    def results_dir(self) -> Path:
        """Where jobs write their label volumes and result objects."""
        return self.data_dir / "results"

    @property
    def db_url(self) -> str:
        """The database URL in effect."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'pacs-node.db').resolve()}"


def _set_nested(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
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


def settings_from_mapping(data: Mapping[str, Any], *, source: str = "configuration") -> Settings:
    """Validate a plain mapping into :class:`Settings`.

    Raises:
        ConfigError: naming each bad key and why it is bad.
    """
    try:
        settings = Settings.model_validate(dict(data))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("dimse", "dicomweb")))
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {_format_loc(loc)}: {msg}")
        raise ConfigError(f"invalid {source}:\n" + "\n".join(lines)) from exc
    # Matchers are validated by the rules compiler so that a bad keyword is
    # reported here, at load time, and not at the first series.
    from pacs_node.rules import compile_settings  # local: rules imports config

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
    data: dict[str, Any] = {}
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
    return settings_from_mapping(data, source=source)
