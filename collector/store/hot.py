"""The state store's hot statements, compiled once per store for its dialect.

Every fetched tenant-day goes through these: looked up and stored with its outbox rows
(:meth:`~collector.store.Store.record_fetched`), read for each sink
(:meth:`~collector.store.Store.pending`), and acknowledged
(:meth:`~collector.store.Store.mark_delivered`). They run at the driver level, many rows per
statement (:mod:`.prepared` explains why); the SQL is SQLAlchemy's own for the dialect, with no
literal bound in it (``literal_column``, ``null()``, ``false()``), so every parameter is one the
caller passes. Row tuples follow each table's column order (``*_COLUMNS``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import (
    Dialect,
    Integer,
    and_,
    bindparam,
    case,
    false,
    func,
    literal_column,
    null,
    or_,
    select,
    update,
)

from collector.store.prepared import KEYS, BulkInsert, Codec, KeyLookup, Prepared
from collector.store.schema import (
    delivery,
    insert_for,
    sink_table,
    store_meta,
    tenant_day,
    tenant_status,
    tenants_in,
)

TENANT_DAY_COLUMNS = tuple(c.name for c in tenant_day.c)
QUEUE_COLUMNS = (
    "sink",
    "tenant",
    "day",
    "attempts",
    "dead_letter",
    "queued_seq",
    "queued_version",
    "queued_at",
    "updated_at",
)
DELIVERED_COLUMNS = (
    "sink",
    "tenant",
    "day",
    "delivered_version",
    "delivered_at",
    "attempts",
    "dead_letter",
    "updated_at",
)

_ZERO = literal_column("0", Integer)
_KEYS = ["sink", "tenant", "day"]


class HotStatements:
    """The compiled hot statements of one store (one dialect)."""

    def __init__(self, dialect: Dialect) -> None:
        self.codec = codec = Codec(dialect.name)
        insert = insert_for(dialect.name)

        def store_days() -> Any:
            statement = insert(tenant_day)
            new = statement.excluded
            set_ = {c: new[c] for c in TENANT_DAY_COLUMNS if c not in ("tenant", "day")}
            return statement.on_conflict_do_update(index_elements=["tenant", "day"], set_=set_)

        def queue() -> Any:
            statement = insert(delivery)
            new = statement.excluded
            # The sink already has this version (content went back to what it holds), or gave
            # up on exactly this version, and nothing else is queued for it: leave the row alone
            # instead of queueing it again. With another version queued, that one may be on its
            # way to the sink right now and would overwrite what it holds: queue this one after.
            idle = delivery.c.queued_seq.is_(None)
            gave_up = and_(
                idle, delivery.c.dead_letter, delivery.c.dead_version == new.queued_version
            )
            has_it = or_(gave_up, and_(idle, delivery.c.delivered_version == new.queued_version))
            set_ = {
                "queued_seq": case((has_it, null()), else_=new.queued_seq),
                "queued_version": case((has_it, null()), else_=new.queued_version),
                "queued_at": case((has_it, null()), else_=new.queued_at),
                # A dead letter of a version that is no longer stored goes: the sink has the
                # day as it is now.
                "attempts": case((gave_up, delivery.c.attempts), else_=_ZERO),
                "dead_letter": case((gave_up, delivery.c.dead_letter), else_=false()),
                "dead_version": case((gave_up, delivery.c.dead_version), else_=null()),
                "updated_at": new.updated_at,
            }
            return statement.on_conflict_do_update(index_elements=_KEYS, set_=set_)

        def delivered() -> Any:
            statement = insert(delivery)
            new = statement.excluded
            # Still queued only if a newer version arrived while this one was being written.
            done = delivery.c.queued_version == new.delivered_version
            set_ = {
                "delivered_version": new.delivered_version,
                "delivered_at": new.delivered_at,
                "attempts": _ZERO,
                "last_error": null(),
                "dead_letter": false(),
                "dead_version": null(),
                "queued_seq": case((done, null()), else_=delivery.c.queued_seq),
                "queued_version": case((done, null()), else_=delivery.c.queued_version),
                "queued_at": case((done, null()), else_=delivery.c.queued_at),
                "updated_at": new.updated_at,
            }
            return statement.on_conflict_do_update(index_elements=_KEYS, set_=set_)

        self.store_days = BulkInsert(store_days(), dialect, TENANT_DAY_COLUMNS)
        self.queue = BulkInsert(queue(), dialect, QUEUE_COLUMNS)
        self.delivered = BulkInsert(delivered(), dialect, DELIVERED_COLUMNS)

        existing = select(
            tenant_day.c.tenant,
            tenant_day.c.day,
            tenant_day.c.version,
            tenant_day.c.payload.is_(None),
        ).select_from(
            KEYS.join(
                tenant_day,
                and_(tenant_day.c.tenant == KEYS.c.tenant, tenant_day.c.day == KEYS.c.day),
            )
        )
        if not codec.sqlite:
            # One global lock order (sorted keys): two PostgreSQL writers cannot deadlock.
            existing = existing.order_by(tenant_day.c.tenant, tenant_day.c.day).with_for_update(
                of=tenant_day
            )
        self.existing = KeyLookup(existing, dialect)
        self.refresh = Prepared(
            update(tenant_day)
            .where(
                tenant_day.c.tenant == bindparam("k_tenant"),
                tenant_day.c.day == bindparam("k_day"),
            )
            .values(
                status=bindparam("status"),
                final=bindparam("final"),
                attempts=_ZERO,
                reason=null(),
                fetched_at=bindparam("fetched_at"),
                updated_at=bindparam("updated_at"),
                # The payload stays: a day whose payload was pruned is written as a changed one
                # instead, and queued for the sinks that lack it.
            ),
            dialect,
            ["status", "final", "fetched_at", "updated_at", "k_tenant", "k_day"],
        )
        # Reserving outbox positions takes the position row's lock until the commit; the sink
        # table's change count is read back in the next statement, so a write re-reads the sink
        # list only after it changed. Not in the UPDATE's RETURNING: on PostgreSQL an UPDATE that
        # waited for the lock (a sink being registered) still reads other rows as they were when
        # it started, and would miss the sink registered meanwhile.
        generation = store_meta.alias("generation")
        sinks_generation = (
            select(generation.c.value)
            .where(generation.c.key == bindparam("generation_key"))
            .scalar_subquery()
        )
        self.reserve_seq = Prepared(
            update(store_meta)
            .where(store_meta.c.key == bindparam("key"))
            .values(value=store_meta.c.value + bindparam("count")),
            dialect,
            ["count", "key"],
        )
        self.top_seq = Prepared(
            select(store_meta.c.value, sinks_generation).where(
                store_meta.c.key == bindparam("key")
            ),
            dialect,
            ["key", "generation_key"],
        )
        self.sinks = Prepared(select(sink_table.c.name, sink_table.c.routes), dialect, [])
        self.pending_first = Prepared(pending_query(after=False), dialect, ["sink", "limit"])
        self.pending_after = Prepared(
            pending_query(after=True), dialect, ["sink", "after", "limit"]
        )
        self.backlog = Prepared(
            select(func.count())
            .select_from(delivery)
            .where(delivery.c.sink == bindparam("sink"), delivery.c.queued_seq.is_not(None)),
            dialect,
            ["sink"],
        )
        days_state = select(
            tenant_day.c.day,
            tenant_day.c.status,
            tenant_day.c.final,
            tenant_day.c.attempts,
            tenant_day.c.content_hash,
        ).where(tenant_day.c.tenant == bindparam("tenant"))
        self.days_state = Prepared(days_state, dialect, ["tenant"])
        self.days_state_since = Prepared(
            days_state.where(tenant_day.c.day >= bindparam("since")), dialect, ["tenant", "since"]
        )
        self._insert = insert
        self._dialect = dialect
        self._tenant_status: dict[tuple[str, ...], Prepared] = {}
        outcome = update(sink_table).where(sink_table.c.name == bindparam("sink"))
        self.sink_success = Prepared(
            outcome.values(last_success_at=bindparam("at")), dialect, ["at", "sink"]
        )
        self.sink_error = Prepared(
            outcome.values(last_error=bindparam("error"), last_error_at=bindparam("at")),
            dialect,
            ["error", "at", "sink"],
        )

    def tenant_status(self, columns: tuple[str, ...]) -> Prepared:
        """Upsert of a ``tenant_status`` row: ``tenant``, then ``columns`` set from the row."""
        prepared = self._tenant_status.get(columns)
        if prepared is None:
            statement = self._insert(tenant_status)
            set_ = {c: statement.excluded[c] for c in columns}
            names = ["tenant", *columns]
            prepared = self._tenant_status[columns] = Prepared(
                statement.on_conflict_do_update(index_elements=["tenant"], set_=set_),
                self._dialect,
                names,
                column_keys=names,
            )
        return prepared


def pending_query(*, after: bool, tenants: Collection[str] | None = None) -> Any:
    """The next queued keys of a sink (an index range on the outbox), then their payloads: the
    sort never sees more than ``limit`` rows, however long the queue. Binds ``sink``, ``limit``
    and with ``after`` the cursor; ``tenants`` narrows it (not the hot path: then it is run
    through SQLAlchemy). Columns: queued_seq, tenant, day, fetched_at, updated_at, final,
    content_hash, payload."""
    queue = (
        select(delivery.c.queued_seq, delivery.c.tenant, delivery.c.day)
        .where(
            delivery.c.sink == bindparam("sink"),
            delivery.c.queued_seq > bindparam("after")
            if after
            else delivery.c.queued_seq.is_not(None),
            tenants_in(delivery.c.tenant, tenants),
        )
        .order_by(delivery.c.queued_seq)
        .limit(bindparam("limit"))
        .offset(_ZERO)  # else SQLite's compiler binds an OFFSET of its own
        .subquery()
    )
    return (
        select(
            queue.c.queued_seq,
            tenant_day.c.tenant,
            tenant_day.c.day,
            # When this version was fetched (an unchanged re-fetch moves fetched_at, not
            # changed_at): every delivery of a version carries the same fetched_at, so a
            # redelivery, by this replica or another, is the same body.
            func.coalesce(tenant_day.c.changed_at, tenant_day.c.fetched_at),
            tenant_day.c.updated_at,
            tenant_day.c.final,
            tenant_day.c.content_hash,
            tenant_day.c.payload,
        )
        .join_from(
            queue,
            tenant_day,
            and_(tenant_day.c.tenant == queue.c.tenant, tenant_day.c.day == queue.c.day),
        )
        .order_by(queue.c.queued_seq)
    )
