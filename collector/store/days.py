"""Fetched and failed tenant-days in the state store, and retention of their raw payloads."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    exists,
    not_,
    or_,
    select,
    tuple_,
    update,
)

from collector.models import DayState, DayStatus, TenantDay
from collector.store.base import Key, as_status, short
from collector.store.outbox import OutboxStore
from collector.store.prepared import rows_by_key
from collector.store.schema import (
    SEQ_KEY,
    SINKS_GENERATION_KEY,
    delivery,
    tenant_day,
    upsert,
    version_of_day,
)


class DaysStore(OutboxStore):
    """Fetched and failed tenant-days, and retention of their payloads."""

    async def record_fetched(self, items: Sequence[tuple[TenantDay, str]]) -> list[bool]:
        """Store fetched tenant-days with their 200 bodies as received, in one transaction.

        Returns, per item, True when its version changed (a new day, other figures, or the day
        became final): exactly the items now queued for the sinks. The transaction is committed
        before this returns, so the sinks may be told right away.
        """
        if not items:
            return []
        items = self.private(items)  # state.raw_pii, before anything reaches the disk
        flags, readers = await self._write(lambda conn: self._record_fetched(conn, items))
        # The sinks are about to read exactly these days: hand them over instead of having the
        # first sink parse every payload again (the largest CPU cost of delivery otherwise).
        for (td, _), changed in zip(items, flags, strict=True):
            if changed:
                self.remember(td, readers.get((td.tenant, td.day), 0))
        return flags

    def _record_fetched(
        self, conn: Connection, items: Sequence[tuple[TenantDay, str]]
    ) -> tuple[list[bool], dict[Key, int]]:
        """:meth:`record_fetched`'s flags, and how many sinks each changed day is queued for."""
        hot = self._hot(conn)
        codec = hot.codec
        now = codec.moment(self._now())
        # The position row before any day's row, as sink registration and retention take it: a
        # writer that locked a day's row and then waited for the position row could deadlock
        # with the writer holding it, which inserts that day (a backfill next to the daemon, a
        # tenant handed over mid-write).
        self._hold_positions(conn)
        # Sorted keys: one lock order for the days' rows, whoever else locks them.
        keys = sorted({(td.tenant, td.day) for td, _ in items})
        before: dict[Key, tuple[str | None, bool]] = {
            key: (row[2], bool(row[3]))
            for key, row in rows_by_key(hot.existing.rows(conn, keys), codec).items()
        }
        latest: dict[Key, str | None] = {key: version for key, (version, _) in before.items()}
        last: dict[Key, tuple[TenantDay, str]] = {}
        flags: list[bool] = []
        for td, payload in items:
            key = (td.tenant, td.day)
            version = version_of_day(td)
            flags.append(latest.get(key) != version)
            latest[key] = version
            last[key] = (td, payload)
        # A day whose payload retention dropped comes back with its re-fetch: queued like a new
        # version, so a sink routed to it since then gets it (one that has it is skipped).
        changed: list[Key] = []
        unchanged: list[Key] = []
        for key in keys:  # (version, payload dropped) as stored: the same, with a payload?
            same = before.get(key, (None, True)) == (latest[key], False)
            (unchanged if same else changed).append(key)
        readers: dict[Key, int] = {}
        if changed:
            first_seq, sinks_generation = self._allocate_seq(conn, len(changed))
            values: list[Any] = []
            queued: list[tuple[Key, int, str]] = []
            for seq, key in enumerate(changed, first_seq):
                td, payload = last[key]
                version = version_of_day(td)
                # TENANT_DAY_COLUMNS: tenant, day, status, final, attempts, reason, fetched_at,
                # changed_at, content_hash, version, seq, payload, updated_at
                values += (
                    td.tenant,
                    codec.day(td.day),
                    "final" if td.final else "fetched",
                    codec.flag(td.final),
                    0,
                    None,
                    codec.moment(td.fetched_at),
                    codec.moment(td.fetched_at),  # changed_at: this version's fetch
                    td.content_hash,
                    version,
                    seq,
                    payload,
                    now,
                )
                queued.append((key, seq, version))
            hot.store_days.execute(conn, values)
            readers = self._queue(conn, queued, now, sinks_generation)
        if unchanged:
            params = []
            for key in unchanged:
                td, _ = last[key]
                params.append(
                    (
                        "final" if td.final else "fetched",
                        codec.flag(td.final),
                        codec.moment(td.fetched_at),
                        now,
                        key[0],
                        codec.day(key[1]),
                    )
                )
            hot.refresh.executemany(conn, params)
        return flags, readers

    def _allocate_seq(self, conn: Connection, count: int) -> tuple[int, int | None]:
        """Reserve ``count`` queue positions (the row lock orders writers): the first, and the
        sink table's change count (:data:`SINKS_GENERATION_KEY`; None if the row is missing)."""
        hot = self._hot(conn)
        hot.reserve_seq.execute(conn, (count, SEQ_KEY))
        top, generation = hot.top_seq.execute(conn, (SEQ_KEY, SINKS_GENERATION_KEY)).one()
        return int(top) - count + 1, None if generation is None else int(generation)

    def _queue(
        self,
        conn: Connection,
        queued: Sequence[tuple[Key, int, str]],
        now: Any,
        sinks_generation: int | None,
    ) -> dict[Key, int]:
        """Queue new versions (key, queue position, version) for every sink routed to their
        tenant, unless it has them. Returns, per tenant-day, how many sinks it was queued for."""
        hot = self._hot(conn)
        codec = hot.codec
        no = codec.flag(False)
        values: list[Any] = []
        readers: dict[Key, int] = {}
        for name, routed in self._registered_as_of(conn, sinks_generation).items():
            for key, seq, version in queued:
                if routed is None or key[0] in routed:
                    readers[key] = readers.get(key, 0) + 1
                    # QUEUE_COLUMNS: sink, tenant, day, attempts, dead_letter, queued_seq,
                    # queued_version, queued_at, updated_at
                    values += (name, key[0], codec.day(key[1]), 0, no, seq, version, now, now)
        if values:
            hot.queue.execute(conn, values)
        return readers

    async def record_failed(self, tenant: str, day: dt.date, reason: str) -> None:
        """Record a failed fetch; an earlier good payload is kept, so the day stays deliverable."""
        now = self._now()
        row = {
            "tenant": tenant,
            "day": day,
            "status": "failed",
            "final": False,
            "attempts": 1,
            "reason": short(reason),
            "updated_at": now,
        }
        set_ = {
            "status": "failed",
            "reason": row["reason"],
            "attempts": tenant_day.c.attempts + 1,
            "updated_at": now,
        }
        await self._write(
            lambda conn: conn.execute(upsert(conn, tenant_day, ["tenant", "day"], set_), [row])
        )

    async def days_state(
        self, tenant: str, since: dt.date | None = None
    ) -> dict[dt.date, DayState]:
        """What is stored for each day of one tenant (from ``since`` on, when given)."""

        def work(conn: Connection) -> dict[dt.date, DayState]:
            hot = self._hot(conn)
            if since is None:
                result = hot.days_state.execute(conn, (tenant,))
            else:
                result = hot.days_state_since.execute(conn, (tenant, hot.codec.day(since)))
            read_day = hot.codec.read_day
            return {
                read_day(day): DayState(_day_status(status), bool(final), attempts, digest)
                for day, status, final, attempts, digest in result
            }

        return await self._read(work, one_statement=True)

    async def prune_payloads(self, older_than_days: int, today: dt.date | None = None) -> int:
        """Retention: drop the raw payload of final days older than ``older_than_days`` days.

        Only once every registered sink routed to the tenant has that exact version, and nothing
        is queued for it; dead-lettered days keep their payload. Figures, hashes and statuses
        stay, so the planner still knows the day is complete. Returns the number of payloads
        dropped. The trade-off: ``replay`` (and a sink added later) cannot go back further.
        """
        if older_than_days < 0:
            raise ValueError("older_than_days must not be negative")
        cutoff = (today or self._now().date()) - dt.timedelta(days=older_than_days)
        now = self._now()

        def work(conn: Connection) -> int:
            # Ordered with sink registration: a sink registered meanwhile either queued its
            # history before this looks (and keeps those payloads) or gets only what is left.
            self._hold_positions(conn)
            sinks = self._registered(conn)
            if not sinks:
                return 0  # nothing has received anything yet: keep every payload
            conditions: list[ColumnElement[bool]] = [
                tenant_day.c.final.is_(True),
                tenant_day.c.payload.is_not(None),
                tenant_day.c.day < cutoff,
                not_(
                    exists().where(
                        delivery.c.tenant == tenant_day.c.tenant,
                        delivery.c.day == tenant_day.c.day,
                        delivery.c.queued_seq.is_not(None),
                    )
                ),
            ]
            for name, routed in sinks.items():
                has_it = exists().where(
                    delivery.c.sink == name,
                    delivery.c.tenant == tenant_day.c.tenant,
                    delivery.c.day == tenant_day.c.day,
                    delivery.c.delivered_version == tenant_day.c.version,
                )
                if routed is None:
                    conditions.append(has_it)
                else:
                    conditions.append(or_(tenant_day.c.tenant.not_in(sorted(routed)), has_it))
            # Rows another transaction holds (PostgreSQL) are left for the next pass instead of
            # waited for, since this holds the position row already. SQLite has no row locks and
            # leaves out the FOR UPDATE.
            free = (
                select(tenant_day.c.tenant, tenant_day.c.day)
                .where(*conditions)
                .with_for_update(skip_locked=True)
            )
            prune = (
                update(tenant_day)
                .where(tuple_(tenant_day.c.tenant, tenant_day.c.day).in_(free))
                .values(payload=None, updated_at=now)
            )
            return int(conn.execute(prune).rowcount)

        return await self._write(work)


def _day_status(value: str) -> DayStatus:
    # `quarantined` is checked here rather than in the shared `as_status`, which maps any
    # status it does not know to `failed` (a day that is planned again, the safe reading).
    return "quarantined" if value == "quarantined" else as_status(value)
