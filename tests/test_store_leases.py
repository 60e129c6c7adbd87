"""Replica registration, tenant leases and fencing, with several in-process replicas (each its own
store) on the real PostgreSQL; and the migration of a version-1 state to version 2."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy

from collector.errors import StoreError
from collector.store import Store
from collector.store.fencing import (
    FENCE_SETTING,
    FENCE_SQLSTATE,
    LeasesUnsupported,
    StaleLease,
    install_fencing,
)
from collector.store.leases import ReplicaLeases, this_replica
from collector.store.schema import SCHEMA_VERSION, tenant_day
from collector.testing import usage_body
from tests.postgres_helpers import fresh_schema
from tests.servers import sample_day
from tests.test_store import fetched

FIXTURES = Path(__file__).parent / "fixtures" / "state"
TENANTS = [f"t{i:02d}" for i in range(10)]
TTL = dt.timedelta(seconds=30)


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[tuple[str, str]]:
    """A new, empty schema in the test PostgreSQL: (its name, a URL that uses it)."""
    with fresh_schema(postgres_url, "l") as schema:
        yield schema


@pytest.fixture
async def replicas(pg_schema: tuple[str, str]) -> AsyncIterator[list[ReplicaLeases]]:
    """Three replicas, each with a store of its own, on one PostgreSQL state (not yet beating)."""
    stores = [await Store.open(pg_schema[1]) for _ in range(3)]
    yield [ReplicaLeases(store, this_replica(), ttl=TTL) for store in stores]
    for store in stores:
        await store.aclose()


async def _rounds(replicas: list[ReplicaLeases], count: int) -> None:
    for _ in range(count):
        for replica in replicas:
            await replica.beat(TENANTS)


def _assert_partition(replicas: list[ReplicaLeases]) -> None:
    held = [r.tenants for r in replicas]
    assert sorted(t for tenants in held for t in tenants) == TENANTS  # each exactly once


@pytest.mark.postgres
async def test_tenants_spread_evenly_and_each_has_one_holder(
    replicas: list[ReplicaLeases],
) -> None:
    """After two heartbeats each, every tenant has exactly one holder and none holds more than
    its fair share plus one."""
    await _rounds(replicas, 2)

    _assert_partition(replicas)
    fair = len(TENANTS) // len(replicas)
    assert max(len(r.tenants) for r in replicas) <= fair + 1
    listed = await replicas[0].store.replicas()
    assert {row.id: set(row.tenants) for row in listed} == {r.me.id: r.tenants for r in replicas}
    assert all(row.live for row in listed)


@pytest.mark.postgres
async def test_a_joining_replica_gets_its_share(replicas: list[ReplicaLeases]) -> None:
    """Two replicas split the tenants; when a third joins, the others release their excess and
    it claims a share."""
    first, second, newcomer = replicas
    await _rounds([first, second], 2)
    assert sorted(len(r.tenants) for r in (first, second)) == [5, 5]

    await _rounds(replicas, 2)

    _assert_partition(replicas)
    assert len(newcomer.tenants) >= len(TENANTS) // 3 - 1
    assert max(len(r.tenants) for r in replicas) <= len(TENANTS) // 3 + 1


@pytest.mark.postgres
async def test_leases_of_a_silent_replica_are_taken_after_expiry(
    pg_schema: tuple[str, str],
) -> None:
    """A replica that stops renewing loses its tenants to the other once the lease expired, with
    a higher fencing token; when it beats again it learns which it lost."""
    short = dt.timedelta(seconds=1)
    stores = [await Store.open(pg_schema[1]) for _ in range(2)]
    try:
        silent, survivor = (ReplicaLeases(s, this_replica(), ttl=short) for s in stores)
        for _ in range(2):
            for replica in (silent, survivor):
                await replica.beat(TENANTS)
        before = dict(silent.tokens)
        assert len(before) == 5

        await anyio.sleep(1.2)  # past the silent replica's expiry
        taken = await survivor.beat(TENANTS)

        assert taken.gained == set(before)
        assert survivor.tenants == set(TENANTS)
        assert all(survivor.tokens[t] == before[t] + 1 for t in before)
        woke = await silent.beat(TENANTS)
        assert woke.lost == set(before)
        assert silent.tenants.isdisjoint(survivor.tenants)
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.postgres
async def test_a_stale_token_cannot_write_day_outbox_or_delivery(
    pg_schema: tuple[str, str],
) -> None:
    """After a takeover, the old holder's writes of a day, a delivery mark and a tenant outcome
    are rejected by the store, while the new holder's go through."""
    short = dt.timedelta(seconds=1)
    stores = [await Store.open(pg_schema[1]) for _ in range(2)]
    try:
        old, new = (ReplicaLeases(s, this_replica(), ttl=short) for s in stores)
        await old.store.sync_sinks({"warehouse": None})
        await old.beat(["acme"])
        day = sample_day("acme", dt.date(2026, 1, 5))
        assert await old.store.record_fetched([(day, usage_body(day))]) == [True]
        await anyio.sleep(1.2)
        await new.beat(["acme"])  # the old holder is paused past its expiry: taken over

        later = sample_day("acme", dt.date(2026, 1, 6))
        with pytest.raises(StaleLease, match="stale fencing token"):
            await old.store.record_fetched([(later, usage_body(later))])
        with pytest.raises(StaleLease):
            await old.store.mark_delivered("warehouse", [day])
        with pytest.raises(StaleLease):
            await old.store.set_tenant_success("acme")

        assert set(await new.store.days_state("acme")) == {day.day}  # `later` was not stored
        assert await new.store.record_fetched([(later, usage_body(later))]) == [True]
        await new.store.mark_delivered("warehouse", [day])
        assert await new.store.backlog("warehouse") == 1  # `later` only: `day` is delivered
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.postgres
async def test_a_replica_frozen_inside_a_write_holds_its_locks_no_longer_than_the_idle_timeout(
    pg_schema: tuple[str, str],
) -> None:
    """A replica that stops running inside a write transaction, holding the outbox position and
    (through the fencing trigger) one of its lease rows, has that transaction ended by PostgreSQL
    after ``idle_transaction_timeout``: the other replica claims every tenant, that one included,
    and writes without waiting for it; the frozen write fails as a store error."""
    short = dt.timedelta(seconds=1)
    frozen_store = await Store.open(
        pg_schema[1], idle_transaction_timeout=dt.timedelta(seconds=0.3)
    )
    other_store = await Store.open(pg_schema[1])
    try:
        frozen, other = (
            ReplicaLeases(s, this_replica(), ttl=short) for s in (frozen_store, other_store)
        )
        await _rounds([frozen, other], 2)
        tenant = min(frozen.tenants)
        day, body = fetched(tenant)
        thawed = threading.Event()

        def freeze_mid_write(conn: sqlalchemy.Connection) -> None:
            Store._hold_positions(conn)
            conn.execute(tenant_day.insert().values(
                tenant=tenant, day=day.day, status="failed", final=False, attempts=1,
                updated_at=day.fetched_at,
            ))  # fmt: skip
            time.sleep(6)  # the process is stopped: PostgreSQL sees its transaction idle
            thawed.set()

        write = asyncio.ensure_future(frozen_store._write(freeze_mid_write))
        await anyio.sleep(1.2)  # past the frozen replica's leases
        await other.beat(TENANTS)
        assert other.tenants == set(TENANTS)  # the share-locked lease row too
        assert await other.store.record_fetched([(day, body)]) == [True]
        assert not thawed.is_set()  # none of it waited for the frozen transaction
        with pytest.raises(StoreError, match="idle-in-transaction timeout"):
            await write
    finally:
        for store in (frozen_store, other_store):
            await store.aclose()


