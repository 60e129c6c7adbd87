"""End to end: ``run --once`` as a subprocess against the simulator over real sockets."""

from __future__ import annotations

import csv
import datetime as dt
import sqlite3
import ssl
from pathlib import Path

import pytest
import trustme

from collector.pipeline import utc_today
from collector.simulator import (
    SimTenant,
    Simulator,
    SimulatorSettings,
    demo_tenants,
    running_simulator,
)
from tests.e2e import count_rows, run_cli, write_config
from tests.variant_corpus import Variant, corpus

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


# --- the corpus of API variants, end to end ------------------------------------------------------

VARIANT_LOOKBACK = 2


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    """A private certificate authority for the HTTPS runs."""
    return trustme.CA()


def _server_context(authority: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    return context


def _expected_rows(sim: Simulator, case: Variant, day: dt.date) -> tuple[tuple[int, int], int]:
    """The day's (active_users, messages) and user-row count the sinks must hold for an accepted
    variant: the simulator's own figures, as the variant reshapes them."""
    data = sim.day_data(case.name, day)
    entry = data["daily"][0] if data["daily"] else {"active_users": 0, "messages": 0}
    totals = (entry["active_users"], entry["messages"])
    if case.variant == "idle_day":
        return (0, 0), 0
    if case.variant == "users_without_daily":
        totals = (0, 0)
    return totals, len(data["users"])


LARGE_ORGANIZATION = 2000


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_run_once_over_the_corpus_of_api_variants(
    tmp_path: Path, scheme: str, authority: trustme.CA
) -> None:
    """One tenant per corpus variant in one ``run --once`` over real sockets: accepted variants
    land in the SQLite and CSV sinks with their exact figures (and ``last_active_at`` where the
    API sent a time), each rejected variant fails only its own days with a reason naming the
    field, and the others are unaffected."""
    cases = [c for c in corpus() if c.users < LARGE_ORGANIZATION]
    await _run_variants(tmp_path, cases, scheme, authority)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_run_once_collects_organizations_of_2000_and_5000_users(
    tmp_path: Path, scheme: str, authority: trustme.CA
) -> None:
    """The 2,000- and 5,000-user organizations of the corpus (bodies of 200 KB to 1 MB) are
    collected completely over HTTP and HTTPS."""
    cases = [c for c in corpus() if c.users >= LARGE_ORGANIZATION]
    assert len(cases) >= 2
    await _run_variants(tmp_path, cases, scheme, authority)


async def _run_variants(
    tmp_path: Path, cases: list[Variant], scheme: str, authority: trustme.CA
) -> None:
    """Serve one tenant per case, run ``run --once``, and check every tenant-day's outcome."""
    tenants = [
        SimTenant(c.name, f"{c.name}-client", f"{c.name}-secret", users=c.users, variant=c.variant)
        for c in cases
    ]
    context = _server_context(authority) if scheme == "https" else None
    env = {}
    if scheme == "https":
        bundle = tmp_path / "ca.pem"
        authority.cert_pem.write_to_path(str(bundle))
        env["SSL_CERT_FILE"] = str(bundle)
    settings = SimulatorSettings(tenants=tenants)
    async with running_simulator(settings, ssl_context=context) as sim:
        assert sim.base_url.startswith(f"{scheme}://")
        sinks = {
            "warehouse": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
            "files": {"type": "csv", "path": str(tmp_path / "csv")},
        }
        config = write_config(
            tmp_path / "config.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=VARIANT_LOOKBACK,
            sinks=sinks,
        )
        result = await run_cli("run", "--once", "-c", str(config), env=env)
        failing = any(case.outcome != "accepted" for case in cases)
        assert result.returncode == int(failing), result.stdout + result.stderr
        days = [utc_today() - dt.timedelta(days=i) for i in range(VARIANT_LOOKBACK)]
        db = tmp_path / "usage.db"
        with sqlite3.connect(db) as warehouse, sqlite3.connect(tmp_path / "state.db") as state:
            for case in cases:
                for day in days:
                    key = (case.name, day.isoformat())
                    daily = warehouse.execute(
                        "SELECT active_users, messages FROM usage_daily WHERE tenant=? AND day=?",
                        key,
                    ).fetchall()
                    users = warehouse.execute(
                        'SELECT "user", last_active, last_active_at FROM usage_user_daily'
                        " WHERE tenant=? AND day=?",
                        key,
                    ).fetchall()
                    status, reason = state.execute(
                        "SELECT status, reason FROM tenant_day WHERE tenant=? AND day=?", key
                    ).fetchone()
                    if case.outcome != "accepted":
                        assert (daily, users) == ([], []), key
                        assert status not in ("fetched", "final"), key
                        if case.outcome == "server_error":
                            assert f"HTTP {case.expect['status']}" in reason, (key, reason)
                        else:
                            case.check_reason(reason)
                            # Raw first: the rejected body is kept with the day quarantined.
                            assert status == "quarantined", key
                            assert state.execute(
                                "SELECT COUNT(*) FROM quarantine WHERE tenant=? AND day=?", key
                            ).fetchone() == (1,), key
                        continue
                    totals, user_rows = _expected_rows(sim, case, day)
                    assert daily == [totals], key
                    assert len(users) == user_rows, key
                    timed = case.variant in ("datetime_last_active", "offsets_and_fractions")
                    assert all((at is not None) == timed for _, _, at in users), key
                    csv_users = tmp_path / "csv" / case.name / "usage_user_daily"
                    with (csv_users / f"{day.isoformat()}.csv").open(encoding="utf-8") as file:
                        rows = list(csv.DictReader(file))
                    assert len(rows) == user_rows, key
                    assert all(bool(row["last_active_at"]) == timed for row in rows), key
