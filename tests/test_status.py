"""``status``: the snapshot from a real state store, its table rendering, and the CLI command."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
import yaml

from collector.app import load, load_plugins
from collector.config import AppConfig
from collector.status import CycleSummary, Status, TenantReport, render_status, status_snapshot
from collector.store import Store
from collector.store.schema import SinkState, TenantState
from tests.e2e import run_cli
from tests.test_store import days

NEXT_RUN = dt.datetime(2030, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


def _config(tmp_path: Path) -> tuple[Path, AppConfig]:
    path = tmp_path / "config.yaml"
    config = {
        "api": {"base_url": "http://127.0.0.1:9", "token_url": "http://127.0.0.1:9/oauth/token"},
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "server": {"listen": None},
        "sinks": {
            "warehouse": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
            "hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret": "s3cret"},
        },
        "tenants": [
            {"id": "acme", "client_id": "acme-client", "client_secret": "acme-secret"},
            {"id": "globex", "api_key": "zak_globex"},
        ],
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path, load(path, load_plugins())


@pytest.fixture
async def populated(tmp_path: Path) -> tuple[Path, AppConfig]:
    """A state store where acme has 3 days (warehouse delivered, hook 2 queued and 1 dead) and
    globex has none and a failing last cycle."""
    path, config = _config(tmp_path)
    store = await Store.open(config.state.connection_url())
    try:
        await store.sync_sinks({"warehouse": None, "hook": None}, remove_missing=True)
        items = days("acme", 3)
        await store.record_fetched(items)
        stored = [td for td, _ in items]
        await store.mark_delivered("warehouse", stored)
        await store.mark_failed("hook", stored[:1], "SinkPermanentError: 410 gone", max_attempts=1)
        await store.set_tenant_success("acme")
        await store.set_tenant_error("globex", "AuthError: credentials rejected")
        await store.set_tenant_next_run("acme", NEXT_RUN)
    finally:
        await store.aclose()
    return path, config


async def test_snapshot_reports_tenants_and_sinks(populated: tuple[Path, AppConfig]) -> None:
    """Per tenant: days, state, last success and error, next run; per sink: backlog, dead
    letters, lag."""
    _, config = populated
    store = await Store.open(config.state.connection_url())
    try:
        parked_until = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        cycle = CycleSummary(
            planned=3,
            fetched=3,
            changed=3,
            failed=0,
            error=None,
            skipped=None,
            seconds=0.5,
            finished_at=NEXT_RUN,
        )
        snapshot = await status_snapshot(
            config,
            store,
            last_results={"acme": cycle},
            parked={"acme": None, "globex": parked_until},
        )
    finally:
        await store.aclose()
    acme, globex = snapshot.tenant("acme"), snapshot.tenant("globex")
    assert acme.stored.days_complete == 3
    assert acme.state == "ok"
    assert acme.stored.last_success_at is not None
    assert acme.stored.next_run_at == NEXT_RUN
    assert acme.last_cycle == cycle
    assert globex.stored.days_complete == 0
    assert globex.state == "auth_failed"
    assert globex.stored.auth_failed_until == parked_until
    assert globex.stored.last_error == "AuthError: credentials rejected"
    sinks = {s.sink: s for s in snapshot.sinks}
    assert (sinks["warehouse"].backlog, sinks["warehouse"].dead_letters) == (0, 0)
    assert (sinks["hook"].backlog, sinks["hook"].dead_letters) == (2, 1)
    assert sinks["hook"].lag_seconds >= 0
    document = json.loads(json.dumps(snapshot.to_dict()))  # JSON only at the edge
    acme_json = next(t for t in document["tenants"] if t["tenant"] == "acme")
    assert (acme_json["state"], acme_json["next_run_at"]) == ("ok", NEXT_RUN.isoformat())
    assert acme_json["last_cycle"]["finished_at"] == NEXT_RUN.isoformat()


async def test_next_run_from_the_daemon_overrides_the_stored_one(
    populated: tuple[Path, AppConfig],
) -> None:
    """A running daemon's in-memory next run wins over the one it last wrote to the store."""
    _, config = populated
    sooner = dt.datetime(2030, 5, 6, 7, 0, tzinfo=dt.UTC)
    store = await Store.open(config.state.connection_url())
    try:
        snapshot = await status_snapshot(config, store, next_run={"acme": sooner})
    finally:
        await store.aclose()
    assert snapshot.tenant("acme").stored.next_run_at == sooner


