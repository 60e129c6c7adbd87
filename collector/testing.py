"""Test helpers for the collector and for sink plugin authors: import what a test needs.

The fixtures (``simulator``, ``simulator_settings``) live in :mod:`collector.pytest_plugin`, the
thin pytest plugin that the ``pytest11`` entry point loads; this module is imported only by the
tests that use it:

- :class:`RecordingSink`, :class:`FailingSink` (transient, permanent, crash or hang) and the
  :data:`testing_sinks` plugin registering both;
- :func:`make_tenant_day`, :func:`make_batch`, :func:`refetched`: consistent tenant-days, built
  as the pipeline builds a fetched day (from an API body, parsed and normalized), and
  :func:`usage_body`, that body;
- :class:`SinkConformance`: the sink contract as tests, to subclass in a plugin's own tests
  (idempotent redelivery, re-fetch replaces, independent partitions, empty batch, idle day,
  unicode, error classification, clean close). docs/plugins.md describes all of it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar, Literal

import anyio
import msgspec
import pytest
from pydantic import Field

from collector.errors import SinkError, SinkPermanentError, SinkTransientError
from collector.hookspecs import hookimpl
from collector.models import (
    Batch,
    DailyRecord,
    IdeRecord,
    LanguageRecord,
    TenantDay,
    UserDayRecord,
    tenant_day_from_body,
)
from collector.sink import Sink, SinkConfig

__all__ = [
    "UNICODE_EMAILS",
    "UNICODE_IDES",
    "UNICODE_LANGUAGES",
    "FailingSink",
    "FailingSinkConfig",
    "RecordingSink",
    "RecordingSinkConfig",
    "SinkConformance",
    "SinkFactory",
    "canonical",
    "make_batch",
    "make_tenant_day",
    "refetched",
    "testing_sinks",
    "usage_body",
]

# --- batch builders -----------------------------------------------------------------------------

ASCII_IDES = ("VS Code", "IntelliJ IDEA", "PyCharm")
ASCII_LANGUAGES = ("Python", "TypeScript", "Go", "Java")
UNICODE_EMAILS = (
    "zoë.müller@bücher.example",
    "łukasz.żółć@example.pl",
    "山田太郎@例え.jp",
    'ömer,"quoted";x@örnek.example',
)
"""Emails with non-ASCII letters, CJK, and CSV/JSON-hostile characters (comma, quote, semicolon)."""
UNICODE_IDES = ("Visual Studio Code \u2013 Insiders", "IntelliJ IDEA Ω")
UNICODE_LANGUAGES = ("C#", "日本語 DSL", 'Ελληνικά, "quoted"')

DEFAULT_DAY = dt.date(2025, 1, 15)
DEFAULT_FETCHED_AT = dt.datetime(2025, 1, 16, 6, 30, tzinfo=dt.UTC)


def _emails(tenant: str, count: int, unicode: bool) -> list[str]:
    if not unicode:
        return [f"user{i:02d}@{tenant}.example" for i in range(count)]
    pool = UNICODE_EMAILS
    return [pool[i] if i < len(pool) else f"\u00fc{i}.{pool[i % len(pool)]}" for i in range(count)]


def make_tenant_day(
    tenant: str = "acme",
    day: dt.date = DEFAULT_DAY,
    users: int | Sequence[str] = 3,
    *,
    ides: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
    unicode: bool = False,
    final: bool = True,
    fetched_at: dt.datetime | None = None,
    seed: int = 0,
) -> TenantDay:
    """One consistent tenant-day: ``users`` is a count (generated emails) or explicit emails.

    Figures are deterministic in (tenant, day, seed): each user's message count, IDEs and
    languages; the day's totals and per-IDE/language engaged users are derived from the users, as
    in the real API. ``unicode=True`` uses :data:`UNICODE_EMAILS`, IDEs and languages.
    """
    if unicode:
        ides = ides if ides is not None else UNICODE_IDES
        languages = languages if languages is not None else UNICODE_LANGUAGES
    ides = tuple(ides if ides is not None else ASCII_IDES)
    languages = tuple(languages if languages is not None else ASCII_LANGUAGES)
    emails = _emails(tenant, users, unicode) if isinstance(users, int) else list(users)
    fetched_at = fetched_at or DEFAULT_FETCHED_AT
    salt = sum(map(ord, tenant)) + day.toordinal() + seed * 7919
    records: list[UserDayRecord] = []
    for i, email in enumerate(emails):
        pick = salt + i * 31
        user_ides = tuple(ides[(pick + k) % len(ides)] for k in range(1 + pick % 2)) if ides else ()
        user_langs = (
            tuple(languages[(pick + k) % len(languages)] for k in range(1 + pick % 3))
            if languages
            else ()
        )
        records.append(
            UserDayRecord(
                tenant=tenant,
                day=day,
                user=email,
                messages=1 + pick % 47,
                last_active=day,
                ides=tuple(dict.fromkeys(user_ides)),
                languages=tuple(dict.fromkeys(user_langs)),
            )
        )
    return _assemble(tenant, day, records, ides, languages, final=final, fetched_at=fetched_at)


def _assemble(
    tenant: str,
    day: dt.date,
    records: Sequence[UserDayRecord],
    ides: Sequence[str],
    languages: Sequence[str],
    *,
    final: bool,
    fetched_at: dt.datetime,
) -> TenantDay:
    ide_rows = tuple(
        IdeRecord(tenant, day, name, sum(name in u.ides for u in records))
        for name in ides
        if any(name in u.ides for u in records)
    )
    language_rows = tuple(
        LanguageRecord(tenant, day, name, sum(name in u.languages for u in records))
        for name in languages
        if any(name in u.languages for u in records)
    )
    daily = DailyRecord(
        tenant=tenant,
        day=day,
        active_users=len(records),
        messages=sum(u.messages for u in records),
        fetched_at=fetched_at,
        final=final,
    )
    figures = TenantDay(
        tenant, day, fetched_at, final, daily, ide_rows, language_rows, tuple(records), ""
    )
    # Built exactly as the pipeline builds a fetched day: from the API's body, parsed,
    # normalized and hashed by the same function.
    return tenant_day_from_body(
        tenant, day, usage_body(figures).encode(), fetched_at=fetched_at, final=final
    )


def usage_body(tenant_day: TenantDay) -> str:
    """The API's 200 body for the figures of ``tenant_day`` (a ``day=`` answer): what the state
    store keeps for a fetched day, and from which the pipeline derives exactly ``tenant_day``."""
    day = tenant_day.day.isoformat()
    daily = tenant_day.daily
    data = {
        "period": {"start": day, "end": day, "days": 1},
        "summary": {"total_active_users": daily.active_users, "total_messages": daily.messages},
        "users": [
            {
                "email": u.user,
                "messages": u.messages,
                "last_active": (
                    u.last_active_at.isoformat()
                    if u.last_active_at is not None
                    else u.last_active.isoformat()
                    if u.last_active is not None
                    else None
                ),
                "ides": list(u.ides),
                "languages": list(u.languages),
            }
            for u in tenant_day.users
        ],
        "daily": [
            {
                "day": day,
                "active_users": daily.active_users,
                "messages": daily.messages,
                "ides": [
                    {"ide_name": i.ide_name, "engaged_users": i.engaged_users}
                    for i in tenant_day.ides
                ],
                "languages": [
                    {"language_name": x.language_name, "engaged_users": x.engaged_users}
                    for x in tenant_day.languages
                ],
            }
        ],
    }
    return json.dumps({"status": "success", "data": data}, ensure_ascii=False)


def make_batch(
    tenants: int | Sequence[str] = ("acme", "globex"),
    days: int | Sequence[dt.date] = 2,
    *,
    start: dt.date = DEFAULT_DAY,
    users: int = 3,
    unicode: bool = False,
    seed: int = 0,
) -> list[TenantDay]:
    """Tenant-days for every tenant and day, tenant-major; a count of tenants means tenant-01.."""
    tenant_ids = (
        [f"tenant-{i:02d}" for i in range(1, tenants + 1)]
        if isinstance(tenants, int)
        else list(tenants)
    )
    day_list = (
        [start + dt.timedelta(days=i) for i in range(days)] if isinstance(days, int) else list(days)
    )
    return [
        make_tenant_day(t, d, users, unicode=unicode, seed=seed)
        for t in tenant_ids
        for d in day_list
    ]


def refetched(
    td: TenantDay,
    *,
    drop_users: int = 1,
    extra_messages: int = 5,
    fetched_at: dt.datetime | None = None,
    final: bool | None = None,
) -> TenantDay:
    """A later version of ``td``: its last ``drop_users`` users gone, the others more active.

    What a re-fetch of a not-yet-final day looks like; a sink must end up holding exactly this.
    ``drop_users`` larger than the user count gives an idle day (no users, no IDEs, no languages).
    """
    kept = td.users[: max(0, len(td.users) - drop_users)]
    records = [msgspec.structs.replace(u, messages=u.messages + extra_messages) for u in kept]
    ides = [i.ide_name for i in td.ides]
    languages = [x.language_name for x in td.languages]
    return _assemble(
        td.tenant,
        td.day,
        records,
        ides,
        languages,
        final=td.final if final is None else final,
        fetched_at=fetched_at or td.fetched_at + dt.timedelta(hours=1),
    )


# --- sinks for tests ----------------------------------------------------------------------------


class RecordingSinkConfig(SinkConfig):
    """Settings of the ``recording`` test sink."""

    type: str = "recording"
    delay: float = Field(default=0.0, ge=0, description="Seconds each write takes (anyio.sleep).")


class RecordingSink(Sink):
    """Keeps every batch in memory: ``batches`` as written, ``stored`` the latest per tenant-day."""

    type_name: ClassVar[str] = "recording"
    Config: ClassVar[type[SinkConfig]] = RecordingSinkConfig

    def __init__(self, name: str = "recording", config: SinkConfig | None = None) -> None:
        super().__init__(name, config if config is not None else RecordingSinkConfig())
        self.batches: list[list[TenantDay]] = []
        self.stored: dict[tuple[str, dt.date], TenantDay] = {}
        self.opened = 0
        self.closed = 0
        self.write_calls = 0

    async def open(self) -> None:
        self.opened += 1

    async def write(self, batch: Batch) -> None:
        self.write_calls += 1
        delay = getattr(self.config, "delay", 0.0)
        if delay:
            await anyio.sleep(delay)
        self._record(batch)

    def _record(self, batch: Batch) -> None:
        self.batches.append(list(batch))
        for td in batch:
            self.stored[(td.tenant, td.day)] = td

    async def aclose(self) -> None:
        self.closed += 1

    def rows(self) -> list[TenantDay]:
        """The stored tenant-days, sorted by tenant and day."""
        return [self.stored[key] for key in sorted(self.stored)]


FailureMode = Literal["transient", "permanent", "crash", "hang"]


class FailingSinkConfig(RecordingSinkConfig):
    """Settings of the ``failing`` test sink."""

    type: str = "failing"
    mode: FailureMode = Field(
        default="transient",
        description="transient / permanent: raise that SinkError; crash: raise RuntimeError "
        "(an unexpected exception); hang: never return.",
    )
    failures: int | None = Field(
        default=None,
        ge=0,
        description="Fail this many writes, then record like RecordingSink; "
        "null: fail every write.",
    )
    retry_after: float | None = Field(default=None, description="retry_after of transient errors.")


class FailingSink(RecordingSink):
    """Fails its first ``failures`` writes (default: all) the way ``mode`` says, then records."""

    type_name: ClassVar[str] = "failing"
    Config: ClassVar[type[SinkConfig]] = FailingSinkConfig

    def __init__(
        self, name: str = "failing", config: FailingSinkConfig | None = None, **settings: Any
    ) -> None:
        super().__init__(name, config if config is not None else FailingSinkConfig(**settings))
        self.config: FailingSinkConfig
        self.failed = 0
        self.hanging = 0

    async def write(self, batch: Batch) -> None:
        self.write_calls += 1
        limit = self.config.failures
        if limit is not None and self.failed >= limit:
            self._record(batch)
            return
        self.failed += 1
        mode = self.config.mode
        if mode == "transient":
            raise SinkTransientError(
                f"sink {self.name}: failing on purpose", retry_after=self.config.retry_after
            )
        if mode == "permanent":
            raise SinkPermanentError(f"sink {self.name}: rejecting on purpose")
        if mode == "crash":
            raise RuntimeError(f"sink {self.name}: crashing on purpose")
        self.hanging += 1
        try:
            await anyio.sleep_forever()  # until cancelled by the host's timeout
        finally:
            self.hanging -= 1

    async def ping(self) -> None:
        if self.config.failures is None and self.config.mode != "hang":
            raise SinkTransientError(f"sink {self.name}: down on purpose")


class _TestingSinks:
    """Registers the test sinks: ``pm.register(testing_sinks)``."""

    @hookimpl
    def collector_register_sinks(self) -> list[type[Sink]]:
        return [RecordingSink, FailingSink]


testing_sinks = _TestingSinks()
"""A plugin object providing sink types ``recording`` and ``failing`` (for end-to-end tests)."""


# --- the conformance suite ----------------------------------------------------------------------

SinkFactory = Callable[[], "Sink | Awaitable[Sink]"]
"""Builds a new sink instance whose target is new and empty on every call."""

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def _leaves(value: Any) -> Iterable[str]:
    """Every scalar in a read-back structure, as text (dates in ISO form)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(key)
            yield from _leaves(item)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, msgspec.Struct):
        yield from _leaves(msgspec.structs.asdict(value))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from _leaves(dataclasses.asdict(value))
    elif isinstance(value, dt.date):
        yield value.isoformat()
    else:
        yield str(value)


