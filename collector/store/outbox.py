"""Each sink's outbox in the state store: routes, queue, acknowledgements, dead letters, replay.

A tenant-day waits for a sink while its ``delivery`` row has a ``queued_seq``. Rows are queued
when a new version is stored (:meth:`DaysStore.record_fetched`), when a sink or a route is added
(:meth:`OutboxStore.sync_sinks`) and by :meth:`OutboxStore.replay`; they leave the queue when the
sink acknowledges that version (:meth:`OutboxStore.mark_delivered`) or gives up on it
(:meth:`OutboxStore.mark_failed` reaching ``max_attempts``). Queue order is ``queued_seq``: the
order in which each day's current version was stored, i.e. a FIFO outbox (a backfill, fetched
oldest day first, is delivered oldest day first)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Sequence
from typing import Any

import structlog
from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    delete,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    tuple_,
    update,
)

from collector.models import TenantDay
from collector.store.base import (
    Key,
    Registered,
    Routes,
    chunks,
    keys_in,
    short,
)
from collector.store.pending import PendingStore
from collector.store.schema import (
    IS_DEAD,
    SEQ_KEY,
    SINKS_GENERATION_KEY,
    DeadLetter,
    UtcDateTime,
    delivery,
    dialect_insert,
    sink_table,
    store_meta,
    tenant_day,
    tenants_in,
    upsert,
    version_of_day,
)

log = structlog.get_logger(__name__)


def _update_deliveries(conn: Connection, where: ColumnElement[bool], **values: Any) -> int:
    """UPDATE the delivery rows matching ``where``, locking them in key order first; returns how
    many.

    Every transaction that locks several delivery rows takes them in (sink, tenant, day) order:
    :meth:`OutboxStore.mark_delivered` and :meth:`~OutboxStore.mark_failed` do, and they do not
    take the position row. A bulk UPDATE that locked rows in scan order could hold one that a
    delivery report waits for while waiting for one that report holds: a deadlock. SQLite has
    no row locks and leaves out the FOR UPDATE.
    """
    key = (delivery.c.sink, delivery.c.tenant, delivery.c.day)
    locked = select(*key).where(where).order_by(*key).with_for_update()
    return int(
        conn.execute(update(delivery).where(tuple_(*key).in_(locked)).values(**values)).rowcount
    )


class OutboxStore(PendingStore):
    """Sinks, routes and each sink's queue: what waits, what arrived, what was given up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routes: dict[str, frozenset[str]] = {}  # parsed `sink.routes` JSON, by its text
        # The sink list as last read, with the sink table's change count it was read at.
        self._sinks_read: tuple[int, Registered] | None = None

    def _registered(self, conn: Connection) -> Registered:
        found: Registered = {}
        for name, routes in self._hot(conn).sinks.execute(conn):
            if routes is None:
                found[name] = None
                continue
            # Read on every commit of fetched days: parse each distinct route list once.
            routed = self._routes.get(routes)
            if routed is None:
                if len(self._routes) > 256:
                    self._routes.clear()
                routed = self._routes[routes] = frozenset(json.loads(routes))
            found[name] = routed
        self._sink_count = len(found)
        return found

    def _registered_as_of(self, conn: Connection, generation: int | None) -> Registered:
        """The registered sinks, read again only when the sink table's change count
        (:data:`SINKS_GENERATION_KEY`, read in this transaction) moved since the last read: any
        process's :meth:`sync_sinks` moves it. None (no count stored): always read."""
        last = self._sinks_read
        if last is not None and generation is not None and last[0] == generation:
            return last[1]
        found = self._registered(conn)
        # Read after the count, in the same transaction: at least as new as that count says.
        self._sinks_read = None if generation is None else (generation, found)
        return found

    @staticmethod
    def _hold_positions(conn: Connection) -> None:
        """Take the outbox position row's lock until this transaction ends.

        A write of new days holds it from reserving their positions until it commits, and reads
        the sink list after taking it. A transaction that changes the sinks (:meth:`sync_sinks`),
        queues stored history (:meth:`replay`) or drops payloads by what the sinks have
        (retention) takes it before reading anything:
        a write in progress is then committed before it looks, and a later write sees what it
        committed. Nothing to do on SQLite, which runs one write transaction at a time.
        """
        if conn.dialect.name == "sqlite":
            return
        conn.execute(
            update(store_meta).where(store_meta.c.key == SEQ_KEY).values(value=store_meta.c.value)
        )

    async def sync_sinks(self, routes: Routes, *, remove_missing: bool = False) -> dict[str, int]:
        """Register the sinks of ``routes`` (sink name -> routed tenants, None = every tenant).

        A new sink gets every stored tenant-day queued (its full history); a tenant newly routed to
        a sink gets its history queued there; a tenant no longer routed leaves that sink's queue.
        With ``remove_missing`` (``routes`` is the whole config), other sinks are unregistered:
        their queues are dropped but their delivery records kept, so a sink that comes back gets
        only what it does not have yet. Returns, per sink, how many tenant-days were newly queued.
        """
        wanted: Registered = {n: None if r is None else frozenset(r) for n, r in routes.items()}
        # Not fenced: queueing history for a new sink is the same for every replica, and
        # idempotent, whichever tenants this one holds.
        return await self._write(
            lambda conn: self._sync_sinks(conn, wanted, remove_missing), fenced=False
        )

    def _sync_sinks(
        self, conn: Connection, wanted: Registered, remove_missing: bool
    ) -> dict[str, int]:
        now = self._now()
        self._hold_positions(conn)
        known = self._registered(conn)
        queued: dict[str, int] = {}
        changed = False
        for name, routed in wanted.items():
            queued[name] = 0
            if name in known and known[name] == routed:
                continue
            changed = True
            added: ColumnElement[bool] = tenants_in(tenant_day.c.tenant, routed)
            if name in known:
                before = known[name]
                if before is None:
                    added = false()
                else:
                    added = and_(added, tenant_day.c.tenant.not_in(sorted(before)))
                if routed is not None:
                    _update_deliveries(
                        conn,
                        and_(
                            delivery.c.sink == name,
                            delivery.c.queued_seq.is_not(None),
                            delivery.c.tenant.not_in(sorted(routed)),
                        ),
                        queued_seq=None,
                        queued_version=None,
                        queued_at=None,
                        updated_at=now,
                    )
            queued[name] = self._enqueue_history(conn, name, added, force=False, now=now)
            routes_json = None if routed is None else json.dumps(sorted(routed))
            conn.execute(
                upsert(conn, sink_table, ["name"], {"routes": routes_json, "updated_at": now}),
                [{"name": name, "routes": routes_json, "updated_at": now}],
            )
        gone = [name for name in known if name not in wanted] if remove_missing else []
        if gone:
            # A sink nobody drains must not hold payloads back from retention.
            _update_deliveries(
                conn,
                and_(delivery.c.sink.in_(gone), delivery.c.queued_seq.is_not(None)),
                queued_seq=None,
                queued_version=None,
                queued_at=None,
                updated_at=now,
            )
            conn.execute(delete(sink_table).where(sink_table.c.name.in_(gone)))
        if changed or gone:
            # Every store (of every process) reads the sink list again at its next write.
            conn.execute(
                update(store_meta)
                .where(store_meta.c.key == SINKS_GENERATION_KEY)
                .values(value=store_meta.c.value + 1)
            )
        return queued

    def _enqueue_history(
        self,
        conn: Connection,
        sink: str,
        condition: ColumnElement[bool],
        *,
        force: bool,
        now: dt.datetime,
    ) -> int:
        """Queue every stored tenant-day matching ``condition`` for ``sink``; returns how many.

        Without ``force`` a day the sink has (or gave up on) at its current version, or that is
        already queued, is left alone; with ``force`` (replay) it is queued again, attempts reset.
        """
        source = select(
            literal(sink).label("sink"),
            tenant_day.c.tenant,
            tenant_day.c.day,
            tenant_day.c.seq,
            tenant_day.c.version,
            literal(now, UtcDateTime()).label("queued_at"),
            literal(0).label("attempts"),
            false().label("dead_letter"),
            literal(now, UtcDateTime()).label("updated_at"),
        ).where(tenant_day.c.payload.is_not(None), condition)
        # In key order: the rows the upsert below locks, as every other writer of delivery rows
        # takes them (see _update_deliveries).
        source = source.order_by(tenant_day.c.tenant, tenant_day.c.day)
        if not force:
            # A day the sink has at its stored version drops a dead letter of another version,
            # as a write of that version does (days.py): the tenant may have been routed
            # elsewhere while the day changed back.
            _update_deliveries(
                conn,
                and_(
                    delivery.c.sink == sink,
                    delivery.c.queued_seq.is_(None),
                    delivery.c.dead_letter,
                    exists().where(
                        tenant_day.c.tenant == delivery.c.tenant,
                        tenant_day.c.day == delivery.c.day,
                        tenant_day.c.version == delivery.c.delivered_version,
                        tenant_day.c.version != delivery.c.dead_version,
                        condition,
                    ),
                ),
                attempts=0,
                dead_letter=False,
                dead_version=None,
                updated_at=now,
            )
            settled = exists().where(
                delivery.c.sink == sink,
                delivery.c.tenant == tenant_day.c.tenant,
                delivery.c.day == tenant_day.c.day,
                or_(
                    delivery.c.queued_seq.is_not(None),
                    delivery.c.delivered_version == tenant_day.c.version,
                    and_(delivery.c.dead_letter, delivery.c.dead_version == tenant_day.c.version),
                ),
            )
            source = source.where(not_(settled))
        count = int(conn.execute(select(func.count()).select_from(source.subquery())).scalar_one())
        if count:
            statement = dialect_insert(conn, delivery).from_select(
                [
                    "sink",
                    "tenant",
                    "day",
                    "queued_seq",
                    "queued_version",
                    "queued_at",
                    "attempts",
                    "dead_letter",
                    "updated_at",
                ],
                source,
            )
            new = statement.excluded
            set_ = {
                "queued_seq": new.queued_seq,
                "queued_version": new.queued_version,
                "queued_at": new.queued_at,
                "attempts": 0,
                "dead_letter": False,
                "dead_version": None,
                "updated_at": new.updated_at,
            }
            conn.execute(
                statement.on_conflict_do_update(index_elements=["sink", "tenant", "day"], set_=set_)
            )
        return count

    async def mark_delivered(self, sink: str, items: Sequence[TenantDay]) -> None:
        """Record that ``sink`` durably has these tenant-days (at the versions given)."""
        if not items:
            return
        now = self._now()
        # One row per day (the last version given wins), in key order.
        latest = {(td.tenant, td.day): td for td in items}

        def work(conn: Connection) -> None:
            hot = self._hot(conn)
            codec = hot.codec
            stamp, no = codec.moment(now), codec.flag(False)
            # DELIVERED_COLUMNS: sink, tenant, day, delivered_version, delivered_at, attempts,
            # dead_letter, updated_at
            values: list[Any] = []
            for (tenant, day), td in sorted(latest.items()):
                values += (sink, tenant, codec.day(day), version_of_day(td), stamp, 0, no, stamp)
            hot.delivered.execute(conn, values)

        await self._write(work)

    async def mark_failed(
        self, sink: str, items: Sequence[TenantDay], error: str, max_attempts: int
    ) -> list[TenantDay]:
        """Count one failed delivery attempt for each item; returns those now dead-lettered.

        A tenant-day is dead-lettered for this sink once its attempts reach ``max_attempts``
        (``max_attempts=1``: at once, for a permanent error). It then leaves the queue until a
        newer version of the day arrives or ``replay`` queues it again.
        """
        if not items:
            return []
        return await self._write(
            lambda conn: self._mark_failed(conn, sink, items, error, max_attempts)
        )

    def _mark_failed(
        self,
        conn: Connection,
        sink: str,
        items: Sequence[TenantDay],
        error: str,
        max_attempts: int,
    ) -> list[TenantDay]:
        now = self._now()
        message = short(error)
        ordered = sorted(items, key=lambda td: (td.tenant, td.day))
        found: dict[Key, dict[str, Any]] = {}
        for chunk in chunks([(td.tenant, td.day) for td in ordered]):
            query = (
                select(delivery)
                .where(
                    delivery.c.sink == sink, keys_in(conn, delivery.c.tenant, delivery.c.day, chunk)
                )
                # Rows locked in key order, as every other writer of delivery rows takes them:
                # in table order, two transactions could each hold a row the other waits for.
                .order_by(delivery.c.tenant, delivery.c.day)
                .with_for_update()
            )
            for existing in conn.execute(query):
                found[(existing.tenant, existing.day)] = dict(existing._mapping)
        dead: list[TenantDay] = []
        rows: list[dict[str, Any]] = []
        for td in ordered:
            version = version_of_day(td)
            row = found.get((td.tenant, td.day)) or {
                "sink": sink,
                "tenant": td.tenant,
                "day": td.day,
                "attempts": 0,
                "dead_letter": False,
            }
            row.update(last_error=message, last_error_at=now, updated_at=now)
            queued_version = row.get("queued_version")
            # Only a failure of the version queued counts (or of a day the sink never had nor
            # waits for). One that newer data superseded, or that left the queue since it was
            # read (delivered by another pass), counts against nothing: dead-lettering it would
            # report a day the sink may well have.
            if queued_version == version or (
                queued_version is None and row.get("delivered_version") is None
            ):
                row["attempts"] += 1
                if row["attempts"] >= max_attempts:
                    row.update(
                        dead_letter=True,
                        dead_version=version,
                        queued_seq=None,
                        queued_version=None,
                        queued_at=None,
                    )
                    dead.append(td)
            rows.append(row)
        columns = [c.name for c in delivery.c if c.name not in ("sink", "tenant", "day")]
        full = [{c: row.get(c) for c in ("sink", "tenant", "day", *columns)} for row in rows]
        conn.execute(upsert(conn, delivery, ["sink", "tenant", "day"], columns=columns), full)
        return dead

    async def backlog(self, sink: str, tenants: Collection[str] | None = None) -> int:
        """How many tenant-days wait for ``sink``."""
        if tenants is None:
            return await self._read(lambda conn: self._backlog(conn, sink), one_statement=True)
        query = (
            select(func.count())
            .select_from(delivery)
            .where(
                delivery.c.sink == sink,
                delivery.c.queued_seq.is_not(None),
                tenants_in(delivery.c.tenant, tenants),
            )
        )
        return int(await self._read(lambda conn: conn.execute(query).scalar_one()))

    def _backlog(self, conn: Connection, sink: str) -> int:
        return int(self._hot(conn).backlog.execute(conn, (sink,)).scalar_one())

    async def dead_letters(self, sink: str, tenant: str | None = None) -> list[DeadLetter]:
        """The tenant-days ``sink`` gave up on, oldest day first, with the last error."""
        query = (
            select(delivery, tenant_day.c.version.label("current_version"))
            .join_from(
                delivery,
                tenant_day,
                and_(tenant_day.c.tenant == delivery.c.tenant, tenant_day.c.day == delivery.c.day),
            )
            .where(delivery.c.sink == sink, IS_DEAD)
            .order_by(delivery.c.day, delivery.c.tenant)
        )
        if tenant is not None:
            query = query.where(delivery.c.tenant == tenant)

        def work(conn: Connection) -> list[DeadLetter]:
            return [
                DeadLetter(
                    sink=row.sink,
                    tenant=row.tenant,
                    day=row.day,
                    attempts=row.attempts,
                    error=row.last_error,
                    dead_version=row.dead_version,
                    current=row.dead_version == row.current_version,
                    updated_at=row.updated_at,
                )
                for row in conn.execute(query)
            ]

        return await self._read(work)

    async def replay(
        self,
        sink: str,
        tenant: str | None = None,
        since: dt.date | None = None,
        only_dead: bool = False,
    ) -> int:
        """Queue stored history for ``sink`` again, without calling the API; returns how many.

        Everything stored (or only its dead letters, with ``only_dead``) for the tenants routed to
        the sink, narrowed to one ``tenant`` and to days from ``since`` on. Days whose payload
        was pruned by retention cannot be replayed.
        """
        now = self._now()

        def work(conn: Connection) -> int:
            # Queued from what is stored as of a write in progress, the replayed entry could
            # replace the newer version that write queues, and name a version that is no longer
            # stored: the sink would get the day again on every pass, never acknowledged.
            self._hold_positions(conn)
            routed = self._registered(conn).get(sink)
            condition = and_(
                tenants_in(tenant_day.c.tenant, routed),
                tenant_day.c.tenant == tenant if tenant is not None else true(),
                tenant_day.c.day >= since if since is not None else true(),
            )
            if not only_dead:
                return self._enqueue_history(conn, sink, condition, force=True, now=now)
            stored = (
                select(tenant_day.c.seq)
                .where(tenant_day.c.tenant == delivery.c.tenant, tenant_day.c.day == delivery.c.day)
                .scalar_subquery()
            )
            stored_version = (
                select(tenant_day.c.version)
                .where(tenant_day.c.tenant == delivery.c.tenant, tenant_day.c.day == delivery.c.day)
                .scalar_subquery()
            )
            replayable = exists().where(
                tenant_day.c.tenant == delivery.c.tenant,
                tenant_day.c.day == delivery.c.day,
                tenant_day.c.payload.is_not(None),
                condition,
            )
            return _update_deliveries(
                conn,
                and_(delivery.c.sink == sink, IS_DEAD, replayable),
                queued_seq=stored,
                queued_version=stored_version,
                queued_at=now,
                attempts=0,
                dead_letter=False,
                dead_version=None,
                updated_at=now,
            )

        return await self._write(work)

    async def end_pass(
        self, sink: str, error: str | None, *, attempted: bool, delivered: bool = False
    ) -> int:
        """A delivery pass is over: note its outcome (when it ``attempted`` any write: success,
        or the last ``error``, or both when it ``delivered`` some days and failed others) and
        return the sink's backlog, in one transaction."""
        now = self._now()

        def work(conn: Connection) -> int:
            if attempted:
                self._sink_outcome(conn, sink, error, now, delivered=delivered)
            return self._backlog(conn, sink)

        return await (self._write(work) if attempted else self._read(work))

    def _sink_outcome(
        self,
        conn: Connection,
        sink: str,
        error: str | None,
        now: dt.datetime,
        *,
        delivered: bool = False,
    ) -> None:
        hot = self._hot(conn)
        at = hot.codec.moment(now)
        if error is None or delivered:
            hot.sink_success.execute(conn, (at, sink))
        if error is not None:
            hot.sink_error.execute(conn, (short(error), at, sink))
