"""The node's configuration: typed, immutable :class:`Settings`, their loading, and the routing-rule language.

- :mod:`pacs_node.config.model`: the settings classes (pydantic, frozen);
- :mod:`pacs_node.config.load`: :func:`load_settings` (YAML file or embedded
  defaults, then ``PACS_NODE_*`` overrides) and :func:`settings_from_mapping`;
- :mod:`pacs_node.config.rules`: the matcher language routes and pipeline
  inputs are written in, compiled when settings load;
- :mod:`pacs_node.config.defaults`: the embedded defaults (demo pipelines and routes).

Every stage imports its settings from here; nothing here imports a stage.
"""

from pacs_node.config.load import load_settings, settings_from_mapping
from pacs_node.config.model import (
    ENV_PREFIX,
    RETURN_TO_SENDER,
    DicomSettings,
    DicomTlsSettings,
    DicomwebDestination,
    DimseDestination,
    DispatchSettings,
    HttpSettings,
    LateInstancePolicy,
    OutputSettings,
    PipelineInput,
    PipelineSettings,
    Priority,
    QueueSettings,
    RetentionSettings,
    ReturnToSender,
    RouteSettings,
    RoutingSettings,
    SecretUnavailable,
    Settings,
    StorageSettings,
    TlsClientSettings,
    WorkerSettings,
    read_secret_file,
)

__all__ = [
    "DicomSettings",
    "DicomTlsSettings",
    "DicomwebDestination",
    "DimseDestination",
    "DispatchSettings",
    "ENV_PREFIX",
    "HttpSettings",
    "LateInstancePolicy",
    "OutputSettings",
    "PipelineInput",
    "PipelineSettings",
    "Priority",
    "QueueSettings",
    "RETURN_TO_SENDER",
    "RetentionSettings",
    "ReturnToSender",
    "RouteSettings",
    "RoutingSettings",
    "SecretUnavailable",
    "Settings",
    "StorageSettings",
    "TlsClientSettings",
    "WorkerSettings",
    "load_settings",
    "read_secret_file",
    "settings_from_mapping",
]
