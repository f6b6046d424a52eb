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
import logging
import os
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pacs_node.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "PACS_NODE_"
#: Host names that mean this machine.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 1-16
_DEST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # fits delivery.destination; never "@sender"


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


class DicomTlsSettings(_Frozen):
    """DICOM TLS on the SCP's port (TLS 1.2 or later; the port then speaks TLS only).

    Client certificates are verified against ``ca_file`` by default; a client
    without a certificate signed by it is refused during the handshake.
    """

    cert_file: Path = Field(description="PEM certificate (chain) the node presents")
    key_file: Path = Field(description="PEM private key of cert_file")
    ca_file: Path | None = Field(None, description="PEM CA certificates that sign the clients' certificates")
    require_client_cert: bool = Field(True, description="refuse clients without a certificate signed by ca_file")
    handshake_timeout_s: float = Field(30.0, gt=0, description="a client that does not finish its handshake is cut")

    @model_validator(mode="after")
    def _ca(self) -> DicomTlsSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError(
                "ca_file: needed to verify client certificates (or set require_client_cert: false "
                "to accept any client that completes the handshake)"
            )
        return self


class DicomSettings(_Frozen):
    """The DIMSE side: the SCP that PACS send to.

    One peer cannot stop the node: a connection must send its association request
    within ``acse_timeout_s``, each PDU must arrive whole within
    ``network_timeout_s`` of its first byte (and nothing at all for that long
    ends an association), connections are counted at accept (``max_connections``,
    ``max_connections_per_host``; more are closed at once), and only associations
    past their request, from allowed hosts, count toward ``max_associations``.
    """

    ae_title: str = "PACSNODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535, description="0 picks a free port (tests)")
    max_associations: int = Field(
        16, ge=1, description="associations at once (counted once requested); more are rejected (local limit)"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="TCP connections open at once, associated or not; more are closed at accept "
        "(default: twice max_associations; at least max_associations)",
    )
    max_connections_per_host: int = Field(
        8, ge=1, description="TCP connections one source address may hold at once; more are closed at accept"
    )
    listen_backlog: int = Field(128, ge=1, le=65535, description="connections the kernel queues before accept")
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
    acse_timeout_s: float = Field(
        30.0, gt=0, description="a connection that has not sent its association request by then is closed"
    )
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(
        60.0,
        gt=0,
        description="an association silent this long, or a PDU not whole this long after its first byte, "
        "is ended and its connection closed",
    )
    processes: int = Field(
        1, ge=1, le=64, description="SCP processes sharing the port (SO_REUSEPORT); 1 keeps everything in one"
    )
    tls: DicomTlsSettings | None = Field(None, description="DICOM TLS on the port; absent: plain TCP")

    @model_validator(mode="after")
    def _connections(self) -> DicomSettings:
        if self.max_connections is not None and self.max_connections < self.max_associations:
            raise ValueError(
                f"max_connections ({self.max_connections}) must be at least max_associations "
                f"({self.max_associations}): every association holds a connection"
            )
        return self

    @property
    def connection_limit(self) -> int:
        """``max_connections``, or twice ``max_associations`` when not set."""
        return self.max_connections if self.max_connections is not None else 2 * self.max_associations

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
    """The HTTP side of ``serve``: DICOMweb (STOW/QIDO/WADO), JSON API, /metrics, dashboard.

    The bearer token is never written in the YAML in clear: it is read from
    ``token_file`` or from the environment variable named by ``token_env``.
    Without a token the server only binds to a loopback address, unless
    ``allow_remote_without_token`` says so explicitly.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port (tests)")
    token_file: Path | None = Field(None, description="file holding the bearer token")
    token_env: str | None = Field(None, description="environment variable holding the bearer token")
    allow_remote_without_token: bool = Field(
        False, description="bind a non-loopback address with no token (only behind an authenticating proxy)"
    )
    public_url: str | None = Field(None, description="base URL clients see (for DICOMweb retrieve URLs)")
    viewer_dir: Path | None = Field(
        None,
        description="OHIF v3's prebuilt dist/ folder, served so that /viewer?StudyInstanceUIDs=... opens a study "
        "(scripts/install_viewer.sh fetches it into .cache/ohif/<version>/dist)",
    )
    viewer_url: str | None = Field(
        None,
        description="a viewer of your own, for the dashboard's study links when viewer_dir is not set; "
        "{study_uid} is replaced, e.g. https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}",
    )
    dashboard: bool = Field(True, description="serve the dashboard under /ui/ (studies, jobs, deliveries, rules)")
    dashboard_refresh_s: float = Field(
        5.0, ge=0, description="how often dashboard pages refresh their content in place; 0 turns it off"
    )

    @field_validator("viewer_url")
    @classmethod
    def _viewer_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://", v) or "{study_uid}" not in v:
            raise ValueError("must be an http(s) URL holding {study_uid}, where the study's UID goes")
        return v


class StorageSettings(_Frozen):
    """The file store under ``data_dir``, and what the receive path (C-STORE and STOW-RS) accepts into it."""

    min_free_mb: int = Field(
        1024,
        ge=0,
        description="refuse instances (out of resources) when free space falls below this, also while one streams in",
    )
    fsync: bool = Field(True, description="fsync every instance before acknowledging it (keep on in production)")
    max_instance_mb: int = Field(
        2048,
        ge=1,
        description="largest instance accepted, as received and, for Deflated Explicit VR Little Endian, once "
        "inflated; a larger one is refused (out of resources) while it streams in",
    )
    max_pixel_mb: int = Field(
        2048,
        ge=1,
        description="largest decoded image an instance may declare (Rows x Columns x samples x bits x frames); "
        "a larger one is refused (out of resources)",
    )


class RoutingSettings(_Frozen):
    """Series completion and routing."""

    series_quiet_s: float = Field(30.0, ge=0, description="a series quiet this long is complete")
    late_instances: LateInstancePolicy = LateInstancePolicy.RERUN
    poll_interval_s: float = Field(1.0, gt=0)


class WorkerSettings(_Frozen):
    """The inference worker processes that ``pacs-node serve`` supervises (embedded mode).

    ``max_attempts`` applies in both modes; ``processes`` and ``poll_interval_s``
    only to the embedded mode (with ``queue.backend: celery``, serve runs no
    inference and ``pacs-node worker`` processes do).
    """

    processes: int = Field(1, ge=0, le=64, description="worker processes; 0 runs no inference in serve")
    poll_interval_s: float = Field(0.5, gt=0)
    max_attempts: int = Field(2, ge=1, description="runs of a job whose worker died before it is failed")
    preload: bool = Field(
        True,
        description="load every pipeline's model (and torch) when a worker starts and run one warm-up "
        "prediction, so that the first job of the day is as fast as the next",
    )


_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss")


class QueueSettings(_Frozen):
    """Where inference jobs run: ``embedded`` (worker processes of ``serve``, SQLite or PostgreSQL)
    or ``celery`` (``pacs-node worker`` processes on any number of hosts, PostgreSQL only).

    In ``celery`` mode ``serve`` publishes each PENDING job to the queue of its
    pipeline's group (``groups``; ``default_group`` for a pipeline not named
    there) and re-publishes jobs whose worker stopped renewing its lease. The
    broker's password never stands in the URL: it comes from
    ``broker_password_file`` or the environment variable ``broker_password_env``.
    """

    backend: Literal["embedded", "celery"] = Field(
        "embedded", description="embedded: one process, no broker; celery: workers consume broker queues"
    )
    broker_url: str | None = Field(
        None, description="amqp://user@host:5672/vhost (RabbitMQ) or redis://host:6379/0; no password in it"
    )
    broker_password_file: Path | None = Field(None, description="file holding the broker password")
    broker_password_env: str | None = Field(None, description="environment variable holding the broker password")
    groups: dict[str, str] = Field(
        default_factory=dict, description="pipeline -> group; each group is one queue, e.g. {stroke: neuro}"
    )
    default_group: str = Field("default", description="group of a pipeline not named in groups")
    queue_prefix: str = Field(
        "pacs-node.", description="broker queue of a group: prefix + group (e.g. pacs-node.neuro)"
    )
    lease_s: float = Field(
        60.0, gt=0, description="a RUNNING job whose worker sent no heartbeat this long is re-published"
    )
    heartbeat_s: float = Field(10.0, gt=0, description="how often a worker renews the lease of its job")
    poll_interval_s: float = Field(0.5, gt=0, description="how often serve publishes PENDING jobs and reaps leases")
    republish_s: float = Field(
        1800.0,
        gt=0,
        description="a PENDING job published this long ago and not started is published again (a lost message); "
        "a duplicate message is a no-op",
    )
    visibility_timeout_s: float = Field(
        7200.0, gt=0, description="Redis only: an unacknowledged message is redelivered after this"
    )
    publish_timeout_s: float = Field(10.0, gt=0, description="connect/publish timeout towards the broker")

    _env_secret: str | None = PrivateAttr(None)

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in _BROKER_SCHEMES:
            raise ValueError(f"must start with one of {', '.join(s + '://' for s in _BROKER_SCHEMES)}")
        netloc = rest.split("/", 1)[0]
        if "@" in netloc and ":" in netloc.rsplit("@", 1)[0]:
            raise ValueError(
                "no password in the URL (it would end up in logs): use broker_password_file or broker_password_env"
            )
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: dict[str, str]) -> dict[str, str]:
        for pipeline, group in v.items():
            if not _GROUP_RE.match(str(group)):
                raise ValueError(
                    f"{pipeline}: group {group!r} must be 1-64 letters, digits, '_' or '-', starting with a letter "
                    "or digit"
                )
        return v

    @field_validator("default_group")
    @classmethod
    def _default_group(cls, v: str) -> str:
        if not _GROUP_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '_' or '-', starting with a letter or digit")
        return v

    @field_validator("queue_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9._-]{0,64}$", v):
            raise ValueError("must be at most 64 letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo) -> QueueSettings:
        if self.lease_s < 3 * self.heartbeat_s:
            raise ValueError("lease_s: must be at least 3 x heartbeat_s (a lease survives two missed heartbeats)")
        if self.broker_password_file is not None and self.broker_password_env is not None:
            raise ValueError("broker_password_file, broker_password_env: give one of them, not both")
        if self.broker_password_env is not None:
            environ = (info.context or {}).get("environ")
            environ = os.environ if environ is None else environ
            self._env_secret = environ.get(self.broker_password_env) or None
        return self

    @property
    def all_groups(self) -> tuple[str, ...]:
        """Every group a job can go to: the mapped ones and the default, sorted."""
        return tuple(sorted({*self.groups.values(), self.default_group}))

    def group_of(self, pipeline: str) -> str:
        """The group (queue) of a pipeline's jobs."""
        return self.groups.get(pipeline, self.default_group)

    def queue_name(self, group: str) -> str:
        """The broker queue of a group."""
        return f"{self.queue_prefix}{group}"

    def broker_connection_url(self) -> str:
        """``broker_url`` with the password filled in from its file or environment variable.

        Raises:
            ConfigError: no broker_url is set.
            SecretUnavailable: the password file or environment variable is missing or empty.
        """
        if self.broker_url is None:
            raise ConfigError("queue.broker_url: not set")
        if self.broker_password_file is not None:
            password: str | None = read_secret_file(self.broker_password_file, "queue.broker_password_file")
        elif self.broker_password_env is not None:
            if self._env_secret is None:
                raise SecretUnavailable(
                    f"queue.broker_password_env: environment variable {self.broker_password_env} was not set "
                    "(or is empty) when the node started"
                )
            password = self._env_secret
        else:
            return self.broker_url
        scheme, _, rest = self.broker_url.partition("://")
        netloc, slash, path = rest.partition("/")
        user, at, host = netloc.rpartition("@")
        if not at:
            if not scheme.startswith("redis"):
                raise ConfigError(
                    "queue.broker_url: a password is configured but the URL names no user (amqp://USER@host:5672/vhost)"
                )
            user, host = "", netloc
        quoted = urllib.parse.quote(password or "", safe="")
        return f"{scheme}://{user}:{quoted}@{host}{slash}{path}"

    def redacted_broker_url(self) -> str:
        """``broker_url`` for logs (never holds the password)."""
        return self.broker_url or "(none)"


