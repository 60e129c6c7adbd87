"""Tenant outcomes (last success, last error, auth pause, next run) and the ``status`` snapshot."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    func,
    literal,
    select,
)

from collector.store.base import StoreBase, short
from collector.store.schema import (
    IS_DEAD,
    QuarantinedDay,
    SinkState,
    StatusSnapshot,
    TenantState,
    TenantStatus,
    delivery,
    quarantine,
    sink_table,
    tenant_day,
    tenant_status,
    tenants_in,
)


class StatusStore(StoreBase):
    """Per-tenant outcomes and the snapshot behind ``status`` and ``/status``."""

    async def _set_tenant(self, tenant: str, values: Mapping[str, Any]) -> None:
        """Upsert the tenant's row: ``values`` (text, or datetimes), and ``updated_at``."""
        now = self._now()
        columns = (*values, "updated_at")

        def work(conn: Connection) -> None:
            hot = self._hot(conn)
            moment = hot.codec.moment
            row = [v if isinstance(v, str) else moment(v) for v in values.values()]
            hot.tenant_status(columns).execute(conn, (tenant, *row, moment(now)))

        await self._write(work)

    async def set_tenant_success(self, tenant: str, at: dt.datetime | None = None) -> None:
        """The tenant's cycle succeeded (this also ends an authentication pause)."""
        await self._set_tenant(
            tenant, {"last_success_at": at or self._now(), "auth_failed_until": None}
        )

    async def set_tenant_error(
        self,
        tenant: str,
        error: str,
        at: dt.datetime | None = None,
        auth_failed_until: dt.datetime | None = None,
    ) -> None:
        """The tenant's cycle failed with ``error`` (secret-free); optionally pause it for auth."""
        await self._set_tenant(
            tenant,
            {
                "last_error": short(error),
                "last_error_at": at or self._now(),
                "auth_failed_until": auth_failed_until,
            },
        )

    async def set_tenant_next_run(self, tenant: str, at: dt.datetime | None) -> None:
        """When the scheduler runs the tenant next (None: not scheduled)."""
        await self._set_tenant(tenant, {"next_run_at": at})

    @staticmethod
    def _tenant_statuses(conn: Connection, query: Any) -> dict[str, TenantStatus]:
        return {
            row.tenant: TenantStatus(
                tenant=row.tenant,
                last_success_at=row.last_success_at,
                last_error=row.last_error,
                last_error_at=row.last_error_at,
                auth_failed_until=row.auth_failed_until,
                next_run_at=row.next_run_at,
            )
            for row in conn.execute(query)
        }

    async def status_snapshot(
        self, tenants: Collection[str] | None = None, *, history_start: dt.date | None = None
    ) -> StatusSnapshot:
        """Per tenant (days complete, failed, quarantined, aged out, last success and error, next
        run) and per registered sink (backlog, dead letters, lag = age of the oldest queued
        tenant-day), read in one go.

        ``tenants`` limits (and completes: a configured tenant with no data yet is listed) the
        tenant part. ``history_start`` is the oldest day the API still serves: days between a
        tenant's first tracked day and it that hold no figures have aged out uncollected. Costs
        one scan of ``tenant_day``; fine for a scrape every few seconds.
        """
        return await self._read(lambda conn: self._status_snapshot(conn, tenants, history_start))

    def _status_snapshot(
        self, conn: Connection, tenants: Collection[str] | None, history_start: dt.date | None
    ) -> StatusSnapshot:
        now = self._now()
        has_figures = tenant_day.c.content_hash.is_not(None)
        before_window = (
            case((and_(tenant_day.c.day < history_start, has_figures), 1), else_=0)
            if history_start is not None
            else literal(0)
        )
        counts = {
            row.tenant: row
            for row in conn.execute(
                select(
                    tenant_day.c.tenant,
                    func.count(tenant_day.c.content_hash).label("complete"),
                    func.sum(case((tenant_day.c.final.is_(True), 1), else_=0)).label("final"),
                    func.sum(case((tenant_day.c.status == "failed", 1), else_=0)).label("failed"),
                    func.sum(case((tenant_day.c.status == "quarantined", 1), else_=0)).label(
                        "quarantined"
                    ),
                    func.sum(before_window).label("kept_before_window"),
                    func.min(tenant_day.c.day).label("first_day"),
                    func.max(tenant_day.c.day).label("last_day"),
                    func.max(tenant_day.c.fetched_at).label("last_fetched_at"),
                )
                .where(tenants_in(tenant_day.c.tenant, tenants))
                .group_by(tenant_day.c.tenant)
            )
        }
        statuses = self._tenant_statuses(
            conn, select(tenant_status).where(tenants_in(tenant_status.c.tenant, tenants))
        )
        names = sorted(set(tenants) if tenants is not None else set(counts) | set(statuses))
        quarantined = self._quarantined_days(conn, tenants)
        tenant_states = []
        for name in names:
            count = counts.get(name)
            status = statuses.get(name) or TenantStatus(tenant=name)
            aged_out: list[str] = []
            lost = 0
            if count is not None and history_start is not None and count.first_day < history_start:
                # Tracked days before the window, minus those with figures: the rest never got
                # collected. The ranges are read only for tenants that have such days.
                lost = (history_start - count.first_day).days - int(count.kept_before_window or 0)
                if lost > 0:
                    aged_out = self._aged_out(conn, name, count.first_day, history_start)
            tenant_states.append(
                TenantState(
                    tenant=name,
                    days_complete=int(count.complete) if count else 0,
                    days_final=int(count.final or 0) if count else 0,
                    days_failed=int(count.failed or 0) if count else 0,
                    days_quarantined=int(count.quarantined or 0) if count else 0,
                    first_day=count.first_day if count else None,
                    last_day=count.last_day if count else None,
                    last_fetched_at=count.last_fetched_at if count else None,
                    last_success_at=status.last_success_at,
                    last_error=status.last_error,
                    last_error_at=status.last_error_at,
                    auth_failed_until=status.auth_failed_until,
                    next_run_at=status.next_run_at,
                    quarantined=quarantined.get(name, []),
                    days_aged_out=lost,
                    aged_out=aged_out,
                )
            )
        dead: dict[str, int] = {
            name: int(count)
            for name, count in conn.execute(
                select(delivery.c.sink, func.count()).where(IS_DEAD).group_by(delivery.c.sink)
            )
        }
        sink_states = []
        for row in conn.execute(select(sink_table).order_by(sink_table.c.name)):
            # Per sink, so each count is an index range over that sink's queue only.
            backlog, oldest = conn.execute(
                select(func.count(), func.min(delivery.c.queued_at)).where(
                    delivery.c.sink == row.name, delivery.c.queued_seq.is_not(None)
                )
            ).one()
            sink_states.append(
                SinkState(
                    sink=row.name,
                    routes=None if row.routes is None else json.loads(row.routes),
                    backlog=int(backlog),
                    dead_letters=dead.get(row.name, 0),
                    lag_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
                    oldest_queued_at=oldest,
                    last_success_at=row.last_success_at,
                    last_error=row.last_error,
                    last_error_at=row.last_error_at,
                )
            )
        return StatusSnapshot(generated_at=now, tenants=tenant_states, sinks=sink_states)

    @staticmethod
    def _quarantined_days(
        conn: Connection, tenants: Collection[str] | None
    ) -> dict[str, list[QuarantinedDay]]:
        """Each tenant's quarantined days with their reasons, oldest first."""
        query = (
            select(
                quarantine.c.tenant, quarantine.c.day, quarantine.c.reason, quarantine.c.received_at
            )
            .join(
                tenant_day,
                and_(
                    tenant_day.c.tenant == quarantine.c.tenant, tenant_day.c.day == quarantine.c.day
                ),
            )
            .where(tenant_day.c.status == "quarantined", tenants_in(quarantine.c.tenant, tenants))
            .order_by(quarantine.c.tenant, quarantine.c.day)
        )
        found: dict[str, list[QuarantinedDay]] = {}
        for tenant, day, reason, received_at in conn.execute(query):
            found.setdefault(tenant, []).append(QuarantinedDay(day, reason, received_at))
        return found

    @staticmethod
    def _aged_out(
        conn: Connection, tenant: str, first: dt.date, history_start: dt.date
    ) -> list[str]:
        """The days from ``first`` up to the API's window without figures, as ranges."""
        kept = {
            day
            for (day,) in conn.execute(
                select(tenant_day.c.day).where(
                    tenant_day.c.tenant == tenant,
                    tenant_day.c.day < history_start,
                    tenant_day.c.content_hash.is_not(None),
                )
            )
        }
        ranges: list[str] = []
        start: dt.date | None = None
        day = first
        while day <= history_start:
            missing = day < history_start and day not in kept
            if missing and start is None:
                start = day
            elif not missing and start is not None:
                end = day - dt.timedelta(days=1)
                ranges.append(start.isoformat() if start == end else f"{start}..{end}")
                start = None
            day += dt.timedelta(days=1)
        return ranges
