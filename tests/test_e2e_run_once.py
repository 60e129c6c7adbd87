"""End to end: ``run --once`` as a subprocess against the simulator over real sockets."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

from collector.pipeline import utc_today
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.e2e import count_rows, run_cli, write_config

LOOKBACK = 5


def _window() -> list[dt.date]:
    today = utc_today()
    return [today - dt.timedelta(days=i) for i in range(LOOKBACK)]


async def test_run_once_ten_tenants_one_bad(tmp_path: Path) -> None:
    """Every good tenant-day lands in SQLite exactly as the simulator served it, a rerun adds
    nothing, and the bad tenant makes the exit code non-zero without stopping the others."""
    tenants = demo_tenants(10)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(
            tmp_path / "config.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=LOOKBACK,
            bad_secret_for={"tenant-07"},
        )
        first = await run_cli("run", "--once", "-c", str(config))
        assert first.returncode == 1, first.stderr
        assert "tenant-07" in first.stdout
        assert "AuthError" in first.stdout
        db = tmp_path / "usage.db"
        counts = count_rows(db)

        good = [t for t in tenants if t.id != "tenant-07"]
        with sqlite3.connect(db) as conn:
            for tenant in good:
                for day in _window():
                    expected = sim.day_data(tenant.id, day)
                    daily = conn.execute(
                        "SELECT active_users, messages FROM usage_daily WHERE tenant=? AND day=?",
                        (tenant.id, day.isoformat()),
                    ).fetchall()
                    entry = (
                        expected["daily"][0]
                        if expected["daily"]
                        else {"active_users": 0, "messages": 0}
                    )
                    assert daily == [(entry["active_users"], entry["messages"])], (tenant.id, day)
                    users = conn.execute(
                        'SELECT "user", messages FROM usage_user_daily'
                        ' WHERE tenant=? AND day=? ORDER BY "user"',
                        (tenant.id, day.isoformat()),
                    ).fetchall()
                    assert users == sorted((u["email"], u["messages"]) for u in expected["users"])
                    ides = conn.execute(
                        "SELECT ide_name, engaged_users FROM usage_daily_ide"
                        " WHERE tenant=? AND day=? ORDER BY ide_name",
                        (tenant.id, day.isoformat()),
                    ).fetchall()
                    expected_ides = expected["daily"][0]["ides"] if expected["daily"] else []
                    assert ides == sorted(
                        (i["ide_name"], i["engaged_users"]) for i in expected_ides
                    )
            bad_rows = conn.execute(
                "SELECT COUNT(*) FROM usage_daily WHERE tenant='tenant-07'"
            ).fetchone()
        assert bad_rows == (0,)
        assert counts["usage_daily"] == len(good) * LOOKBACK

        second = await run_cli("run", "--once", "-c", str(config))
        assert second.returncode == 1
        assert count_rows(db) == counts


async def test_run_once_all_good_exits_zero_and_second_run_fetches_only_unsettled(
    tmp_path: Path,
) -> None:
    """With every tenant healthy the exit code is 0, and a second run re-fetches only the days
    that are not final yet (today and the settle window), not the whole lookback."""
    tenants = demo_tenants(3)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(
            tmp_path / "config.yaml", sim, tenants, workdir=tmp_path, lookback_days=LOOKBACK
        )
        first = await run_cli("run", "--once", "-c", str(config))
        assert first.returncode == 0, first.stdout + first.stderr
        after_first = sum(sim.stats.usage_requests.values())
        assert after_first == 3 * LOOKBACK
        second = await run_cli("run", "--once", "-c", str(config))
        assert second.returncode == 0
        refetched = sum(sim.stats.usage_requests.values()) - after_first
        # settle_days=1: today and yesterday are not final, so 2 days per tenant.
        assert refetched == 3 * 2


async def test_validate_lists_every_problem_with_file_and_line(tmp_path: Path) -> None:
    """``validate`` prints each problem as FILE:LINE: path: message and exits 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "api:\n  timeout: soon\ntenants:\n  - id: a\n    client_id: x\n    colour: red\n",
        encoding="utf-8",
    )
    result = await run_cli("validate", "-c", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2: api.timeout:" in result.stderr
    assert f"{bad}:6: tenants[0].colour:" in result.stderr


async def test_validate_ok_summarizes_tenants_and_sinks(tmp_path: Path) -> None:
    """A good config validates with a summary naming its tenants and sinks."""
    tenants = demo_tenants(3)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(tmp_path / "config.yaml", sim, tenants, workdir=tmp_path)
        result = await run_cli("validate", "-c", str(config), "--check-credentials")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 3 tenants")
    assert "warehouse (sqlite)" in result.stdout
    assert result.stdout.count(": ok") == 3
