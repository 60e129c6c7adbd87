"""``state migrate``: a SQLite state store copied into PostgreSQL, end to end over real servers."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from collector.pipeline import utc_today
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from collector.state_migrate import copied_tables
from collector.store import Store
from collector.testing import usage_body
from tests.e2e import run_cli, write_config
from tests.postgres_helpers import fresh_schema
from tests.servers import WebhookReceiver, sample_day

pytestmark = pytest.mark.postgres

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtMTIzNA=="
LOOKBACK = 5


@pytest.fixture
def empty_postgres(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty schema in the test PostgreSQL (dropped afterwards)."""
    with fresh_schema(postgres_url, "m") as (_, url):
        yield url


def _all_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every copied state table, in primary-key order."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                table.name: [
                    tuple(row)
                    for row in conn.execute(
                        sqlalchemy.select(table).order_by(*table.primary_key.columns)
                    )
                ]
                for table in copied_tables()
            }
    finally:
        engine.dispose()


async def _dead_letter_one(state_url: str, tenant: str, day: dt.date) -> None:
    """Give up on one delivered day for the webhook sink, as a permanent sink error would."""
    store = await Store.open(state_url)
    try:
        await store.mark_failed("hook", [sample_day(tenant, day)], "HTTP 410 Gone", max_attempts=1)
        await store.set_tenant_error(tenant, "a recorded error")
    finally:
        await store.aclose()


async def test_migrated_state_resumes_without_refetching_or_redelivering(
    tmp_path: Path, empty_postgres: str
) -> None:
    """After migrating, run --once on PostgreSQL asks the API only for days not yet final, and no
    sink receives a tenant-day twice; every table arrives row for row, the password unprinted."""
    tenants = demo_tenants(4)
    async with (
        running_simulator(SimulatorSettings(tenants=tenants)) as sim,
        WebhookReceiver(SECRET) as receiver,
    ):
        sinks = {
            "warehouse": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
            "hook": {"type": "webhook", "url": receiver.url, "secret": SECRET},
        }
        config = write_config(
            tmp_path / "config.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=LOOKBACK,
            sinks=sinks,
        )
        first = await run_cli("run", "--once", "-c", str(config))
        assert first.returncode == 0, first.stderr
        sqlite_url = f"sqlite:///{tmp_path / 'state.db'}"
        today = utc_today()
        await _dead_letter_one(sqlite_url, "tenant-02", today - dt.timedelta(days=3))
        store = await Store.open(sqlite_url)
        try:
            not_final = {
                (t.id, day.isoformat())
                for t in tenants
                for day, state in (await store.days_state(t.id)).items()
                if not state.final
            }
        finally:
            await store.aclose()
        assert not_final, "the window must hold days that are still settling"

        migrated = await run_cli("state", "migrate", "-c", str(config), "--to", empty_postgres)
        assert migrated.returncode == 0, migrated.stderr
        password = sqlalchemy.make_url(empty_postgres).password
        assert password
        assert password not in migrated.stdout + migrated.stderr
        assert "row counts verified" in migrated.stdout
        assert _all_rows(empty_postgres) == _all_rows(sqlite_url)

        config = write_config(
            tmp_path / "config.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=LOOKBACK,
            sinks=sinks,
            extra={"state": {"url": empty_postgres}},
        )
        sim.stats.reset()
        second = await run_cli("run", "--once", "-c", str(config))
        assert second.returncode == 0, second.stderr

    asked = {(record.tenant, record.param) for record in sim.stats.log}
    assert asked == not_final
    ids = Counter(request.webhook_id for request in receiver.accepted)
    assert ids, "the first run delivered to the webhook"
    assert max(ids.values()) == 1


async def test_refuses_a_target_that_is_not_empty(tmp_path: Path, empty_postgres: str) -> None:
    """A second migration into the same database is refused with exit code 2 and changes nothing."""
    source = f"sqlite:///{tmp_path / 'state.db'}"
    store = await Store.open(source)
    try:
        day = sample_day("t1")
        await store.record_fetched([(day, usage_body(day))])
    finally:
        await store.aclose()
    assert (
        await run_cli("state", "migrate", "--from", source, "--to", empty_postgres)
    ).returncode == 0
    before = _all_rows(empty_postgres)

    again = await run_cli("state", "migrate", "--from", source, "--to", empty_postgres)

    assert again.returncode == 2
    assert "is not empty: tenant_day (1 rows)" in again.stderr
    assert _all_rows(empty_postgres) == before


async def test_refuses_a_missing_source_and_a_non_postgresql_target(tmp_path: Path) -> None:
    """A source file that does not exist and a SQLite target are refused before anything is
    created."""
    missing = tmp_path / "nowhere" / "state.db"
    gone = await run_cli(
        "state",
        "migrate",
        "--from",
        f"sqlite:///{missing}",
        "--to",
        "postgresql+psycopg://u:pw@h/db",
    )
    assert gone.returncode == 2
    assert "no SQLite state store at" in gone.stderr
    assert not missing.parent.exists()

    other = await run_cli(
        "state",
        "migrate",
        "--from",
        f"sqlite:///{missing}",
        "--to",
        f"sqlite:///{tmp_path / 'b.db'}",
    )
    assert other.returncode == 2
    assert "--to must be a PostgreSQL URL" in other.stderr


async def test_refuses_a_source_a_collector_is_running_on(
    tmp_path: Path, empty_postgres: str
) -> None:
    """While a collector holds the SQLite state's lock, the migration refuses and copies
    nothing."""
    source = f"sqlite:///{tmp_path / 'state.db'}"
    running = await Store.open(source, exclusive=True)
    try:
        day = sample_day("t1")
        await running.record_fetched([(day, usage_body(day))])
        busy = await run_cli("state", "migrate", "--from", source, "--to", empty_postgres)
    finally:
        await running.aclose()

    assert busy.returncode == 1
    assert "is in use by" in busy.stderr
    engine = sqlalchemy.create_engine(empty_postgres)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []  # not even a schema
    finally:
        engine.dispose()