@pytest.mark.postgres
async def test_leaving_hands_leases_over_at_once(replicas: list[ReplicaLeases]) -> None:
    """A replica that leaves releases its leases and unregisters: the others take its tenants
    at their next heartbeat, without waiting for an expiry."""
    leaving, *staying = replicas
    await _rounds(replicas, 2)
    assert leaving.tenants

    await leaving.leave()
    await _rounds(staying, 2)

    _assert_partition(staying)
    assert leaving.me.id not in {row.id for row in await staying[0].store.replicas()}


async def test_sqlite_refuses_leases(tmp_path: Path) -> None:
    """Leases need PostgreSQL: on SQLite the heartbeat says so, and status lists no replica."""
    store = await Store.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with pytest.raises(LeasesUnsupported, match="need a PostgreSQL state store"):
            await ReplicaLeases(store, this_replica(), ttl=TTL).beat(TENANTS)
        assert await store.replicas() == []
    finally:
        await store.aclose()


def test_the_trigger_spells_the_setting_and_sqlstate_of_the_module() -> None:
    """The trigger's SQL names the setting and error code the Python side uses."""
    from collector.store import fencing

    assert f"current_setting('{FENCE_SETTING}', true)" in fencing._FENCE_FUNCTION
    assert f"ERRCODE = '{FENCE_SQLSTATE}'" in fencing._FENCE_FUNCTION
    assert callable(install_fencing)


