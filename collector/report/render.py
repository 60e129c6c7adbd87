"""The report as text: an aligned table, CSV (one section) or JSON (everything).

Every format names tenants by their configured ``name``; CSV and JSON add ``tenant_id`` so rows
still join with the sink's tables.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

from collector.files import guard_row
from collector.report.model import (
    NO_USER_ROWS,
    DayFigures,
    SeatRow,
    TenantUsage,
    UsageReport,
    seat_rule,
    seat_totals,
    title,
)
from collector.report.tables import render_table

Section = Literal["usage", "seats"]
Format = Literal["table", "csv", "json", "html"]

USAGE_COLUMNS = (
    "tenant",
    "days",
    "messages",
    "distinct_users",
    "avg_daily_active",
    "peak_daily_active",
    "top_ide",
    "top_language",
    "stale_users",
    "quiet_users",
)
SEAT_COLUMNS = ("tenant", "user", "status", "last_active", "idle_days", "window_messages")


def _usage_values(tenant: TenantUsage) -> list[Any]:
    return [getattr(tenant, column) for column in USAGE_COLUMNS]


def _seat_values(seat: SeatRow) -> list[Any]:
    return [getattr(seat, column) for column in SEAT_COLUMNS]


def render_text(report: UsageReport, sections: Sequence[Section] = ("usage", "seats")) -> str:
    """Aligned tables for a terminal: usage per tenant with a portfolio row, then seat hygiene."""
    parts = [f"{title(report)}, {len(report.tenants)} tenants, from {report.source}"]
    if "usage" in sections:
        p = report.portfolio
        total = ["ALL", "", p.messages, p.distinct_users, p.avg_daily_active, p.peak_daily_active]
        total += ["", "", *seat_totals(report)]
        rows = [_usage_values(t) for t in report.tenants]
        parts.append(render_table(USAGE_COLUMNS, [*rows, total]))
    if "seats" in sections:
        if not report.has_user_rows:
            parts.append(f"Seat hygiene: {NO_USER_ROWS}.")
        elif not report.seats:
            parts.append(f"Seat hygiene ({seat_rule(report)}): no stale or quiet users.")
        else:
            table = render_table(SEAT_COLUMNS, [_seat_values(s) for s in report.seats])
            parts.append(f"Seat hygiene ({seat_rule(report)}):\n\n{table}")
    return "\n\n".join(parts)


def render_csv(report: UsageReport, section: Section = "usage") -> str:
    """One section as CSV with a header row (a CSV file holds one table)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    # Tenant names and emails are text others chose: guarded, as in every CSV the collector
    # writes, so a spreadsheet never runs one as a formula (docs/sinks.md#spreadsheet-formulas).
    if section == "usage":
        writer.writerow([*USAGE_COLUMNS, "tenant_id"])
        writer.writerows(guard_row([*_usage_values(t), t.tenant_id]) for t in report.tenants)
    else:
        writer.writerow([*SEAT_COLUMNS, "tenant_id"])
        writer.writerows(guard_row([*_seat_values(s), s.tenant_id]) for s in report.seats)
    return out.getvalue()


def report_dict(report: UsageReport) -> dict[str, Any]:
    """The JSON document: window, source, portfolio, tenants (with daily figures), mixes, seats."""
    p = report.portfolio
    return {
        "since": report.window.since.isoformat(),
        "until": report.window.until.isoformat(),
        "days": report.window.days,
        "source": report.source,
        "pii": report.pii,
        "generated_at": report.generated_at.isoformat(timespec="seconds"),
        "portfolio": {
            "tenants": p.tenants,
            "messages": p.messages,
            "distinct_users": p.distinct_users,
            "avg_daily_active": p.avg_daily_active,
            "peak_daily_active": p.peak_daily_active,
        },
        "tenants": [
            {
                **{c: getattr(t, c) for c in USAGE_COLUMNS},
                "tenant_id": t.tenant_id,
                "daily": [_day_dict(d) for d in t.daily],
            }
            for t in report.tenants
        ],
        "ides": [{"ide_name": n, "engaged_user_days": v} for n, v in report.ides],
        "languages": [{"language_name": n, "engaged_user_days": v} for n, v in report.languages],
        "seat_hygiene": {
            "available": report.has_user_rows,
            "stale_days": report.stale_days,
            "last_week_start": report.window.last_week_start.isoformat(),
            "users": [
                {**{c: getattr(s, c) for c in SEAT_COLUMNS}, "tenant_id": s.tenant_id}
                | {"last_active": s.last_active.isoformat()}
                for s in report.seats
            ],
        },
    }


def _day_dict(figures: DayFigures) -> dict[str, Any]:
    return {
        "day": figures.day.isoformat(),
        "active_users": figures.active_users,
        "messages": figures.messages,
    }


def render_json(report: UsageReport) -> str:
    return json.dumps(report_dict(report), indent=2, ensure_ascii=False)


def render(report: UsageReport, fmt: Format, section: Section | None = None) -> str:
    """The report in one format; ``section`` limits the text formats to usage or seats (CSV
    shows usage unless told otherwise, HTML always shows everything)."""
    if fmt == "html":
        from collector.report.html import render_html

        return render_html(report)
    if fmt == "json":
        return render_json(report)
    if fmt == "csv":
        return render_csv(report, section or "usage")
    return render_text(report, (section,) if section else ("usage", "seats"))
