"""The simulator run as a process: request stats, the tenants file, the simulate command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from collector.simulator import Simulator, load_tenants_file
from tests.simulator_helpers import T1, T2, fetch_token, get_usage

# --- stats ----------------------------------------------------------------------------------------


async def test_stats_count_and_log_requests_in_order(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Counters by client, tenant and status; the log holds (tenant, param, status) in order."""
    await fetch_token(http, sim)
    await get_usage(http, sim, "day=2025-09-30")
    await get_usage(http, sim, "period=30d", {"zencoder-api-key": "zak_test_tenant-02"})
    await get_usage(http, sim, "period=9d")
    await get_usage(http, sim, "day=2025-09-29", {})
    assert sim.stats.token_requests == Counter({"tenant-01-client": 1})
    assert sim.stats.usage_requests == Counter({T1: 2, T2: 1})
    assert sim.stats.responses == Counter({200: 2, 400: 1, 401: 1})
    log = list(sim.stats.log)
    assert [(r.tenant, r.param, r.status) for r in log] == [
        (T1, "2025-09-30", 200),
        (T2, "30d", 200),
        (T1, "9d", 400),
        (None, "2025-09-29", 401),
    ]
    assert [r.time for r in log] == sorted(r.time for r in log)
    sim.stats.log_enabled = False
    await get_usage(http, sim, "day=2025-09-30")
    assert len(sim.stats.log) == 4
    assert sim.stats.responses[200] == 3


# --- tenants file and command line ----------------------------------------------------------------


def test_tenants_file_fills_in_the_demo_rule(tmp_path: Path) -> None:
    """A tenants file needs only ids; credentials default to the demo rule; duplicates fail."""
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "tenants:\n  - id: acme\n    users: 12\n  - id: globex\n    client_secret: s3\n"
    )
    acme, globex = load_tenants_file(path)
    assert (acme.client_id, acme.client_secret, acme.api_key, acme.users) == (
        "acme-client", "acme-secret", "zak_test_acme", 12,
    )  # fmt: skip
    assert globex.client_secret == "s3"
    assert "s3" not in repr(globex)
    path.write_text("- id: a\n- id: a\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_tenants_file(path)


def test_tenants_file_names_an_api_variant(tmp_path: Path) -> None:
    """A tenant's ``variant`` is read from the file, and an unknown one is refused by name."""
    path = tmp_path / "tenants.yaml"
    path.write_text("- id: big\n  users: 2000\n  variant: datetime_last_active\n")
    (big,) = load_tenants_file(path)
    assert (big.users, big.variant) == (2000, "datetime_last_active")
    path.write_text("- id: a\n  variant: sideways\n")
    with pytest.raises(ValueError, match="unknown variant 'sideways'"):
        load_tenants_file(path)


async def test_simulate_command_serves_and_stops_on_sigterm(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The simulate command prints its URLs, serves the file's tenants, and exits 0 on SIGTERM."""
    path = tmp_path / "tenants.yaml"
    path.write_text("- id: acme\n  api_key: zak_acme\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collector.simulator", "--port", "0", "--tenants-file", str(path),
        "--today", "2025-10-01", "--rate-limit", "50",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        base_url = first.rsplit(" ", 1)[-1].strip()
        assert base_url.startswith("http://127.0.0.1:")
        url = f"{base_url}/api/v1/data/usage?day=2025-09-30"
        async with http.get(url, headers={"zencoder-api-key": "zak_acme"}) as r:
            assert r.status == 200
            assert (await r.json())["data"]["users"][0]["email"].endswith("@acme.example")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_stats_endpoint_reports_counters_and_cpu(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """GET /_simulator/stats reports request counters and the process's CPU seconds as JSON."""
    await fetch_token(http, sim)
    await get_usage(http, sim, "day=2025-09-30")
    await get_usage(http, sim, "period=1d")
    async with http.get(sim.base_url + "/_simulator/stats") as r:
        body = await r.json()
    assert body["token_requests"] == 1
    assert body["usage_requests"] == 2
    assert body["responses"] == {"200": 1, "400": 1}
    assert body["cpu_seconds"] > 0