class OutputSettings(_Frozen):
    """Result objects: series numbers (the same for every study, so viewers sort them last)."""

    seg_series_number: int = Field(9001, ge=1)
    sr_series_number: int = Field(9002, ge=1)
    key_image_series_number: int = Field(9003, ge=1)
    notice_series_number: int = Field(9004, ge=1)
    key_image: bool = Field(True, description="burn the overlay into a Secondary Capture for viewers without SEG")


class DispatchSettings(_Frozen):
    """The dispatcher that sends results to destinations (in ``pacs-node serve``).

    A transient failure (peer down, refused for resources, timeout, HTTP 5xx,
    408, 429) is retried after a random delay between 0 and
    ``min(backoff_max_s, backoff_base_s * 2**(attempts-1))`` ("full jitter").
    A delivery fails for good (dead letter, state ``failed``) after
    ``max_attempts`` attempts or once older than ``max_age_s``, or after
    ``permanent_max_attempts`` attempts that the peer refused permanently.
    """

    enabled: bool = Field(True, description="run the dispatcher in serve")
    poll_interval_s: float = Field(1.0, gt=0)
    batch_size: int = Field(50, ge=1, le=1000, description="deliveries per association or STOW-RS request")
    concurrency: int = Field(4, ge=1, le=64, description="destinations sent to in parallel")
    backoff_base_s: float = Field(15.0, gt=0)
    backoff_max_s: float = Field(900.0, gt=0)
    max_attempts: int = Field(20, ge=1, description="attempts before a transient failure becomes a dead letter")
    permanent_max_attempts: int = Field(
        2, ge=1, description="attempts before a permanent refusal becomes a dead letter (no retry storm)"
    )
    max_age_s: float = Field(172_800.0, gt=0, description="a delivery this old is not retried again (2 days)")
    timeout_s: float = Field(60.0, gt=0, description="connect, association, DIMSE response and HTTP timeout")
    lease_s: float = Field(300.0, gt=0, description="a claimed delivery whose dispatcher stops renewing returns")

    @model_validator(mode="after")
    def _bounds(self) -> DispatchSettings:
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s: must be at least backoff_base_s")
        if self.lease_s < 2 * self.poll_interval_s:
            raise ValueError("lease_s: must be at least twice poll_interval_s (leases are renewed every poll)")
        return self


