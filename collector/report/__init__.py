"""Reports for people: the per-tenant cycle summary and the cross-tenant usage report.

The usage report reads what a sink stored (a SQL sink's database or a CSV sink's files,
:mod:`~collector.report.sources`), computes it with the same queries for every source
(:mod:`~collector.report.query`), and renders it as a text table, CSV, JSON or a self-contained
HTML page with charts (:mod:`~collector.report.render`, :mod:`~collector.report.html`).

Modules: ``model`` (what a report holds), ``sources`` (what to read; ``make_report``),
``query``, ``render`` (text formats; ``render`` for all), ``charts``, ``html``, ``tables``
(plain text tables). Only ``tables`` is
imported with the package, since every command prints a cycle summary and only ``report``
needs the rest.
"""

from __future__ import annotations

from collector.report.tables import cycle_summary, render_table

__all__ = ["cycle_summary", "render_table"]
