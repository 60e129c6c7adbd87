"""The state store against real databases: SQLite files in tmp_path, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from collector.errors import StoreError
from collector.models import TenantDay, tenant_day_from_body
from collector.store import Store
from collector.store.schema import SCHEMA_VERSION

DAY = dt.date(2025, 1, 10)
FETCHED_AT = dt.datetime(2025, 1, 11, 6, 0, tzinfo=dt.UTC)


def usage_data(day: dt.date, users: int = 3, messages: int = 7) -> dict[str, Any]:
    """A ``data`` object as the API returns it for ``day=``."""
    emails = [f"user{i}@acme.example" for i in range(users)]
    return {
        "period": {"start": day.isoformat(), "end": day.isoformat(), "days": 1},
        "summary": {"total_active_users": users, "total_messages": messages * users},
        "users": [
            {
                "email": email,
                "messages": messages,
                "last_active": day.isoformat(),
                "ides": ["VS Code"],
                "languages": ["Python", "Go"],
            }
            for email in emails
        ],
        "daily": [
            {
                "day": day.isoformat(),
                "active_users": users,
                "messages": messages * users,
                "ides": [{"ide_name": "VS Code", "engaged_users": users}],
                "languages": [{"language_name": "Python", "engaged_users": users}],
            }
        ],
        "lines_of_code": 12,  # an unknown field, as the API has added before
    }


def fetched(
    tenant: str, day: dt.date = DAY, *, final: bool = False, **kwargs: int
) -> tuple[TenantDay, str]:
    """A fetched tenant-day exactly as the pipeline builds it: from the body, which is kept."""
    body = json.dumps({"status": "success", "data": usage_data(day, **kwargs)})
    return tenant_day_from_body(
        tenant, day, body.encode(), fetched_at=FETCHED_AT, final=final
    ), body


def days(tenant: str, count: int, *, final: bool = False) -> list[tuple[TenantDay, str]]:
    return [fetched(tenant, DAY + dt.timedelta(days=i), final=final) for i in range(count)]


def keys(items: list[TenantDay]) -> list[tuple[str, dt.date]]:
    return [(td.tenant, td.day) for td in items]


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on the fresh database, closed after the test."""
    opened = await Store.open(store_url)
    yield opened
    await opened.aclose()


async def test_recorded_days_survive_close_and_reopen(store_url: str) -> None:
    """A committed tenant-day is there, payload and all, after the store is closed and reopened."""
    first = await Store.open(store_url)
    await first.sync_sinks({"warehouse": None})
    item, _ = fetched("acme")
    assert await first.record_fetched([fetched("acme")]) == [True]
    await first.aclose()

    second = await Store.open(store_url)
    try:
        await second.ping()
        state = (await second.days_state("acme"))[DAY]
        assert (state.status, state.final, state.content_hash) == (
            "fetched",
            False,
            item.content_hash,
        )
        assert list(await second.pending("warehouse")) == [item]
    finally:
        await second.aclose()


async def test_content_change_is_reported_and_an_unchanged_refetch_is_not(store: Store) -> None:
    """record_fetched says True for new or different figures and False for an identical re-fetch."""
    assert await store.record_fetched([fetched("acme"), fetched("globex")]) == [True, True]
    assert await store.record_fetched([fetched("acme"), fetched("globex")]) == [False, False]
    assert await store.record_fetched([fetched("acme", messages=8), fetched("globex")]) == [
        True,
        False,
    ]


async def test_an_unchanged_refetch_leaves_what_a_pending_delivery_carries(store_url: str) -> None:
    """A pending day re-fetched with the same figures is still delivered with the fetched_at of
    its version (rebuilt after a restart too), so every delivery of a version is identical."""
    first = await Store.open(store_url)
    await first.sync_sinks({"warehouse": None})
    await first.record_fetched([fetched("acme")])
    _, body = fetched("acme")
    later = tenant_day_from_body(
        "acme", DAY, body.encode(), fetched_at=FETCHED_AT + dt.timedelta(hours=1), final=False
    )
    assert await first.record_fetched([(later, body)]) == [False]
    await first.aclose()
    second = await Store.open(store_url)
    try:
        [pending] = await second.pending("warehouse")
        assert pending.fetched_at == FETCHED_AT
        assert pending.daily.fetched_at == FETCHED_AT
    finally:
        await second.aclose()


async def test_figures_that_change_back_during_a_delivery_are_delivered_again(
    store: Store,
) -> None:
    """A day delivered at version A, re-fetched as B, and re-fetched as A again while B is being
    delivered: once B lands, A is queued again, so the sink does not keep B."""
    await store.sync_sinks({"warehouse": None})
    first = fetched("acme", messages=7)
    await store.record_fetched([first])
    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    await store.record_fetched([fetched("acme", messages=8)])
    in_flight = await store.pending("warehouse")  # the deliverer reads B ...
    assert [td.daily.messages for td in in_flight] == [8 * 3]
    assert await store.record_fetched([first]) == [True]  # ... A is stored again ...
    await store.mark_delivered("warehouse", in_flight)  # ... and B lands in the sink
    [again] = await store.pending("warehouse")
    assert again.daily.messages == 7 * 3
    await store.mark_delivered("warehouse", [again])
    assert await store.pending("warehouse") == []


