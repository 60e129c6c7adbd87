"""Stand-in sink configs and the write/load/problems helpers shared by the config tests."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import SecretStr

from collector.config import AppConfig, load_config
from collector.errors import ConfigError
from collector.sink import SinkConfig


class SqliteTestConfig(SinkConfig):
    """A stand-in sqlite sink config: a path is required."""

    type: Literal["sqlite"] = "sqlite"
    path: str


class CsvTestConfig(SinkConfig):
    """A stand-in csv sink config."""

    type: Literal["csv"] = "csv"
    path: str


class WebhookTestConfig(SinkConfig):
    """A stand-in webhook sink config with a secret and a timedelta field."""

    type: Literal["webhook"] = "webhook"
    url: str
    secret: SecretStr
    request_timeout: dt.timedelta = dt.timedelta(seconds=10)


SINK_TYPES: dict[str, type[SinkConfig]] = {
    "sqlite": SqliteTestConfig,
    "csv": CsvTestConfig,
    "webhook": WebhookTestConfig,
}

TENANT = "tenants:\n  - {id: acme, api_key: zak_acme_key}\n"


def write(tmp_path: Path, *parts: str, name: str = "collector.yaml") -> Path:
    """Write the dedented parts one after another as the config file."""
    path = tmp_path / name
    path.write_text("".join(textwrap.dedent(part) for part in parts))
    return path


def load(path: Path, env: dict[str, str] | None = None, sink_types: Any = SINK_TYPES) -> AppConfig:
    return load_config(path, environ=env or {}, sink_types=sink_types)


def problems(
    path: Path, env: dict[str, str] | None = None, sink_types: Any = SINK_TYPES
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, env, sink_types)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return [str(p) for p in caught.value.problems]