class RetentionSettings(_Frozen):
    """Purging of received inputs and produced results; ``null`` keeps forever."""

    inputs_days: float | None = Field(7.0, ge=0, description="days after a study's jobs finished")
    results_days: float | None = Field(
        7.0, ge=0, description="days after every delivery of a result ended (delivered, failed or cancelled)"
    )
    interval_s: float = Field(3600.0, gt=0)


class TlsClientSettings(_Frozen):
    """TLS towards a DIMSE destination (TLS 1.2 or later).

    The server's certificate is verified (against ``ca_file``, or the system's
    trust store without one) and its name checked against ``server_name`` or the
    destination's ``host`` unless ``verify`` is false. ``cert_file`` and
    ``key_file`` present a client certificate to peers that ask for one.
    """

    ca_file: Path | None = Field(None, description="PEM CA certificates to trust; default: the system's")
    cert_file: Path | None = Field(None, description="PEM client certificate (chain)")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    verify: bool = Field(True, description="verify the server's certificate and name (keep on)")
    server_name: str | None = Field(None, description="name expected in the server certificate (default: host)")

    @model_validator(mode="after")
    def _pair(self) -> TlsClientSettings:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ValueError(f"{missing}: cert_file and key_file go together")
        return self


class DimseDestination(_Frozen):
    """A DIMSE C-STORE peer: results go over one association per batch."""

    type: Literal["dimse"]
    host: str
    port: int = Field(ge=1, le=65535)
    ae_title: str = Field(description="the called AE title of the peer")
    calling_ae: str | None = Field(None, description="our AE title towards this peer (default: dicom.ae_title)")
    seg_type: Literal["binary", "labelmap"] = "binary"
    tls: TlsClientSettings | None = Field(None, description="DICOM TLS; absent: plain TCP")

    @field_validator("ae_title", "calling_ae")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae(v)


