"""Settings, constants and request helpers shared by the simulator tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

import aiohttp

from collector.simulator import Simulator, SimulatorSettings, demo_tenants

TODAY = dt.date(2025, 10, 1)  # a Wednesday
T1 = "tenant-01"
T2 = "tenant-02"
API_KEY_1 = "zak_test_tenant-01"
CREDS_1 = {
    "client_id": "tenant-01-client",
    "client_secret": "tenant-01-secret",
    "grant_type": "client_credentials",
}


def make_settings(**overrides: Any) -> SimulatorSettings:
    values: dict[str, Any] = {"tenants": demo_tenants(3), "today": TODAY, "seed": 7}
    values.update(overrides)
    return SimulatorSettings(**values)


async def get_usage(
    http: aiohttp.ClientSession,
    sim: Simulator,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes, aiohttp.ClientResponse]:
    url = sim.usage_url + (f"?{query}" if query else "")
    async with http.get(
        url, headers={"zencoder-api-key": API_KEY_1} if headers is None else headers
    ) as r:
        return r.status, r.content_type, await r.read(), r


async def fetch_token(http: aiohttp.ClientSession, sim: Simulator, **body: Any) -> tuple[int, Any]:
    async with http.post(sim.token_url, json=body or CREDS_1) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()