async def test_a_pruned_day_fetched_again_goes_to_a_sink_routed_since(store: Store) -> None:
    """A day whose payload retention dropped is stored again by its next fetch and queued for a
    sink that was added after the prune, not for the one that has it."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([fetched("acme", final=True)])
    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    assert await store.prune_payloads(7, today=DAY + dt.timedelta(days=30)) == 1
    assert await store.sync_sinks({"warehouse": None, "lake": None}) == {"warehouse": 0, "lake": 0}
    assert await store.record_fetched([fetched("acme", final=True)]) == [False]  # same figures
    assert keys(await store.pending("lake")) == [("acme", DAY)]
    assert await store.pending("warehouse") == []


async def test_a_late_failure_of_a_version_the_sink_has_moved_past_is_no_dead_letter(
    store: Store,
) -> None:
    """A write failure reported for version A after B was stored and delivered (by another
    pass) dead-letters nothing: the sink has the day, at its current version."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([fetched("acme", messages=7)])
    stale = await store.pending("warehouse")
    await store.record_fetched([fetched("acme", messages=8)])
    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    assert await store.mark_failed("warehouse", stale, "HTTP 500", max_attempts=1) == []
    assert await store.dead_letters("warehouse") == []
    assert await store.pending("warehouse") == []


async def test_figures_back_at_the_delivered_version_clear_a_dead_letter(store: Store) -> None:
    """A day delivered at A, then dead-lettered at B, then stored as A again: the sink has the day
    as it is now, so the dead letter goes and nothing is queued."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([fetched("acme", messages=7)])
    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    await store.record_fetched([fetched("acme", messages=8)])
    failed = await store.pending("warehouse")
    assert len(await store.mark_failed("warehouse", failed, "HTTP 400", max_attempts=1)) == 1
    assert len(await store.dead_letters("warehouse")) == 1
    assert await store.record_fetched([fetched("acme", messages=7)]) == [True]
    assert await store.dead_letters("warehouse") == []
    assert await store.pending("warehouse") == []


async def test_a_tenant_routed_back_drops_a_dead_letter_of_a_version_it_moved_past(
    store: Store,
) -> None:
    """The same, but the day goes back to A while its tenant is routed elsewhere: when the
    tenant is routed to the sink again, the sink has A, so the dead letter of B goes too."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([fetched("acme", messages=7)])
    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    await store.record_fetched([fetched("acme", messages=8)])
    failed = await store.pending("warehouse")
    assert len(await store.mark_failed("warehouse", failed, "HTTP 400", max_attempts=1)) == 1
    await store.sync_sinks({"warehouse": ["globex"]})
    assert await store.record_fetched([fetched("acme", messages=7)]) == [True]
    assert len(await store.dead_letters("warehouse")) == 1  # not routed: left as it was

    assert await store.sync_sinks({"warehouse": None}) == {"warehouse": 0}
    assert await store.dead_letters("warehouse") == []
    assert await store.pending("warehouse") == []


async def test_a_day_that_becomes_final_is_delivered_once_more(store: Store) -> None:
    """Same figures but now final counts as a change, so sinks learn final = true."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([fetched("acme")])
    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    assert await store.record_fetched([fetched("acme", final=True)]) == [True]
    [again] = await store.pending("warehouse")
    assert again.final
    assert again.daily.final
    assert (await store.days_state("acme"))[DAY].status == "final"


async def test_duplicates_within_one_batch_are_reported_in_sequence(store: Store) -> None:
    """The same tenant-day twice in one batch: the first is new, the identical second is not."""
    assert await store.record_fetched([fetched("acme"), fetched("acme")]) == [True, False]
    assert len(await store.days_state("acme")) == 1


async def test_failed_refetch_keeps_the_earlier_payload_deliverable(store: Store) -> None:
    """A failed re-fetch marks the day failed but keeps its payload, still pending for sinks."""
    await store.sync_sinks({"warehouse": None})
    item, _ = fetched("acme")
    await store.record_fetched([fetched("acme")])
    await store.record_failed("acme", DAY, "ServerError: HTTP 500: Failed to fetch data")
    await store.record_failed("acme", DAY, "ServerError: HTTP 500: Failed to fetch data")
    state = (await store.days_state("acme"))[DAY]
    assert (state.status, state.attempts, state.content_hash) == ("failed", 2, item.content_hash)
    assert list(await store.pending("warehouse")) == [item]


async def test_a_failed_day_without_data_is_not_pending_and_a_success_clears_it(
    store: Store,
) -> None:
    """A never-fetched failed day has nothing to deliver; a later success resets the attempts."""
    await store.sync_sinks({"warehouse": None})
    await store.record_failed("acme", DAY, "RateLimited: HTTP 429")
    assert await store.backlog("warehouse") == 0
    assert (await store.days_state("acme"))[DAY].status == "failed"
    await store.record_fetched([fetched("acme")])
    state = (await store.days_state("acme"))[DAY]
    assert (state.status, state.attempts) == ("fetched", 0)
    assert await store.backlog("warehouse") == 1


async def test_pending_skips_what_the_sink_has_and_returns_changes(store: Store) -> None:
    """A sink that has a version gets nothing more until the figures change."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched(days("acme", 3))
    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    assert list(await store.pending("warehouse")) == []
    await store.record_fetched(days("acme", 3))  # unchanged re-fetch
    assert list(await store.pending("warehouse")) == []
    changed, body = fetched("acme", DAY + dt.timedelta(days=1), messages=99)
    await store.record_fetched([(changed, body)])
    assert list(await store.pending("warehouse")) == [changed]


