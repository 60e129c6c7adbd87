"""The outbox under concurrent processes on one state (PostgreSQL, or one SQLite file): nothing
stored goes missing.

Several stores (as several collector processes or threads would open them) run random writes of
new and changed days, failed and quarantined fetches, sink registrations with changing routes,
deliveries and failed deliveries, replays and retention passes at the same time. The
operations are random but the checks are not: whatever the interleaving, once everything is
delivered every sink has (or dead-lettered) every stored day of its tenants at its current
version, and no sink has a day queued whose payload retention dropped.

Each sink has one deliverer at a time, as in the product: one lane per sink in a process, and
replicas deliver only the tenants they hold (a handed-over tenant's late delivery mark is
fenced). Two deliverers of one sink could acknowledge an older version after a newer one.

CI runs three seeds of 40 operations per store; ``COLLECTOR_TEST_OUTBOX_SEEDS`` and
``COLLECTOR_TEST_OUTBOX_OPERATIONS`` run more, off the CI path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
from typing import Any

import pytest
import sqlalchemy

from collector.store import Store
from tests.test_store import DAY, fetched

TENANTS = ("acme", "globex", "initech")
DAYS = [DAY + dt.timedelta(days=i) for i in range(6)]
SINKS = ("warehouse", "lake", "hook", "archive")
FAR_FUTURE = DAY + dt.timedelta(days=3650)
SEEDS = range(1, 1 + int(os.environ.get("COLLECTOR_TEST_OUTBOX_SEEDS", "3")))
OPERATIONS = int(os.environ.get("COLLECTOR_TEST_OUTBOX_OPERATIONS", "40"))


async def _operate(
    store: Store, rng: random.Random, operations: int, lanes: dict[str, asyncio.Lock]
) -> None:
    """``operations`` random store calls, one after the other (one process's view); a delivery
    holds its sink's lane."""
    for _ in range(operations):
        roll = rng.random()
        if roll < 0.5:
            written = {
                (tenant, day): fetched(
                    tenant, day, final=rng.random() < 0.15, messages=rng.randint(1, 2)
                )
                for tenant, day in (
                    (rng.choice(TENANTS), rng.choice(DAYS)) for _ in range(rng.randint(1, 4))
                )
            }
            await store.record_fetched(list(written.values()))
        elif roll < 0.62:
            chosen = rng.sample(SINKS, rng.randint(1, len(SINKS)))
            await store.sync_sinks({name: _routes(rng) for name in chosen})
        elif roll < 0.78:
            sink = rng.choice(SINKS)
            async with lanes[sink]:
                batch = await store.pending(sink, limit=rng.randint(1, 8))
                await _sink_write(rng)
                await store.mark_delivered(sink, batch)
        elif roll < 0.82:
            sink = rng.choice(SINKS)
            async with lanes[sink]:
                batch = await store.pending(sink, limit=rng.randint(1, 4))
                await _sink_write(rng)
                await store.mark_failed(sink, batch, "HTTP 503 from the sink", max_attempts=2)
        elif roll < 0.87:
            await store.record_failed(rng.choice(TENANTS), rng.choice(DAYS), "HTTP 500")
        elif roll < 0.91:
            tenant, day = rng.choice(TENANTS), rng.choice(DAYS)
            await store.record_quarantined(tenant, day, "at data.users: not a list", b"{}")
        elif roll < 0.95:
            which = rng.choice((None, *TENANTS))
            await store.replay(rng.choice(SINKS), tenant=which, only_dead=rng.random() < 0.3)
        else:
            await store.prune_payloads(0, today=FAR_FUTURE)


async def _sink_write(rng: random.Random) -> None:
    """The time a sink write takes, between reading a batch and reporting on it: the other
    stores' work lands in that window, as it does while a real lane delivers."""
    await asyncio.sleep(rng.uniform(0, 0.02))


def _routes(rng: random.Random) -> list[str] | None:
    """Every tenant (None), or some of them."""
    if rng.random() < 0.5:
        return None
    return rng.sample(TENANTS, rng.randint(1, len(TENANTS)))


async def _drain(store: Store, sink: str) -> None:
    while batch := await store.pending(sink, limit=50):
        await store.mark_delivered(sink, batch)


@pytest.mark.parametrize("seed", SEEDS)
async def test_concurrent_writers_registrations_deliveries_and_retention_lose_nothing(
    store_url: str, seed: int
) -> None:
    """Three stores doing random work at once: afterwards, and after draining every sink, each
    registered sink has (or gave up on) each stored day of its tenants at its current version,
    and nothing queued lacks its payload."""
    from collector.store.schema import delivery, sink_table, tenant_day

    stores = [await Store.open(store_url) for _ in range(3)]
    checker = sqlalchemy.create_engine(store_url)
    try:
        await stores[0].sync_sinks({"warehouse": None})
        lanes = {sink: asyncio.Lock() for sink in SINKS}
        await asyncio.gather(
            *(
                _operate(store, random.Random(seed * 10 + n), OPERATIONS, lanes)
                for n, store in enumerate(stores)
            )
        )
        with checker.connect() as conn:
            orphans = conn.execute(
                sqlalchemy.select(delivery.c.sink, delivery.c.tenant, delivery.c.day)
                .select_from(delivery.join(tenant_day, sqlalchemy.and_(
                    delivery.c.tenant == tenant_day.c.tenant,
                    delivery.c.day == tenant_day.c.day,
                )))
                .where(delivery.c.queued_seq.is_not(None), tenant_day.c.payload.is_(None))
            ).all()  # fmt: skip
            registered = {
                row.name: None if row.routes is None else set(json.loads(row.routes))
                for row in conn.execute(sqlalchemy.select(sink_table))
            }
        assert orphans == []
        for sink in registered:
            await _drain(stores[0], sink)
        with checker.connect() as conn:
            stored = conn.execute(
                sqlalchemy.select(
                    tenant_day.c.tenant, tenant_day.c.day, tenant_day.c.version
                ).where(tenant_day.c.payload.is_not(None))
            ).all()
            # What each sink has of each day: the version delivered, or the version it
            # gave up on (a dead letter, which only a newer version or a replay requeues).
            has: dict[tuple[str, str, Any], Any] = {
                (row.sink, row.tenant, row.day): row.dead_version
                if row.dead_letter
                else row.delivered_version
                for row in conn.execute(sqlalchemy.select(delivery))
            }
        assert stored, "the random work stored some days"
        missing = [
            (sink, row.tenant, row.day)
            for sink, routed in registered.items()
            for row in stored
            if (routed is None or row.tenant in routed)
            and has.get((sink, row.tenant, row.day)) != row.version
        ]
        assert missing == []
    finally:
        for store in stores:
            await store.aclose()
        checker.dispose()
