"""Quarantined days: 200 bodies that failed validation, kept so a later parser can read them.

Raw first: the API forgets a day after ``api.history_days``, so a body our parser rejects today is
stored (zlib-compressed, in the ``quarantine`` table) in the same transaction that marks the day
``quarantined``, before the failure is reported anywhere. The planner asks for the day again next
cycle while the API still serves it; ``reprocess`` re-derives it from the stored body with the
current parser, without calling the API, which is the only way back once the day aged out.

A day that had good figures keeps them (and stays deliverable) when a later answer is quarantined,
exactly like a failed re-fetch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Collection, Sequence

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    and_,
    delete,
    exists,
    or_,
    select,
    update,
)

from collector.models import TenantDay
from collector.store.base import short
from collector.store.days import DaysStore
from collector.store.schema import StoredBody, quarantine, tenant_day, tenants_in, upsert

QUARANTINED = "quarantined"


class QuarantineStore(DaysStore):
    """Quarantined bodies, and the stored bodies ``reprocess`` re-derives days from."""

    async def record_quarantined(self, tenant: str, day: dt.date, reason: str, body: bytes) -> None:
        """Store a rejected 200 body and mark its day ``quarantined``, in one transaction.

        ``reason`` names the problem and its field path, never a value from the body. An earlier
        good payload of the day is kept.
        """
        now = self._now()
        reason = short(reason)
        if self.body_policy is not None:  # state.raw_pii: no email kept, even unparsed
            body = self.body_policy(body)
        digest = hashlib.sha256(body).hexdigest()

        def work(conn: Connection) -> None:
            row = {
                "tenant": tenant,
                "day": day,
                "status": QUARANTINED,
                "final": False,
                "attempts": 1,
                "reason": reason,
                "updated_at": now,
            }
            set_ = {
                "status": QUARANTINED,
                "reason": reason,
                "attempts": tenant_day.c.attempts + 1,
                "updated_at": now,
            }
            conn.execute(upsert(conn, tenant_day, ["tenant", "day"], set_), [row])
            kept = {
                "tenant": tenant,
                "day": day,
                "received_at": now,
                "reason": reason,
                "body": body,  # compressed by the column type (schema.ZlibBytes)
                "body_hash": digest,
            }
            columns = ("received_at", "reason", "body", "body_hash")
            conn.execute(upsert(conn, quarantine, ["tenant", "day"], columns=columns), [kept])

        await self._write(work)

    async def stored_bodies(
        self,
        tenant: str,
        since: dt.date | None = None,
        until: dt.date | None = None,
        *,
        after: dt.date | None = None,
        limit: int = 64,
    ) -> list[StoredBody]:
        """One tenant's stored bodies in ``[since, until]``, oldest day first, a page at a time
        (``after``: the last day of the previous page): the kept body of each quarantined day,
        and the payload of every other day that still has one. Pages, because a large
        organization's bodies are megabytes each."""
        q_body = quarantine.c.body
        query = (
            select(
                tenant_day.c.day,
                tenant_day.c.status,
                tenant_day.c.payload,
                tenant_day.c.final,
                tenant_day.c.fetched_at,
                q_body,
                quarantine.c.received_at,
            )
            .select_from(
                tenant_day.outerjoin(
                    quarantine,
                    and_(
                        quarantine.c.tenant == tenant_day.c.tenant,
                        quarantine.c.day == tenant_day.c.day,
                    ),
                )
            )
            .where(
                *_in_range(tenant_day, [tenant], since, until),
                or_(
                    and_(tenant_day.c.status == QUARANTINED, q_body.is_not(None)),
                    tenant_day.c.payload.is_not(None),
                ),
            )
            .order_by(tenant_day.c.day)
            .limit(limit)
        )
        if after is not None:
            query = query.where(tenant_day.c.day > after)

        def work(conn: Connection) -> list[StoredBody]:
            found: list[StoredBody] = []
            for day, status, payload, final, fetched_at, body, received_at in conn.execute(query):
                if status == QUARANTINED and body is not None:
                    found.append(StoredBody(tenant, day, True, body, False, received_at))
                elif payload is not None:
                    found.append(
                        StoredBody(tenant, day, False, payload.encode(), bool(final), fetched_at)
                    )
            return found

        return await self._read(work)

    async def still_quarantined(self, tenant: str, day: dt.date, reason: str) -> None:
        """The current parser rejects the quarantined body too: record its (new) reason."""
        reason = short(reason)

        def work(conn: Connection) -> None:
            key = and_(tenant_day.c.tenant == tenant, tenant_day.c.day == day)
            conn.execute(update(tenant_day).where(key).values(reason=reason))
            where = and_(quarantine.c.tenant == tenant, quarantine.c.day == day)
            conn.execute(update(quarantine).where(where).values(reason=reason))

        await self._write(work)

    async def recover(self, items: Sequence[tuple[TenantDay, str]]) -> list[bool]:
        """Store days re-derived from their quarantined bodies (queued for the sinks like any
        fetched day) and drop those bodies; returns, per item, whether its version changed."""
        changed = await self.record_fetched(items)
        await self.drop_recovered_quarantine()
        return changed

    async def drop_recovered_quarantine(self) -> int:
        """Drop the kept bodies of days that are no longer quarantined (fetched again since)."""

        def work(conn: Connection) -> int:
            still = exists().where(
                tenant_day.c.tenant == quarantine.c.tenant,
                tenant_day.c.day == quarantine.c.day,
                tenant_day.c.status == QUARANTINED,
            )
            return int(conn.execute(delete(quarantine).where(~still)).rowcount)

        return await self._write(work)


def _in_range(
    table: Table,
    tenants: Collection[str] | None,
    since: dt.date | None,
    until: dt.date | None,
) -> list[ColumnElement[bool]]:
    columns = table.c
    conditions: list[ColumnElement[bool]] = [tenants_in(columns.tenant, tenants)]
    if since is not None:
        conditions.append(columns.day >= since)
    if until is not None:
        conditions.append(columns.day <= until)
    return conditions