async def test_pending_is_in_storage_order_and_pages_with_the_cursor(store: Store) -> None:
    """Days come in the order their versions were stored; ``after`` continues past a page."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched(days("globex", 3))
    await store.record_fetched(days("acme", 3))
    first = await store.pending("warehouse", limit=4)
    rest = await store.pending("warehouse", limit=4, after=first.cursor)
    expected = [("globex", DAY + dt.timedelta(days=i)) for i in range(3)]
    expected += [("acme", DAY + dt.timedelta(days=i)) for i in range(3)]
    assert keys(first) + keys(rest) == expected
    assert list(await store.pending("warehouse", limit=4, after=rest.cursor)) == []
    assert keys(await store.pending("warehouse", tenants=["acme"])) == expected[3:]


async def test_a_delivery_of_an_outdated_version_leaves_the_new_one_queued(store: Store) -> None:
    """If new figures arrive while a sink writes the old ones, the new ones stay pending."""
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([fetched("acme")])
    [old] = await store.pending("warehouse")
    newer, data = fetched("acme", messages=50)
    await store.record_fetched([(newer, data)])
    await store.mark_delivered("warehouse", [old])
    assert list(await store.pending("warehouse")) == [newer]


async def test_dead_letter_after_max_attempts_until_the_data_changes(store: Store) -> None:
    """A day failing max_attempts times becomes a dead letter; new figures queue it again."""
    await store.sync_sinks({"hook": None})
    await store.record_fetched([fetched("acme")])
    [item] = await store.pending("hook")
    assert await store.mark_failed("hook", [item], "SinkTransientError: 503", 3) == []
    assert await store.mark_failed("hook", [item], "SinkTransientError: 503", 3) == []
    assert list(await store.pending("hook")) == [item]
    assert await store.mark_failed("hook", [item], "SinkTransientError: 503", 3) == [item]
    assert list(await store.pending("hook")) == []
    [dead] = await store.dead_letters("hook")
    assert (dead.tenant, dead.day, dead.attempts, dead.current) == ("acme", DAY, 3, True)
    assert dead.error == "SinkTransientError: 503"

    await store.record_fetched([fetched("acme")])  # same figures: stays dead
    assert await store.backlog("hook") == 0
    changed, data = fetched("acme", messages=9)
    await store.record_fetched([(changed, data)])
    assert list(await store.pending("hook")) == [changed]
    await store.mark_delivered("hook", [changed])
    assert await store.dead_letters("hook") == []


async def test_replay_queues_history_again(store: Store) -> None:
    """replay re-queues delivered days, filtered by tenant and since, without touching the API."""
    await store.sync_sinks({"lake": None})
    await store.record_fetched(days("acme", 4) + days("globex", 2))
    await store.mark_delivered("lake", await store.pending("lake"))
    assert await store.backlog("lake") == 0

    since = DAY + dt.timedelta(days=2)
    assert await store.replay("lake", tenant="acme", since=since) == 2
    assert keys(await store.pending("lake")) == [("acme", since), ("acme", since + dt.timedelta(1))]
    assert await store.replay("lake") == 6
    assert await store.backlog("lake") == 6


async def test_replay_only_dead_letters(store: Store) -> None:
    """replay --dead-letters re-queues only the dead letters, with fresh attempts."""
    await store.sync_sinks({"hook": None})
    await store.record_fetched(days("acme", 3))
    batch = list(await store.pending("hook"))
    await store.mark_delivered("hook", batch[1:])
    assert await store.mark_failed("hook", batch[:1], "SinkPermanentError: 400", 1) == batch[:1]
    assert await store.replay("hook", only_dead=True) == 1
    assert list(await store.pending("hook")) == batch[:1]
    assert await store.dead_letters("hook") == []
    assert await store.mark_failed("hook", batch[:1], "again", 2) == []  # attempts were reset


async def test_new_sink_gets_full_history_and_routes_are_honoured(store: Store) -> None:
    """A sink added later has every stored day queued; tenants not routed to it are not."""
    await store.record_fetched(days("acme", 2) + days("globex", 2))
    queued = await store.sync_sinks({"warehouse": None, "hook": ["acme"]})
    assert queued == {"warehouse": 4, "hook": 2}
    assert {t for t, _ in keys(await store.pending("hook"))} == {"acme"}

    await store.record_fetched([fetched("initech")])
    assert await store.backlog("warehouse") == 5
    assert await store.backlog("hook") == 2

    # Re-routing: globex joins hook (its history is queued), acme leaves (its queue is dropped).
    assert (await store.sync_sinks({"warehouse": None, "hook": ["globex"]}))["hook"] == 2
    assert {t for t, _ in keys(await store.pending("hook"))} == {"globex"}
    assert await store.sync_sinks({"warehouse": None, "hook": ["globex"]}) == {
        "warehouse": 0,
        "hook": 0,
    }


async def test_a_removed_sink_that_returns_gets_only_what_it_lacks(store: Store) -> None:
    """Unregistering keeps delivery records, so re-adding a sink does not resend what it has."""
    await store.sync_sinks({"warehouse": None, "hook": None})
    await store.record_fetched(days("acme", 3))
    await store.mark_delivered("hook", (await store.pending("hook"))[:2])
    await store.sync_sinks({"warehouse": None}, remove_missing=True)
    assert {s.sink for s in (await store.status_snapshot()).sinks} == {"warehouse"}
    assert await store.backlog("hook") == 0
    assert await store.sync_sinks({"warehouse": None, "hook": None}) == {"warehouse": 0, "hook": 1}


async def test_a_sink_registered_by_another_process_is_queued_at_the_next_write(
    store_url: str,
) -> None:
    """A store that already wrote days (and keeps the sink list it read) queues its next days
    for a sink another store registered, or re-routed, meanwhile."""
    writer, other = await Store.open(store_url), await Store.open(store_url)
    try:
        await writer.sync_sinks({"warehouse": None})
        await writer.record_fetched([fetched("acme")])
        await other.sync_sinks({"warehouse": None, "hook": ["acme"]})

        await writer.record_fetched([fetched("acme", DAY + dt.timedelta(days=1))])
        assert await writer.backlog("hook") == 2  # the history, then the new day
        await other.sync_sinks({"warehouse": None, "hook": ["globex"]})
        await writer.record_fetched([fetched("acme", DAY + dt.timedelta(days=2))])
        assert await writer.backlog("hook") == 0
        assert await writer.backlog("warehouse") == 3
    finally:
        await writer.aclose()
        await other.aclose()


async def test_prune_keeps_payloads_a_sink_still_needs(store: Store) -> None:
    """Retention drops old final payloads only after every routed sink has them."""
    await store.sync_sinks({"warehouse": None, "hook": ["acme"]})
    old = days("acme", 2, final=True) + days("globex", 1, final=True)
    await store.record_fetched(old)
    recent, data = fetched("acme", DAY + dt.timedelta(days=30), final=False)
    await store.record_fetched([(recent, data)])
    today = DAY + dt.timedelta(days=31)

    await store.mark_delivered("warehouse", await store.pending("warehouse"))
    # hook has not received acme's days yet; globex is not routed to hook.
    assert await store.prune_payloads(7, today=today) == 1
    await store.mark_delivered("hook", await store.pending("hook"))
    assert await store.prune_payloads(7, today=today) == 2
    assert await store.prune_payloads(7, today=today) == 0

    states = await store.days_state("acme")
    assert states[DAY].status == "final"
    assert states[DAY].content_hash is not None
    # Replay can only reach what retention kept: the recent day.
    assert await store.replay("warehouse") == 1
    assert keys(await store.pending("warehouse")) == [("acme", recent.day)]


async def test_prune_keeps_dead_letters_and_everything_without_sinks(store: Store) -> None:
    """Dead-lettered days keep their payload (for replay), and with no sinks nothing is pruned."""
    await store.record_fetched(days("acme", 2, final=True))
    today = DAY + dt.timedelta(days=60)
    assert await store.prune_payloads(7, today=today) == 0
    await store.sync_sinks({"hook": None})
    first, second = await store.pending("hook")
    await store.mark_delivered("hook", [first])
    await store.mark_failed("hook", [second], "SinkPermanentError: 422", 1)
    assert await store.prune_payloads(7, today=today) == 1
    assert await store.replay("hook", only_dead=True) == 1


async def test_status_snapshot_reports_tenants_and_sinks(store: Store) -> None:
    """status_snapshot gives days complete, failures, outcomes, backlog, dead letters and lag."""
    await store.sync_sinks({"warehouse": None, "hook": ["acme"]})
    await store.record_fetched(days("acme", 3, final=True) + days("globex", 1))
    await store.record_failed("globex", DAY + dt.timedelta(days=1), "ServerError: HTTP 500")
    await store.set_tenant_success("acme")
    later = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    await store.set_tenant_error("globex", "AuthError: HTTP 401", auth_failed_until=later)
    await store.set_tenant_next_run("globex", later)
    batch = await store.pending("hook")
    await store.mark_failed("hook", batch[:1], "SinkPermanentError: 400", 1)
    assert await store.end_pass("hook", "SinkPermanentError: 400", attempted=True) == 2

    snapshot = await store.status_snapshot(tenants=["acme", "globex", "initech"])
    tenants = {t.tenant: t for t in snapshot.tenants}
    assert (tenants["acme"].days_complete, tenants["acme"].days_final) == (3, 3)
    assert tenants["acme"].last_success_at is not None
    assert (tenants["globex"].days_complete, tenants["globex"].days_failed) == (1, 1)
    assert tenants["globex"].auth_failed_until == later
    assert tenants["globex"].next_run_at == later
    assert tenants["initech"].days_complete == 0
    sinks = {s.sink: s for s in snapshot.sinks}
    assert (sinks["warehouse"].backlog, sinks["warehouse"].dead_letters) == (4, 0)
    assert (sinks["hook"].backlog, sinks["hook"].dead_letters) == (2, 1)
    assert sinks["hook"].routes == ["acme"]
    assert sinks["hook"].last_error == "SinkPermanentError: 400"
    assert sinks["warehouse"].lag_seconds >= 0.0
    assert [s.sink for s in snapshot.sinks] == ["hook", "warehouse"]  # by name


async def test_lag_is_the_age_of_the_oldest_queued_day(store_url: str) -> None:
    """A sink's lag grows with the time its oldest queued tenant-day has waited."""
    now = [dt.datetime(2025, 2, 1, 12, 0, tzinfo=dt.UTC)]
    clocked = await Store.open(store_url, clock=lambda: now[0])
    try:
        await clocked.sync_sinks({"hook": None})
        await clocked.record_fetched([fetched("acme")])
        now[0] += dt.timedelta(minutes=5)
        [hook] = (await clocked.status_snapshot()).sinks
        assert hook.lag_seconds == 300.0
        await clocked.mark_delivered("hook", await clocked.pending("hook"))
        [hook] = (await clocked.status_snapshot()).sinks
        assert (hook.backlog, hook.lag_seconds) == (0, 0.0)
    finally:
        await clocked.aclose()


