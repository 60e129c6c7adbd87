"""``reprocess``: days re-derived from stored 200 bodies with the current parser, without the API.

Each test runs the real command (``python -m collector reprocess``) against a real SQLite state
store, with the simulator running at the configured API address so that any request the command
made would be counted there.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

from collector.pipeline import utc_today
from collector.reprocess import reprocess_stored
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from collector.simulator.app import Simulator
from collector.store import Store
from tests.e2e import run_cli, write_config
from tests.test_store import fetched, usage_data

OLDER_REASON = (
    "BadResponse: HTTP 200: response does not match the documented schema "
    "(at data.users[0].last_active: Invalid RFC3339 encoded date)"
)
"""What the release before ISO 8601 date-times were accepted said of a date-time last_active."""


def body_with_datetimes(day: dt.date, users: int) -> bytes:
    """A 200 body whose users' last_active are date-times, as the API's docs allow."""
    data = usage_data(day, users=users)
    for user in data["users"]:
        user["last_active"] = f"{day.isoformat()}T14:03:11Z"
    return json.dumps({"status": "success", "data": data}).encode()


def api_requests(sim: Simulator) -> int:
    """Every request the simulator answered: usage (any status) and token requests."""
    return sum(sim.stats.responses.values()) + sum(sim.stats.token_requests.values())


def usage_rows(path: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT tenant, day, active_users FROM usage_daily ORDER BY tenant, day"
        ).fetchall()


async def test_a_day_quarantined_by_an_earlier_parser_is_recovered_without_the_api(
    tmp_path: Path,
) -> None:
    """A day an earlier release quarantined is stored, delivered and no longer quarantined after
    ``reprocess`` with the current parser, with zero API requests.

    How "an earlier parser" is honest here: the state database outlives collector versions, so
    the test writes it as the previous release left it, through the store's own
    ``record_quarantined`` (the call the pipeline makes): the body as the API sent it, with
    ``last_active`` date-times that release rejected ("Invalid RFC3339 encoded date") and the
    current parser accepts. Nothing of the collector is patched; the command runs in its own
    process. ``test_pipeline`` proves the pipeline itself quarantines with the body kept.
    """
    tenants = demo_tenants(2)
    day = utc_today() - dt.timedelta(days=3)
    other_day = day - dt.timedelta(days=1)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(tmp_path / "c.yaml", sim, tenants, workdir=tmp_path)
        store = await Store.open(f"sqlite:///{tmp_path / 'state.db'}")
        try:
            for tenant, when in (("tenant-01", day), ("tenant-02", other_day)):
                body = body_with_datetimes(when, users=4)
                await store.record_quarantined(tenant, when, OLDER_REASON, body)
        finally:
            await store.aclose()

        only_one = await run_cli(
            "reprocess", "-c", str(config), "--tenant", "tenant-01", "--since", day.isoformat()
        )
        status = await run_cli("status", "-c", str(config), "--json")
        requests = api_requests(sim)
    assert only_one.returncode == 0, only_one.stdout + only_one.stderr
    assert "recovered 1 quarantined day(s) (1 queued for delivery)" in only_one.stdout
    assert requests == 0
    assert usage_rows(tmp_path / "usage.db") == [("tenant-01", day.isoformat(), 4)]
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        stamps = {at for (at,) in conn.execute("SELECT last_active_at FROM usage_user_daily")}
    assert len(stamps) == 1
    assert None not in stamps  # the time of day the earlier parser could not read
    tenants_status = {t["tenant"]: t for t in json.loads(status.stdout)["tenants"]}
    assert tenants_status["tenant-01"]["days_quarantined"] == 0
    assert tenants_status["tenant-01"]["days_complete"] == 1
    assert [q["day"] for q in tenants_status["tenant-02"]["quarantined"]] == [other_day.isoformat()]


async def test_a_body_the_current_parser_still_rejects_stays_quarantined(tmp_path: Path) -> None:
    """Days the real pipeline quarantined stay quarantined (exit 1, reason listed) when the
    current parser still rejects their stored bodies, and reprocess asks the API nothing."""
    tenants = demo_tenants(1)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        sim.faults.set("tenant-01", bad_response="wrong_types")
        config = write_config(tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=2)
        run = await run_cli("run", "--once", "-c", str(config))
        before = api_requests(sim)
        result = await run_cli("reprocess", "-c", str(config))
        after = api_requests(sim)
        status = await run_cli("status", "-c", str(config))
    assert run.returncode == 1, run.stdout + run.stderr
    assert before > 0
    assert after == before
    assert result.returncode == 1, result.stdout + result.stderr
    assert "recovered 0 quarantined day(s)" in result.stdout
    assert result.stdout.count("still quarantined: BadResponse") == 2
    assert "quarantined: BadResponse" in status.stdout
    assert not (tmp_path / "usage.db").exists() or usage_rows(tmp_path / "usage.db") == []


async def test_stored_days_are_checked_and_left_alone(tmp_path: Path) -> None:
    """Days stored by a good fetch are re-read without being queued again or asking the API."""
    tenants = demo_tenants(1)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=3)
        run = await run_cli("run", "--once", "-c", str(config))
        before = api_requests(sim)
        result = await run_cli("reprocess", "-c", str(config))
        after = api_requests(sim)
    assert run.returncode == 0, run.stdout + run.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    assert after == before
    assert "recovered 0 quarantined day(s) (0 queued for delivery)" in result.stdout
    assert "3 stored day(s) read fine; 0 unreadable" in result.stdout


async def test_reprocess_stored_reports_unreadable_payloads_and_judges_finality(
    tmp_path: Path,
) -> None:
    """A stored payload the current parser cannot read is reported and left as it is; a
    recovered day is final only if it had settled when its body arrived."""
    store = await Store.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        today = utc_today()
        settled, settling, broken = (today - dt.timedelta(days=n) for n in (5, 1, 8))
        for day in (settled, settling):
            await store.record_quarantined("acme", day, OLDER_REASON, body_with_datetimes(day, 3))
        td, _ = fetched("acme", broken)
        await store.record_fetched([(td, '{"status": "success", "data": {"period": 7}}')])
        result = await reprocess_stored(store, ["acme"], lambda _tenant: 2)
        states = await store.days_state("acme")
    finally:
        await store.aclose()
    assert result.recovered == [("acme", settled), ("acme", settling)]
    assert [key for key, _ in result.unreadable] == [("acme", broken)]
    assert "data.period" in result.unreadable[0][1]
    assert (states[settled].status, states[settled].final) == ("final", True)
    assert (states[settling].status, states[settling].final) == ("fetched", False)
    assert states[broken].content_hash == td.content_hash  # left as it was