def canonical(value: Any) -> Any:
    """An order-insensitive, comparable form of a read-back structure (rows are a multiset)."""
    if isinstance(value, dict):
        return (
            "dict",
            tuple(sorted(((repr(canonical(k)), canonical(v)) for k, v in value.items()), key=repr)),
        )
    if isinstance(value, list | tuple | set | frozenset):
        return ("rows", tuple(sorted((canonical(v) for v in value), key=repr)))
    if isinstance(value, msgspec.Struct):
        return canonical(msgspec.structs.asdict(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    return value


class SinkConformance:
    """The sink contract as tests. Subclass it (name the subclass ``Test...``) and provide:

    - a ``sink_factory`` fixture returning a callable that builds a new sink instance with a new,
      empty target on every call (several are built per test);
    - a ``broken_sink_factory`` fixture, the same for a target that cannot work (a path that is a
      file, a closed port, a missing bucket), or ``supports_broken_target = False``;
    - ``read_back(self, sink)`` (sync or async): every record the sink's target holds, decoded
      into plain values (dicts, lists, tuples, strings, numbers, dates), without anything specific
      to one target (absolute paths, bucket names), so two targets holding the same data compare
      equal. Rows are compared as a multiset; their order does not matter.
    """

    supports_broken_target: ClassVar[bool] = True
    stores_users: ClassVar[bool] = True
    """False for a sink that stores no per-user rows (then emails are not looked for)."""
    operation_timeout: ClassVar[float] = 30.0

    @pytest.fixture
    def sink_factory(self) -> SinkFactory:
        pytest.fail(f"{type(self).__name__} must define a sink_factory fixture")

    @pytest.fixture
    def broken_sink_factory(self) -> SinkFactory:
        pytest.fail(
            f"{type(self).__name__} must define a broken_sink_factory fixture "
            "(or set supports_broken_target = False)"
        )

    @pytest.fixture
    def anyio_backend(self) -> str:
        """The suite runs on asyncio, as the collector does (anyio's pytest plugin runs it)."""
        return "asyncio"

    def read_back(self, sink: Sink) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement read_back(sink)")

    # helpers

    async def _call(self, operation: Awaitable[Any], what: str) -> Any:
        with anyio.move_on_after(self.operation_timeout):
            return await operation
        pytest.fail(f"{what} did not finish within {self.operation_timeout} s")

    async def _build(self, factory: SinkFactory) -> Sink:
        made = factory()
        sink = await made if inspect.isawaitable(made) else made
        if not isinstance(sink, Sink):
            pytest.fail(f"the factory returned {sink!r}, not a collector.sink.Sink")
        return sink

    async def _new(self, factory: SinkFactory) -> Sink:
        sink = await self._build(factory)
        await self._call(sink.open(), "open()")
        return sink

    async def _read(self, sink: Sink) -> Any:
        result = self.read_back(sink)
        if inspect.isawaitable(result):
            result = await self._call(result, "read_back()")
        return result

    async def _stored(self, factory: SinkFactory, *batches: Batch) -> Any:
        sink = await self._new(factory)
        try:
            for batch in batches:
                await self._call(sink.write(batch), "write()")
            return canonical(await self._read(sink))
        finally:
            await self._call(sink.aclose(), "aclose()")

    # the contract

    @pytest.mark.anyio
    async def test_conformance_declares_the_contract(self, sink_factory: SinkFactory) -> None:
        """The sink class has a valid type name and a SinkConfig model with a JSON schema."""
        sink = await self._build(sink_factory)
        sink_class = type(sink)
        assert _TYPE_NAME.match(sink_class.type_name), f"bad type_name {sink_class.type_name!r}"
        assert issubclass(sink_class.Config, SinkConfig)
        assert isinstance(sink.config, SinkConfig)
        assert sink_class.Config.model_json_schema()["type"] == "object"
        await self._call(sink.aclose(), "aclose()")

    @pytest.mark.anyio
    async def test_conformance_stores_what_it_is_given(self, sink_factory: SinkFactory) -> None:
        """Every tenant, day and (if stored) user of a written batch can be read back."""
        batch = make_batch(("acme", "globex"), 2)
        text = "\n".join(_leaves(await self._stored(sink_factory, batch)))
        for td in batch:
            assert td.tenant in text
            assert td.day.isoformat() in text
            if self.stores_users:
                for user in td.users:
                    assert user.user in text, f"user {user.user} of {td.tenant} {td.day} not stored"

    @pytest.mark.anyio
    async def test_conformance_redelivery_is_idempotent(self, sink_factory: SinkFactory) -> None:
        """Writing the same batch twice (at-least-once delivery) stores exactly what once does."""
        batch = make_batch(("acme", "globex"), 2)
        once = await self._stored(sink_factory, batch)
        assert "acme" in "\n".join(_leaves(once)), "read_back returned nothing after a write"
        assert await self._stored(sink_factory, batch, batch) == once

    @pytest.mark.anyio
    async def test_conformance_refetch_replaces(self, sink_factory: SinkFactory) -> None:
        """A changed re-fetch of a day replaces it: gone users and an idle day leave no old rows."""
        first = make_batch(("acme", "globex"), 2, users=4)
        second = [refetched(td) for td in first]
        second[-1] = refetched(first[-1], drop_users=99)  # the day turned out idle
        assert await self._stored(sink_factory, first, second) == await self._stored(
            sink_factory, second
        )

    @pytest.mark.anyio
    async def test_conformance_partitions_are_independent(self, sink_factory: SinkFactory) -> None:
        """Batches of different tenant-days add up; writing one day never disturbs another."""
        batch = make_batch(("acme", "globex"), 3)
        separately = await self._stored(sink_factory, batch[:2], batch[2:4], batch[4:])
        assert separately == await self._stored(sink_factory, batch)

    @pytest.mark.anyio
    async def test_conformance_empty_batch(self, sink_factory: SinkFactory) -> None:
        """An empty batch is accepted and changes nothing."""
        batch = make_batch(("acme",), 1)
        assert await self._stored(sink_factory, []) == await self._stored(sink_factory)
        assert await self._stored(sink_factory, batch, []) == await self._stored(
            sink_factory, batch
        )

    @pytest.mark.anyio
    async def test_conformance_idle_day(self, sink_factory: SinkFactory) -> None:
        """A day without any activity (no users, IDEs or languages) is stored, idempotently."""
        idle = [make_tenant_day("acme", DEFAULT_DAY, 0)]
        stored = await self._stored(sink_factory, idle)
        assert "acme" in "\n".join(_leaves(stored))
        assert await self._stored(sink_factory, idle, idle) == stored

    @pytest.mark.anyio
    async def test_conformance_unicode(self, sink_factory: SinkFactory) -> None:
        """Non-ASCII and CSV/JSON-hostile names survive the round trip unchanged."""
        batch = make_batch(("acme",), 1, users=len(UNICODE_EMAILS), unicode=True)
        stored = await self._stored(sink_factory, batch)
        text = "\n".join(_leaves(stored))
        expected = [*UNICODE_IDES, *UNICODE_LANGUAGES]
        if self.stores_users:
            expected += UNICODE_EMAILS
        for name in expected:
            assert name in text, f"{name!r} did not survive"
        assert await self._stored(sink_factory, batch, batch) == stored

    @pytest.mark.anyio
    async def test_conformance_broken_target_raises_sink_error(
        self, request: pytest.FixtureRequest
    ) -> None:
        """A target that cannot work makes open() or write() raise a SinkError, nothing else."""
        if not self.supports_broken_target:
            pytest.skip(f"{type(self).__name__} declares no broken target")
        factory: SinkFactory = request.getfixturevalue("broken_sink_factory")
        sink = await self._build(factory)

        async def use() -> None:
            await self._call(sink.open(), "open()")
            await self._call(sink.write(make_batch(("acme",), 1)), "write()")

        try:
            with pytest.raises(SinkError):
                await use()
        finally:
            await self._call(sink.aclose(), "aclose()")

    @pytest.mark.anyio
    async def test_conformance_close_is_clean(self, sink_factory: SinkFactory) -> None:
        """aclose() works after use, twice in a row, and on a sink that was never opened."""
        sink = await self._new(sink_factory)
        await self._call(sink.write(make_batch(("acme",), 1)), "write()")
        await self._call(sink.aclose(), "aclose()")
        await self._call(sink.aclose(), "second aclose()")
        unopened = await self._build(sink_factory)
        await self._call(unopened.aclose(), "aclose() of a sink never opened")
