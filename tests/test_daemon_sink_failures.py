"""The daemon process with a sink that cannot be opened: the failure shows where the docs say.

A csv sink whose root is a regular file fails ``open()``; ``status`` must show it as the sink's
last error, ``sink_failures_total`` must count it and ``/status`` must show the lane down, while
the healthy SQLite sink gets every day.
"""

from __future__ import annotations

import json
from pathlib import Path

from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.daemon_process import DaemonProcess, eventually, sqlite_days
from tests.e2e import daemon_config, run_cli


async def test_a_sink_that_cannot_open_shows_in_status_and_metrics(tmp_path: Path) -> None:
    """An unopenable csv sink: status last error 'open failed: ...', failures counted, lane down;
    the SQLite sink is unaffected."""
    tenants = demo_tenants(1)
    blocker = tmp_path / "csv-root-is-a-file"
    blocker.write_text("not a directory")
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = daemon_config(
            tmp_path,
            sim,
            tenants,
            lookback=2,
            every="1h",
            sinks={
                "warehouse": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
                "sheets": {"type": "csv", "path": str(blocker)},
            },
        )
        async with DaemonProcess(config) as d:
            await eventually(
                lambda: len(sqlite_days(tmp_path / "usage.db")) == 2,
                within=30,
                what="SQLite current",
                daemon=d,
            )
            await eventually(lambda: d.listen is not None, within=10, what="ops server")

            async def failures_counted() -> bool:
                metrics = await d.metrics()
                return metrics.get('zencoder_collector_sink_failures_total{sink="sheets"}', 0) > 0

            await eventually(failures_counted, within=15, what="sheets failures", daemon=d)
            daemon_status = await d.status()
            assert daemon_status["daemon"]["sink_lanes"]["sheets"] == "down"
            status = await run_cli("status", "-c", str(config), "--json")
            assert status.returncode == 0, status.stderr
            sinks = {s["sink"]: s for s in json.loads(status.stdout)["sinks"]}
            assert sinks["sheets"]["last_error"].startswith("open failed: SinkTransientError")
            assert sinks["sheets"]["backlog"] == 2
            assert sinks["warehouse"]["last_error"] is None
            assert sinks["warehouse"]["last_success_at"] is not None
            assert await d.stop() == 0
