"""Plain text tables: the aligned table every text rendering uses, and the per-tenant cycle
summary that ``run --once``, ``backfill`` and ``demo`` print."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
