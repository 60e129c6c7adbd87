"""The daemon: schedules, and the real process under SIGTERM, SIGHUP and an unreachable store.

The process tests run ``python -m collector run -c FILE`` as a child (real signals, real sockets)
against the simulator and read the results from the SQLite sink, the state database, the ops
endpoints and the simulator's own request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import yaml

from collector.app import load, load_plugins
from collector.daemon import DEFAULT_GRACE, grace_from_env, next_run_after, schedule_seconds
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.daemon_process import DaemonProcess, eventually, sqlite_days
from tests.e2e import daemon_config, expected_days, window_days

AFTER = dt.datetime(2026, 3, 4, 10, 7, 30, tzinfo=dt.UTC)


def _schedule_config(tmp_path: Path, schedule: dict[str, Any], tenant_schedule: Any = None) -> Any:
    tenant: dict[str, Any] = {"id": "acme", "api_key": "zak_acme"}
    if tenant_schedule is not None:
        tenant["schedule"] = tenant_schedule
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": "http://127.0.0.1:9", "token_url": "http://127.0.0.1:9/t"},
                "collection": {"schedule": schedule},
                "tenants": [tenant],
            }
        ),
        encoding="utf-8",
    )
    config = load(path, load_plugins())
    return config, config.tenants[0]


# --- schedules ------------------------------------------------------------------------------------


def test_every_without_jitter_is_exact(tmp_path: Path) -> None:
    """``every: 90s`` with no jitter runs exactly 90 s after the previous start."""
    config, tenant = _schedule_config(tmp_path, {"every": "90s", "jitter": "0s"})
    assert next_run_after(config, tenant, AFTER, random.Random(1)) == AFTER + dt.timedelta(
        seconds=90
    )


def test_every_with_jitter_stays_within_bounds_and_spreads(tmp_path: Path) -> None:
    """With jitter J, each next run lies in [after + every, after + every + J], and a thousand
    tenants do not all get the same second."""
    config, tenant = _schedule_config(tmp_path, {"every": "1h", "jitter": "5m"})
    rng = random.Random(7)
    runs = [next_run_after(config, tenant, AFTER, rng) for _ in range(1000)]
    low, high = AFTER + dt.timedelta(hours=1), AFTER + dt.timedelta(hours=1, minutes=5)
    assert all(low <= r <= high for r in runs)
    assert len({r.replace(microsecond=0) for r in runs}) > 200


def test_cron_gives_the_next_matching_time_plus_jitter(tmp_path: Path) -> None:
    """``cron: "*/15 * * * *"`` after 10:07:30 is 10:15 (UTC), plus at most the jitter."""
    config, tenant = _schedule_config(tmp_path, {"cron": "*/15 * * * *", "jitter": "30s"})
    rng = random.Random(3)
    expected = dt.datetime(2026, 3, 4, 10, 15, tzinfo=dt.UTC)
    runs = [next_run_after(config, tenant, AFTER, rng) for _ in range(200)]
    assert all(expected <= r <= expected + dt.timedelta(seconds=30) for r in runs)
    assert min(runs) < expected + dt.timedelta(seconds=5)
    assert max(runs) > expected + dt.timedelta(seconds=25)
    hourly, tenant = _schedule_config(tmp_path, {"cron": "5 * * * *", "jitter": "0s"})
    assert next_run_after(hourly, tenant, AFTER, rng) == dt.datetime(
        2026, 3, 4, 11, 5, tzinfo=dt.UTC
    )


def test_tenant_schedule_overrides_the_default(tmp_path: Path) -> None:
    """A tenant's own ``schedule.every`` wins over ``collection.schedule``; jitter is inherited."""
    config, tenant = _schedule_config(
        tmp_path, {"every": "1h", "jitter": "0s"}, tenant_schedule={"every": "10m"}
    )
    assert next_run_after(config, tenant, AFTER, random.Random(0)) == AFTER + dt.timedelta(
        minutes=10
    )


def test_grace_comes_from_the_environment() -> None:
    """The shutdown grace is read from ZENCODER_COLLECTOR_SHUTDOWN_GRACE, defaulting when unset
    or not a number."""
    assert grace_from_env({}) == DEFAULT_GRACE
    assert grace_from_env({"ZENCODER_COLLECTOR_SHUTDOWN_GRACE": "3.5"}) == 3.5
    assert grace_from_env({"ZENCODER_COLLECTOR_SHUTDOWN_GRACE": "soon"}) == DEFAULT_GRACE


# --- the real process -----------------------------------------------------------------------------


