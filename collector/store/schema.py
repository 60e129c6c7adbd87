"""Tables and returned values of the state store (:mod:`collector.store`); no I/O here.

Plain SQLAlchemy Core tables on a private ``MetaData`` (the SQL sink's usage tables have their
own), so ``create_all`` on it never puts another component's tables into the state database. Core
also gives the dialect upserts (``INSERT ... ON CONFLICT``) the hot path needs, with the same code
on SQLite and PostgreSQL.

Schema version 2 (``schema_version`` table): version 1 plus the replica and lease tables of
:mod:`.leases` and, on PostgreSQL, their fencing trigger; ``StoreBase._migrate`` upgrades.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    event,
    true,
)

from collector.models import TenantDay

SCHEMA_VERSION = 2
FINAL_SUFFIX = ":final"


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def bind_processor(self, dialect: Any) -> Any:
        process = super().bind_processor(dialect)
        if process is None:
            return None
        # A batch binds the same `now` object in every row (several columns each): convert it
        # once. One (value, result) pair, swapped atomically, so threads may share it.
        last: tuple[Any, Any] = (None, None)

        def convert(value: Any) -> Any:
            nonlocal last
            seen, result = last
            if value is seen and value is not None:
                return result
            result = process(value)
            last = (value, result)
            return result

        return convert

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class ZlibBytes(TypeDecorator[bytes]):
    """Bytes stored zlib-compressed, read back as they were (a 1 MB body is about 100 kB)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: bytes | None, dialect: Any) -> bytes | None:
        return None if value is None else zlib.compress(value, 6)

    def process_result_value(self, value: bytes | None, dialect: Any) -> bytes | None:
        return None if value is None else zlib.decompress(value)


metadata = MetaData()

Tenant = String(200)
Hash = String(80)

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", UtcDateTime, nullable=False),
)

