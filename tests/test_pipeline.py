"""The collection cycle against the simulator over real sockets: fairness, bad data, parking."""

from __future__ import annotations

import datetime as dt
import functools
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from collector.app import Runtime, load, load_plugins, open_runtime
from collector.metrics import Metrics
from collector.pipeline import HANDED_OVER, uncommitted_days
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
    assert result.tenants["tenant-02"].skipped == HANDED_OVER
    assert lost == {}


@pytest.mark.postgres
async def test_a_write_refused_by_fencing_ends_the_cycle_as_handed_over(
    tmp_path: Path, postgres_url: str
) -> None:
    """When another replica took the tenant over, the old holder's cycle ends as handed over
    (no error, no failed day, logged once at info), its refused write is counted as fenced and
    the state store stays healthy."""
    from collector.store import Store
    from collector.store.leases import ReplicaLeases, this_replica
    from tests.postgres_helpers import fresh_schema

    tenants = demo_tenants(1)
    short = dt.timedelta(seconds=1)
    metrics = Metrics()
    with fresh_schema(postgres_url, "p") as (_, url):
        async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
            config_path = write_config(
                tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=3, sinks={},
                extra={"state": {"url": url}},
            )  # fmt: skip
            plugins = load_plugins()
            config = load(config_path, plugins)
            async with open_runtime(config, plugins, metrics=metrics) as runtime:
                assert runtime.collector is not None
                old = ReplicaLeases(runtime.store, this_replica(), ttl=short)
                await old.beat(["tenant-01"])
                other_store = await Store.open(url)
                try:
                    await anyio.sleep(1.2)  # the old holder is paused past its lease's expiry
                    taken = await ReplicaLeases(other_store, this_replica(), ttl=short).beat(
                        ["tenant-01"]
                    )
                    with capture_logs() as logs:
                        result = await runtime.collector.run_cycle()
                    stored = await other_store.days_state("tenant-01")
                finally:
                    await other_store.aclose()
                health = runtime.store.health
                fenced = runtime.store.fenced_writes
    assert taken.gained == {"tenant-01"}
    outcome = result.tenants["tenant-01"]
    assert (outcome.skipped, outcome.error, outcome.failed) == (HANDED_OVER, None, 0)
    assert stored == {}
    assert fenced >= 1
    assert (health.failing, health.failures) == (False, 0)
    handed = [e for e in logs if e["event"].startswith("tenant handed to another replica")]
    assert [(e["log_level"], e["tenant"]) for e in handed] == [("info", "tenant-01")]
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]
    assert metrics.fetch_errors.samples.get((("tenant", "tenant-01"),), 0.0) == 0


def _usage_answers(sim: Any) -> int:
    return sum(r.status == 200 for r in sim.stats.log)


def _answered_at_least(sim: Any, count: int) -> bool:
    return _usage_answers(sim) >= count


async def _cycle_into(runtime: Runtime, outcome: list[Any]) -> None:
    assert runtime.collector is not None
    outcome.append(await runtime.collector.run_cycle())


@pytest.mark.postgres
async def test_fetched_days_wait_for_their_commit_beyond_the_bound(
    tmp_path: Path, postgres_url: str
) -> None:
    """While the state store cannot commit, the tenants' workers stop asking the API once
    uncommitted_days() days are fetched or in flight, and every day is stored once it can."""
    import sqlalchemy

    from tests.daemon_process import eventually
    from tests.postgres_helpers import fresh_schema

    tenants = demo_tenants(300)  # 600 workers: more than the bound
    outcome: list[Any] = []
    with fresh_schema(postgres_url, "p") as (_, url):
        async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
            config_path = write_config(
                tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=3, sinks={},
                extra={"state": {"url": url}},
            )  # fmt: skip
            blocker = sqlalchemy.create_engine(url)
            try:
                async for runtime in _runtime(config_path):
                    bound = uncommitted_days(runtime.config.api.max_concurrency)
                    assert bound < 300 * 2
                    with blocker.connect() as conn:
                        # Reads go on; the writer's INSERT into tenant_day waits for the lock.
                        conn.exec_driver_sql("LOCK TABLE tenant_day IN EXCLUSIVE MODE")
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(_cycle_into, runtime, outcome)
                            reached = functools.partial(_answered_at_least, sim, bound)
                            await eventually(reached, within=60, what="the bound")
                            await anyio.sleep(1.0)  # time for more requests, had there been room
                            served_while_locked = _usage_answers(sim)
                            stored_while_locked = await runtime.store.days_state(tenants[0].id)
                            conn.rollback()  # the writer goes on
                    stored = [await runtime.store.days_state(t.id) for t in tenants]
            finally:
                blocker.dispose()
    assert served_while_locked == bound
    assert stored_while_locked == {}
    assert outcome[0].ok
    assert sum(len(days) for days in stored) == 300 * 3
