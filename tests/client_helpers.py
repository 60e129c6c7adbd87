"""Shared by the API client's tests: an ``ApiConfig`` for a simulator, tenants, a closed port."""

from __future__ import annotations

import datetime as dt
import json
import socket
from typing import Any

from collector.client import FetchedDay
from collector.config import ApiConfig, RateLimitConfig, RetryConfig, TenantConfig
from collector.simulator import SimTenant, Simulator

TODAY = dt.date(2025, 10, 1)
DAY = dt.date(2025, 9, 29)


def api_config(base_url: str, token_url: str, **overrides: Any) -> ApiConfig:
    retry = {
        "max_attempts": 3,
        "max_time": dt.timedelta(seconds=60),
        "backoff_initial": dt.timedelta(seconds=0.25),
        "backoff_max": dt.timedelta(seconds=1),
    }
    retry.update(overrides.pop("retry", {}))
    values: dict[str, Any] = {
        "base_url": base_url,
        "token_url": token_url,
        "timeout": dt.timedelta(seconds=5),
        "max_concurrency": 64,
        "rate_limit": RateLimitConfig(per_second=10_000, burst=10_000),
        "retry": RetryConfig(**retry),
    }
    values.update(overrides)
    return ApiConfig(**values)


def sim_config(sim: Simulator, **overrides: Any) -> ApiConfig:
    return api_config(sim.base_url, sim.token_url, **overrides)


def tenant_config(sim_tenant: SimTenant, **overrides: Any) -> TenantConfig:
    values: dict[str, Any] = {
        "id": sim_tenant.id,
        "client_id": sim_tenant.client_id,
        "client_secret": sim_tenant.client_secret,
    }
    values.update(overrides)
    return TenantConfig(**values)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def body_data(fetched: FetchedDay) -> dict[str, Any]:
    """The ``data`` object of the body the client kept (what the state store stores)."""
    data: dict[str, Any] = json.loads(fetched.payload)["data"]
    return data