# --- migration from schema version 1 ------------------------------------------------------------


async def test_a_version_1_sqlite_state_migrates_to_2_keeping_every_row(tmp_path: Path) -> None:
    """A copy of a version-1 SQLite state opens at version 2 with its days, deliveries and
    statuses unchanged and the lease tables added."""
    copy = tmp_path / "state.db"
    shutil.copy(FIXTURES / "state-v1.db", copy)
    with sqlite3.connect(copy) as conn:
        before = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()  # noqa: S608
                  for t in ("tenant_day", "delivery", "sink", "tenant_status")}  # fmt: skip

    store = await Store.open(f"sqlite:///{copy}")
    await store.aclose()

    with sqlite3.connect(copy) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
        after = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()  # noqa: S608
                 for t in before}  # fmt: skip
        leases = conn.execute("SELECT count(*) FROM tenant_lease").fetchone()
    assert versions == [1, SCHEMA_VERSION]
    assert after == before
    assert len(before["tenant_day"]) == 7
    assert leases == (0,)


@pytest.mark.postgres
async def test_a_version_1_postgresql_state_migrates_to_2_and_is_fenced(
    pg_schema: tuple[str, str], postgres_url: str
) -> None:
    """A copy of a version-1 PostgreSQL state (a pg_dump) opens at version 2 with every row
    kept, the fencing trigger installed, and its tenants leasable."""
    schema, url = pg_schema
    dump = (FIXTURES / "state-v1-postgresql.sql").read_text(encoding="utf-8")
    admin = sqlalchemy.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema}")
        conn.exec_driver_sql(dump.replace("state_v1", schema))
    admin.dispose()
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        before = conn.exec_driver_sql("SELECT * FROM tenant_day ORDER BY 1, 2").fetchall()
    assert len(before) == 7

    store = await Store.open(url)
    try:
        leases = ReplicaLeases(store, this_replica(), ttl=TTL)
        await leases.beat(["acme", "globex"])
        assert leases.tenants == {"acme", "globex"}
        await store.set_tenant_success("globex")  # a fenced write by the holder
    finally:
        await store.aclose()

    with engine.connect() as conn:
        versions = conn.exec_driver_sql("SELECT version FROM schema_version ORDER BY 1").all()
        after = conn.exec_driver_sql("SELECT * FROM tenant_day ORDER BY 1, 2").fetchall()
        triggers = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid::regclass::text || '_fence' = tgname"
            " AND tgrelid::regclass::text IN ('tenant_day', 'delivery', 'tenant_status')"
        ).scalar()
    engine.dispose()
    assert [v for (v,) in versions] == [1, SCHEMA_VERSION]
    assert after == before
    assert triggers == 3


@pytest.mark.postgres
async def test_a_replica_reads_only_its_tenants_outbox_and_registers_sinks_for_all(
    replicas: list[ReplicaLeases],
) -> None:
    """The outbox scope follows the leases, and a new sink's history is queued for every tenant
    even by a replica that holds only some (registering sinks is not fenced)."""
    first, second, _ = replicas
    await first.beat(["acme"])
    await second.beat(["acme", "globex"])  # acme is taken: globex only
    acme, globex = fetched("acme"), fetched("globex")
    await first.store.record_fetched([acme])
    await second.store.record_fetched([globex])

    queued = await first.store.sync_sinks({"late": None})

    assert queued == {"late": 2}
    assert first.store.lease_scope == {"acme"}
    pending = await first.store.pending("late", first.store.lease_scope)
    assert [(td.tenant, td.day) for td in pending] == [("acme", acme[0].day)]


@pytest.mark.postgres
async def test_a_tenant_removed_from_the_config_is_released_not_lost(
    replicas: list[ReplicaLeases],
) -> None:
    """When a held tenant leaves the configured list, the replica gives its lease back (a
    release) instead of counting it lost, and no replica holds it any more."""
    only = replicas[0]
    await only.beat(["acme", "globex"])

    outcome = await only.beat(["acme"])

    assert outcome.released == {"globex"}
    assert outcome.lost == frozenset()
    assert only.tenants == {"acme"}
