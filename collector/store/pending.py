"""Reading a sink's queue: the next tenant-days in queue order, as the sinks get them.

A day is rebuilt from its stored payload (parsed and normalized again), unless the cache of days
just stored or rebuilt (:class:`RecentDays`) still has it: every sink reads the same new days at
about the same time, so a day is parsed at most once for all of them, and not at all when the
sinks keep pace with fetching (:meth:`~collector.store.Store.record_fetched` hands its days to
the cache). A stored payload this version cannot read is set aside as a dead letter for that
sink, visibly, instead of stalling its queue."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import Any

import structlog
from sqlalchemy import Connection, update

from collector.errors import BadResponse
from collector.models import TenantDay, normalize, parse_usage
from collector.store.base import Key, StoreBase, short
from collector.store.hot import pending_query
from collector.store.schema import PendingBatch, delivery

log = structlog.get_logger(__name__)

# Stored or rebuilt tenant-days kept for the sinks (5 to 10 kB each). A sink that keeps pace lags
# by a few hundred days. One that falls behind steadily fills any size, and then misses about the
# share of new days it falls behind by, whatever the size: a larger cache only holds more memory.
RECENT_DAYS = 2048
STALE_AFTER = 120.0  # seconds after which an unread cached day may make room for a new one


class RecentDays:
    """The last tenant-days stored or rebuilt from payloads, for the sinks (thread-safe).

    An entry leaves once each sink it was queued for has read it. The sinks read in queue order,
    so when they lag behind by more than ``size`` days, evicting the oldest entry (LRU) would
    throw away exactly the days they need next and every read would miss: a full cache keeps
    what it has and skips the new day instead, unless its oldest entry has waited
    ``stale_after`` seconds (a sink that stopped reading must not pin it forever).
    """

    def __init__(self, size: int = RECENT_DAYS, stale_after: float = STALE_AFTER) -> None:
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


class PendingStore(StoreBase):
    """Each sink's next tenant-days, and the cache they are rebuilt from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recent = RecentDays()
        self._sink_count = 0  # registered sinks, as last seen: readers of a rebuilt day

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

        def work(conn: Connection) -> tuple[PendingBatch, list[tuple[Key, str]]]:
            # Rebuilding the records is CPU work: done here, in the worker thread, not on the loop.
            hot = self._hot(conn)
            codec = hot.codec
            if tenants is not None:
                query = pending_query(after=after is not None, tenants=tenants)
                result = conn.execute(query, {"sink": sink, "after": after, "limit": limit})
            elif after is None:
                result = hot.pending_first.execute(conn, (sink, limit))
            else:
                result = hot.pending_after.execute(conn, (sink, after, limit))
            batch = PendingBatch()
            broken: list[tuple[Key, str]] = []
            last, read = after, 0
            read_day, read_moment = codec.read_day, codec.read_moment
            for seq, tenant, day, fetched_at, updated_at, final, digest, payload in result:
                last = seq
                read += 1
                day = read_day(day)
                try:
                    batch.append(
                        self._rebuild(
                            tenant,
                            day,
                            read_moment(fetched_at or updated_at),
                            bool(final),
                            digest,
                            payload,
                        )
                    )
                except BadResponse as exc:
                    broken.append(((tenant, day), str(exc)))
            batch.cursor = last
            batch.read = read
            return batch, broken

        batch, broken = await self._read(work, one_statement=True)
        if broken:
            await self._set_aside(sink, broken)
        return batch

    def remember(self, td: TenantDay, readers: int) -> None:
        """Offer a just-stored tenant-day, queued for ``readers`` sinks, to the rebuild cache."""
        key = (td.tenant, td.day, td.content_hash, td.final, td.fetched_at)  # as a rebuild has it
        self._recent.put(key, td, readers)

    def _rebuild(
        self,
        tenant: str,
        day: dt.date,
        fetched_at: dt.datetime | None,
        final: bool,
        digest: str | None,
        payload: str | None,
    ) -> TenantDay:
        if payload is None or digest is None or fetched_at is None:
            raise BadResponse("no stored payload (pruned by retention)", tenant=tenant)
        key = (tenant, day, digest, final, fetched_at)
        cached = self._recent.get(key)
        if cached is not None:
            return cached
        response = parse_usage(payload, tenant=tenant)
        rebuilt = normalize(
            tenant, day, response, fetched_at=fetched_at, final=final, digest=digest
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
            # In key order, as every writer of several delivery rows takes them.
            for (tenant, day), reason in sorted(broken):
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
