"""The deliverer: per-sink lanes over a real SQLite store, with small real sinks defined here.

The sinks below implement the sink contract (open/write/aclose) for real: they keep what they
receive, raise the contract's errors, or hang. Nothing of the collector is replaced.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from collector.deliverer import Deliverer
from collector.errors import SinkPermanentError, SinkTransientError
from collector.hookspecs import hookimpl
from collector.models import Batch, TenantDay, tenant_day_from_body
from collector.plugin_manager import Notifier, make_plugin_manager
from collector.retry import no_wait
from collector.sink import Sink, SinkConfig
from collector.store import Store
from collector_sinks.csv import CsvSink, CsvSinkConfig
from collector_sinks.sqlite import SqliteSink, SqliteSinkConfig

DAY = dt.date(2025, 1, 10)
EMAIL = "ada@acme.example"


def fetched(tenant: str, day: dt.date, messages: int = 5) -> tuple[TenantDay, str]:
    """One fetched tenant-day as the pipeline stores it: derived from its body, body kept."""
    data = {
        "period": {"start": day.isoformat(), "end": day.isoformat(), "days": 1},
        "summary": {"total_active_users": 1, "total_messages": messages},
        "users": [{"email": EMAIL, "messages": messages, "ides": ["VS Code"], "languages": ["Go"]}],
        "daily": [{"day": day.isoformat(), "active_users": 1, "messages": messages}],
    }
    body = json.dumps({"status": "success", "data": data})
    fetched_at = dt.datetime(2025, 1, 20, tzinfo=dt.UTC)
    return tenant_day_from_body(tenant, day, body.encode(), fetched_at=fetched_at, final=True), body


def history(tenants: Sequence[str], count: int) -> list[tuple[TenantDay, str]]:
    return [fetched(t, DAY + dt.timedelta(days=i)) for t in tenants for i in range(count)]


def config(**overrides: Any) -> SinkConfig:
    settings: dict[str, Any] = {"type": "test", "timeout": dt.timedelta(seconds=5)}
    settings.update(overrides)
    return SinkConfig(**settings)


class RecordingSink(Sink):
    """Keeps every batch it is given, in memory and as JSON lines in a file."""

    type_name = "recording"

    def __init__(self, name: str, path: Path | None = None) -> None:
        super().__init__(name, config())
        self.batches: list[list[TenantDay]] = []
        self.path = path
        self.opened = 0
        self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def write(self, batch: Batch) -> None:
        self.batches.append(list(batch))
        if self.path is not None:
            with self.path.open("a") as out:
                for td in batch:
                    out.write(json.dumps({"tenant": td.tenant, "day": td.day.isoformat()}) + "\n")

    async def aclose(self) -> None:
        self.closed += 1

    @property
    def received(self) -> list[tuple[str, dt.date]]:
        return [(td.tenant, td.day) for batch in self.batches for td in batch]


class RaisingSink(RecordingSink):
    """Raises the given error on every write while ``failing`` is true, then records."""

    def __init__(self, name: str, error: Callable[[], Exception]) -> None:
        super().__init__(name)
        self.error = error
        self.failing = True
        self.calls = 0

    async def write(self, batch: Batch) -> None:
        self.calls += 1
        if self.failing:
            raise self.error()
        await super().write(batch)


class HangingSink(RecordingSink):
    """Never finishes a write (a target that accepted the connection and went silent)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.writing = asyncio.Event()

    async def write(self, batch: Batch) -> None:
        self.writing.set()
        await asyncio.Event().wait()


class PoisonSink(RecordingSink):
    """Refuses every batch that contains the poison tenant-day, with the given error class."""

    def __init__(self, name: str, poison: tuple[str, dt.date], error: type[Exception]) -> None:
        super().__init__(name)
        self.poison = poison
        self.error = error
        self.refused = 0

    async def write(self, batch: Batch) -> None:
        if any((td.tenant, td.day) == self.poison for td in batch):
            self.refused += 1
            raise self.error("row rejected: bad day")
        await super().write(batch)


