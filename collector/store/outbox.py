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
import threading
import time
from collections import OrderedDict
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
    update,
)

from collector.errors import BadResponse
from collector.models import TenantDay, normalize, parse_usage
from collector.store.base import (
    Key,
    Registered,
    Routes,
    StoreBase,
    chunks,
    keys_in,
    short,
    tenants_in,
)
from collector.store.schema import (
    IS_DEAD,
    DeadLetter,
    PendingBatch,
    UtcDateTime,
    delivery,
    dialect_insert,
    mark_delivered_statement,
    sink_table,
    tenant_day,
    upsert,
    version_of_day,
)

log = structlog.get_logger("collector.store")

_RECENT_DAYS = 4096  # rebuilt tenant-days kept for the other sinks (about 10 kB each)
_STALE_AFTER = 120.0  # seconds after which an unread cached day may make room for a new one


class _RecentDays:
    """The last tenant-days stored or rebuilt from payloads, for the sinks (thread-safe).

    Every sink reads the same new days at about the same time; parsing a payload once instead
    of once per sink saves most of the delivery CPU with several sinks. An entry leaves once each
    sink it was queued for has read it. The sinks read in queue order, so when they lag behind
    by more than ``size`` days, evicting the oldest entry (LRU) would throw away exactly the days
    they need next and every read would miss: a full cache keeps what it has and skips the new
    day instead, unless its oldest entry has waited ``stale_after`` seconds (a sink that stopped
    reading must not pin it forever).
    """

    def __init__(self, size: int, stale_after: float = _STALE_AFTER) -> None:
        self._size = size
        self._stale_after = stale_after
        # key -> (tenant-day, reads left, monotonic time stored); insertion order = age
        self._items: OrderedDict[tuple[Any, ...], tuple[TenantDay, int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> TenantDay | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            value, reads, stored = found
            if reads <= 1:
                del self._items[key]
            else:
                self._items[key] = (value, reads - 1, stored)
            return value

    def put(self, key: tuple[Any, ...], value: TenantDay, reads: int) -> None:
        if reads < 1:
            return
        now = time.monotonic()
        with self._lock:
            if key not in self._items and len(self._items) >= self._size:
                oldest = next(iter(self._items.values()))
                if now - oldest[2] < self._stale_after:
                    return
                self._items.popitem(last=False)
            self._items[key] = (value, reads, now)
            self._items.move_to_end(key)


class OutboxStore(StoreBase):
    """Sinks, routes and each sink's queue: what waits, what arrived, what was given up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recent = _RecentDays(_RECENT_DAYS)
        self._sink_count = 0  # registered sinks, as last seen: readers of a rebuilt day

    def _registered(self, conn: Connection) -> Registered:
        found = {
            name: None if routes is None else frozenset(json.loads(routes))
            for name, routes in conn.execute(select(sink_table.c.name, sink_table.c.routes))
        }
        self._sink_count = len(found)
        return found

    async def registered_sinks(self) -> Registered:
        """The registered sinks and their routes (None: every tenant)."""
        return await self._read(self._registered)

    async def sync_sinks(self, routes: Routes, *, remove_missing: bool = False) -> dict[str, int]:
        """Register the sinks of ``routes`` (sink name -> routed tenants, None = every tenant).

        A new sink gets every stored tenant-day queued (its full history); a tenant newly routed to
        a sink gets its history queued there; a tenant no longer routed leaves that sink's queue.
        With ``remove_missing`` (``routes`` is the whole config), other sinks are unregistered:
        their queues are dropped but their delivery records kept, so a sink that comes back gets
        only what it does not have yet. Returns, per sink, how many tenant-days were newly queued.
        """
        wanted: Registered = {n: None if r is None else frozenset(r) for n, r in routes.items()}
        return await self._write(lambda conn: self._sync_sinks(conn, wanted, remove_missing))

    def _sync_sinks(
        self, conn: Connection, wanted: Registered, remove_missing: bool
    ) -> dict[str, int]:
        now = self._now()
        known = self._registered(conn)
        queued: dict[str, int] = {}
        for name, routed in wanted.items():
            queued[name] = 0
            if name in known and known[name] == routed:
                continue
            added: ColumnElement[bool] = tenants_in(tenant_day.c.tenant, routed)
            if name in known:
                before = known[name]
                if before is None:
                    added = false()
                else:
                    added = and_(added, tenant_day.c.tenant.not_in(sorted(before)))
                if routed is not None:
                    conn.execute(
                        update(delivery)
                        .where(
                            delivery.c.sink == name,
                            delivery.c.queued_seq.is_not(None),
                            delivery.c.tenant.not_in(sorted(routed)),
                        )
                        .values(
                            queued_seq=None, queued_version=None, queued_at=None, updated_at=now
                        )
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
            conn.execute(
                update(delivery)
                .where(delivery.c.sink.in_(gone), delivery.c.queued_seq.is_not(None))
                .values(queued_seq=None, queued_version=None, queued_at=None, updated_at=now)
            )
            conn.execute(delete(sink_table).where(sink_table.c.name.in_(gone)))
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
        if not force:
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

    async def pending(
        self,
        sink: str,
        tenants: Collection[str] | None = None,
        limit: int = 100,
        *,
        after: int | None = None,
    ) -> PendingBatch:
        """The next ``limit`` tenant-days waiting for ``sink``, in queue order.

        Queue order is the order in which each day's current version was stored (a FIFO outbox:
        a backfill, fetched oldest first, is delivered oldest first). ``after`` is the
        ``cursor`` of a previous batch, to continue a pass over the backlog past days that failed
        in it. ``tenants`` narrows the result further than the sink's routes.
        """
        if tenants is not None and not tenants:
            return PendingBatch()
        # The next keys first (an index range on the outbox), then their payloads: the sort
        # never sees more than `limit` rows, however long the queue.
        queue = (
            select(delivery.c.queued_seq, delivery.c.tenant, delivery.c.day)
            .where(
                delivery.c.sink == sink,
                delivery.c.queued_seq.is_not(None)
                if after is None
                else delivery.c.queued_seq > after,
                tenants_in(delivery.c.tenant, tenants),
            )
            .order_by(delivery.c.queued_seq)
            .limit(limit)
            .subquery()
        )
        query = (
            select(
                queue.c.queued_seq,
                tenant_day.c.tenant,
                tenant_day.c.day,
                tenant_day.c.fetched_at,
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

        def work(conn: Connection) -> tuple[PendingBatch, list[tuple[Key, str]]]:
            # Rebuilding the records is CPU work: done here, in the worker thread, not on the loop.
            rows = list(conn.execute(query))
            batch = PendingBatch()
            broken: list[tuple[Key, str]] = []
            for row in rows:
                try:
                    batch.append(self._rebuild(row))
                except BadResponse as exc:
                    broken.append(((row.tenant, row.day), str(exc)))
            batch.cursor = rows[-1].queued_seq if rows else after
            return batch, broken

        batch, broken = await self._read(work)
        if broken:
            await self._set_aside(sink, broken)
        return batch

    def remember(self, td: TenantDay, readers: int) -> None:
        """Offer a just-stored tenant-day, queued for ``readers`` sinks, to the rebuild cache."""
        key = (td.tenant, td.day, td.content_hash, td.final, td.fetched_at)  # as a rebuild has it
        self._recent.put(key, td, readers)

    def _rebuild(self, row: Any) -> TenantDay:
        if row.payload is None or row.content_hash is None:
            raise BadResponse("no stored payload (pruned by retention)", tenant=row.tenant)
        fetched_at = row.fetched_at or row.updated_at
        key = (row.tenant, row.day, row.content_hash, bool(row.final), fetched_at)
        cached = self._recent.get(key)
        if cached is not None:
            return cached
        response = parse_usage(row.payload, tenant=row.tenant)
        rebuilt = normalize(
            row.tenant,
            row.day,
            response,
            fetched_at=fetched_at,
            final=bool(row.final),
            digest=row.content_hash,
        )
        # This sink has read it; the other sinks may still come for it.
        self._recent.put(key, rebuilt, self._sink_count - 1)
        return rebuilt

    async def _set_aside(self, sink: str, broken: Sequence[tuple[Key, str]]) -> None:
        # A stored payload this version cannot read (e.g. after a downgrade) would stall the
        # queue: dead-letter it for this sink, visibly, so `replay` can retry after an upgrade.
        now = self._now()
        for (tenant, day), reason in broken:
            log.error(
                "stored payload unreadable",
                sink=sink,
                tenant=tenant,
                day=day.isoformat(),
                reason=reason,
            )

        def work(conn: Connection) -> None:
            for (tenant, day), reason in broken:
                conn.execute(
                    update(delivery)
                    .where(
                        delivery.c.sink == sink, delivery.c.tenant == tenant, delivery.c.day == day
                    )
                    .values(
                        dead_letter=True,
                        dead_version=delivery.c.queued_version,
                        queued_seq=None,
                        queued_version=None,
                        queued_at=None,
                        last_error=short(f"stored payload unreadable: {reason}"),
                        last_error_at=now,
                        updated_at=now,
                    )
                )

        await self._write(work)

    async def mark_delivered(self, sink: str, items: Sequence[TenantDay]) -> None:
        """Record that ``sink`` durably has these tenant-days (at the versions given)."""
        if not items:
            return
        now = self._now()
        rows = [
            {
                "sink": sink,
                "tenant": td.tenant,
                "day": td.day,
                "delivered_version": version_of_day(td),
                "delivered_at": now,
                "attempts": 0,
                "dead_letter": False,
                "updated_at": now,
            }
            for td in sorted(items, key=lambda td: (td.tenant, td.day))
        ]

        def work(conn: Connection) -> None:
            conn.execute(self._statement("delivered", conn, mark_delivered_statement), rows)

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
            # A failure of a version that newer data already superseded counts against nothing.
            if queued_version is None or queued_version == version:
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
            result = conn.execute(
                update(delivery)
                .where(delivery.c.sink == sink, IS_DEAD, replayable)
                .values(
                    queued_seq=stored,
                    queued_version=stored_version,
                    queued_at=now,
                    attempts=0,
                    dead_letter=False,
                    dead_version=None,
                    updated_at=now,
                )
            )
            return int(result.rowcount)

        return await self._write(work)

    async def record_sink_outcome(self, sink: str, error: str | None) -> None:
        """Note a sink's latest success (``error=None``) or failure, for ``status``."""
        now = self._now()
        values: dict[str, Any] = (
            {"last_success_at": now}
            if error is None
            else {"last_error": short(error), "last_error_at": now}
        )
        statement = update(sink_table).where(sink_table.c.name == sink).values(**values)
        await self._write(lambda conn: conn.execute(statement))
