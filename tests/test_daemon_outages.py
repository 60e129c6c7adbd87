"""The daemon process through outages: a webhook receiver answering 503, an API that is down.

Both heal without manual action: the backlog is visible meanwhile (``/metrics``, ``status``) and
drains when the receiver is back; the days the API could not serve are fetched by later cycles.
"""

from __future__ import annotations

import json
from pathlib import Path

from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.daemon_process import DaemonProcess, eventually, sqlite_days
from tests.e2e import daemon_config, expected_days, run_cli
from tests.servers import WebhookReceiver

HOOK_SECRET = "outage-test-secret"


def _csv_days(root: Path) -> list[tuple[str, str]]:
    """(tenant, day) of every usage_daily CSV partition."""
    return sorted((p.parent.parent.name, p.stem) for p in root.glob("*/usage_daily/*.csv"))


async def test_webhook_outage_keeps_other_sinks_current_and_drains_after(tmp_path: Path) -> None:
    """While the webhook answers 503, SQLite and CSV get every day, the hook's backlog shows in
    /metrics and ``status`` with nothing dead-lettered; when it recovers everything arrives."""
    tenants = demo_tenants(2)
    lookback = 4
    expected = expected_days(tenants, lookback)
    async with (
        running_simulator(SimulatorSettings(tenants=tenants)) as sim,
        WebhookReceiver(HOOK_SECRET) as receiver,
    ):
        receiver.answer(503, times=1_000_000, headers={"Retry-After": "0"})
        config = daemon_config(
            tmp_path,
            sim,
            tenants,
            lookback=lookback,
            sinks={
                "warehouse": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
                "sheets": {"type": "csv", "path": str(tmp_path / "csv")},
                "hook": {
                    "type": "webhook",
                    "url": receiver.url,
                    "secret": HOOK_SECRET,
                    "max_retries": 0,
                    "max_attempts": 3,
                },
            },
        )
        async with DaemonProcess(config) as d:
            await eventually(
                lambda: (
                    sqlite_days(tmp_path / "usage.db") == expected
                    and _csv_days(tmp_path / "csv") == expected
                ),
                within=30,
                what="SQLite and CSV current during the webhook outage",
                daemon=d,
            )
            await eventually(lambda: d.listen is not None, within=10, what="ops server")

            async def backlog_visible() -> bool:
                metrics = await d.metrics()
                return metrics.get('zencoder_collector_sink_backlog{sink="hook"}', 0) > 0

            await eventually(backlog_visible, within=10, what="hook backlog in /metrics", daemon=d)
            # More failed writes than max_attempts, yet an outage dead-letters nothing.
            await eventually(
                lambda: len(receiver.requests) > 10, within=20, what="retries", daemon=d
            )
            metrics = await d.metrics()
            assert metrics['zencoder_collector_sink_backlog{sink="warehouse"}'] == 0
            assert metrics['zencoder_collector_sink_dead_letters{sink="hook"}'] == 0
            assert metrics['zencoder_collector_sink_failures_total{sink="hook"}'] > 0
            status = await run_cli("status", "-c", str(config), "--json")
            assert status.returncode == 0, status.stderr
            sinks = {s["sink"]: s for s in json.loads(status.stdout)["sinks"]}
            assert sinks["hook"]["backlog"] > 0
            assert sinks["hook"]["dead_letters"] == 0
            assert sinks["hook"]["last_error"]
            assert sinks["warehouse"]["backlog"] == 0

            receiver.clear_answers()

            def all_arrived() -> bool:
                days = {(p["tenant"], p["day"]) for p in receiver.payloads()}
                return sorted(days) == expected

            await eventually(all_arrived, within=30, what="every day at the webhook", daemon=d)

            async def drained() -> bool:
                metrics = await d.metrics()
                return metrics['zencoder_collector_sink_backlog{sink="hook"}'] == 0

            await eventually(drained, within=15, what="hook backlog 0", daemon=d)
            assert await d.stop() == 0
    assert receiver.bad_signatures == 0


async def test_api_outage_is_healed_by_later_cycles(tmp_path: Path) -> None:
    """With the API down, cycles fail and status says so; once it is back, the next cycles fetch
    every missing day without any manual action."""
    tenants = demo_tenants(2)
    lookback = 5
    expected = expected_days(tenants, lookback)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        sim.faults.set(None, down=True)
        config = daemon_config(
            tmp_path,
            sim,
            tenants,
            lookback=lookback,
        )
        async with DaemonProcess(config) as d:
            await eventually(
                lambda: sim.stats.responses[500] >= 30,
                within=30,
                what="several failing cycles",
                daemon=d,
            )

            async def failing() -> bool:
                status = await d.status()
                return all(
                    t["state"] == "failing" and t["days_failed"] == lookback
                    for t in status["tenants"]
                )

            await eventually(failing, within=15, what="status showing the outage", daemon=d)
            metrics = await d.metrics()
            assert metrics['zencoder_collector_fetch_errors_total{tenant="tenant-01"}'] > 0
            assert metrics['zencoder_collector_days_failed{tenant="tenant-01"}'] == lookback
            assert sqlite_days(tmp_path / "usage.db") == []

            sim.faults.set(None, down=None)
            await eventually(
                lambda: sqlite_days(tmp_path / "usage.db") == expected,
                within=30,
                what="the gap filled after the outage",
                daemon=d,
            )

            async def healthy() -> bool:
                status = await d.status()
                return all(
                    t["state"] == "ok" and t["days_failed"] == 0 and t["days_complete"] == lookback
                    for t in status["tenants"]
                )

            await eventually(healthy, within=15, what="status back to ok", daemon=d)
            assert await d.stop() == 0
