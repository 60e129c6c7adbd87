"""The CSV sink: one file per tenant, table and day, replaced atomically on every redelivery.

Type ``csv``::

    sinks:
      sheets: {type: csv, path: data/csv}

Layout under ``path`` (``ROOT``)::

    ROOT/TENANT/usage_daily/2025-01-31.csv
    ROOT/TENANT/usage_daily_ide/2025-01-31.csv
    ROOT/TENANT/usage_daily_language/2025-01-31.csv
    ROOT/TENANT/usage_user_daily/2025-01-31.csv

Every file has a header row and the columns of the table of the same name (docs/data-model.md);
text cells that a spreadsheet would run as formulas are guarded with a leading ``'`` unless
``csv_formula_guard: false``.

A day is all four tables or none. Every file of a batch is first written to a temporary file in
its directory, flushed and fsynced; only when all of them are written does :func:`publish_days`
rename them into place with ``os.replace`` (atomic on POSIX and Windows), the day's
``usage_daily`` file (its *marker*) last, and the marker of a day being replaced is removed before
any of its files changes. So a full disk or a failing directory leaves no day half-written, a
reader that finds ``usage_daily/DAY.csv`` finds the other three files of the same version beside
it, and a power cut after ``write`` returned loses nothing. Files are created 0600 and
directories 0700 (0640 / 0750 with ``files.shared_group``). ``zencoder-collector export csv``
joins a date range into one file per table (:mod:`collector.export`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import os
import re
import shutil
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import structlog
from pydantic import Field

from collector.plugin import (
    CSV_MARKER_FIRST,
    USAGE_COLUMNS,
    Batch,
    Sink,
    SinkConfig,
    SinkError,
    SinkPermanentError,
    SinkTransientError,
    TenantDay,
    create_temp_file,
    csv_partition_path,
    ensure_private_dir,
    fsync_directory,
    guard_row,
    hookimpl,
    run_blocking,
)

COLUMNS = USAGE_COLUMNS
"""Table name -> CSV header, in file column order (from :mod:`collector.tables`)."""

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)

log = structlog.get_logger(__name__)


class CsvSinkConfig(SinkConfig):
    """Settings of a ``csv`` sink."""

    type: Literal["csv"] = "csv"
    path: Path = Field(description="Root directory; created if missing.")
    fsync: bool = Field(
        default=True,
        description="fsync every file and directory before write returns (turn off only on "
        "storage that cannot lose acknowledged writes, or for throwaway output).",
    )
    csv_formula_guard: bool = Field(
        default=True,
        description="Prefix ' to text cells starting with =, +, -, @, tab or carriage return, so "
        "spreadsheets show them as text instead of running them as formulas; turn off only for "
        "machine consumers that need the exact text.",
    )


def safe_segment(value: str, what: str = "tenant id") -> str:
    """``value`` if it can be one path segment everywhere; otherwise :class:`SinkPermanentError`."""
    if not _SAFE_SEGMENT.match(value) or _WINDOWS_RESERVED.match(value) or value.endswith("."):
        raise SinkPermanentError(
            f"{what} {value!r} cannot be a directory name (letters, digits, '.', '_', '-' only, "
            "starting with a letter or digit)"
        )
    return value


def partition_path(root: Path, tenant: str, table: str, day: dt.date) -> Path:
    """Where one tenant-day of one table lives (the shared layout, after checking ``tenant``)."""
    return csv_partition_path(root, safe_segment(tenant), table, day)


def render_tables(td: TenantDay, *, formula_guard: bool = True) -> dict[str, bytes]:
    """The four CSV files of one tenant-day, UTF-8 with a header row each.

    With ``formula_guard`` (the default) every text cell a spreadsheet would run as a formula gets
    a leading ``'`` (:func:`collector.files.guard_formula`); numbers stay numbers.
    """
    fetched_at = td.daily.fetched_at
    if fetched_at.tzinfo is None:
        fetched_at = fetched_at.replace(tzinfo=dt.UTC)
    day = td.day.isoformat()
    rows: dict[str, Iterable[Sequence[Any]]] = {
        "usage_daily": [
            (
                td.tenant,
                day,
                td.daily.active_users,
                td.daily.messages,
                fetched_at.astimezone(dt.UTC).isoformat(),
                "true" if td.daily.final else "false",
            )
        ],
        "usage_daily_ide": [(td.tenant, day, i.ide_name, i.engaged_users) for i in td.ides],
        "usage_daily_language": [
            (td.tenant, day, x.language_name, x.engaged_users) for x in td.languages
        ],
        "usage_user_daily": [
            (
                td.tenant,
                day,
                u.user,
                u.messages,
                u.last_active.isoformat() if u.last_active else "",
                json.dumps(list(u.ides), ensure_ascii=False),
                json.dumps(list(u.languages), ensure_ascii=False),
                u.last_active_at.astimezone(dt.UTC).isoformat() if u.last_active_at else "",
            )
            for u in td.users
        ],
    }
    files: dict[str, bytes] = {}
    for table, header in COLUMNS.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        table_rows = rows[table]
        writer.writerows(map(guard_row, table_rows) if formula_guard else table_rows)
        files[table] = buffer.getvalue().encode("utf-8")
    return files


@dataclass(frozen=True)
class Staged:
    """A partition written to its temporary file, waiting to be renamed over ``target``."""

    temp: Path
    target: Path


def write_temp(
    target: Path, data: bytes, *, fsync: bool = True, shared_group: bool = False
) -> Staged:
    """Write ``data`` to a new temporary file beside ``target`` (``.DAY.csv.XXXX.tmp``).

    Nothing is visible under ``target`` yet: :func:`publish_days` renames it into place.
    """
    fd, tmp_name = create_temp_file(target.parent, f".{target.name}.", shared_group)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return Staged(Path(tmp_name), target)


def publish_days(days: Sequence[Sequence[Staged]], *, fsync: bool = True) -> None:
    """Rename the staged files of whole days into place so that a day is all four tables or none.

    Each day's first file is its ``usage_daily`` partition, the *marker*. In three steps: the
    markers of days being replaced are removed, then every other file is renamed into place,
    then the markers are. So a marker on disk always has the other three files of its own
    version beside it, even after a crash or power cut at any point (with ``fsync``, each step is
    made durable, by fsyncing the directories it changed, before the next begins). A failure
    stops the publication and leaves the remaining temporary files to the caller.
    """
    markers = [day[0] for day in days]
    replaced = [m.target for m in markers if m.target.exists()]
    for target in replaced:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
    if fsync:
        _fsync_directories(t.parent for t in replaced)
    details = [staged for day in days for staged in day[1:]]
    for staged in details:
        os.replace(staged.temp, staged.target)
    if fsync:
        _fsync_directories(s.target.parent for s in details)
    for staged in markers:
        os.replace(staged.temp, staged.target)
    if fsync:
        _fsync_directories(m.target.parent for m in markers)


def _fsync_directories(directories: Iterable[Path]) -> None:
    for directory in sorted(set(directories)):
        fsync_directory(directory)


def sweep_leftovers(directory: Path, older_than: float) -> int:
    """Delete temporary files of interrupted writes (``.DAY.csv.XXXX.tmp``) from ``directory``.

    Only files last modified before ``older_than`` (a time stamp) go: a sink sweeps what was
    there before it opened, which no write of this process can still be using.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and name.endswith(".tmp") and ".csv." in name):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_mtime < older_than:
                os.unlink(entry.path)
                removed += 1
    return removed


