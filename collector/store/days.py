"""Fetched and failed tenant-days in the state store, and retention of their raw payloads."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    bindparam,
    exists,
    func,
    not_,
    or_,
    select,
    update,
)

from collector.models import TenantDay
from collector.planner import DayState
from collector.store.base import Key, as_status, chunks, dump_json, keys_in, short
from collector.store.outbox import OutboxStore
from collector.store.schema import (
    UtcDateTime,
    delivery,
    queue_statement,
    store_days_statement,
    store_meta,
    tenant_day,
    upsert,
    version_of_day,
)

_REFRESH_UNCHANGED = (
    update(tenant_day)
    .where(tenant_day.c.tenant == bindparam("k_tenant"), tenant_day.c.day == bindparam("k_day"))
    .values(
        status=bindparam("status"),
        final=bindparam("final"),
        attempts=0,
        reason=None,
        fetched_at=bindparam("fetched_at", type_=UtcDateTime()),
        updated_at=bindparam("updated_at", type_=UtcDateTime()),
        # A payload pruned by retention comes back when the day is fetched again.
        payload=func.coalesce(tenant_day.c.payload, bindparam("payload")),
    )
)


_RESERVE_SEQ = (
    update(store_meta)
    .where(store_meta.c.key == "seq")
    .values(value=store_meta.c.value + bindparam("count"))
)
_TOP_SEQ = select(store_meta.c.value).where(store_meta.c.key == "seq")


class DaysStore(OutboxStore):
    """Fetched and failed tenant-days, and retention of their payloads."""

    async def record_fetched(
        self, items: Sequence[tuple[TenantDay, Mapping[str, Any] | str]]
    ) -> list[bool]:
        """Store fetched tenant-days with their raw ``data`` objects, in one transaction.

        Returns, per item, True when its version changed (a new day, other figures, or the day
        became final): exactly the items now queued for the sinks. The transaction is committed
        before this returns, so the sinks may be told right away.
        """
        if not items:
            return []
        flags, readers = await self._write(lambda conn: self._record_fetched(conn, items))
        # The sinks are about to read exactly these days: hand them over instead of having the
        # first sink parse every payload again (the largest CPU cost of delivery otherwise).
        for (td, _), changed in zip(items, flags, strict=True):
            if changed:
                self.remember(td, readers.get((td.tenant, td.day), 0))
        return flags

    def _record_fetched(
        self, conn: Connection, items: Sequence[tuple[TenantDay, Mapping[str, Any] | str]]
    ) -> tuple[list[bool], dict[Key, int]]:
        """:meth:`record_fetched`'s flags, and how many sinks each changed day is queued for."""
        now = self._now()
        # One global lock order (sorted keys): two PostgreSQL writers cannot deadlock.
        keys = sorted({(td.tenant, td.day) for td, _ in items})
        before: dict[Key, tuple[str | None, bool]] = {}
        for chunk in chunks(keys):
            query = (
                select(
                    tenant_day.c.tenant,
                    tenant_day.c.day,
                    tenant_day.c.version,
                    tenant_day.c.payload.is_(None),
                )
                .where(keys_in(conn, tenant_day.c.tenant, tenant_day.c.day, chunk))
                .with_for_update()
            )
            for tenant, day, version, no_payload in conn.execute(query):
                before[(tenant, day)] = (version, bool(no_payload))
        before = {key: before[key] for key in keys if key in before}
        latest: dict[Key, str | None] = {key: version for key, (version, _) in before.items()}
        last: dict[Key, tuple[TenantDay, Mapping[str, Any] | str]] = {}
        flags: list[bool] = []
        for td, data in items:
            key = (td.tenant, td.day)
            version = version_of_day(td)
            flags.append(latest.get(key) != version)
            latest[key] = version
            last[key] = (td, data)
        changed = [key for key in keys if before.get(key, (None, True))[0] != latest[key]]
        unchanged = [key for key in keys if before.get(key, (None, True))[0] == latest[key]]
        readers: dict[Key, int] = {}
        if changed:
            first_seq = self._allocate_seq(conn, len(changed))
            rows = [
                self._day_row(*last[key], now=now, seq=first_seq + i)
                for i, key in enumerate(changed)
            ]
            conn.execute(self._statement("store_days", conn, store_days_statement), rows)
            readers = self._queue(conn, rows, now)
        if unchanged:
            params = []
            for key in unchanged:
                td, data = last[key]
                params.append(
                    {
                        "k_tenant": key[0],
                        "k_day": key[1],
                        "status": "final" if td.final else "fetched",
                        "final": td.final,
                        "fetched_at": td.fetched_at,
                        "updated_at": now,
                        "payload": dump_json(data) if before[key][1] else None,
                    }
                )
            conn.execute(_REFRESH_UNCHANGED, params)
        return flags, readers

    @staticmethod
    def _day_row(
        td: TenantDay, data: Mapping[str, Any] | str, *, now: dt.datetime, seq: int
    ) -> dict[str, Any]:
        return {
            "tenant": td.tenant,
            "day": td.day,
            "status": "final" if td.final else "fetched",
            "final": td.final,
            "attempts": 0,
            "reason": None,
            "fetched_at": td.fetched_at,
            "changed_at": now,
            "content_hash": td.content_hash,
            "version": version_of_day(td),
            "seq": seq,
            "payload": dump_json(data),
            "updated_at": now,
        }

    @staticmethod
    def _allocate_seq(conn: Connection, count: int) -> int:
        """Reserve ``count`` queue positions and return the first; the row lock orders writers."""
        conn.execute(_RESERVE_SEQ, {"count": count})
        top = conn.execute(_TOP_SEQ).scalar_one()
        return int(top) - count + 1

    def _queue(
        self, conn: Connection, rows: Sequence[Mapping[str, Any]], now: dt.datetime
    ) -> dict[Key, int]:
        """Queue new versions for every sink routed to their tenant (unless it has them).

        Returns, per tenant-day, how many sinks it was queued for."""
        entries = []
        readers: dict[Key, int] = {}
        for name, routed in self._registered(conn).items():
            for row in rows:
                if routed is None or row["tenant"] in routed:
                    key = (row["tenant"], row["day"])
                    readers[key] = readers.get(key, 0) + 1
                    entries.append(
                        {
                            "sink": name,
                            "tenant": row["tenant"],
                            "day": row["day"],
                            "queued_seq": row["seq"],
                            "queued_version": row["version"],
                            "queued_at": now,
                            "attempts": 0,
                            "dead_letter": False,
                            "updated_at": now,
                        }
                    )
        if entries:
            conn.execute(self._statement("queue", conn, queue_statement), entries)
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
        query = select(
            tenant_day.c.day,
            tenant_day.c.status,
            tenant_day.c.final,
            tenant_day.c.attempts,
            tenant_day.c.content_hash,
        ).where(tenant_day.c.tenant == tenant)
        if since is not None:
            query = query.where(tenant_day.c.day >= since)

        def work(conn: Connection) -> dict[dt.date, DayState]:
            return {
                row.day: DayState(
                    as_status(row.status), bool(row.final), row.attempts, row.content_hash
                )
                for row in conn.execute(query)
            }

        return await self._read(work)

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
            result = conn.execute(
                update(tenant_day).where(*conditions).values(payload=None, updated_at=now)
            )
            return int(result.rowcount)

        return await self._write(work)