class OpenFailsSink(RecordingSink):
    """Cannot connect for its first ``failures`` opens."""

    def __init__(self, name: str, failures: int) -> None:
        super().__init__(name)
        self.failures = failures

    async def open(self) -> None:
        await super().open()
        if self.opened <= self.failures:
            raise SinkTransientError("connection refused")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real SQLite state store in tmp_path."""
    opened = await Store.open(f"sqlite:///{tmp_path / 'state.db'}")
    yield opened
    await opened.aclose()


@pytest.fixture
def instant() -> Iterator[None]:
    """Backoff waits are zero (the collector's testing switch), attempts still count."""
    with no_wait():
        yield


def delivered_exactly(sink: RecordingSink, count: int) -> bool:
    return len(sink.received) == count


def deliverer(
    store: Store, sinks: dict[str, Sink], configs: dict[str, SinkConfig] | None = None, **kw: Any
) -> Deliverer:
    configs = {name: (configs or {}).get(name, config()) for name in sinks}
    return Deliverer(store, sinks, configs, **kw)


class DeliveryAlerts:
    """A plugin recording every collector_sink_delivery_failed call it receives."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    @hookimpl
    def collector_sink_delivery_failed(
        self, sink: str, tenant: str, day: dt.date, error: str, dead_lettered: bool
    ) -> None:
        self.calls.append(
            {
                "sink": sink,
                "tenant": tenant,
                "day": day,
                "error": error,
                "dead_lettered": dead_lettered,
            }
        )


def alerting_notifier(alerts: DeliveryAlerts) -> Notifier:
    """A notifier over a plugin manager with ``alerts`` registered (as the runtime builds it)."""
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(alerts, name="alerts")
    return Notifier(pm)


async def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> float:
    """Poll ``condition`` on the event loop; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_every_stored_day_reaches_the_sink_once_in_batches(
    store: Store, tmp_path: Path
) -> None:
    """run_until_drained delivers every stored day in batch_size batches, then reports done."""
    sink = RecordingSink("warehouse", tmp_path / "out.jsonl")
    items = history(["acme", "globex"], 5)
    delivery = deliverer(store, {"warehouse": sink}, {"warehouse": config(batch_size=4)})
    await store.record_fetched(items)
    assert await delivery.run_until_drained() is True
    assert sorted(sink.received) == sorted((td.tenant, td.day) for td, _ in items)
    assert [len(b) for b in sink.batches] == [4, 4, 2]
    assert [b for batch in sink.batches for b in batch] == [td for td, _ in items]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 10
    assert await store.backlog("warehouse") == 0
    assert await delivery.run_until_drained() is True  # nothing new: nothing sent again
    assert len(sink.batches) == 3
    stats = delivery.stats()["warehouse"]
    assert (stats.delivered, stats.batches, stats.backlog, stats.failed) == (10, 3, 0, 0)
    await delivery.aclose()
    assert (sink.opened, sink.closed) == (1, 1)


async def test_broken_sinks_do_not_delay_a_healthy_one(store: Store, instant: None) -> None:
    """A raising, a hanging and a permanently failing sink leave the healthy sink's output whole."""
    healthy = RecordingSink("warehouse")
    sinks: dict[str, Sink] = {
        "warehouse": healthy,
        "down": RaisingSink("down", lambda: SinkTransientError("HTTP 503")),
        "crashing": RaisingSink("crashing", lambda: RuntimeError("bug in plugin")),
        "hanging": HangingSink("hanging"),
        "refusing": RaisingSink("refusing", lambda: SinkPermanentError("HTTP 400")),
    }
    configs = {name: config(batch_size=5, timeout=dt.timedelta(seconds=30)) for name in sinks}
    delivery = deliverer(store, sinks, configs, poll_interval=60)
    runner = asyncio.create_task(delivery.run_forever())
    items = history(["acme", "globex", "initech"], 10)
    try:
        for start in range(0, len(items), 6):  # data keeps arriving while the others struggle
            await store.record_fetched(items[start : start + 6])
            delivery.notify_new_data()
        took = await wait_until(lambda: len(healthy.received) == len(items), limit=5.0)
        await wait_until(lambda: delivery.stats()["refusing"].dead_lettered == len(items))
    finally:
        await delivery.stop(grace=0.1)
        await runner
        await delivery.aclose()
    assert took < 5.0  # far below the hanging sink's 30 s timeout
    assert sorted(healthy.received) == sorted((td.tenant, td.day) for td, _ in items)
    assert await store.backlog("warehouse") == 0
    assert await store.backlog("hanging") > 0  # never acknowledged, so it will be redelivered
    assert len(await store.dead_letters("refusing")) == len(items)
    assert await store.dead_letters("down") == []  # an outage dead-letters nothing


async def test_a_poison_day_is_isolated_from_its_batch(store: Store) -> None:
    """A permanent refusal of a batch retries its days one by one; only the bad day is dead."""
    poison = ("acme", DAY + dt.timedelta(days=2))
    sink = PoisonSink("hook", poison, SinkPermanentError)
    alerts = DeliveryAlerts()
    delivery = deliverer(
        store,
        {"hook": sink},
        {"hook": config(batch_size=5)},
        notifier=alerting_notifier(alerts),
    )
    await store.record_fetched(history(["acme"], 5))
    assert await delivery.run_until_drained() is False
    assert sorted(sink.received) == sorted(
        ("acme", DAY + dt.timedelta(days=i)) for i in (0, 1, 3, 4)
    )
    [dead] = await store.dead_letters("hook")
    assert ((dead.tenant, dead.day), dead.attempts) == (poison, 1)
    assert dead.error == "SinkPermanentError: row rejected: bad day"
    assert alerts.calls == [
        {
            "sink": "hook",
            "tenant": "acme",
            "day": poison[1],
            "error": "SinkPermanentError: row rejected: bad day",
            "dead_lettered": True,
        }
    ]
    assert await store.backlog("hook") == 0
    assert delivery.stats()["hook"].dead_lettered == 1


async def test_a_day_failing_transiently_is_dead_lettered_after_max_attempts(
    store: Store, instant: None
) -> None:
    """A day the sink keeps refusing while accepting others is given up after max_attempts."""
    poison = ("globex", DAY)
    sink = PoisonSink("hook", poison, SinkTransientError)
    alerts = DeliveryAlerts()
    delivery = deliverer(
        store,
        {"hook": sink},
        {"hook": config(batch_size=3, max_attempts=4)},
        notifier=alerting_notifier(alerts),
        poll_interval=60,
    )
    runner = asyncio.create_task(delivery.run_forever())
    try:
        rounds = 0
        # New data keeps the sink demonstrably healthy between attempts at the poison day.
        while delivery.stats()["hook"].dead_lettered == 0 and rounds < 30:
            await store.record_fetched(
                [fetched("globex", DAY), fetched("acme", DAY + dt.timedelta(rounds))]
            )
            rounds += 1
            delivery.notify_new_data()
            await wait_until(functools.partial(delivered_exactly, sink, rounds))
            await asyncio.sleep(0.02)
    finally:
        await delivery.stop(grace=1)
        await runner
    [dead] = await store.dead_letters("hook")
    assert ((dead.tenant, dead.day), dead.attempts) == (poison, 4)
    # Three counted failures, then the fourth dead-letters it (plus uncounted retries in between).
    notified = [call["dead_lettered"] for call in alerts.calls]
    assert notified.count(True) == 1
    assert notified[-1] is True
    assert 4 <= rounds < 30
    assert sorted(sink.received) == [("acme", DAY + dt.timedelta(i)) for i in range(rounds)]
    assert await store.backlog("hook") == 0


async def test_a_sink_outage_dead_letters_nothing_and_recovers(store: Store, instant: None) -> None:
    """While a sink is down its backlog grows without dead letters; back up, everything arrives."""
    sink = RaisingSink("hook", lambda: SinkTransientError("HTTP 503", retry_after=0.01))
    delivery = deliverer(store, {"hook": sink}, {"hook": config(batch_size=4, max_attempts=2)})
    runner = asyncio.create_task(delivery.run_forever())
    items = history(["acme", "globex"], 6)
    try:
        await store.record_fetched(items)
        delivery.notify_new_data()
        await wait_until(lambda: sink.calls >= 20)  # many passes, far beyond max_attempts
        stats = delivery.stats()["hook"]
        assert stats.state in {"down", "delivering"}
        assert stats.last_error == "SinkTransientError: HTTP 503"
        assert (await store.status_snapshot()).sinks[0].backlog == len(items)
        assert await store.dead_letters("hook") == []
        sink.failing = False
        await wait_until(lambda: len(sink.received) == len(items))
    finally:
        await delivery.stop(grace=1)
        await runner
    assert await store.backlog("hook") == 0
    assert await store.dead_letters("hook") == []


async def test_open_failures_are_retried(store: Store, instant: None) -> None:
    """A sink that cannot connect at first is opened again with backoff and then delivered to."""
    sink = OpenFailsSink("warehouse", failures=2)
    delivery = deliverer(store, {"warehouse": sink})
    await store.record_fetched(history(["acme"], 3))
    assert await delivery.run_until_drained(failed_passes=5) is True
    assert sink.opened == 3
    assert len(sink.received) == 3


async def test_run_until_drained_gives_up_quickly_on_a_dead_sink(store: Store) -> None:
    """run --once does not wait for a down sink: one failed pass, and it reports not drained."""
    sink = RaisingSink("hook", lambda: SinkTransientError("HTTP 502"))
    healthy = RecordingSink("warehouse")
    delivery = deliverer(store, {"hook": sink, "warehouse": healthy})
    await store.record_fetched(history(["acme"], 3))
    started = time.monotonic()
    assert await delivery.run_until_drained() is False
    assert time.monotonic() - started < 2.0
    assert len(healthy.received) == 3
    assert delivery.stats()["hook"].backlog == 3


async def test_a_hanging_write_times_out_and_stays_pending(store: Store) -> None:
    """A write that never returns is cut off by the sink's timeout and is not acknowledged."""
    sink = HangingSink("slow")
    delivery = deliverer(store, {"slow": sink}, {"slow": config(timeout=dt.timedelta(seconds=0.2))})
    await store.record_fetched(history(["acme"], 1))
    started = time.monotonic()
    assert await delivery.run_until_drained() is False
    assert time.monotonic() - started < 2.0
    assert delivery.stats()["slow"].last_error == "timeout: no answer within 0.2s"
    assert await store.backlog("slow") == 1


async def test_stop_cuts_off_writes_in_flight_after_the_grace_period(store: Store) -> None:
    """stop(grace) returns within about grace even when a write hangs, losing nothing."""
    sink = HangingSink("slow")
    delivery = deliverer(store, {"slow": sink}, {"slow": config(timeout=dt.timedelta(hours=1))})
    runner = asyncio.create_task(delivery.run_forever())
    await store.record_fetched(history(["acme"], 2))
    delivery.notify_new_data()
    await asyncio.wait_for(sink.writing.wait(), 5)
    started = time.monotonic()
    await delivery.stop(grace=0.3)
    await runner
    assert 0.25 <= time.monotonic() - started < 2.0
    assert await store.backlog("slow") == 2
    assert delivery.stats()["slow"].state == "stopped"


async def test_new_data_wakes_an_idle_sink_at_once(store: Store) -> None:
    """notify_new_data makes an idle lane deliver immediately, not at the next poll."""
    sink = RecordingSink("warehouse")
    delivery = deliverer(store, {"warehouse": sink}, poll_interval=3600)
    runner = asyncio.create_task(delivery.run_forever())
    try:
        await wait_until(lambda: delivery.stats()["warehouse"].state == "idle")
        await store.record_fetched(history(["acme"], 2))
        delivery.notify_new_data()
        took = await wait_until(lambda: len(sink.received) == 2, limit=3.0)
    finally:
        await delivery.stop(grace=1)
        await runner
    assert took < 1.0


async def test_days_stored_while_new_data_flows_go_out_in_one_write(store: Store) -> None:
    """After a short pass the lane lingers, so days stored one commit after another during that
    pause reach the sink in a single write instead of one write per commit."""
    sink = RecordingSink("warehouse")
    delivery = deliverer(store, {"warehouse": sink}, poll_interval=3600, linger=1.0)
    runner = asyncio.create_task(delivery.run_forever())
    try:
        await wait_until(lambda: delivery.stats()["warehouse"].state == "idle")
        await store.record_fetched([fetched("acme", DAY)])
        delivery.notify_new_data()
        await wait_until(lambda: len(sink.received) == 1, limit=3.0)
        for offset in range(1, 4):  # three commits, each waking the lane
            await store.record_fetched([fetched("acme", DAY + dt.timedelta(days=offset))])
            delivery.notify_new_data()
        await wait_until(lambda: len(sink.received) == 4, limit=5.0)
    finally:
        await delivery.stop(grace=1)
        await runner
    assert [len(batch) for batch in sink.batches] == [1, 3]


async def test_each_sink_gets_its_pii_policy(store: Store) -> None:
    """The deliverer applies each sink's PII policy: emails kept, pseudonymized or dropped."""
    sinks: dict[str, Sink] = {
        "keep": RecordingSink("keep"),
        "pseudo": RecordingSink("pseudo"),
        "drop": RecordingSink("drop"),
    }
    configs = {
        "keep": config(),
        "pseudo": config(pii="pseudonymize", pii_key=SecretStr("k3y-for-tests")),
        "drop": config(pii="drop"),
    }
    await store.record_fetched(history(["acme"], 1))
    assert await deliverer(store, sinks, configs).run_until_drained() is True
    received = {name: sink.batches[0][0] for name, sink in sinks.items()}  # type: ignore[attr-defined]
    assert [u.user for u in received["keep"].users] == [EMAIL]
    [pseudonym] = [u.user for u in received["pseudo"].users]
    assert pseudonym.startswith("u_")
    assert "acme.example" not in pseudonym
    assert received["drop"].users == ()
    assert received["drop"].daily == received["keep"].daily


async def test_routes_limit_what_a_sink_receives(store: Store) -> None:
    """A sink routed to some tenants receives only theirs; the other sink receives everyone."""
    narrow, wide = RecordingSink("narrow"), RecordingSink("wide")
    delivery = deliverer(
        store, {"narrow": narrow, "wide": wide}, routes={"narrow": ["globex"], "wide": None}
    )
    await store.record_fetched(history(["acme", "globex"], 2))
    assert await delivery.run_until_drained() is True
    assert {t for t, _ in narrow.received} == {"globex"}
    assert len(wide.received) == 4


async def test_complete_routes_unregister_sinks_no_longer_configured(store: Store) -> None:
    """With complete_routes, a sink removed from the config stops holding a queue in the store."""
    await store.sync_sinks({"old": None})
    await store.record_fetched(history(["acme"], 2))
    assert await store.backlog("old") == 2
    delivery = deliverer(store, {"new": RecordingSink("new")}, complete_routes=True)
    assert await delivery.run_until_drained() is True
    assert {s.sink for s in (await store.status_snapshot()).sinks} == {"new"}
    assert await store.backlog("old") == 0


# --- failures visible where the docs promise them -----------------------------------------------


async def sink_row(store: Store, name: str) -> Any:
    """The sink's row of the status snapshot (what `status` and /status show)."""
    [row] = [s for s in (await store.status_snapshot()).sinks if s.sink == name]
    return row


async def test_an_open_failure_shows_in_status_and_the_failure_count(
    store: Store, tmp_path: Path
) -> None:
    """A csv sink whose root cannot be created fails open(): status shows it as the sink's last
    error and the sink's failure count (sink_failures_total) goes up."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the csv root should be")
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=blocker))
    delivery = deliverer(store, {"sheets": sink})
    await store.record_fetched(history(["acme"], 2))
    assert await delivery.run_until_drained() is False
    row = await sink_row(store, "sheets")
    assert row.last_error.startswith("open failed: SinkTransientError: sink sheets")
    assert row.last_error_at is not None
    assert row.backlog == 2
    assert delivery.stats()["sheets"].failed >= 1


async def test_a_pass_that_delivered_and_dead_lettered_notes_its_success(store: Store) -> None:
    """Days delivered in a pass that also dead-lettered others set the sink's last success."""
    poison = ("acme", DAY + dt.timedelta(days=1))
    sink = PoisonSink("hook", poison, SinkPermanentError)
    delivery = deliverer(store, {"hook": sink}, {"hook": config(batch_size=10)})
    await store.record_fetched(history(["acme"], 4))
    assert await delivery.run_until_drained() is False
    row = await sink_row(store, "hook")
    assert len(sink.received) == 3
    assert row.dead_letters == 1
    assert row.last_success_at is not None
    assert row.last_error == "SinkPermanentError: row rejected: bad day"


async def test_an_unexpected_exception_is_logged_with_its_traceback_at_debug(
    store: Store,
) -> None:
    """A plugin's RuntimeError is logged at debug with its traceback; a contract error is not."""
    sinks: dict[str, Sink] = {
        "buggy": RaisingSink("buggy", lambda: RuntimeError("bug in plugin")),
        "down": RaisingSink("down", lambda: SinkTransientError("HTTP 503")),
    }
    delivery = deliverer(store, sinks)
    await store.record_fetched(history(["acme"], 1))
    with capture_logs() as logs:
        assert await delivery.run_until_drained() is False
    unexpected = [e for e in logs if e["event"] == "sink raised an unexpected exception"]
    assert [(e["sink"], e["log_level"], e["call"]) for e in unexpected] == [
        ("buggy", "debug", "write")
    ]
    kind, error, trace = unexpected[0]["exc_info"]
    assert (kind, str(error)) == (RuntimeError, "bug in plugin")
    assert trace is not None
    assert (await sink_row(store, "buggy")).last_error == "RuntimeError: bug in plugin"


async def test_a_value_the_sqlite_sink_cannot_store_dead_letters_that_day_only(
    store: Store, tmp_path: Path
) -> None:
    """A day whose value the sink's table refuses (a CHECK constraint of the user's warehouse) is
    dead-lettered at its first attempt; the other days of its batch are stored, nothing is
    retried. (Counts past int64, the other such value, are refused by the parser already.)"""
    path = tmp_path / "usage.db"
    opened = SqliteSink("warehouse", SqliteSinkConfig(type="sqlite", path=path))
    await opened.open()  # the four tables as the sink makes them
    await opened.aclose()
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE usage_daily RENAME TO usage_daily_unchecked")
        conn.execute(
            "CREATE TABLE usage_daily (tenant VARCHAR NOT NULL, day DATE NOT NULL, "
            "active_users INTEGER NOT NULL, messages INTEGER NOT NULL CHECK (messages < 1000), "
            "fetched_at DATETIME NOT NULL, final BOOLEAN NOT NULL, PRIMARY KEY (tenant, day))"
        )
    items = history(["acme"], 4)
    poison = DAY + dt.timedelta(days=2)
    items[2] = fetched("acme", poison, messages=5000)
    sink = SqliteSink("warehouse", SqliteSinkConfig(type="sqlite", path=path, create_tables=False))
    delivery = deliverer(store, {"warehouse": sink}, {"warehouse": config(batch_size=10)})
    await store.record_fetched(items)
    assert await delivery.run_until_drained(failed_passes=3) is False
    [dead] = await store.dead_letters("warehouse")
    assert ((dead.tenant, dead.day), dead.attempts) == (("acme", poison), 1)
    assert dead.error.startswith("SinkPermanentError: sink warehouse: IntegrityError")
    assert await store.backlog("warehouse") == 0
    stats = delivery.stats()["warehouse"]
    assert (stats.delivered, stats.dead_lettered, stats.failed) == (3, 1, 1)
    await delivery.aclose()


class SlowCloseSink(RecordingSink):
    """Takes a moment to close (a flush over the network): a point where a cancel would land."""

    async def aclose(self) -> None:
        await anyio.sleep(0.01)
        await super().aclose()


async def test_sinks_are_closed_even_when_the_shutdown_is_cancelled(store: Store) -> None:
    """aclose() closes every opened sink in a shielded scope: a cancelled caller still closes
    them (files flushed, connections released), within each sink's timeout."""
    sinks: dict[str, Sink] = {"a": SlowCloseSink("a"), "b": SlowCloseSink("b")}
    delivery = deliverer(store, sinks)
    assert await delivery.run_until_drained() is True  # opens both sinks
    with anyio.CancelScope() as scope:
        scope.cancel()
        await delivery.aclose()
    assert [sink.closed for sink in sinks.values() if isinstance(sink, RecordingSink)] == [1, 1]


class RebalancingSink(RecordingSink):
    """Takes every batch; during its first write a second replica joins and the first hands it a
    tenant (the rebalance of store.leases), as can happen while a real sink writes."""

    def __init__(self, name: str, rebalance: Callable[[], Any]) -> None:
        super().__init__(name)
        self._rebalance: Callable[[], Any] | None = rebalance

    async def write(self, batch: Batch) -> None:
        await super().write(batch)
        if self._rebalance is not None:
            rebalance, self._rebalance = self._rebalance, None
            await rebalance()


@pytest.mark.postgres
async def test_a_tenant_handed_over_during_a_write_is_not_a_sink_failure(
    postgres_url: str,
) -> None:
    """When a replica loses one tenant of a batch while the sink writes it, the days of the
    tenant it still holds are marked delivered, the others are left to the new holder, and the
    lane neither fails nor warns."""
    from collector.store.leases import ReplicaLeases, this_replica
    from tests.postgres_helpers import fresh_schema

    ttl = dt.timedelta(seconds=30)
    tenants = ["acme", "globex"]
    with fresh_schema(postgres_url, "d") as (_, url):
        first, second = await Store.open(url), await Store.open(url)
        try:
            old, new = (ReplicaLeases(s, this_replica(), ttl=ttl) for s in (first, second))
            await old.beat(tenants)  # alone: it holds both
            await first.sync_sinks({"warehouse": None})
            await first.record_fetched(history(tenants, 2))

            async def rebalance() -> None:
                await new.beat(tenants)  # joins: nothing free yet
                await old.beat(tenants)  # releases its excess
                await new.beat(tenants)  # claims it

            sink = RebalancingSink("warehouse", rebalance)
            delivery = deliverer(first, {"warehouse": sink})
            with capture_logs() as logs:
                assert await delivery.run_until_drained() is True
            await delivery.aclose()
            assert len(sink.received) == 4  # the sink took every day
            kept, handed = sorted(old.tenants), sorted(new.tenants)
            assert len(kept) == len(handed) == 1
            assert await second.backlog("warehouse", kept) == 0
            assert await second.backlog("warehouse", handed) == 2  # the new holder delivers them
            stats = delivery.stats()["warehouse"]
            assert (stats.failed, stats.last_error) == (0, None)
            assert not [e for e in logs if e["event"] == "sink failing"]
        finally:
            await first.aclose()
            await second.aclose()