async def test_concurrent_writers_do_not_conflict(store_url: str) -> None:
    """Many concurrent writes from two store instances (daemon and CLI) all commit."""
    daemon, cli = await Store.open(store_url), await Store.open(store_url)
    try:
        await daemon.sync_sinks({"warehouse": None})
        tenants = [f"tenant-{i:02d}" for i in range(12)]
        await asyncio.gather(
            *(daemon.record_fetched(days(t, 5)) for t in tenants[:6]),
            *(cli.record_fetched(days(t, 5)) for t in tenants[6:]),
            *(cli.record_failed(t, DAY - dt.timedelta(days=1), "x") for t in tenants),
        )
        assert await cli.backlog("warehouse") == 60
        pages = await asyncio.gather(daemon.pending("warehouse", limit=60), cli.replay("warehouse"))
        await daemon.mark_delivered("warehouse", pages[0])
        assert await daemon.backlog("warehouse") == 0
    finally:
        await daemon.aclose()
        await cli.aclose()


async def test_unreadable_stored_payload_is_dead_lettered_not_stuck(tmp_path: Path) -> None:
    """A stored payload this version cannot parse goes to the dead-letter instead of blocking."""
    path = tmp_path / "state.db"
    writer = await Store.open(f"sqlite:///{path}")
    await writer.sync_sinks({"hook": None})
    await writer.record_fetched(days("acme", 2))
    await writer.aclose()
    with sqlite3.connect(path) as raw:  # as a damaged or future-format row would look
        raw.execute("UPDATE tenant_day SET payload = '{\"daily\": 5}' WHERE day = ?", (DAY,))
    # A fresh process: nothing of the days is cached, the payload must be read.
    store = await Store.open(f"sqlite:///{path}")
    try:
        batch = await store.pending("hook")
        assert keys(batch) == [("acme", DAY + dt.timedelta(days=1))]
        [dead] = await store.dead_letters("hook")
        assert dead.day == DAY
        assert dead.error is not None
        assert "unreadable" in dead.error
        assert await store.backlog("hook") == 1
    finally:
        await store.aclose()