def is_loopback_literal(host: str) -> bool:
    """Whether ``host`` is a loopback name or address as written (``localhost``, ``127.0.0.2``, ``[::1]``).

    No DNS lookup: at load a name may not resolve yet, and a Host header is only the client's word.
    """
    name = host.strip().strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class SecretUnavailable(ConfigError):
    """A destination's secret file or environment variable cannot be read; names the key."""


def read_secret_file(path: Path, key: str) -> str:
    """The stripped content of a secret file.

    Raises:
        SecretUnavailable: the file cannot be read or is empty (the message names ``key``).
    """
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecretUnavailable(f"{key}: cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise SecretUnavailable(f"{key}: {path} is empty")
    return value


class DicomwebDestination(_Frozen):
    """A DICOMweb STOW-RS endpoint (``url`` is the service root; results are POSTed to ``url/studies``).

    Secrets never stand in the YAML: ``auth: basic`` takes ``username`` and the
    password from ``password_file`` or the environment variable named by
    ``password_env``; ``auth: bearer`` takes the token from ``token_file`` or
    ``token_env``. Files are read at each request (a rotated token is picked
    up); environment variables when the settings are loaded.

    A secret is never sent in clear text to another machine: ``auth: basic`` or
    ``bearer`` with an ``http://`` URL is refused unless the host is a loopback
    address (``localhost``, ``127.x.x.x``, ``[::1]``) or ``allow_insecure: true``
    says so (then a warning is logged at every load and the conformance
    statement and the dashboard show it).
    """

    type: Literal["dicomweb"]
    url: str
    seg_type: Literal["binary", "labelmap"] = "binary"
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(None, description="user name for auth: basic")
    password_file: Path | None = Field(None, description="file holding the password (auth: basic)")
    password_env: str | None = Field(None, description="environment variable holding the password (auth: basic)")
    token_file: Path | None = Field(None, description="file holding the bearer token (auth: bearer)")
    token_env: str | None = Field(None, description="environment variable holding the bearer token (auth: bearer)")
    verify: bool = Field(True, description="verify the server's TLS certificate (keep on)")
    ca_file: Path | None = Field(None, description="PEM CA certificates to trust; default: the system's")
    allow_insecure: bool = Field(
        False,
        description="send the password or token over plain http:// to a non-loopback host "
        "(only on a network you trust; prefer https://)",
    )

    _env_secret: str | None = PrivateAttr(None)
    _env_present: bool = PrivateAttr(False)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError("must start with http:// or https://")
        if "@" in v.split("/", 3)[2]:
            raise ValueError("no user or password in the URL: use auth with password_file/password_env")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _auth(self, info: ValidationInfo) -> DicomwebDestination:
        wanted = {"none": (), "basic": ("password",), "bearer": ("token",)}[self.auth]
        for kind in ("password", "token"):
            file, env = getattr(self, f"{kind}_file"), getattr(self, f"{kind}_env")
            if kind not in wanted:
                if file is not None or env is not None:
                    raise ValueError(
                        f"{kind}_file/{kind}_env: only used with auth: {'basic' if kind == 'password' else 'bearer'}"
                    )
                continue
            if (file is None) == (env is None):
                raise ValueError(f"{kind}_file or {kind}_env: exactly one is needed for auth: {self.auth}")
            if env is not None:
                environ = (info.context or {}).get("environ")
                environ = os.environ if environ is None else environ
                self._env_present = env in environ
                self._env_secret = environ.get(env) or None
        if self.auth == "basic" and not self.username:
            raise ValueError("username: needed for auth: basic")
        if self.auth != "basic" and self.username is not None:
            raise ValueError("username: only used with auth: basic")
        if self.secret_in_clear:
            what = "password" if self.auth == "basic" else "bearer token"
            host = urllib.parse.urlsplit(self.url).hostname
            if not self.allow_insecure:
                raise ValueError(
                    f"url: an http:// URL would send the {what} to {host} in clear text; use https://, "
                    "or set allow_insecure: true (only on a network you trust)"
                )
            logger.warning(
                "destination %s: the %s goes to %s over plain http (allow_insecure: true)", self.url, what, host
            )
        return self

    @property
    def secret_in_clear(self) -> bool:
        """Whether a password or token goes over plain ``http://`` to a host that is not this machine."""
        if self.auth == "none":
            return False
        parts = urllib.parse.urlsplit(self.url)
        return parts.scheme == "http" and not is_loopback_literal(parts.hostname or "")

    def secret(self, name: str = "destination") -> str | None:
        """The password (basic) or token (bearer); ``None`` for ``auth: none``.

        Args:
            name: the destination's name, for messages.

        Raises:
            SecretUnavailable: the file or environment variable is missing or empty (names the key).
        """
        if self.auth == "none":
            return None
        kind = "password" if self.auth == "basic" else "token"
        file, env = getattr(self, f"{kind}_file"), getattr(self, f"{kind}_env")
        if file is not None:
            return read_secret_file(file, f"destinations.{name}.{kind}_file")
        if self._env_secret is None:
            state = "is empty" if self._env_present else "was not set"
            raise SecretUnavailable(
                f"destinations.{name}.{kind}_env: environment variable {env} {state} when the node started"
            )
        return self._env_secret


Destination = Annotated[DimseDestination | DicomwebDestination, Field(discriminator="type")]

# A matcher is a mapping of DICOM keywords (or the combinators all/any/not) to
# conditions; pacs_node.config.rules validates and compiles it.
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


RETURN_TO_SENDER = "@sender"
"""Destination name of the deliveries a route's ``return_to_sender`` makes."""


class ReturnToSender(_Frozen):
    """Send results back to the AE that sent the study, by C-STORE.

    The peer is the calling AE title and source address recorded when the
    triggering series arrived over DIMSE; its storage port is not in the
    association, so it is configured here. Behind NAT the recorded address is
    the translating device's, which then must forward ``port``.
    """

    port: int = Field(ge=1, le=65535, description="the sender's storage SCP port (often 104 or 11112)")
    seg_type: Literal["binary", "labelmap"] = "binary"
    tls: TlsClientSettings | None = Field(None, description="DICOM TLS towards the sender; absent: plain TCP")


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
    return_to_sender: ReturnToSender | None = Field(
        None, description="also send results to the AE that sent the series (DIMSE only)"
    )
    include_unvalidated: bool = Field(
        False,
        description="also draw and measure the segments the model card marks as not validated "
        "(model.yaml segments[].validated: false); off by default, so they never reach the PACS unasked",
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
    queue: QueueSettings = Field(default_factory=QueueSettings)  # type: ignore[arg-type]
    outputs: OutputSettings = Field(default_factory=OutputSettings)  # type: ignore[arg-type]
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)  # type: ignore[arg-type]
    destinations: dict[str, Destination] = Field(default_factory=dict)
    pipelines: dict[str, PipelineSettings] = Field(default_factory=dict)
    routes: tuple[RouteSettings, ...] = ()

    @field_validator("destinations")
    @classmethod
    def _destination_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _DEST_NAME_RE.match(name):
                raise ValueError(
                    f"{name!r}: a destination name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                    "or digit"
                )
        return v

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

    @model_validator(mode="after")
    def _queue(self) -> Settings:
        q = self.queue
        for pipeline in q.groups:
            if pipeline not in self.pipelines:
                raise ValueError(
                    f"queue.groups: {pipeline!r} is not defined under pipelines "
                    f"(known: {sorted(self.pipelines) or 'none'})"
                )
        if q.backend == "celery":
            if not self.database_url or not self.database_url.startswith(("postgresql://", "postgresql+")):
                raise ValueError(
                    "queue.backend: celery needs a PostgreSQL database_url (e.g. database_url: "
                    "postgresql://pacsnode@db-host/pacsnode): workers on other hosts share the database, "
                    f"and {'the default SQLite file' if not self.database_url else 'this database'} cannot be shared"
                )
            if not q.broker_url:
                raise ValueError(
                    "queue.broker_url: needed for queue.backend: celery "
                    "(amqp://user@rabbitmq-host:5672/vhost or redis://redis-host:6379/0)"
                )
        return self

    @property
    def distributed(self) -> bool:
        """Jobs run on Celery workers (``queue.backend: celery``), not in serve."""
        return self.queue.backend == "celery"

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
