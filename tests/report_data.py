"""Report test data made by the real pipeline: ``backfill`` against the simulator into four sinks
(SQLite keeping emails, CSV, SQLite with pseudonyms, SQLite with per-user rows dropped, and a
PostgreSQL ``sql`` sink when a test database is given), plus what the simulator served, as the
independent truth the tests compare the report with."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from collector.pii import Pseudonymizer
from collector.pipeline import utc_today
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.e2e import run_cli, write_config

NAMES = {"tenant-01": "Acme Corp", "tenant-02": 'Globex <R&D> "East"', "tenant-03": "Initech"}
PII_KEY = "report-test-pseudonym-key"
COLLECTED_DAYS = 40
"""Days backfilled, ending today: more than the 30-day window, so stale users exist before it."""


@dataclass
class Collected:
    config: Path
    workdir: Path
    until: dt.date
    """The last settled day (yesterday): the window's end in the tests."""
    truth: dict[str, dict[dt.date, dict[str, Any]]]
    """tenant id -> day -> the ``data`` object the simulator served for that day."""

    def users_by_day(self, tenant: str) -> dict[dt.date, dict[str, int]]:
        """day -> email -> messages, as served."""
        return {
            day: {u["email"]: u["messages"] for u in data["users"]}
            for day, data in self.truth[tenant].items()
        }


def pseudonym(email: str) -> str:
    return Pseudonymizer(PII_KEY.encode()).pseudonym(email)


def collect(workdir: Path, postgres_url: str | None = None) -> Collected:
    """Backfill :data:`COLLECTED_DAYS` days of three simulated tenants into every test sink."""
    return asyncio.run(_collect(workdir, postgres_url))


async def _collect(workdir: Path, postgres_url: str | None) -> Collected:
    tenants = demo_tenants(3)
    today = utc_today()
    since = today - dt.timedelta(days=COLLECTED_DAYS - 1)
    sinks: dict[str, Any] = {
        "warehouse": {"type": "sqlite", "path": str(workdir / "usage.db")},
        "sheets": {"type": "csv", "path": str(workdir / "csv"), "fsync": False},
        "pseudo": {
            "type": "sqlite",
            "path": str(workdir / "pseudo.db"),
            "pii": "pseudonymize",
            "pii_key": PII_KEY,
        },
        "totals": {"type": "sqlite", "path": str(workdir / "totals.db"), "pii": "drop"},
        "hook": {
            "type": "webhook",
            "url": "http://127.0.0.1:9/never-called",
            "secret": "report-test-webhook-secret",
        },
    }
    if postgres_url:
        sinks["dwh"] = {"type": "sql", "url": postgres_url}
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(workdir / "config.yaml", sim, tenants, workdir=workdir, sinks=sinks)
        # The webhook sink only shows that report refuses a sink it cannot read: route no tenant
        # to it, so nothing waits on a receiver that does not exist.
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
        for entry in document["tenants"]:
            entry["name"] = NAMES[entry["id"]]
            entry["sinks"] = [name for name in sinks if name != "hook"]
        config.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        result = await run_cli("backfill", "-c", str(config), "--since", since.isoformat())
        assert result.returncode == 0, result.stdout + result.stderr
        span = [since + dt.timedelta(days=i) for i in range(COLLECTED_DAYS)]
        truth = {t.id: {day: sim.day_data(t.id, day) for day in span} for t in tenants}
    return Collected(config, workdir, today - dt.timedelta(days=1), truth)
