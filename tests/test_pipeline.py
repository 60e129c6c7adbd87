"""The collection cycle against the simulator over real sockets: fairness, bad data, parking."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from collector.app import Runtime, load, load_plugins, open_runtime
from collector.retry import no_wait
from collector.simulator import (
    BAD_RESPONSE_MODES,
    SimulatorSettings,
    demo_tenants,
    running_simulator,
)
from collector.status import status_snapshot
from tests.e2e import write_config


async def _runtime(config_path: Path) -> AsyncIterator[Runtime]:
    plugins = load_plugins()
    config = load(config_path, plugins)
    async with open_runtime(config, plugins) as runtime:
        yield runtime


async def test_big_backfill_does_not_delay_small_tenants(tmp_path: Path) -> None:
    """With one tenant backfilling 90 days and 49 needing 2 days, the 49 are served first-come
    round-robin: their last request comes about when it would without the big tenant."""
    tenants = demo_tenants(50)
    settings = SimulatorSettings(tenants=tenants, latency=0.002)
    async with running_simulator(settings) as sim:
        config_path = write_config(
            tmp_path / "c.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=2,
            sinks={},
            extra={"api": {"max_concurrency": 4}},
        )
        text = config_path.read_text().replace(
            "- id: tenant-01\n", "- id: tenant-01\n  lookback_days: 90\n", 1
        )
        config_path.write_text(text)
        with no_wait():
            async for runtime in _runtime(config_path):
                assert runtime.collector is not None
                result = await runtime.collector.run_cycle()
        log = [r for r in sim.stats.log if r.status == 200]
    assert result.ok
    assert result.tenants["tenant-01"].fetched == 90
    small_positions = [i for i, r in enumerate(log) if r.tenant != "tenant-01"]
    assert len(small_positions) == 49 * 2
    # Alone, the 98 small requests would be the first 98. Round-robin (and the cap on each
    # tenant's requests in flight) lets the big tenant take about one slot in fifty while they
    # wait, so their last one comes before position 110; had the backfill queued its 90 days
    # first, it would come after position 180.
    assert small_positions[-1] < 110, small_positions[-1]


@pytest.mark.parametrize("mode", sorted(BAD_RESPONSE_MODES))
async def test_bad_response_quarantines_the_day_with_its_body(tmp_path: Path, mode: str) -> None:
    """A defective 200 quarantines its day with the body kept and a reason in status; it is asked
    for once per cycle (never retried within one), nothing reaches the sink, the other tenant
    completes, and the next cycle asks again."""
    tenants = demo_tenants(2)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        sim.faults.set("tenant-02", bad_response=mode)
        config_path = write_config(
            tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=2
        )
        with no_wait():
            async for runtime in _runtime(config_path):
                assert runtime.collector is not None
                assert runtime.deliverer is not None
                first = await runtime.collector.run_cycle()
                await runtime.deliverer.run_until_drained()
                states = await runtime.store.days_state("tenant-02")
                kept = await runtime.store.stored_bodies("tenant-02")
                status = await status_snapshot(runtime.config, runtime.store)
                requests_first = sim.stats.usage_requests["tenant-02"]
                second = await runtime.collector.run_cycle()
                requests_second = sim.stats.usage_requests["tenant-02"] - requests_first
    assert first.tenants["tenant-01"].ok
    assert (first.tenants["tenant-02"].failed, first.tenants["tenant-02"].quarantined) == (2, 2)
    assert {s.status for s in states.values()} == {"quarantined"}
    assert [(b.day, b.quarantined) for b in kept] == [(day, True) for day in sorted(states)]
    assert all(b.body.strip() for b in kept) or mode == "empty_body"
    assert (requests_first, requests_second) == (2, 2)
    assert second.tenants["tenant-02"].planned == 2
    tenant = status.tenant("tenant-02").stored
    assert tenant.days_quarantined == 2
    assert all(q.reason.startswith("BadResponse") for q in tenant.quarantined)
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        rows = conn.execute("SELECT tenant, COUNT(*) FROM usage_daily GROUP BY tenant").fetchall()
    assert rows == [("tenant-01", 2)]


async def test_a_quarantined_day_heals_when_the_api_sends_a_good_body(tmp_path: Path) -> None:
    """Once the API answers a quarantined day with a valid body, the next cycle stores and
    delivers it and the day is no longer quarantined anywhere."""
    tenants = demo_tenants(1)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        sim.faults.set("tenant-01", bad_response="negative_numbers")
        config_path = write_config(
            tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=2
        )
        with no_wait():
            async for runtime in _runtime(config_path):
                assert runtime.collector is not None
                assert runtime.deliverer is not None
                first = await runtime.collector.run_cycle()
                sim.faults.set("tenant-01", bad_response=None)
                second = await runtime.collector.run_cycle()
                await runtime.deliverer.run_until_drained()
                states = await runtime.store.days_state("tenant-01")
                kept = await runtime.store.stored_bodies("tenant-01")
                status = await status_snapshot(runtime.config, runtime.store)
    assert (first.tenants["tenant-01"].quarantined, second.tenants["tenant-01"].ok) == (2, True)
    assert {s.status for s in states.values()} <= {"fetched", "final"}
    assert [b.quarantined for b in kept] == [False, False]
    assert status.tenants[0].stored.days_quarantined == 0
    assert status.tenants[0].stored.quarantined == []
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM usage_daily").fetchone() == (2,)


async def test_a_quarantined_body_that_echoes_the_api_key_is_kept_without_it(
    tmp_path: Path,
) -> None:
    """A 200 error page echoing the request's zencoder-api-key is quarantined with the key
    replaced by *** in the kept body; the key appears nowhere in the state store."""
    key = "zak_canary_0123456789abcdef"

    async def echo(request: web.Request) -> web.Response:
        echoed = {"status": "error", "message": f"bad key {request.headers['zencoder-api-key']}"}
        return web.json_response(echoed)

    app = web.Application()
    app.router.add_get("/api/v1/data/usage", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        f"""\
