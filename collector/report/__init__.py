"""Reports for people: the per-tenant cycle summary and the cross-tenant usage report.

The usage report reads what a sink stored (a SQL sink's database or a CSV sink's files,
:mod:`~collector.report.sources`), computes it with the same queries for every source
(:mod:`~collector.report.query`), and renders it as a text table, CSV, JSON or a self-contained
HTML page with charts (:mod:`~collector.report.render`, :mod:`~collector.report.html`).

Modules: ``model`` (what a report holds), ``sources``, ``query``, ``render``, ``charts``,
``html``, ``tables`` (plain text tables).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from collector.report.model import ReportError, UsageReport, Window
from collector.report.render import Section, render_csv, render_json, render_text
from collector.report.sources import CsvSource, ReportSource, SqlSource, choose_sink, sink_source
from collector.report.tables import cycle_summary, render_table

Format = Literal["table", "csv", "json", "html"]

__all__ = [
    "CsvSource",
    "Format",
    "ReportError",
    "ReportSource",
    "SqlSource",
    "UsageReport",
    "Window",
    "choose_sink",
    "cycle_summary",
    "make_report",
    "render",
    "render_table",
    "render_text",
    "sink_source",
]


def make_report(
    source: ReportSource,
    window: Window,
    *,
    names: Mapping[str, str] | None = None,
    stale_days: int = 14,
) -> UsageReport:
    """Read ``window`` from ``source`` into a report; ``names`` maps tenant ids to names."""
    from collector.report.query import build_report

    if stale_days < 0:
        raise ReportError(f"--stale-days must be 0 or more, not {stale_days}")
    with source.connect(window) as conn:
        return build_report(
            conn,
            window,
            names=names,
            stale_days=stale_days,
            source=source.description,
            pii=source.pii,
        )


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