def test_render_status_shows_two_aligned_tables() -> None:
    """The table has one row per tenant and per sink with the figures an operator needs."""
    at = dt.datetime(2026, 1, 30, 10, 0, tzinfo=dt.UTC)
    acme = TenantState(
        tenant="acme",
        days_complete=30,
        days_final=28,
        days_failed=1,
        days_quarantined=2,
        first_day=dt.date(2026, 1, 1),
        last_day=dt.date(2026, 1, 30),
        last_fetched_at=at,
        last_success_at=at,
        last_error=None,
        last_error_at=None,
        auth_failed_until=None,
        next_run_at=at + dt.timedelta(hours=1),
        days_aged_out=3,
    )
    globex = dataclasses.replace(
        acme,
        tenant="globex",
        days_complete=0,
        days_failed=0,
        days_quarantined=0,
        days_aged_out=0,
        last_day=None,
        last_success_at=None,
        next_run_at=None,
        last_error="ServerError: 500 " + "x" * 100,
    )
    hook = SinkState(
        sink="hook",
        routes=None,
        backlog=12,
        dead_letters=2,
        lag_seconds=93.4,
        oldest_queued_at=None,
        last_success_at=None,
        last_error=None,
        last_error_at=None,
    )
    snapshot = Status(
        generated_at=at,
        history_start=dt.date(2025, 11, 1),
        tenants=[TenantReport(acme, "ok"), TenantReport(globex, "failing")],
        sinks=[hook],
    )
    text = render_status(snapshot)
    tenant_table, sink_table = text.split("\n\n")  # no quarantined or aged-out days to list
    header, rule, acme, globex = tenant_table.splitlines()
    assert header.split() == [
        "tenant",
        "state",
        "days",
        "failed",
        "quarantined",
        "aged",
        "out",
        "last",
        "day",
        "last",
        "success",
        "next",
        "run",
        "last",
        "error",
    ]
    assert acme.split()[:8] == ["acme", "ok", "30", "1", "2", "3", "2026-01-30", "2026-01-30"]
    assert "2026-01-30 11:00:00" in acme
    assert acme.index(" ok ") + 1 == header.index("state") == rule.index(" -") + 1
    assert globex.split()[:7] == ["globex", "failing", "0", "0", "0", "0", "-"]
    assert "x" * 60 not in globex  # long errors are cut
    sink_rows = sink_table.splitlines()
    assert sink_rows[2].split()[:4] == ["hook", "12", "2", "93s"]


async def test_status_command_reads_the_store(populated: tuple[Path, AppConfig]) -> None:
    """``zencoder-collector status`` prints the tables, and ``--json`` the same data as JSON,
    including the next run the daemon recorded."""
    path, _ = populated
    table = await run_cli("status", "-c", str(path))
    assert table.returncode == 0, table.stderr
    assert "acme" in table.stdout
    assert "2030-05-06 07:08:09" in table.stdout
    hook_row = next(line for line in table.stdout.splitlines() if line.startswith("hook"))
    assert hook_row.split()[:3] == ["hook", "2", "1"]
    as_json = await run_cli("status", "-c", str(path), "--json")
    assert as_json.returncode == 0, as_json.stderr
    snapshot = json.loads(as_json.stdout)
    assert {t["tenant"]: t["days_complete"] for t in snapshot["tenants"]} == {
        "acme": 3,
        "globex": 0,
    }


async def test_a_configured_sink_not_yet_registered_shows_its_waiting_history(
    tmp_path: Path,
) -> None:
    """A sink in the config that no run has registered yet is listed (nothing queued for it
    until a run registers it), and its JSON has the fields of a sink with nothing delivered."""
    _, config = _config(tmp_path)
    store = await Store.open(config.state.connection_url())
    try:
        await store.record_fetched(days("acme", 3))
        snapshot = await status_snapshot(config, store)
    finally:
        await store.aclose()
    assert [(s.sink, s.backlog) for s in snapshot.sinks] == [("hook", 0), ("warehouse", 0)]
    assert snapshot.to_dict()["sinks"][0] == {
        "sink": "hook",
        "backlog": 0,
        "dead_letters": 0,
        "lag_seconds": 0.0,
        "last_success_at": None,
        "last_error": None,
    }