def _stored_days(state_db: Path) -> set[tuple[str, str]]:
    """(tenant, day) of every fetched day in the state database."""
    with contextlib.closing(sqlite3.connect(state_db)) as conn:
        return set(
            conn.execute("SELECT tenant, day FROM tenant_day WHERE content_hash IS NOT NULL")
        )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_lets_a_busy_cycle_finish_and_exits_zero(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGTERM (or SIGINT) in the middle of a slow cycle: the cycle finishes within the grace
    period, every fetched day is delivered, and the process exits 0 well before the grace ends."""
    tenants = demo_tenants(2)
    lookback = 8
    async with running_simulator(SimulatorSettings(tenants=tenants, latency=0.25)) as sim:
        config = daemon_config(tmp_path, sim, tenants, lookback=lookback, every="1h")
        async with DaemonProcess(config, env={"ZENCODER_COLLECTOR_SHUTDOWN_GRACE": "20"}) as d:
            await eventually(
                lambda: sum(sim.stats.usage_requests.values()) >= 2,
                within=30,
                what="the first requests",
                daemon=d,
            )
            asked = time.monotonic()
            d.signal(signum)
            code = await d.wait(25)
            took = time.monotonic() - asked
        assert code == 0, d.output()[-3000:]
        assert took < 15, took
        assert d.events("daemon stopped")
        assert not d.events("grace period over: cancelled in-flight cycles")
        assert sqlite_days(tmp_path / "usage.db") == expected_days(tenants, lookback)


async def test_sigterm_past_the_grace_cancels_and_a_restart_completes(tmp_path: Path) -> None:
    """When a cycle outlasts the grace period the daemon cancels it and still exits 0 on time;
    what was committed stays committed (the restart does not fetch it again), and the restart
    fetches and delivers the rest."""
    tenants = demo_tenants(2)
    lookback = 20
    async with running_simulator(SimulatorSettings(tenants=tenants, latency=0.6)) as sim:
        config = daemon_config(tmp_path, sim, tenants, lookback=lookback, every="1h")
        async with DaemonProcess(config, env={"ZENCODER_COLLECTOR_SHUTDOWN_GRACE": "1"}) as d:
            await eventually(
                lambda: sim.stats.responses[200] >= 6, within=30, what="some days", daemon=d
            )
            asked = time.monotonic()
            d.signal(signal.SIGTERM)
            code = await d.wait(20)
            took = time.monotonic() - asked
        assert code == 0, d.output()[-3000:]
        assert took < 6, took
        assert d.events("grace period over: cancelled in-flight cycles")
        committed = _stored_days(tmp_path / "state.db")
        assert 6 <= len(committed) < len(tenants) * lookback
        served_before = len(sim.stats.log)

        sim.faults.set(None, latency=0.0)
        async with DaemonProcess(config) as again:
            await eventually(
                lambda: sqlite_days(tmp_path / "usage.db") == expected_days(tenants, lookback),
                within=40,
                what="every day in the sink after the restart",
                daemon=again,
            )
            assert await again.stop() == 0
    refetched = {(r.tenant, r.param) for r in list(sim.stats.log)[served_before:]}
    recent = set(window_days(2))  # today and yesterday (settle_days=1) are re-fetched by design
    assert not {(t, day) for t, day in committed if day not in recent} & refetched


async def test_a_second_sigterm_ends_the_grace_period_at_once(tmp_path: Path) -> None:
    """With a long grace period, a second SIGTERM cancels the in-flight cycle at once, and the
    daemon still exits 0."""
    tenants = demo_tenants(1)
    async with running_simulator(SimulatorSettings(tenants=tenants, latency=1.0)) as sim:
        config = daemon_config(tmp_path, sim, tenants, lookback=30, every="1h")
        async with DaemonProcess(config, env={"ZENCODER_COLLECTOR_SHUTDOWN_GRACE": "60"}) as d:
            await eventually(
                lambda: sim.stats.responses[200] >= 4, within=30, what="some days", daemon=d
            )
            d.signal(signal.SIGTERM)
            await eventually(
                lambda: bool(d.events("stop requested: finishing in-flight work")),
                within=10,
                what="the first signal handled",
                daemon=d,
            )
            asked = time.monotonic()
            d.signal(signal.SIGTERM)
            code = await d.wait(30)
            took = time.monotonic() - asked
        assert code == 0, d.output()[-3000:]
        assert took < 5, took
        assert d.events("second stop signal: cancelling in-flight work now")
        assert d.events("grace period over: cancelled in-flight cycles")


async def test_sighup_adds_removes_changes_and_rejects(tmp_path: Path) -> None:
    """SIGHUP: an added tenant starts collecting, a removed tenant gets no more requests, a
    tenant whose secret changed drops its cached token (the new, wrong secret is used at once), an
    added sink receives the stored history, and an invalid file is rejected with its problems
    logged while the old config keeps running."""
    tenants = demo_tenants(3)
    lookback = 3
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = daemon_config(tmp_path, sim, tenants[:2], lookback=lookback)
        async with DaemonProcess(config) as d:
            db = tmp_path / "usage.db"
            await eventually(
                lambda: sqlite_days(db) == expected_days(tenants[:2], lookback),
                within=30,
                what="the first two tenants collected",
                daemon=d,
            )
            tokens_before = sim.stats.token_requests["tenant-01-client"]
            # Replace tenant-02 with tenant-03; tenant-01's secret becomes a wrong one; a CSV
            # sink joins the SQLite one.
            daemon_config(
                tmp_path,
                sim,
                [tenants[0], tenants[2]],
                lookback=lookback,
                bad_secret_for=frozenset({"tenant-01"}),
                sinks={
                    "warehouse": {"type": "sqlite", "path": str(db)},
                    "sheets": {"type": "csv", "path": str(tmp_path / "csv")},
                },
            )
            d.signal(signal.SIGHUP)
            await eventually(
                lambda: bool(d.events("config reloaded")), within=15, what="reload", daemon=d
            )
            reloaded = d.events("config reloaded")[0]
            assert reloaded["added"] == ["tenant-03"]
            assert reloaded["removed"] == ["tenant-02"]
            assert reloaded["credentials_changed"] == ["tenant-01"]
            assert reloaded["sinks_restarted"] is True
            # The new sink gets the stored history of tenant-01, whose fetching now fails.
            csv_root = tmp_path / "csv" / "tenant-01" / "usage_daily"
            await eventually(
                lambda: sorted(p.stem for p in csv_root.glob("*.csv")) == window_days(lookback),
                within=20,
                what="tenant-01's history in the added CSV sink",
                daemon=d,
            )
            await eventually(
                lambda: {t for t, _ in sqlite_days(db)} == {"tenant-01", "tenant-02", "tenant-03"},
                within=30,
                what="the added tenant collected",
                daemon=d,
            )

            async def tenant_01_rejected() -> bool:
                states = {t["tenant"]: t["state"] for t in (await d.status())["tenants"]}
                return states.get("tenant-01") == "auth_failed"

            await eventually(tenant_01_rejected, within=20, what="tenant-01 auth_failed", daemon=d)
            # Its cached (still valid) token was dropped: a new token was asked with the new secret.
            assert sim.stats.token_requests["tenant-01-client"] > tokens_before
            await asyncio.sleep(0.5)  # a request of tenant-02 in flight at the reload may land
            removed_count = sim.stats.usage_requests["tenant-02"]
            kept_count = sim.stats.usage_requests["tenant-03"]
            await eventually(
                lambda: sim.stats.usage_requests["tenant-03"] >= kept_count + 4,
                within=20,
                what="two more cycles of tenant-03",
                daemon=d,
            )
            assert sim.stats.usage_requests["tenant-02"] == removed_count
            status = await d.status()
            assert [t["tenant"] for t in status["tenants"]] == ["tenant-01", "tenant-03"]
            metrics = await d.metrics()
            assert not any('tenant="tenant-02"' in key for key in metrics)
            assert metrics['zencoder_collector_tenant_auth_failed{tenant="tenant-01"}'] == 1

            # An invalid file: rejected, logged with file and line, old config kept.
            config.write_text(
                config.read_text(encoding="utf-8") + "\nbogus_key: [1\n", encoding="utf-8"
            )
            d.signal(signal.SIGHUP)
            await eventually(
                lambda: bool(d.events("config reload rejected; keeping the running config")),
                within=15,
                what="the rejection",
                daemon=d,
            )
            rejected = d.events("config reload rejected; keeping the running config")[0]
            assert any(str(config) in p for p in rejected["problems"])
            before = sim.stats.usage_requests["tenant-03"]
            await eventually(
                lambda: sim.stats.usage_requests["tenant-03"] >= before + 4,
                within=20,
                what="collection going on with the old config",
                daemon=d,
            )
            metrics = await d.metrics()
            assert metrics["zencoder_collector_config_reload_failures_total"] == 1
            assert metrics["zencoder_collector_config_reloads_total"] == 1
            assert await d.stop() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.mark.postgres
async def test_readyz_waits_for_an_unreachable_state_store(
    tmp_path: Path, postgres_url: str
) -> None:
    """With the state database down, /healthz answers 200 and /readyz 503 with the reason; once
    the database is reachable (a TCP proxy to it starts) the daemon opens it and turns ready."""
    real = sqlalchemy.make_url(postgres_url)
    port = _free_port()
    via_proxy = real.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    tenants = demo_tenants(1)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = daemon_config(
            tmp_path, sim, tenants, lookback=2, every="1h", state={"url": via_proxy}
        )
        async with DaemonProcess(config) as d:
            await eventually(lambda: d.listen is not None, within=20, what="ops server", daemon=d)
            assert (await d.get("/healthz"))[0] == 200
            status, body = await d.get("/readyz")
            assert status == 503
            assert "state store" in body
            await eventually(
                lambda: bool(d.events("state store unreachable; retrying")),
                within=10,
                what="a retry",
                daemon=d,
            )

            async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                up_reader, up_writer = await asyncio.open_connection(real.host, real.port)
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

            proxy = await asyncio.start_server(forward, "127.0.0.1", port)
            async with proxy:

                async def ready() -> bool:
                    return (await d.get("/readyz"))[0] == 200

                await eventually(ready, within=30, what="/readyz 200", daemon=d)
                assert await d.stop() == 0
    assert real.password
    assert real.password not in d.output()


async def test_metrics_show_zero_counters_schedule_api_outcomes_and_process(
    tmp_path: Path,
) -> None:
    """A running daemon's /metrics has every configured tenant's error counters at 0, its
    schedule interval, the API requests by outcome and their time, the process_* metrics and
    build_info."""
    tenants = demo_tenants(2)
    lookback = 2
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = daemon_config(tmp_path, sim, tenants, lookback=lookback, every="1h")
        async with DaemonProcess(config) as d:
            await eventually(
                lambda: sqlite_days(tmp_path / "usage.db") == expected_days(tenants, lookback),
                within=60,
                what="the first cycle delivered",
                daemon=d,
            )
            metrics = await d.metrics()
    for tenant in tenants:
        assert metrics[f'zencoder_collector_fetch_errors_total{{tenant="{tenant.id}"}}'] == 0
        assert (
            metrics[f'zencoder_collector_schedule_interval_seconds{{tenant="{tenant.id}"}}'] == 3600
        )
        ok = f'zencoder_collector_api_requests_total{{outcome="ok",tenant="{tenant.id}"}}'
        assert metrics[ok] >= lookback
        # The client's own counters are mirrored: request time grew, nothing failed.
        assert metrics[f'zencoder_collector_api_request_seconds_total{{tenant="{tenant.id}"}}'] > 0
        for quiet in (
            "api_bad_responses_total",
            "token_request_failures_total",
            "fetch_retry_wait_seconds_total",
            "retry_after_clamped_total",
        ):
            assert metrics[f'zencoder_collector_{quiet}{{tenant="{tenant.id}"}}'] == 0
    assert metrics['zencoder_collector_sink_failures_total{sink="warehouse"}'] == 0
    assert metrics["process_resident_memory_bytes"] > 0
    assert any(key.startswith("zencoder_collector_build_info{") for key in metrics)
    # Between cycles no request holds or waits for a concurrency slot (none leaked).
    assert metrics["zencoder_collector_api_requests_in_flight"] == 0
    assert metrics["zencoder_collector_api_requests_queued"] == 0


async def test_metrics_show_requests_in_flight_and_queued_for_a_slot(tmp_path: Path) -> None:
    """While a cycle of more requests than ``max_concurrency`` (32) waits on a slow API, /metrics
    shows every slot in flight and the rest queued."""
    tenants = demo_tenants(40)
    async with running_simulator(SimulatorSettings(tenants=tenants, latency=1.0)) as sim:
        config = daemon_config(tmp_path, sim, tenants, lookback=2, every="1h")
        async with DaemonProcess(config) as d:
            await eventually(lambda: d.listen is not None, within=30, what="ops", daemon=d)

            async def saturated() -> bool:
                metrics = await d.metrics()
                return (
                    metrics.get("zencoder_collector_api_requests_in_flight") == 32
                    and metrics.get("zencoder_collector_api_requests_queued", 0) > 0
                )

            await eventually(saturated, within=30, what="every slot busy, more queued", daemon=d)


def test_schedule_seconds_is_the_interval_or_cron_gap_plus_jitter(tmp_path: Path) -> None:
    """The exported schedule interval is ``every`` plus the jitter, or for cron the gap between
    two runs plus the jitter (what the stale-tenant alert doubles)."""
    config, tenant = _schedule_config(tmp_path, {"every": "1h", "jitter": "5m"})
    assert schedule_seconds(config, tenant) == 3900
    config, tenant = _schedule_config(tmp_path, {"cron": "0 */6 * * *", "jitter": "0s"})
    assert schedule_seconds(config, tenant) == 6 * 3600
