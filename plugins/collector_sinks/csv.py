"""The CSV sink: one file per tenant, table and day, replaced atomically on every redelivery.

Type ``csv``::

    sinks:
      sheets: {type: csv, path: data/csv}

Layout under ``path`` (``ROOT``)::

    ROOT/TENANT/usage_daily/2025-01-31.csv
    ROOT/TENANT/usage_daily_ide/2025-01-31.csv
    ROOT/TENANT/usage_daily_language/2025-01-31.csv
    ROOT/TENANT/usage_user_daily/2025-01-31.csv

Every file has a header row and the columns of the table of the same name (docs/data-model.md).
A file is written to a temporary file in the same directory, flushed and fsynced, renamed over the
old one with ``os.replace`` (atomic on POSIX and Windows), and the directory is fsynced, so a
reader sees the old or the new partition, never a torn one, and a power cut after ``write``
returned loses nothing. ``zencoder-collector export csv`` joins a date range into one file per
table (:mod:`collector.export`).
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
import tempfile
import time
from collections.abc import Awaitable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from collector.errors import SinkError, SinkPermanentError, SinkTransientError
from collector.hookspecs import hookimpl
from collector.log import get_logger
from collector.models import Batch, TenantDay
from collector.sink import Sink, SinkConfig, run_blocking

COLUMNS: dict[str, tuple[str, ...]] = {
    "usage_daily": ("tenant", "day", "active_users", "messages", "fetched_at", "final"),
    "usage_daily_ide": ("tenant", "day", "ide_name", "engaged_users"),
    "usage_daily_language": ("tenant", "day", "language_name", "engaged_users"),
    "usage_user_daily": (
        "tenant",
        "day",
        "user",
        "messages",
        "last_active",
        "ides",
        "languages",
    ),
}
"""Table name -> CSV header, in file column order."""

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)

log = get_logger(__name__)


class CsvSinkConfig(SinkConfig):
    """Settings of a ``csv`` sink."""

    type: Literal["csv"] = "csv"
    path: Path = Field(description="Root directory; created if missing.")
    fsync: bool = Field(
        default=True,
        description="fsync every file and directory before write returns (turn off only on "
        "storage that cannot lose acknowledged writes, or for throwaway output).",
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
    """Where one tenant-day of one table lives."""
    return root / safe_segment(tenant) / table / f"{day.isoformat()}.csv"


def render_tables(td: TenantDay) -> dict[str, bytes]:
    """The four CSV files of one tenant-day, UTF-8 with a header row each."""
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
            )
            for u in td.users
        ],
    }
    files: dict[str, bytes] = {}
    for table, header in COLUMNS.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows[table])
        files[table] = buffer.getvalue().encode("utf-8")
    return files


def write_atomically(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never half.

    The caller fsyncs the directory (once for many files) to make the rename itself durable.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


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


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are durable on return
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            self.root.mkdir(parents=True, exist_ok=True)
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
        touched: set[Path] = set()
        try:
            for td in latest.values():
                for table, data in render_tables(td).items():
                    target = partition_path(self.root, td.tenant, table, td.day)
                    if target.parent not in touched:
                        self._make_dirs(target.parent, touched)
                    write_atomically(target, data, fsync=self.config.fsync)
            if self.config.fsync:
                for directory in sorted(touched):
                    fsync_directory(directory)
        except OSError as error:
            raise self._translate(error) from None

    def _make_dirs(self, directory: Path, touched: set[Path]) -> None:
        """Create ``TENANT/TABLE`` as needed; new entries make their parents need an fsync too.

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
        touched.add(directory)
        missing = [d for d in (directory.parent, directory) if not d.is_dir()]
        directory.mkdir(parents=True, exist_ok=True)
        for created in missing:
            touched.add(created.parent)

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