store_meta = Table(
    "store_meta",
    metadata,
    Column("key", String(50), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

tenant_day = Table(
    "tenant_day",
    metadata,
    Column("tenant", Tenant, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("status", String(16), nullable=False),  # fetched | final | failed | quarantined
    Column("final", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),  # failed fetches since the last success
    Column("reason", Text),  # why the last fetch failed
    Column("fetched_at", UtcDateTime),  # last successful fetch
    Column("changed_at", UtcDateTime),  # when the stored version was fetched (sinks get this)
    Column("content_hash", Hash),  # usage figures only (collector.models.content_hash)
    Column("version", Hash),  # content_hash, plus ":final" once final: what sinks are compared on
    Column("seq", BigInteger),  # queue position of the current version
    Column("payload", Text),  # the API's response body, as received; NULL after retention
    Column("updated_at", UtcDateTime, nullable=False),
    Index("ix_tenant_day_day", "day"),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("tenant", Tenant, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("received_at", UtcDateTime, nullable=False),
    Column("reason", Text, nullable=False),  # field path and problem, never a value
    Column("body", ZlibBytes, nullable=False),  # the 200 body as received (stored compressed)
    Column("body_hash", Hash, nullable=False),  # sha256 of the body as received
    ForeignKeyConstraint(
        ["tenant", "day"], ["tenant_day.tenant", "tenant_day.day"], ondelete="CASCADE"
    ),
)
"""The last 200 body of each quarantined day (a table of its own, so a version-1 database gains
it through ``create_all`` without a migration; rows of days that recovered since are dropped at
the next retention pass)."""

sink_table = Table(
    "sink",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("routes", Text),  # JSON list of tenant ids; NULL = every tenant
    Column("last_success_at", UtcDateTime),
    Column("last_error", Text),
    Column("last_error_at", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
)

delivery = Table(
    "delivery",
    metadata,
    Column("sink", String(200), primary_key=True),
    Column("tenant", Tenant, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("delivered_version", Hash),
    Column("delivered_at", UtcDateTime),
    Column("attempts", Integer, nullable=False, default=0),  # failures of the queued version
    Column("last_error", Text),
    Column("last_error_at", UtcDateTime),
    Column("dead_letter", Boolean, nullable=False, default=False),
    Column("dead_version", Hash),
    Column("queued_seq", BigInteger),  # NOT NULL = waiting for delivery (the outbox)
    Column("queued_version", Hash),
    Column("queued_at", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
    ForeignKeyConstraint(
        ["tenant", "day"], ["tenant_day.tenant", "tenant_day.day"], ondelete="CASCADE"
    ),
    Index("ix_delivery_outbox", "sink", "queued_seq"),
)
IS_DEAD = delivery.c.dead_letter == true()
"""The dead-letter condition, spelled exactly as the partial index below so SQLite uses it."""

# Dead letters are few: a partial index keeps `status` from scanning every delivery row.
DEAD_INDEX = Index("ix_delivery_dead", delivery.c.sink, sqlite_where=IS_DEAD)


@event.listens_for(DEAD_INDEX, "before_create")
def _partial_on_postgresql(index: Index, connection: Connection, **_kw: Any) -> None:
    # The PostgreSQL form of the condition is attached when the index is created there: naming
    # `postgresql_where` above would make SQLAlchemy load its whole PostgreSQL dialect (~40 ms)
    # at import, in every SQLite run too.
    if connection.dialect.name == "postgresql":
        index.dialect_options["postgresql"]["where"] = IS_DEAD


tenant_status = Table(
    "tenant_status",
    metadata,
    Column("tenant", Tenant, primary_key=True),
    Column("last_success_at", UtcDateTime),
    Column("last_error", Text),
    Column("last_error_at", UtcDateTime),
    Column("auth_failed_until", UtcDateTime),
    Column("next_run_at", UtcDateTime),
    Column("updated_at", UtcDateTime, nullable=False),
)


def version_of(content_hash: str, final: bool) -> str:
    """What a sink must have for a day to count as delivered: its figures and its finality."""
    return content_hash + FINAL_SUFFIX if final else content_hash


def version_of_day(td: TenantDay) -> str:
    return version_of(td.content_hash, td.final)


def dialect_insert(conn: Connection, table: Table) -> Any:
    """``INSERT`` with ``on_conflict_do_update`` support for the connection's backend."""
    return insert_for(conn.dialect.name)(table)


def insert_for(dialect_name: str) -> Any:
    """The dialect's ``insert`` construct (upserts), imported on first use: the PostgreSQL
    dialect takes ~40 ms to import, which a SQLite run never needs."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def upsert(
    conn: Connection,
    table: Table,
    keys: Sequence[str],
    set_: Mapping[str, Any] | None = None,
    *,
    columns: Iterable[str] = (),
) -> Any:
    """An upsert for executemany; on conflict it sets ``set_``, else ``columns`` from the row."""
    statement = dialect_insert(conn, table)
    updates: dict[str, Any] = dict(set_ or {})
    for name in columns:
        updates.setdefault(name, statement.excluded[name])
    if not updates:
        return statement.on_conflict_do_nothing(index_elements=list(keys))
    return statement.on_conflict_do_update(index_elements=list(keys), set_=updates)


def tenants_in(
    column: Any, tenants: Collection[str] | frozenset[str] | None
) -> ColumnElement[bool]:
    """``column IN tenants``; no condition at all for None (every tenant)."""
    return true() if tenants is None else column.in_(sorted(tenants))


# --- values the store returns -------------------------------------------------------------------


class PendingBatch(list[TenantDay]):
    """The next tenant-days for a sink, in queue order; ``cursor`` continues after them.

    ``read`` counts the queue entries read, unreadable ones set aside included: fewer than the
    limit asked for means the end of the queue."""

    cursor: int | None = None
    read: int = 0


def _iso(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


class _JsonMixin:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: dates and datetimes as ISO 8601 strings."""
        raw = asdict(self)  # type: ignore[call-overload]
        return {k: _iso(v) for k, v in raw.items()}


@dataclass(frozen=True, slots=True)
class DeadLetter(_JsonMixin):
    """A tenant-day a sink gave up on, and why; ``current`` is False once newer data replaced it."""

    sink: str
    tenant: str
    day: dt.date
    attempts: int
    error: str | None
    dead_version: str | None
    current: bool
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class TenantStatus(_JsonMixin):
    """The ``tenant_status`` row: outcome of the tenant's last cycles and its next run."""

    tenant: str
    last_success_at: dt.datetime | None = None
    last_error: str | None = None
    last_error_at: dt.datetime | None = None
    auth_failed_until: dt.datetime | None = None
    next_run_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class TenantState(_JsonMixin):
    """One tenant in ``status``: stored days and the last outcomes."""

    tenant: str
    days_complete: int  # days with stored figures (fetched or final, including failed re-fetches)
    days_final: int
    days_failed: int  # days whose last fetch failed (with or without earlier figures)
    days_quarantined: int  # days whose last 200 body failed validation (kept for `reprocess`)
    first_day: dt.date | None
    last_day: dt.date | None
    last_fetched_at: dt.datetime | None
    last_success_at: dt.datetime | None
    last_error: str | None
    last_error_at: dt.datetime | None
    auth_failed_until: dt.datetime | None
    next_run_at: dt.datetime | None
    quarantined: list[QuarantinedDay] = field(default_factory=list)
    days_aged_out: int = 0  # days older than the API's window that were never collected
    aged_out: list[str] = field(default_factory=list)  # those days as ranges, oldest first

    def to_dict(self) -> dict[str, Any]:
        out = _JsonMixin.to_dict(self)
        out["quarantined"] = [q.to_dict() for q in self.quarantined]
        return out


@dataclass(frozen=True, slots=True)
class QuarantinedDay(_JsonMixin):
    """A day whose last 200 body failed validation: why, and when that body arrived."""

    day: dt.date
    reason: str
    received_at: dt.datetime


@dataclass(frozen=True, slots=True)
class StoredBody:
    """A stored 200 body and what ``reprocess`` needs to re-derive its day."""

    tenant: str
    day: dt.date
    quarantined: bool  # the quarantined body (True) or the day's stored payload (False)
    body: bytes
    final: bool
    received_at: dt.datetime


@dataclass(frozen=True, slots=True)
class SinkState(_JsonMixin):
    """One sink in ``status``: how much waits, how old the oldest wait is, what was given up."""

    sink: str
    routes: list[str] | None
    backlog: int
    dead_letters: int
    lag_seconds: float  # age of the oldest queued tenant-day; 0 when the backlog is empty
    oldest_queued_at: dt.datetime | None
    last_success_at: dt.datetime | None
    last_error: str | None
    last_error_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Everything ``status`` and ``/status`` show, read in one go from the store."""

    generated_at: dt.datetime
    tenants: list[TenantState] = field(default_factory=list)
    sinks: list[SinkState] = field(default_factory=list)
