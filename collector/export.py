"""``zencoder-collector export csv``: join a CSV sink's day partitions into one file per table.

The CSV sink keeps one file per tenant, table and day (``ROOT/TENANT/TABLE/DAY.csv``) so that a
redelivery replaces exactly one partition. Spreadsheets want one file per table instead; this
module concatenates the partitions of a date range (both ends included), ordered by tenant and
day, with a single header row, into ``OUT/usage_daily.csv`` and its three siblings. Each output
file is written to a temporary file and renamed, so a spreadsheet that has the old export open
never sees a half-written one.

Only complete days are exported: a day counts when its ``usage_daily`` partition (the marker the
sink publishes last) exists, so the files of a day whose write failed half-way never leak into an
export. Text cells a spreadsheet would run as formulas get a leading ``'`` (``--no-formula-guard``
turns that off), and the files and directories it creates are owner-only unless the config says
``files.shared_group`` (:mod:`collector.files`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import os
import re
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from collector.config.models import tenant_id_problem
from collector.csv_layout import day_is_complete, partition_path
from collector.errors import CollectorError
from collector.files import create_temp_file, ensure_private_dir, fsync_directory, guard_formula
from collector.tables import USAGE_COLUMNS as COLUMNS

_INTEGER = re.compile(r"^-?[0-9]+$")


class ExportError(CollectorError):
    """The export could not run (no such root, bad range, unknown tenant)."""


@dataclass
class ExportResult:
    """What an export wrote: one file per table and how many data rows each holds."""

    files: dict[str, Path] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    partitions: int = 0


def _days(since: dt.date, until: dt.date) -> Iterator[dt.date]:
    day = since
    while day <= until:
        yield day
        day += dt.timedelta(days=1)


def _tenants(root: Path, tenants: Collection[str] | None) -> list[str]:
    if tenants is not None:
        for tenant in tenants:
            problem = tenant_id_problem(tenant)  # the config's rule: never a path of its own
            if problem is not None:
                raise ExportError(problem)
        return sorted(set(tenants))
    return sorted(
        entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )


def _partition_rows(path: Path, header: tuple[str, ...]) -> list[list[str]]:
    """Rows of one partition in ``header`` order (a column the file lacks comes out empty)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return [[row.get(column) or "" for column in header] for row in reader]


def _guard_cells(row: list[str]) -> list[str]:
    # Partitions hold text only; an integer (a count) is a number to a spreadsheet, not a formula.
    return [cell if _INTEGER.match(cell) else guard_formula(cell) for cell in row]


@contextlib.contextmanager
def _atomic_text(target: Path, shared_group: bool) -> Iterator[TextIO]:
    """Stream text into a temporary file beside ``target``; fsync and rename it on success."""
    fd, tmp_name = create_temp_file(target.parent, f".{target.name}.", shared_group)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def export_csv(
    root: str | Path,
    out_dir: str | Path,
    since: dt.date,
    until: dt.date,
    tenants: Collection[str] | None = None,
    *,
    formula_guard: bool = True,
    shared_group: bool = False,
) -> ExportResult:
    """Concatenate the partitions under ``root`` for ``since..until`` into ``out_dir``.

    ``tenants`` limits the export to those tenant ids (default: every tenant directory). A day
    without its ``usage_daily`` partition is absent; each table gets a file even when it has no
    rows. ``formula_guard`` neutralizes formula-like text cells; ``shared_group`` makes the files
    and directories it creates group-readable.
    """
    root = Path(root).expanduser()
    out = Path(out_dir).expanduser()
    if until < since:
        raise ExportError(f"--until {until} is before --since {since}")
    if not root.is_dir():
        raise ExportError(f"{root} is not a directory (the path of a csv sink)")
    tenant_ids = _tenants(root, tenants)
    days = list(_days(since, until))
    # The complete days: those whose marker the sink has published (it comes last).
    complete = {
        tenant: [d for d in days if day_is_complete(root, tenant, d)] for tenant in tenant_ids
    }
    ensure_private_dir(out, shared_group)
    result = ExportResult()
    seen_partitions: set[tuple[str, dt.date]] = set()
    for table, header in COLUMNS.items():
        target = out / f"{table}.csv"
        with _atomic_text(target, shared_group) as handle:
            writer = csv.writer(handle, lineterminator="\r\n")
            writer.writerow(header)
            count = 0
            for tenant in tenant_ids:
                for day in complete[tenant]:
                    try:
                        rows = _partition_rows(partition_path(root, tenant, table, day), header)
                    except FileNotFoundError:  # being replaced by the sink right now
                        continue
                    seen_partitions.add((tenant, day))
                    writer.writerows(map(_guard_cells, rows) if formula_guard else rows)
                    count += len(rows)
        result.files[table] = target
        result.rows[table] = count
    fsync_directory(out)
    result.partitions = len(seen_partitions)
    return result


# --- the command line ---------------------------------------------------------------------------


def _day(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {value!r}: expected YYYY-MM-DD") from None


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``zencoder-collector export csv``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", help="root directory of a csv sink (its path: setting)")
    source.add_argument("--sink", help="name of a csv sink in the config given with -c")
    parser.add_argument(
        "-c",
        "--config",
        default=os.environ.get("ZENCODER_COLLECTOR_CONFIG"),
        help="config file, to find --sink's directory; default: $ZENCODER_COLLECTOR_CONFIG",
    )
    parser.add_argument("-o", "--out", required=True, help="directory for the joined files")
    parser.add_argument("--since", type=_day, required=True, help="first day, YYYY-MM-DD")
    parser.add_argument(
        "--until", type=_day, help="last day, YYYY-MM-DD (default: today, UTC)", default=None
    )
    parser.add_argument(
        "--tenant", action="append", default=None, help="tenant id (repeatable; default: all)"
    )
    parser.add_argument(
        "--no-formula-guard",
        dest="formula_guard",
        action="store_false",
        help="write text cells exactly as stored, even those a spreadsheet would run as formulas "
        "(=, +, -, @, tab, CR); by default they get a leading '",
    )


def _root_from_config(config_path: str, sink_name: str) -> tuple[Path, bool]:
    """The csv sink's root and the config's ``files.shared_group``."""
    from collector.config import load_config
    from collector.plugin_manager import SinkRegistry, make_plugin_manager

    registry = SinkRegistry.from_plugin_manager(make_plugin_manager())
    config = load_config(config_path, sink_types=registry.config_types())
    sink = config.sinks.get(sink_name)
    if sink is None:
        raise ExportError(f"no sink named {sink_name!r} in {config_path}")
    path = getattr(sink, "path", None)
    if sink.type != "csv" or path is None:
        raise ExportError(f"sink {sink_name!r} is of type {sink.type}, not csv")
    return Path(path), config.files.shared_group


def run_export(args: argparse.Namespace) -> int:
    """Run ``export csv`` from parsed arguments; print one line per file; return the exit code."""
    shared_group = False
    if args.sink is not None:
        if not args.config:
            raise ExportError("--sink needs the config file: -c FILE")
        root, shared_group = _root_from_config(args.config, args.sink)
    else:
        root = Path(args.root)
    until = args.until or dt.datetime.now(dt.UTC).date()
    result = export_csv(
        root,
        args.out,
        args.since,
        until,
        tenants=args.tenant,
        formula_guard=args.formula_guard,
        shared_group=shared_group,
    )
    for table, path in result.files.items():
        print(f"{path}  {result.rows[table]} rows", file=sys.stdout)
    print(
        f"{result.partitions} tenant-day(s) from {args.since} to {until} exported",
        file=sys.stdout,
    )
    return 0
