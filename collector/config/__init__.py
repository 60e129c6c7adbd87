"""The configuration: one YAML file into validated pydantic models, with every problem at once.

Usage::

    from collector.config import load_config
    cfg = load_config("collector.yaml", sink_types={"sqlite": SqliteSink.Config, ...})

Every model forbids unknown keys. A failed load raises :class:`~collector.errors.ConfigError`
whose ``problems`` list *every* problem as ``FILE:LINE: dotted.path: message`` (paths look like
``tenants[2].client_secret_file``). :mod:`.source` reads the YAML with the line of every key and
does ``${VAR}`` interpolation and ``<key>_file`` secret files; :mod:`.models` holds the sections
(:mod:`.durations` their ``30s``-style durations); :mod:`.loader` validates and locates problems.
Secrets are :class:`~pydantic.SecretStr`: ``repr``, ``str`` and ``model_dump_json`` show
``**********``; :meth:`AppConfig.secret_values` hands them to the log redactor.

Sinks: each ``sinks.NAME`` mapping is validated by the ``Config`` model of its ``type``, taken from
``sink_types`` (type name -> ``SinkConfig`` subclass, as the plugin manager discovers them). When
``sink_types`` is None (plugins not loaded, e.g. a quick ``validate``), each sink is validated as a
:class:`GenericSinkConfig`: the base keys of :class:`~collector.sink.SinkConfig` are checked and
every other key is kept as written in ``model_extra`` (values of secret-looking keys wrapped in
``SecretStr``), so a caller can validate them later against the real type.

A ``<key>_file`` key stays on the model only where the model declares it (tenants keep
``client_secret_file`` etc., so :meth:`TenantConfig.reload_secrets` can notice a rotated file; a
sink keeps it if its ``Config`` has such a field); elsewhere only ``<key>`` is passed on.
Relative paths (``sqlite:///data/state.db``, sink paths, secret files) stay as written: they are
relative to the working directory of the process.
"""

from collector.config.durations import parse_duration
from collector.config.loader import json_schema, load_config, parse_config, summarize
from collector.config.models import (
    ApiConfig,
    AppConfig,
    CollectionConfig,
    GenericSinkConfig,
    RateLimitConfig,
    RetryConfig,
    RuntimeConfig,
    ScheduleConfig,
    ServerConfig,
    StateConfig,
    TenantConfig,
)
from collector.config.source import SECRET_KEYS, interpolate, is_secret_key, read_secret_file

__all__ = [
    "SECRET_KEYS",
    "ApiConfig",
    "AppConfig",
    "CollectionConfig",
    "GenericSinkConfig",
    "RateLimitConfig",
    "RetryConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "ServerConfig",
    "StateConfig",
    "TenantConfig",
    "interpolate",
    "is_secret_key",
    "json_schema",
    "load_config",
    "parse_config",
    "parse_duration",
    "read_secret_file",
    "summarize",
]
