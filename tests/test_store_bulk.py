"""The state store's hot path at scale: batches larger than one statement, values read back
through SQLAlchemy exactly, and the end of a delivery pass (SQLite, and PostgreSQL when set)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
import sqlalchemy

from collector.store import Store
from collector.store.schema import delivery, tenant_day
from collector.testing import make_batch, refetched, usage_body

START = dt.date(2024, 1, 1)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on the fresh database with two sinks, one routed to tenant-01 only."""
    opened = await Store.open(store_url)
    await opened.sync_sinks({"warehouse": None, "hook": ["tenant-01"]})
    yield opened
    await opened.aclose()


async def test_a_batch_larger_than_one_statement_is_stored_queued_and_read_whole(
    store: Store,
) -> None:
    """700 tenant-days in one commit (several statements and key lookups each) are all stored,
    queued in order for every routed sink, read back equal, and known again on a re-fetch."""
    items = make_batch(7, 100, start=START, users=2)
    assert await store.record_fetched([(td, usage_body(td)) for td in items]) == [True] * 700
    page = await store.pending("warehouse", limit=1000)
    assert (list(page), page.read) == (items, 700)
    assert await store.backlog("hook") == 100
    await store.mark_delivered("warehouse", page)
    assert await store.backlog("warehouse") == 0
    again = items[:350] + [refetched(td) for td in items[350:]]
    flags = await store.record_fetched([(td, usage_body(td)) for td in again])
    assert flags == [False] * 350 + [True] * 350
    assert await store.backlog("warehouse") == 350


async def test_values_of_the_hot_path_read_back_through_sqlalchemy(
    store: Store, store_url: str
) -> None:
    """Dates, UTC timestamps (any offset given) and booleans written at the driver level read
    back through the Core tables exactly as SQLAlchemy itself would have stored them."""
    plus_two = dt.timezone(dt.timedelta(hours=2))
    moment = dt.datetime(2024, 3, 5, 8, 30, tzinfo=plus_two)  # no microseconds
    [td] = make_batch(("tenant-01",), 1, start=START)
    final = refetched(td, fetched_at=moment, final=True)
    await store.record_fetched([(final, usage_body(final))])
    await store.mark_delivered("warehouse", [final])
    engine = sqlalchemy.create_engine(store_url)
    try:
        with engine.connect() as conn:
            day_row = conn.execute(sqlalchemy.select(tenant_day)).one()
            sent = conn.execute(
                sqlalchemy.select(delivery).where(delivery.c.sink == "warehouse")
            ).one()
            # The stored form itself is SQLAlchemy's (SQLite keeps text that is compared as text).
            raw = conn.exec_driver_sql("SELECT day, fetched_at, final FROM tenant_day").one()
            own = [
                column.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
                or (lambda value: value)
                for column in (tenant_day.c.day, tenant_day.c.fetched_at, tenant_day.c.final)
            ]
            assert tuple(raw) == (own[0](START), own[1](moment), own[2](True))
    finally:
        engine.dispose()
    assert (day_row.day, day_row.final, day_row.status) == (START, True, "final")
    assert day_row.fetched_at == moment.astimezone(dt.UTC)
    assert day_row.fetched_at.tzinfo is not None
    assert (sent.day, sent.dead_letter, sent.queued_seq) == (START, False, None)
    assert sent.delivered_version == day_row.version == final.content_hash + ":final"
    assert [td.fetched_at for td in await store.pending("hook")] == [moment.astimezone(dt.UTC)]


async def test_end_pass_notes_the_outcome_and_returns_the_backlog(store: Store) -> None:
    """end_pass notes success or the error for status only after a write, and counts what waits."""
    items = make_batch(("tenant-01",), 3, start=START)
    await store.record_fetched([(td, usage_body(td)) for td in items])
    assert await store.end_pass("hook", None, attempted=False) == 3
    assert (await store.status_snapshot()).sinks[0].last_success_at is None
    await store.mark_delivered("hook", items[:1])
    assert await store.end_pass("hook", None, attempted=True) == 2
    assert await store.end_pass("hook", "SinkTransientError: 503", attempted=True) == 2
    hook = next(s for s in (await store.status_snapshot()).sinks if s.sink == "hook")
    assert hook.last_success_at is not None
    assert hook.last_error == "SinkTransientError: 503"


async def test_a_page_counts_the_unreadable_days_it_set_aside(store: Store, store_url: str) -> None:
    """A page that set a broken payload aside still counts it as read, so the reader knows the
    queue went on past a short page."""
    items = make_batch(("tenant-01",), 3, start=START)
    await store.record_fetched([(td, usage_body(td)) for td in items])
    engine = sqlalchemy.create_engine(store_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sqlalchemy.update(tenant_day)
                .where(tenant_day.c.day == items[0].day)
                .values(payload="{not json")
            )
    finally:
        engine.dispose()
    # A store opened afresh: the one that recorded the days still has them in its cache.
    reader = await Store.open(store_url)
    try:
        page = await reader.pending("warehouse", limit=2)
        assert (list(page), page.read) == ([items[1]], 2)
        rest = await reader.pending("warehouse", limit=2, after=page.cursor)
        assert (list(rest), rest.read) == ([items[2]], 1)
        assert [d.day for d in await reader.dead_letters("warehouse")] == [items[0].day]
    finally:
        await reader.aclose()