async def test_sqlite_file_is_in_wal_mode_with_the_chosen_durability(tmp_path: Path) -> None:
    """The SQLite state file uses WAL; synchronous can be raised to FULL from the URL; the
    store's connections keep temporary files (statement journals, sorts) in memory."""
    path = tmp_path / "deep" / "dir" / "state.db"
    store = await Store.open(f"sqlite:///{path}?synchronous=full")
    try:
        await store.record_fetched([fetched("acme")])
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            version = raw.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            assert version == SCHEMA_VERSION
        with store._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA temp_store").scalar() == 2  # MEMORY
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("make_url", "message"),
    [
        (lambda tmp: "not a url", "not a database URL"),
        (lambda tmp: "mysql://u:p@localhost/db", "unsupported database"),
        (lambda tmp: "sqlite://", "needs a file path"),
        (lambda tmp: f"sqlite:///{tmp}/x.db?synchronous=sometimes", "synchronous must be"),
        (lambda tmp: f"sqlite:///{tmp}/a-file/state.db", "state database"),
    ],
)
async def test_bad_urls_raise_store_error(
    tmp_path: Path, make_url: Callable[[Path], str], message: str
) -> None:
    """Every way of giving a bad state URL ends in a StoreError saying what is wrong."""
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreError, match=message):
        await Store.open(make_url(tmp_path))


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A state database written by a newer collector is refused instead of being damaged."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    await (await Store.open(url)).aclose()
    with sqlite3.connect(tmp_path / "state.db") as raw:
        raw.execute("INSERT INTO schema_version VALUES (99, '2030-01-01 00:00:00')")
    with pytest.raises(StoreError, match="schema version 99"):
        await Store.open(url)


async def test_database_errors_become_store_errors_without_payloads(tmp_path: Path) -> None:
    """A failing statement raises StoreError, and its message holds no SQL parameters (emails)."""
    path = tmp_path / "state.db"
    store = await Store.open(f"sqlite:///{path}")
    try:
        await store.sync_sinks({"hook": None})
        with sqlite3.connect(path) as raw:
            raw.execute("DROP TABLE delivery")
        with pytest.raises(StoreError) as caught:
            await store.record_fetched([fetched("acme")])
        assert "acme.example" not in str(caught.value)
        assert await store.days_state("acme") == {}  # the failed transaction left nothing behind
        await store.aclose()
        with pytest.raises(StoreError, match="closed"):
            await store.days_state("acme")
    finally:
        await store.aclose()


@pytest.mark.postgres
async def test_postgres_password_never_appears(postgres_url: str) -> None:
    """The PostgreSQL password is masked in the store's repr and absent from connection errors."""
    url = sqlalchemy.make_url(postgres_url)
    store = await Store.open(postgres_url)
    try:
        if url.password is not None:
            assert f":{url.password}@" not in repr(store)
            assert ":***@" in repr(store)
    finally:
        await store.aclose()
    wrong = url.set(password="Canary-Pw-7f3a9").render_as_string(hide_password=False)
    with pytest.raises(StoreError) as caught:
        await Store.open(wrong)
    assert "Canary-Pw-7f3a9" not in str(caught.value)


_WRITER = """
import asyncio, datetime as dt, json, sys
from collector.models import tenant_day_from_body
from collector.store import Store

async def main(url):
    store = await Store.open(url)
    await store.sync_sinks({"warehouse": None})
    day = dt.date(2024, 1, 1)
    for n in range(100000):
        data = {"period": {"start": str(day), "end": str(day), "days": 1},
                "summary": {"total_active_users": 1, "total_messages": n},
                "users": [], "daily": [{"day": str(day), "active_users": 1, "messages": n}]}
        body = json.dumps({"status": "success", "data": data})
        now = dt.datetime.now(dt.UTC)
        item = tenant_day_from_body(f"t{n % 7}", day, body.encode(), fetched_at=now, final=True)
        await store.record_fetched([(item, body)])
        print(item.tenant, day.isoformat(), flush=True)  # only after the commit returned
        day += dt.timedelta(days=1) if n % 7 == 6 else dt.timedelta(0)

asyncio.run(main(sys.argv[1]))
"""


