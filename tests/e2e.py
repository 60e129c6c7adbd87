"""Helpers for end-to-end tests: write a real config file and run the real CLI as a subprocess."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from collector.pipeline import utc_today
from collector.simulator import SimTenant, Simulator

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def write_config(
    path: Path,
    sim: Simulator,
    tenants: list[SimTenant],
    *,
    workdir: Path,
    lookback_days: int = 5,
    sinks: dict[str, Any] | None = None,
    bad_secret_for: set[str] = frozenset(),  # type: ignore[assignment]
    extra: dict[str, Any] | None = None,
) -> Path:
    """A config pointing at the simulator; tenants use OAuth, or an API key where they have one."""
    tenant_entries = []
    for t in tenants:
        if t.api_key and t.id.endswith("5"):
            tenant_entries.append({"id": t.id, "api_key": t.api_key})
        else:
            secret = "definitely-wrong-secret" if t.id in bad_secret_for else t.client_secret
            tenant_entries.append({"id": t.id, "client_id": t.client_id, "client_secret": secret})
    config: dict[str, Any] = {
        "api": {
            "base_url": sim.base_url,
            "token_url": sim.token_url,
            "timeout": "10s",
            "max_concurrency": 32,
            "rate_limit": {"per_second": 200, "burst": 50},
            "retry": {
                "max_attempts": 3,
                "max_time": "20s",
                "backoff_initial": "10ms",
                "backoff_max": "50ms",
            },
        },
        "collection": {"lookback_days": lookback_days, "settle_days": 1},
        "state": {"url": f"sqlite:///{workdir / 'state.db'}"},
        "server": {"listen": None},
        "sinks": sinks
        if sinks is not None
        else {"warehouse": {"type": "sqlite", "path": str(workdir / "usage.db")}},
        "tenants": tenant_entries,
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def daemon_config(
    tmp_path: Path,
    sim: Simulator,
    tenants: list[SimTenant],
    *,
    lookback: int,
    every: str = "1s",
    sinks: dict[str, Any] | None = None,
    bad_secret_for: frozenset[str] = frozenset(),
    **extra: Any,
) -> Path:
    """``tmp_path/config.yaml`` for a daemon test: :func:`write_config`, a cycle ``every`` (no
    jitter), the ops server on an ephemeral port, and ``extra`` top-level sections on top."""
    return write_config(
        tmp_path / "config.yaml",
        sim,
        tenants,
        workdir=tmp_path,
        lookback_days=lookback,
        sinks=sinks,
        bad_secret_for=set(bad_secret_for),
        extra={
            "collection": {"schedule": {"every": every, "jitter": "0s"}},
            "server": {"listen": "127.0.0.1:0"},
            **extra,
        },
    )


def window_days(lookback: int) -> list[str]:
    """The ``lookback`` days up to today (UTC), oldest first, as ISO dates."""
    today = utc_today()
    return sorted((today - dt.timedelta(days=i)).isoformat() for i in range(lookback))


def expected_days(tenants: list[SimTenant], lookback: int) -> list[tuple[str, str]]:
    """Every (tenant, day) a collection of the last ``lookback`` days stores, sorted."""
    return sorted((t.id, day) for t in tenants for day in window_days(lookback))


async def run_cli(
    *args: str, env: dict[str, str] | None = None, deadline: float = 120
) -> CliResult:
    """Run ``python -m collector ARGS`` without blocking the loop that serves the simulator."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "collector",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLLECTOR_TESTING_NO_WAIT": "1", **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), deadline)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (its own ``sys.modules``) from the repository root;
    it must exit 0."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )


def table_rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2"))  # noqa: S608 - test-owned names


def count_rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {
            table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: S608
            for table in (
                "usage_daily",
                "usage_daily_ide",
                "usage_daily_language",
                "usage_user_daily",
            )
        }
