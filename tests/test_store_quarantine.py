"""Quarantined days in the state store: the rejected body kept, status, recovery, aged-out days."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator

import pytest

from collector.store import Store
from tests.test_store import DAY, fetched, usage_data

REASON = "BadResponse: HTTP 200: response does not match the documented schema (at data.users[0])"


def body_of(day: dt.date, **changes: object) -> bytes:
    """A 200 body for ``day`` with top-level ``data`` keys replaced (e.g. a broken field)."""
    data = {**usage_data(day), **changes}
    return json.dumps({"status": "success", "data": data}).encode()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store on the fresh database, closed after the test."""
    opened = await Store.open(store_url)
    yield opened
    await opened.aclose()


async def test_a_quarantined_body_is_kept_byte_for_byte_and_the_day_is_marked(
    store: Store,
) -> None:
    """The rejected body comes back exactly as received, and the day's state says quarantined."""
    body = body_of(DAY, summary="not an object") + b"\n  \xff trailing bytes"
    await store.record_quarantined("acme", DAY, REASON, body)
    state = (await store.days_state("acme"))[DAY]
    assert (state.status, state.attempts, state.content_hash) == ("quarantined", 1, None)
    [kept] = await store.stored_bodies("acme")
    assert (kept.tenant, kept.day, kept.quarantined, kept.body) == ("acme", DAY, True, body)
    await store.record_quarantined("acme", DAY, REASON, body)
    assert (await store.days_state("acme"))[DAY].attempts == 2


async def test_quarantine_keeps_an_earlier_good_payload_deliverable(store: Store) -> None:
    """A settling day already stored keeps its figures when a later answer is quarantined."""
    td, body = fetched("acme")
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([(td, body)])
    await store.record_quarantined("acme", DAY, REASON, b"<html>oops</html>")
    state = (await store.days_state("acme"))[DAY]
    assert (state.status, state.content_hash) == ("quarantined", td.content_hash)
    assert [d.day for d in await store.pending("warehouse")] == [DAY]
    bodies = {b.quarantined: b.body for b in await store.stored_bodies("acme")}
    assert bodies == {True: b"<html>oops</html>"}  # the quarantined body stands for the day


async def test_a_good_fetch_ends_the_quarantine_and_its_body_is_dropped(store: Store) -> None:
    """Once the day is fetched fine, it is no longer quarantined and the old body goes."""
    await store.record_quarantined("acme", DAY, REASON, b"{}")
    td, body = fetched("acme")
    await store.record_fetched([(td, body)])
    assert (await store.days_state("acme"))[DAY].status == "fetched"
    assert await store.drop_recovered_quarantine() == 1
    [kept] = await store.stored_bodies("acme")
    assert (kept.quarantined, kept.body) == (False, body.encode())  # kept as received


async def test_stored_bodies_are_one_tenants_days_in_range_a_page_at_a_time(
    store: Store,
) -> None:
    """``reprocess``'s selection: one tenant, since and until, pages continuing after a day."""
    dates = [DAY + dt.timedelta(days=offset) for offset in range(5)]
    for day in dates:
        await store.record_fetched([fetched("acme", day), fetched("globex", day)])
    first = await store.stored_bodies("acme", since=dates[1], until=dates[3], limit=2)
    rest = await store.stored_bodies("acme", since=dates[1], until=dates[3], after=dates[2])
    assert [(b.tenant, b.day) for b in first + rest] == [("acme", d) for d in dates[1:4]]


async def test_status_lists_quarantined_days_and_days_that_aged_out(store: Store) -> None:
    """Per tenant: quarantined days with reasons, and uncollected days older than the window."""
    # acme: days 0-9 tracked; 2 and 5-6 never collected (one failed, two missing), 3 quarantined
    for offset in (0, 1, 4, 7, 8, 9):
        await store.record_fetched([fetched("acme", DAY + dt.timedelta(days=offset))])
    await store.record_failed("acme", DAY + dt.timedelta(days=2), "ServerError: HTTP 500")
    quarantined_day = DAY + dt.timedelta(days=3)
    await store.record_quarantined("acme", quarantined_day, REASON, b"{}")
    history_start = DAY + dt.timedelta(days=8)  # the API serves day 8 on
    snapshot = await store.status_snapshot(["acme", "globex"], history_start=history_start)
    acme, globex = snapshot.tenants
    assert (acme.days_quarantined, acme.days_failed) == (1, 1)
    assert [(q.day, q.reason) for q in acme.quarantined] == [(quarantined_day, REASON)]
    assert acme.aged_out == [
        f"{DAY + dt.timedelta(days=2)}..{quarantined_day}",
        f"{DAY + dt.timedelta(days=5)}..{DAY + dt.timedelta(days=6)}",
    ]
    assert acme.days_aged_out == 4
    assert (globex.days_aged_out, globex.aged_out, globex.quarantined) == (0, [], [])
    as_json = acme.to_dict()
    assert as_json["quarantined"] == [
        {
            "day": quarantined_day.isoformat(),
            "reason": REASON,
            "received_at": as_json["quarantined"][0]["received_at"],
        }
    ]
    json.dumps([t.to_dict() for t in snapshot.tenants])  # JSON-ready, as /status serves it