async def test_every_acknowledged_commit_survives_kill_9(tmp_path: Path) -> None:
    """Days whose record_fetched returned are all there after the process is killed with SIGKILL."""
    path = tmp_path / "state.db"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), f"sqlite:///{path}", stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    acknowledged: list[tuple[str, dt.date]] = []
    while len(acknowledged) < 60:
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().split()
        acknowledged.append((line[0], dt.date.fromisoformat(line[1])))
    process.send_signal(signal.SIGKILL)
    await process.wait()

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = await Store.open(f"sqlite:///{path}")
    try:
        stored = {
            (tenant, day)
            for tenant in {t for t, _ in acknowledged}
            for day in await store.days_state(tenant)
        }
        assert set(acknowledged) <= stored
        assert await store.backlog("warehouse") == len(stored)
    finally:
        await store.aclose()


def test_rebuild_cache_keeps_unread_days_when_full_and_drops_read_ones() -> None:
    """A full rebuild cache skips new days rather than evicting unread ones, and frees read ones."""
    from collector.store.pending import RecentDays
    from collector.testing import make_tenant_day

    days = [make_tenant_day("acme", dt.date(2025, 1, d), users=1) for d in (1, 2, 3)]
    cache = RecentDays(2, stale_after=3600)
    cache.put(("1",), days[0], 2)
    cache.put(("2",), days[1], 1)
    cache.put(("3",), days[2], 1)  # full, nothing stale: the new day is skipped
    assert cache.get(("3",)) is None
    assert cache.get(("2",)) is days[1]
    assert cache.get(("2",)) is None  # its only reader had it
    assert cache.get(("1",)) is days[0]
    assert cache.get(("1",)) is days[0]  # two readers
    assert cache.get(("1",)) is None
    cache.put(("3",), days[2], 0)  # no sink will read it
    assert cache.get(("3",)) is None

    stale = RecentDays(1, stale_after=0.0)
    stale.put(("1",), days[0], 1)
    stale.put(("2",), days[1], 1)  # the unread oldest is stale: it makes room
    assert stale.get(("1",)) is None
    assert stale.get(("2",)) is days[1]


@contextlib.contextmanager
def _watched(
    postgres_url: str, prefix: str
) -> Iterator[tuple[str, sqlalchemy.URL, sqlalchemy.Engine]]:
    """A fresh schema (its name, a URL whose connections carry it as ``application_name``) and
    an engine outside it, to see which of those connections wait for a lock."""
    from tests.postgres_helpers import fresh_schema

    with fresh_schema(postgres_url, prefix) as (schema, plain_url):
        url = sqlalchemy.make_url(plain_url).update_query_dict({"application_name": schema})
        watcher = sqlalchemy.create_engine(sqlalchemy.make_url(postgres_url))
        try:
            yield schema, url, watcher
        finally:
            watcher.dispose()


def _lock_waiters(engine: sqlalchemy.Engine, application: str) -> int:
    """Connections of ``application`` waiting for a lock (PostgreSQL)."""
    with engine.connect() as conn:
        query = (
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %(app)s AND wait_event_type = 'Lock'"
        )
        return int(conn.exec_driver_sql(query, {"app": application}).scalar_one())


def _lock_delivery(conn: sqlalchemy.Connection, tenant: str) -> None:
    """Lock ``tenant``'s delivery rows of the sink ``warehouse`` in ``conn``'s transaction."""
    from collector.store.schema import delivery

    conn.execute(
        sqlalchemy.select(delivery.c.day)
        .where(delivery.c.sink == "warehouse", delivery.c.tenant == tenant)
        .with_for_update()
    )


async def _start_in_order(
    watcher: sqlalchemy.Engine,
    application: str,
    first: Callable[[], Awaitable[Any]],
    second: Callable[[], Awaitable[Any]],
) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """Start ``first``, wait until it waits for a lock (or is done), then the same for
    ``second``: PostgreSQL then grants the lock they wait for in that order."""
    from tests.daemon_process import eventually

    tasks: list[asyncio.Task[Any]] = []

    def all_wait_or_done() -> bool:
        return _lock_waiters(watcher, application) >= sum(not t.done() for t in tasks)

    for step, what in ((first, "the first to wait"), (second, "both to wait")):
        tasks.append(asyncio.ensure_future(step()))
        await eventually(all_wait_or_done, within=10, what=what)
    return tasks[0], tasks[1]