api: {{base_url: "http://127.0.0.1:{port}"}}
collection: {{lookback_days: 1}}
state: {{url: "sqlite:///{tmp_path / "state.db"}"}}
server: {{listen: null}}
tenants: [{{id: acme, api_key: {key}}}]
"""
    )
    try:
        async for runtime in _runtime(config_path):
            assert runtime.collector is not None
            result = await runtime.collector.run_cycle()
            [kept] = await runtime.store.stored_bodies("acme")
            status = await status_snapshot(runtime.config, runtime.store)
    finally:
        await runner.cleanup()
    assert result.tenants["acme"].quarantined == 1
    assert kept.quarantined
    assert json.loads(kept.body) == {"status": "error", "message": "bad key ***"}
    assert key not in json.dumps(status.to_dict())
    with sqlite3.connect(tmp_path / "state.db") as conn:
        for table in ("tenant_day", "quarantine", "tenant_status"):
            assert key not in repr(conn.execute(f"SELECT * FROM {table}").fetchall())  # noqa: S608 - fixed names


async def test_bad_credentials_park_the_tenant_and_status_says_so(tmp_path: Path) -> None:
    """Two auth failures in a row park the tenant: the next cycle skips it without asking for a
    token, the other tenant is unaffected, and the status shows auth_failed."""
    tenants = demo_tenants(2)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config_path = write_config(
            tmp_path / "c.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=2,
            bad_secret_for={"tenant-02"},
        )
        results: list[Any] = []
        with no_wait():
            async for runtime in _runtime(config_path):
                assert runtime.collector is not None
                for _ in range(2):
                    results.append(await runtime.collector.run_cycle())
                token_requests = sim.stats.token_requests["tenant-02-client"]
                results.append(await runtime.collector.run_cycle())
                assert sim.stats.token_requests["tenant-02-client"] == token_requests
                snapshot = await status_snapshot(
                    runtime.config,
                    runtime.store,
                    parked={t.id: runtime.client.parked_until(t) for t in runtime.config.tenants},
                )
    assert all(r.tenants["tenant-01"].ok for r in results)
    assert results[0].tenants["tenant-02"].error is not None
    assert results[2].tenants["tenant-02"].skipped is not None
    assert "auth_failed" in results[2].tenants["tenant-02"].skipped
    states = {t.stored.tenant: t.state for t in snapshot.tenants}
    assert states == {"tenant-01": "ok", "tenant-02": "auth_failed"}


@pytest.mark.postgres
async def test_a_lost_tenant_does_not_fail_the_days_of_the_tenants_held(
    tmp_path: Path, postgres_url: str
) -> None:
    """A replica's cycle over a tenant it holds and one it lost stores every day of the first,
    though both tenants' days share the writer's batches; the lost tenant's days are refused."""
    from collector.store.leases import ReplicaLeases, this_replica
    from tests.postgres_helpers import fresh_schema

    tenants = demo_tenants(2)
    with fresh_schema(postgres_url, "p") as (_, url):
        async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
            config_path = write_config(
                tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=5, sinks={},
                extra={"state": {"url": url}},
            )  # fmt: skip
            async for runtime in _runtime(config_path):
                assert runtime.collector is not None
                replica = ReplicaLeases(runtime.store, this_replica(), ttl=dt.timedelta(seconds=30))
                await replica.beat(["tenant-01"])  # tenant-02 is nobody's: its writes are fenced
                result = await runtime.collector.run_cycle()
                held = await runtime.store.days_state("tenant-01")
                lost = await runtime.store.days_state("tenant-02")
    assert result.tenants["tenant-01"].ok
    assert len(held) == 5
    assert not result.tenants["tenant-02"].ok
    assert "stale fencing token" in str(result.tenants["tenant-02"].error)
    assert lost == {}
