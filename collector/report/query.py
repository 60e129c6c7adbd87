"""The report's queries over the four usage tables of docs/data-model.md, on any SQL database.

The tables are the SQLModel table models' (:mod:`collector.tables`, the one declaration of the
data model), queried with SQLAlchemy Core; the queries name only the columns they need, so the
core reads any SQL sink (SQLite, PostgreSQL, ...), a database of an earlier release, and the CSV
sink's files (loaded into SQLite, :mod:`collector.report.sources`) without importing a plugin.
Aggregates that grow with users (distinct users, seat hygiene) run in the database; what comes
back is one row per tenant-day, per tenant-IDE or per flagged user.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping

import sqlalchemy as sa

from collector.report.model import (
    DayFigures,
    Portfolio,
    SeatRow,
    SeatStatus,
    TenantUsage,
    UsageReport,
    Window,
)
from collector.tables import (
    USAGE_COLUMNS,
    UsageDaily,
    UsageDailyIde,
    UsageDailyLanguage,
    UsageUserDaily,
)

DAILY: sa.Table = UsageDaily.__table__  # type: ignore[attr-defined]  # set on table=True models
IDE: sa.Table = UsageDailyIde.__table__  # type: ignore[attr-defined]
LANGUAGE: sa.Table = UsageDailyLanguage.__table__  # type: ignore[attr-defined]
USER: sa.Table = UsageUserDaily.__table__  # type: ignore[attr-defined]
TABLE_NAMES = tuple(USAGE_COLUMNS)


def build_report(
    conn: sa.Connection,
    window: Window,
    *,
    names: Mapping[str, str] | None = None,
    stale_days: int = 14,
    source: str = "",
    pii: str | None = None,
) -> UsageReport:
    """Read the window (and, for seat hygiene, every earlier user row) into a report.

    ``names`` maps tenant ids to display names; an id without one is shown as is.
    """
    names = names or {}
    daily = _daily(conn, window)
    distinct = _distinct_users(conn, window)
    ide_mix = _mix(conn, IDE, IDE.c.ide_name, window)
    language_mix = _mix(conn, LANGUAGE, LANGUAGE.c.language_name, window)
    has_user_rows = conn.execute(sa.select(USER.c.tenant).limit(1)).first() is not None
    seats = _seats(conn, window, stale_days, names) if has_user_rows else []
    flagged: dict[tuple[str, str], int] = defaultdict(int)
    for seat in seats:
        flagged[seat.tenant_id, seat.status] += 1

    tenants = []
    for tenant_id in sorted(daily, key=lambda t: (names.get(t, t).casefold(), t)):
        days = daily[tenant_id]
        active = [d.active_users for d in days]
        had_users = tenant_id in distinct or not any(active)
        tenants.append(
            TenantUsage(
                tenant=names.get(tenant_id, tenant_id),
                tenant_id=tenant_id,
                days=len(days),
                messages=sum(d.messages for d in days),
                distinct_users=distinct.get(tenant_id, 0) if had_users else None,
                avg_daily_active=round(sum(active) / len(active), 1) if active else 0.0,
                peak_daily_active=max(active, default=0),
                top_ide=_top(ide_mix.get(tenant_id)),
                top_language=_top(language_mix.get(tenant_id)),
                stale_users=flagged[tenant_id, "stale"] if has_user_rows else None,
                quiet_users=flagged[tenant_id, "quiet"] if has_user_rows else None,
                daily=days,
            )
        )
    return UsageReport(
        window=window,
        stale_days=stale_days,
        source=source,
        pii=pii,
        tenants=tenants,
        portfolio=_portfolio(tenants),
        ides=_portfolio_mix(ide_mix),
        languages=_portfolio_mix(language_mix),
        seats=seats,
        has_user_rows=has_user_rows,
    )


def _between(column: sa.ColumnElement[dt.date], window: Window) -> sa.ColumnElement[bool]:
    return column.between(window.since, window.until)


def _daily(conn: sa.Connection, window: Window) -> dict[str, list[DayFigures]]:
    query = (
        sa.select(DAILY.c.tenant, DAILY.c.day, DAILY.c.active_users, DAILY.c.messages)
        .where(_between(DAILY.c.day, window))
        .order_by(DAILY.c.tenant, DAILY.c.day)
    )
    daily: dict[str, list[DayFigures]] = defaultdict(list)
    for tenant, day, active, messages in conn.execute(query):
        daily[tenant].append(DayFigures(day, int(active), int(messages)))
    return daily


def _distinct_users(conn: sa.Connection, window: Window) -> dict[str, int]:
    query = (
        sa.select(USER.c.tenant, sa.func.count(sa.distinct(USER.c.user)))
        .where(_between(USER.c.day, window))
        .group_by(USER.c.tenant)
    )
    return {tenant: int(n) for tenant, n in conn.execute(query)}


def _mix(
    conn: sa.Connection, table: sa.Table, name: sa.ColumnElement[str], window: Window
) -> dict[str, dict[str, int]]:
    """tenant -> name -> engaged user-days in the window."""
    query = (
        sa.select(table.c.tenant, name, sa.func.sum(table.c.engaged_users))
        .where(_between(table.c.day, window))
        .group_by(table.c.tenant, name)
    )
    mix: dict[str, dict[str, int]] = defaultdict(dict)
    for tenant, key, user_days in conn.execute(query):
        mix[tenant][key] = int(user_days or 0)
    return mix


def _top(counts: Mapping[str, int] | None) -> str | None:
    """The largest entry; ties go to the name that sorts first, so the answer is stable."""
    if not counts:
        return None
    return min(counts.items(), key=lambda item: (-item[1], item[0]))[0]


def _portfolio_mix(mix: Mapping[str, Mapping[str, int]]) -> list[tuple[str, int]]:
    total: dict[str, int] = defaultdict(int)
    for counts in mix.values():
        for key, user_days in counts.items():
            total[key] += user_days
    return sorted(total.items(), key=lambda item: (-item[1], item[0]))


def _portfolio(tenants: list[TenantUsage]) -> Portfolio:
    by_day: dict[dt.date, list[int]] = defaultdict(lambda: [0, 0])
    for tenant in tenants:
        for figures in tenant.daily:
            totals = by_day[figures.day]
            totals[0] += figures.active_users
            totals[1] += figures.messages
    daily = [
        DayFigures(day, active, messages) for day, (active, messages) in sorted(by_day.items())
    ]
    known = [t.distinct_users for t in tenants if t.distinct_users is not None]
    active = [d.active_users for d in daily]
    return Portfolio(
        tenants=len(tenants),
        messages=sum(t.messages for t in tenants),
        distinct_users=sum(known) if known else None,
        avg_daily_active=round(sum(active) / len(active), 1) if active else 0.0,
        peak_daily_active=max(active, default=0),
        daily=daily,
    )


def _seats(
    conn: sa.Connection, window: Window, stale_days: int, names: Mapping[str, str]
) -> list[SeatRow]:
    """Users last active more than ``stale_days`` days before the window's end, and users seen in
    the window but not in its last week; every user row up to the window's end counts.

    A user's last activity is the later of their last row's day and the API's ``last_active``.
    Only users without a row in the last ``min(stale_days, 6)`` days can be flagged, which the
    database filters before anything comes back.
    """
    in_window = USER.c.day >= window.since
    last_day = sa.func.max(USER.c.day)
    query = (
        sa.select(
            USER.c.tenant,
            USER.c.user,
            last_day,
            sa.func.max(USER.c.last_active),
            sa.func.coalesce(sa.func.sum(sa.case((in_window, USER.c.messages), else_=0)), 0),
            sa.func.max(sa.case((in_window, USER.c.day), else_=None)),
        )
        .where(USER.c.day <= window.until)
        .group_by(USER.c.tenant, USER.c.user)
        .having(last_day < window.until - dt.timedelta(days=min(stale_days, 6)))
    )
    seats = []
    for tenant, user, last_row, last_active, messages, last_in_window in conn.execute(query):
        seen = max(d for d in (last_row, last_active) if d is not None)
        idle = max(0, (window.until - seen).days)
        status: SeatStatus
        if idle > stale_days:
            status = "stale"
        elif last_in_window is not None and seen < window.last_week_start:
            status = "quiet"
        else:
            continue
        seats.append(
            SeatRow(
                tenant=names.get(tenant, tenant),
                tenant_id=tenant,
                user=user,
                last_active=seen,
                idle_days=idle,
                window_messages=int(messages),
                status=status,
            )
        )
    seats.sort(key=lambda s: (s.tenant.casefold(), s.tenant_id, -s.idle_days, s.user))
    return seats
