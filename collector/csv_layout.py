"""Where a CSV sink keeps a tenant-day, and when a day counts as complete.

The csv sink writes one file per tenant, table and day::

    ROOT/TENANT/TABLE/DAY.csv

and publishes a day's ``usage_daily`` file, its *marker*, last (and removes it first when it
replaces the day). So a reader counts a day only when the marker exists: the writer, ``export
csv`` and ``report --sink`` share this one rule through this module, which is why it is part of
the public plugin API (:mod:`collector.plugin`) rather than private to the sink.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

from collector.tables import USAGE_COLUMNS

MARKER = "usage_daily"
"""The table whose partition the csv sink publishes last: its presence means a complete day."""

MARKER_FIRST: tuple[str, ...] = (MARKER, *(table for table in USAGE_COLUMNS if table != MARKER))
"""The tables of a day, its marker first (the order a writer stages and a reader checks them)."""


def partition_path(root: Path, tenant: str, table: str, day: dt.date) -> Path:
    """Where one tenant-day of one table lives (``tenant`` must already be a safe segment)."""
    return root / tenant / table / f"{day.isoformat()}.csv"


def day_is_complete(root: Path, tenant: str, day: dt.date) -> bool:
    """Whether the sink has published ``day`` of ``tenant`` (its marker exists)."""
    return partition_path(root, tenant, MARKER, day).is_file()


def complete_partitions(
    tenant_dir: Path, table: str, first: dt.date, last: dt.date
) -> Iterator[Path]:
    """The files of ``table`` under ``tenant_dir`` for complete days in ``first..last``, by day.

    Files that are not named by a day (the sink's hidden temporary files, anything a user put
    there) are skipped, and so is a day whose marker is missing (being written, or half-written
    by a write that failed).
    """
    directory = tenant_dir / table
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.csv")):
        if path.name.startswith("."):
            continue
        try:
            day = dt.date.fromisoformat(path.stem)
        except ValueError:
            continue
        if first <= day <= last and day_is_complete(tenant_dir.parent, tenant_dir.name, day):
            yield path
