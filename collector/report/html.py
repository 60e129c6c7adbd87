"""The report as one self-contained HTML page: inline CSS, inline SVG charts, no script.

The page opens offline and fetches nothing: it holds no URL, and its Content-Security-Policy
(``default-src 'none'``) would stop a browser from loading anything even if it did. Every value
from the data (tenant names, users, IDE names) is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence

from collector.report.charts import (
    MAX_LINES,
    Series,
    bar_chart,
    fmt,
    line_chart,
    top_with_other,
)
from collector.report.model import (
    NO_USER_ROWS,
    TenantUsage,
    UsageReport,
    seat_rule,
    seat_totals,
    title,
)

_CSS = """
:root { color-scheme: light; --ink: #1d2733; --muted: #5a6675; --line: #dde3ea; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
  margin: 0 auto; max-width: 1080px; padding: 24px; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.2rem; margin: 32px 0 8px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; }
.meta, .note { color: var(--muted); margin: 4px 0; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 12px;
  margin: 16px 0; padding: 0; list-style: none; }
.tiles li { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.tiles b { display: block; font-size: 1.5rem; }
.tiles span { color: var(--muted); font-size: .85rem; }
.grid { display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fit, minmax(min(440px, 100%), 1fr)); }
figure.chart { margin: 12px 0; border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 12px; }
figure.chart figcaption { font-weight: 600; margin-bottom: 6px; }
ul.legend { list-style: none; padding: 0; margin: 6px 0 0; display: flex; flex-wrap: wrap;
  gap: 4px 16px; font-size: .85rem; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
  margin-right: 6px; vertical-align: -1px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; margin: 8px 0; }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left; }