@pytest.mark.postgres
@pytest.mark.parametrize("first", ["day", "sink"])
async def test_a_sink_added_while_a_day_is_written_gets_that_day(
    postgres_url: str, first: str
) -> None:
    """A new day and a new sink committed at the same time by two processes on one PostgreSQL
    state: whichever commits first, the day is queued for the new sink (by the writer, or with
    the sink's history), never for neither."""
    from collector.store.schema import tenant_day

    with _watched(postgres_url, "race") as (schema, url, watcher):
        url_text = url.render_as_string(hide_password=False)
        writer, registrar = await Store.open(url_text), await Store.open(url_text)
        blocker = sqlalchemy.create_engine(url)
        try:
            await writer.sync_sinks({"warehouse": None})
            await writer.record_fetched([fetched("globex")])  # the writer has read the sinks
            with blocker.connect() as conn:
                conn.begin()
                if first == "day":
                    # An uncommitted row with the same key holds the writer inside its
                    # transaction, after it read the sink list, until the blocker rolls back.
                    conn.execute(
                        tenant_day.insert().values(
                            tenant="acme", day=DAY, status="failed", final=False, attempts=1,
                            updated_at=FETCHED_AT,
                        )
                    )  # fmt: skip
                else:
                    # The outbox position row: the sink registration takes it first (if it
                    # takes it at all), and the writer queues behind it.
                    Store._hold_positions(conn)

                def write() -> Awaitable[Any]:
                    return writer.record_fetched([fetched("acme")])

                def register() -> Awaitable[Any]:
                    return registrar.sync_sinks({"warehouse": None, "lake": None})

                steps = (write, register) if first == "day" else (register, write)
                tasks = await _start_in_order(watcher, schema, *steps)
                conn.rollback()
            await asyncio.gather(*tasks)
            both = [("acme", DAY), ("globex", DAY)]
            assert sorted(keys(await registrar.pending("lake"))) == both
            assert sorted(keys(await writer.pending("warehouse"))) == both
        finally:
            await writer.aclose()
            await registrar.aclose()
            blocker.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("first", ["retention", "sink"])
async def test_retention_and_a_sink_registered_at_once_leave_no_queued_day_without_payload(
    postgres_url: str, first: str
) -> None:
    """Retention and another process registering a new sink, both waiting for the outbox
    position row: whichever goes first, the new sink either gets the delivered day queued with
    its payload kept, or the payload goes and the sink's history leaves the day out."""
    from collector.store.schema import delivery, tenant_day

    with _watched(postgres_url, "prune") as (schema, url, watcher):
        url_text = url.render_as_string(hide_password=False)
        pruner, registrar = await Store.open(url_text), await Store.open(url_text)
        blocker = sqlalchemy.create_engine(url)
        try:
            await pruner.sync_sinks({"warehouse": None})
            await pruner.record_fetched([fetched("acme", final=True)])
            await pruner.mark_delivered("warehouse", await pruner.pending("warehouse"))
            with blocker.connect() as conn:
                conn.begin()
                # The position row, as a write of new days holds it until it commits.
                Store._hold_positions(conn)

                def prune() -> Awaitable[Any]:
                    return pruner.prune_payloads(7, today=DAY + dt.timedelta(days=30))

                def register() -> Awaitable[Any]:
                    return registrar.sync_sinks({"warehouse": None, "lake": None})

                steps = (prune, register) if first == "retention" else (register, prune)
                tasks = await _start_in_order(watcher, schema, *steps)
                conn.rollback()
            await asyncio.gather(*tasks)
            with blocker.connect() as conn:
                queued_without_payload = conn.execute(
                    sqlalchemy.select(sqlalchemy.func.count())
                    .select_from(delivery.join(tenant_day, sqlalchemy.and_(
                        delivery.c.tenant == tenant_day.c.tenant,
                        delivery.c.day == tenant_day.c.day,
                    )))
                    .where(delivery.c.queued_seq.is_not(None), tenant_day.c.payload.is_(None))
                ).scalar_one()  # fmt: skip
            assert queued_without_payload == 0
            lake = keys(await registrar.pending("lake"))
            assert lake == ([] if first == "retention" else [("acme", DAY)])
        finally:
            await pruner.aclose()
            await registrar.aclose()
            blocker.dispose()


@pytest.mark.postgres
async def test_retention_leaves_a_day_a_writer_holds_for_the_next_pass(postgres_url: str) -> None:
    """A payload whose row a writer has locked is skipped, not waited for (the writer takes the
    position row that retention holds next, which would deadlock), and dropped on the next pass."""
    from collector.store.schema import tenant_day
    from tests.postgres_helpers import fresh_schema

    with fresh_schema(postgres_url, "skip") as (_, url):
        store = await Store.open(url)
        blocker = sqlalchemy.create_engine(url)
        later = DAY + dt.timedelta(days=30)
        try:
            await store.sync_sinks({"warehouse": None})
            await store.record_fetched([fetched("acme", final=True), fetched("globex", final=True)])
            await store.mark_delivered("warehouse", await store.pending("warehouse"))
            with blocker.connect() as conn:
                conn.begin()
                conn.execute(
                    sqlalchemy.select(tenant_day.c.day)
                    .where(tenant_day.c.tenant == "acme")
                    .with_for_update()
                )
                assert await asyncio.wait_for(store.prune_payloads(7, today=later), 10) == 1
                conn.rollback()
            assert await store.prune_payloads(7, today=later) == 1
            assert await store.prune_payloads(7, today=later) == 0
        finally:
            await store.aclose()
            blocker.dispose()


@pytest.mark.postgres
async def test_a_write_waiting_for_the_position_row_holds_no_day_row(postgres_url: str) -> None:
    """A write of a stored day that waits for another write's position row has not locked that
    day's row yet, so the other write can update it and commit: no deadlock (a backfill next to
    the daemon writes the same days)."""
    from collector.store.schema import tenant_day
    from tests.daemon_process import eventually

    with _watched(postgres_url, "order") as (schema, url, watcher):
        store = await Store.open(url.render_as_string(hide_password=False))
        other = sqlalchemy.create_engine(url)
        try:
            await store.record_fetched([fetched("acme")])
            with other.connect() as conn:
                conn.begin()
                # The other write: it holds the position row, then updates the day's row.
                Store._hold_positions(conn)
                write = asyncio.create_task(store.record_fetched([fetched("acme", messages=9)]))
                await eventually(
                    lambda: _lock_waiters(watcher, schema) >= 1, within=10, what="the write"
                )
                conn.execute(
                    sqlalchemy.update(tenant_day)
                    .where(tenant_day.c.tenant == "acme")
                    .values(attempts=0)
                )  # would wait forever (a deadlock PostgreSQL breaks) if the write held the row
                conn.commit()
            assert await asyncio.wait_for(write, 10) == [True]
        finally:
            await store.aclose()
            other.dispose()