class CsvSink(Sink):
    """CSV files partitioned by tenant, table and day (ROOT/TENANT/TABLE/DAY.csv)."""

    type_name: ClassVar[str] = "csv"
    Config: ClassVar[type[SinkConfig]] = CsvSinkConfig

    def __init__(self, name: str, config: CsvSinkConfig) -> None:
        super().__init__(name, config)
        self.config: CsvSinkConfig = config
        self.root = Path(config.path).expanduser()
        self._opened_at = 0.0
        self._swept: set[Path] = set()

    def __repr__(self) -> str:
        return f"CsvSink(name={self.name!r}, root={str(self.root)!r})"

    async def open(self) -> None:
        await run_blocking(self._open_sync)

    async def ping(self) -> None:
        await run_blocking(self._ping_sync)

    async def write(self, batch: Batch) -> None:
        if batch:
            await run_blocking(self._write_sync, batch)

    def _open_sync(self) -> None:
        self._opened_at = time.time()
        try:
            ensure_private_dir(self.root, self.host.shared_group)
        except OSError as error:
            raise self._translate(error) from None

    def _ping_sync(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise SinkTransientError(f"sink {self.name}: {self.root} is not a writable directory")

    def _write_sync(self, batch: Batch) -> None:
        latest = {(td.tenant, td.day): td for td in batch}
        # Validate every tenant id before touching the disk: a bad one fails the batch as a whole.
        for tenant, _day in latest:
            safe_segment(tenant)
        ready: set[Path] = set()  # table directories that exist (and were swept)
        new_entries: set[Path] = set()  # directories in which this write created a directory
        staged: list[list[Staged]] = []
        fsync, shared = self.config.fsync, self.host.shared_group
        try:
            try:
                # Every file of the batch goes to a temporary file first: a full disk or a
                # failing directory stops the write here, before any day is visible.
                for td in latest.values():
                    tables = render_tables(td, formula_guard=self.config.csv_formula_guard)
                    day: list[Staged] = []
                    staged.append(day)
                    for table in CSV_MARKER_FIRST:
                        target = partition_path(self.root, td.tenant, table, td.day)
                        if target.parent not in ready:
                            self._make_dirs(target.parent, ready, new_entries)
                        day.append(
                            write_temp(target, tables[table], fsync=fsync, shared_group=shared)
                        )
                if fsync:  # new directories first, or a power cut could lose what is in them
                    _fsync_directories(new_entries)
                publish_days(staged, fsync=fsync)
            except BaseException:
                for staged_file in (s for day in staged for s in day):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(staged_file.temp)  # what was not published
                raise
        except OSError as error:
            raise self._translate(error) from None

    def _make_dirs(self, directory: Path, ready: set[Path], new_entries: set[Path]) -> None:
        """Create ``TENANT/TABLE`` as needed; new entries make their parents need an fsync.

        The first time this process writes into a directory, it also deletes temporary files a
        killed process left there: the day being written at the kill is delivered again, so the
        leftovers sit exactly where the sink writes next, and no sweep of the whole tree at
        start-up is needed.
        """
        if directory not in self._swept:
            self._swept.add(directory)
            removed = sweep_leftovers(directory, self._opened_at)
            if removed:
                log.info(
                    "removed temporary files of an interrupted write",
                    sink=self.name,
                    directory=str(directory),
                    files=removed,
                )
        ready.add(directory)
        for created in ensure_private_dir(directory, self.host.shared_group):
            new_entries.add(created.parent)

    def _translate(self, error: OSError) -> SinkError:
        # Every file-system failure is the target's state (full, read-only, missing, permissions),
        # which an operator can fix; the data itself is always writable, so retry.
        reason = error.strerror or type(error).__name__
        where = f" ({error.filename})" if error.filename else ""
        return SinkTransientError(f"sink {self.name}: {reason}{where}")


@hookimpl
def collector_register_sinks() -> list[type[Sink]]:
    """The CSV sink."""
    return [CsvSink]


# --- tenant purge (``zencoder-collector tenant purge``) ----------------------------------------


@hookimpl
def collector_sink_purge(sink: Sink, tenant: str) -> Awaitable[int] | None:
    """Delete the tenant's directory (every table and day) from a csv sink; None for others."""
    if not isinstance(sink, CsvSink):
        return None
    return run_blocking(purge_tenant_files, sink.root, tenant)


def purge_tenant_files(root: Path, tenant: str) -> int:
    """Remove ``ROOT/TENANT`` and everything under it; returns the number of files removed."""
    try:
        directory = root / safe_segment(tenant)
    except SinkPermanentError:
        return 0  # an id that cannot be a directory name was never written here
    if not directory.is_dir():
        return 0
    files = sum(1 for path in directory.rglob("*") if path.is_file())
    shutil.rmtree(directory)
    fsync_directory(root)
    return files