th { background: #f5f7fa; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid var(--ink); }
.badge { border-radius: 4px; padding: 1px 6px; font-size: .8rem; }
.stale { background: #fde2d0; } .quiet { background: #fff1c2; }
@media print { body { padding: 0; } figure.chart { break-inside: avoid; } }
"""

# Nothing may be loaded: no script, no font, no image, no connection. Inline styles only.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _cell(value: object, numeric: bool = False) -> str:
    if value is None:
        shown = "n/a" if numeric else ""
    elif isinstance(value, int | float):
        shown = fmt(value)
    else:
        shown = str(value)
    return f'<td class="n">{_e(shown)}</td>' if numeric else f"<td>{_e(shown)}</td>"


def _table(
    headers: Sequence[tuple[str, bool]], rows: Sequence[Sequence[object]], total: bool = False
) -> str:
    head = "".join(f'<th scope="col"{" class=n" if n else ""}>{_e(h)}</th>' for h, n in headers)
    body = []
    for index, row in enumerate(rows):
        cells = "".join(_cell(v, n) for v, (_, n) in zip(row, headers, strict=True))
        last = total and index == len(rows) - 1
        body.append(f'<tr class="total">{cells}</tr>' if last else f"<tr>{cells}</tr>")
    return _scrolling(head, body)


def _scrolling(head: str, body: Sequence[str]) -> str:
    """A table that scrolls sideways on a narrow screen instead of widening the page."""
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def tenant_series(tenants: Sequence[TenantUsage], field: str) -> list[Series]:
    """One line per tenant, busiest first; beyond the palette the rest become one line."""
    ordered = sorted(tenants, key=lambda t: (-t.messages, t.tenant.casefold()))
    shown = ordered if len(ordered) <= MAX_LINES else ordered[: MAX_LINES - 1]
    series = [Series(t.tenant, {d.day: getattr(d, field) for d in t.daily}) for t in shown]
    rest = ordered[len(shown) :]
    if rest:
        summed: dict[dt.date, int] = {}
        for tenant in rest:
            for d in tenant.daily:
                summed[d.day] = summed.get(d.day, 0) + getattr(d, field)
        series.append(Series(f"Other tenants ({len(rest)})", summed))
    return series


def _tiles(report: UsageReport) -> str:
    p = report.portfolio
    tiles = [
        (fmt(p.tenants), "tenants"),
        ("n/a" if p.distinct_users is None else fmt(p.distinct_users), "distinct users"),
        (fmt(p.messages), "messages"),
        (fmt(p.avg_daily_active), "average daily active users"),
        (fmt(p.peak_daily_active), "peak daily active users"),
    ]
    stale = seat_totals(report)[0]
    if stale is not None:
        tiles.append((fmt(stale), f"stale seats (> {report.stale_days} days)"))
    items = "".join(f"<li><b>{_e(v)}</b><span>{_e(label)}</span></li>" for v, label in tiles)
    return f'<ul class="tiles">{items}</ul>'


def _usage_table(report: UsageReport) -> str:
    headers = [("Tenant", False), ("Days", True), ("Messages", True), ("Distinct users", True),
               ("Avg daily active", True), ("Peak daily active", True), ("Top IDE", False),
               ("Top language", False), ("Stale", True), ("Quiet", True)]  # fmt: skip
    rows: list[list[object]] = [
        [t.tenant, t.days, t.messages, t.distinct_users, t.avg_daily_active,
         t.peak_daily_active, t.top_ide, t.top_language, t.stale_users, t.quiet_users]
        for t in report.tenants
    ]  # fmt: skip
    p = report.portfolio
    rows.append(["All tenants", "", p.messages, p.distinct_users, p.avg_daily_active,
                 p.peak_daily_active, "", "", *seat_totals(report)])  # fmt: skip
    return _table(headers, rows, total=True)


def _seats_section(report: UsageReport) -> str:
    rule = f'<p class="note">{_e(seat_rule(report).capitalize())}.</p>'
    if not report.has_user_rows:
        return f'<p class="note">{_e(NO_USER_ROWS.capitalize())}.</p>'
    if report.pii == "pseudonymize":
        rule += '<p class="note">This sink pseudonymizes users: the column shows pseudonyms.</p>'
    if not report.seats:
        return rule + '<p class="note">No stale or quiet users.</p>'
    headers = [("Tenant", False), ("User", False), ("Status", False), ("Last active", False),
               ("Idle days", True), ("Messages in window", True)]  # fmt: skip
    body = []
    for s in report.seats:
        badge = f'<span class="badge {s.status}">{s.status}</span>'
        body.append(
            f"<tr><td>{_e(s.tenant)}</td><td>{_e(s.user)}</td><td>{badge}</td>"
            f"<td>{s.last_active.isoformat()}</td>{_cell(s.idle_days, True)}"
            f"{_cell(s.window_messages, True)}</tr>"
        )
    head = "".join(f'<th scope="col"{" class=n" if n else ""}>{_e(h)}</th>' for h, n in headers)
    return rule + _scrolling(head, body)


def render_html(report: UsageReport) -> str:
    """The whole page."""
    window = report.window
    dates = window.dates()
    portfolio = Series("All tenants", {d.day: d.active_users for d in report.portfolio.daily})
    pii = f"; PII policy of the sink: {report.pii}" if report.pii else ""
    charts_activity = (
        line_chart("active-users", "Daily active users per tenant", dates,
                   tenant_series(report.tenants, "active_users"), "active users")
        + line_chart("messages", "Messages per tenant", dates,
                     tenant_series(report.tenants, "messages"), "messages")
    )  # fmt: skip
    charts_mix = (
        bar_chart("ides", "IDE mix (share of engaged user-days)",
                  top_with_other(report.ides), "engaged user-days")
        + bar_chart("languages", "Language mix (share of engaged user-days)",
                    top_with_other(report.languages), "engaged user-days")
    )  # fmt: skip
    portfolio_chart = line_chart(
        "portfolio",
        "All tenants: daily active users",
        dates,
        [portfolio] if portfolio.values else [],
        "active users",
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title(report))}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>Zencoder usage report</h1>
<p class="meta">{window.since.isoformat()} to {window.until.isoformat()} ({window.days} days,
UTC) &middot; {len(report.tenants)} tenants &middot; from {_e(report.source)}{_e(pii)}</p>
<p class="meta">Generated {_e(report.generated_at.isoformat(timespec="minutes"))}</p>
</header>
<main>
<section id="portfolio" aria-labelledby="h-portfolio">
<h2 id="h-portfolio">Portfolio</h2>
{_tiles(report)}
{portfolio_chart}
</section>
<section id="activity" aria-labelledby="h-activity">
<h2 id="h-activity">Activity per tenant</h2>
{charts_activity}
</section>
<section id="mix" aria-labelledby="h-mix">
<h2 id="h-mix">IDEs and languages</h2>
<div class="grid">{charts_mix}</div>
<p class="note">A user active in one IDE on three days counts three engaged user-days.</p>
</section>
<section id="tenants" aria-labelledby="h-tenants">
<h2 id="h-tenants">Tenants</h2>
{_usage_table(report)}
<p class="note">Distinct users are counted from per-user rows over the whole window (a user
active on many days counts once); the total adds the tenants' counts (a seat per tenant).</p>
</section>
<section id="seats" aria-labelledby="h-seats">
<h2 id="h-seats">Seat hygiene</h2>
{_seats_section(report)}
</section>
</main>
</body>
</html>
"""