@pytest.mark.postgres
async def test_a_replay_during_a_write_queues_the_version_the_write_stores(
    postgres_url: str,
) -> None:
    """A replay that starts while a write of a new version is in progress waits for it, and
    queues that version: the sink's queue empties once it is delivered (a replayed entry naming
    the version before would be sent on every pass and never acknowledged)."""
    from collector.store.schema import delivery, store_meta, tenant_day, version_of_day
    from tests.daemon_process import eventually

    with _watched(postgres_url, "replay") as (schema, url, watcher):
        store = await Store.open(url.render_as_string(hide_password=False))
        writer = sqlalchemy.create_engine(url)
        try:
            await store.sync_sinks({"warehouse": None})
            await store.record_fetched([fetched("acme")])
            await store.mark_delivered("warehouse", await store.pending("warehouse"))
            new, body = fetched("acme", messages=9)
            with writer.connect() as conn:
                conn.begin()
                # A write of the new version, as record_fetched makes it: the position row,
                # then the day, then its queue entry.
                conn.execute(
                    sqlalchemy.update(store_meta)
                    .where(store_meta.c.key == "seq")
                    .values(value=store_meta.c.value + 1)
                )
                conn.execute(
                    sqlalchemy.update(tenant_day)
                    .where(tenant_day.c.tenant == "acme")
                    .values(
                        content_hash=new.content_hash,
                        version=version_of_day(new),
                        payload=body,
                        seq=sqlalchemy.select(store_meta.c.value)
                        .where(store_meta.c.key == "seq")
                        .scalar_subquery(),
                    )
                )
                conn.execute(
                    sqlalchemy.update(delivery)
                    .where(delivery.c.sink == "warehouse")
                    .values(queued_seq=1000, queued_version=version_of_day(new))
                )
                replay = asyncio.create_task(store.replay("warehouse"))
                await eventually(
                    lambda: _lock_waiters(watcher, schema) >= 1, within=10, what="the replay"
                )
                conn.commit()
            assert await asyncio.wait_for(replay, 10) == 1
            [again] = await store.pending("warehouse")
            assert again.daily.messages == 9 * 3
            await store.mark_delivered("warehouse", [again])
            assert await store.pending("warehouse") == []
        finally:
            await store.aclose()
            writer.dispose()


@pytest.mark.postgres
async def test_a_failed_delivery_locks_its_days_in_key_order(postgres_url: str) -> None:
    """mark_failed takes a sink's delivery rows in key order, as a write queueing the same days
    does: a transaction holding the first and then taking the second cannot deadlock with it."""
    from tests.daemon_process import eventually

    with _watched(postgres_url, "fail") as (schema, url, watcher):
        store = await Store.open(url.render_as_string(hide_password=False))
        other = sqlalchemy.create_engine(url)
        try:
            await store.sync_sinks({"warehouse": None})
            # globex's row first in the table, acme's second: table order is not key order.
            await store.record_fetched([fetched("globex")])
            await store.record_fetched([fetched("acme")])
            batch = await store.pending("warehouse")
            assert keys(batch) == [("globex", DAY), ("acme", DAY)]
            with other.connect() as conn:
                conn.begin()

                _lock_delivery(conn, "acme")  # the first in key order, as a queueing write takes it
                failing = asyncio.create_task(
                    store.mark_failed("warehouse", batch, "HTTP 500", max_attempts=3)
                )
                await eventually(
                    lambda: _lock_waiters(watcher, schema) >= 1, within=10, what="mark_failed"
                )
                _lock_delivery(conn, "globex")  # deadlocks if mark_failed took globex's row first
                conn.commit()
            assert await asyncio.wait_for(failing, 10) == []
        finally:
            await store.aclose()
            other.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("only_dead", [False, True])
async def test_a_replay_locks_delivery_rows_in_key_order(
    postgres_url: str, only_dead: bool
) -> None:
    """replay (all history, or only dead letters) takes a sink's delivery rows in key order, as
    a delivery report does: a transaction holding the first and then taking the second cannot
    deadlock with it, though the days were stored in the other order."""
    from tests.daemon_process import eventually

    with _watched(postgres_url, "replay") as (schema, url, watcher):
        store = await Store.open(url.render_as_string(hide_password=False))
        other = sqlalchemy.create_engine(url)
        try:
            await store.sync_sinks({"warehouse": None})
            # globex's rows first in the tables, acme's second: table order is not key order.
            for tenant in ("globex", "acme"):
                await store.record_fetched([fetched(tenant)])
            if only_dead:
                for tenant in ("globex", "acme"):
                    failed = [td for td in await store.pending("warehouse") if td.tenant == tenant]
                    assert await store.mark_failed("warehouse", failed, "HTTP 400", 1) == failed
            with other.connect() as conn:
                conn.begin()

                _lock_delivery(
                    conn, "acme"
                )  # the first in key order, as a delivery report takes it
                replaying = asyncio.create_task(store.replay("warehouse", only_dead=only_dead))
                await eventually(
                    lambda: _lock_waiters(watcher, schema) >= 1, within=10, what="replay"
                )
                _lock_delivery(conn, "globex")  # deadlocks if the replay took globex's row first
                conn.commit()
            assert await asyncio.wait_for(replaying, 10) == 2
        finally:
            await store.aclose()
            other.dispose()
