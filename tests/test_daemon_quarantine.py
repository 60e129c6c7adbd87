"""The daemon process with an API whose 200 bodies fail validation: quarantine in the open.

The quarantined days show in ``/status`` (with their reasons) and ``/metrics``, each cycle asks
for them once, and they heal without manual action once the API sends valid bodies again.
"""

from __future__ import annotations

from pathlib import Path

from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.daemon_process import DaemonProcess, eventually, sqlite_days
from tests.e2e import daemon_config, expected_days


async def test_quarantined_days_show_in_status_and_metrics_and_heal(tmp_path: Path) -> None:
    """While one tenant's API answers wrongly typed 200 bodies, /status lists its quarantined
    days with reasons and /metrics counts them; the other tenant is unaffected; once the bodies
    are valid again, the days are stored and the quarantine is gone."""
    tenants = demo_tenants(2)
    lookback = 3
    expected = expected_days(tenants, lookback)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        sim.faults.set("tenant-02", bad_response="wrong_types")
        config = daemon_config(
            tmp_path,
            sim,
            tenants,
            lookback=lookback,
        )
        async with DaemonProcess(config) as d:
            await eventually(
                lambda: d.listen is not None, within=30, what="the ops server", daemon=d
            )

            async def quarantined() -> bool:
                status = await d.status()  # {"state": "starting", "tenants": []} at first
                counts = {t["tenant"]: t["days_quarantined"] for t in status["tenants"]}
                return counts.get("tenant-02") == lookback

            await eventually(quarantined, within=30, what="quarantined days in status", daemon=d)
            status = await d.status()
            tenant = next(t for t in status["tenants"] if t["tenant"] == "tenant-02")
            assert all(q["reason"].startswith("BadResponse") for q in tenant["quarantined"])
            metrics = await d.metrics()
            assert metrics['zencoder_collector_days_quarantined{tenant="tenant-02"}'] == lookback
            assert metrics['zencoder_collector_days_quarantined{tenant="tenant-01"}'] == 0

            sim.faults.set("tenant-02", bad_response=None)
            await eventually(
                lambda: sqlite_days(tmp_path / "usage.db") == expected,
                within=30,
                what="the quarantined days stored once the API is fixed",
                daemon=d,
            )

            async def healed() -> bool:
                metrics = await d.metrics()
                return metrics['zencoder_collector_days_quarantined{tenant="tenant-02"}'] == 0

            await eventually(healed, within=15, what="the quarantine gauge back to 0", daemon=d)
            assert await d.stop() == 0
