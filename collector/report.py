"""Tables for people: the per-tenant cycle summary and the cross-tenant usage report.

The usage report reads a SQL sink's database (SQLite or PostgreSQL) and computes distinct users
over the window from the per-user-day rows, which the API's fixed periods cannot give.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from collector.pipeline import CycleResult


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (no dependency, readable in any terminal or log)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cycle_summary(result: CycleResult) -> str:
    """The per-tenant summary printed at the end of ``run --once``, ``backfill`` and ``demo``."""
    rows = []
    for tenant_id in sorted(result.tenants):
        r = result.tenants[tenant_id]
        state = "ok" if r.ok else (r.skipped or r.error or f"{r.failed} day(s) failed")
        rows.append([tenant_id, r.planned, r.fetched, r.changed, r.failed, state])
    table = render_table(["tenant", "planned", "fetched", "changed", "failed", "status"], rows)
    good = sum(1 for r in result.tenants.values() if r.ok)
    return (
        f"{table}\n\n{good}/{len(result.tenants)} tenants ok, {result.fetched} tenant-days fetched "
        f"in {result.seconds:.1f}s"
    )


@dataclass
class UsageRow:
    tenant: str
    days: int
    messages: int
    distinct_users: int
    avg_daily_active: float
    peak_daily_active: int
    top_ide: str | None
    top_language: str | None


def _top(
    conn: sa.Connection, table: str, column: str, since: dt.date, until: dt.date
) -> dict[str, str]:
    query = sa.text(
        f"SELECT tenant, {column}, SUM(engaged_users) AS n FROM {table} "  # noqa: S608 - fixed identifiers
        "WHERE day BETWEEN :since AND :until GROUP BY tenant, "
        f"{column} ORDER BY tenant, n DESC, {column}"
    )
    top: dict[str, str] = {}
    for tenant, name, _ in conn.execute(query, {"since": since, "until": until}):
        top.setdefault(tenant, name)
    return top


def usage_report(url: str | sa.URL, since: dt.date, until: dt.date) -> list[UsageRow]:
    """Per-tenant usage over [since, until] from the four tables of a SQL sink."""
    engine = sa.create_engine(url)
    params = {"since": since, "until": until}
    try:
        with engine.connect() as conn:
            daily = conn.execute(
                sa.text(
                    "SELECT tenant, COUNT(*), COALESCE(SUM(messages), 0), "
                    "COALESCE(AVG(active_users), 0), COALESCE(MAX(active_users), 0) "
                    "FROM usage_daily WHERE day BETWEEN :since AND :until GROUP BY tenant"
                ),
                params,
            ).all()
            distinct: dict[str, int] = dict(
                conn.execute(
                    sa.text(
                        'SELECT tenant, COUNT(DISTINCT "user") FROM usage_user_daily '
                        "WHERE day BETWEEN :since AND :until GROUP BY tenant"
                    ),
                    params,
                ).all()
            )
            ides = _top(conn, "usage_daily_ide", "ide_name", since, until)
            languages = _top(conn, "usage_daily_language", "language_name", since, until)
    finally:
        engine.dispose()
    return [
        UsageRow(
            tenant=tenant,
            days=int(days),
            messages=int(messages),
            distinct_users=int(distinct.get(tenant, 0)),
            avg_daily_active=round(float(avg), 1),
            peak_daily_active=int(peak),
            top_ide=ides.get(tenant),
            top_language=languages.get(tenant),
        )
        for tenant, days, messages, avg, peak in sorted(daily)
    ]


def render_usage(rows: list[UsageRow], fmt: str, since: dt.date, until: dt.date) -> str:
    """Render the usage report as an aligned table, CSV or JSON."""
    if fmt == "json":
        return json.dumps(
            {
                "since": since.isoformat(),
                "until": until.isoformat(),
                "tenants": [asdict(r) for r in rows],
            },
            indent=2,
        )
    headers = list(UsageRow.__dataclass_fields__)
    values = [[getattr(r, h) for h in headers] for r in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(headers)
        writer.writerows(values)
        return out.getvalue()
    total = [
        "ALL",
        sum(r.days for r in rows),
        sum(r.messages for r in rows),
        sum(r.distinct_users for r in rows),
        "",
        "",
        "",
        "",
    ]
    title = f"Zencoder usage {since.isoformat()} .. {until.isoformat()} ({len(rows)} tenants)"
    return f"{title}\n\n{render_table(headers, [*values, total])}"
