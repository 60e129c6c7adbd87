"""Where a report reads from: a SQL database, a CSV sink's directory, or a sink named in the config.

The core never imports a sink plugin to find its data. It reads what the sinks document instead:

- a sink whose config offers ``sqlalchemy_url()`` (the ``sqlite``/``sql`` sink, or any plugin
  sink that keeps the four tables of docs/data-model.md in a SQL database) is read with SQL;
- a ``csv`` sink's ``path`` holds ``TENANT/TABLE/YYYY-MM-DD.csv`` files with a header row
  (docs/sinks.md); the files of the window are loaded into an in-memory SQLite database, so the
  same queries (:mod:`collector.report.query`) serve both.

Other sink types (S3, webhooks) hold nothing the collector can read back; naming one is an error
that lists the sinks that can be read.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from collector.csv_layout import complete_partitions
from collector.report.model import ReportError, UsageReport, Window
from collector.report.query import TABLE_NAMES, build_report
from collector.tables import USAGE_TABLES

_INSERT_CHUNK = 5_000


class ReportSource(Protocol):
    """Something the report can query: yields a connection holding the four usage tables."""

    description: str
    pii: str | None

    def connect(self, window: Window) -> contextlib.AbstractContextManager[sa.Connection]: ...


def _first_line(error: BaseException) -> str:
    # The driver's own message, first line only: SQLAlchemy appends the statement and its
    # parameters, and neither belongs in an error a user pastes into a ticket.
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    return lines[0] if lines else type(original).__name__


@dataclass
class SqlSource:
    """The usage tables in a database reachable by a SQLAlchemy URL (password included)."""

    url: sa.URL
    description: str
    pii: str | None = None

    @classmethod
    def from_argument(cls, value: str) -> SqlSource:
        """``--db``: a SQLAlchemy URL, or the path of a SQLite file."""
        try:
            url = sa.make_url(value) if "://" in value else sa.URL.create("sqlite", database=value)
        except sa.exc.ArgumentError:
            raise ReportError("--db is not a SQLAlchemy URL (dialect+driver://...)") from None
        return cls(url, url.render_as_string(hide_password=True))

    @contextlib.contextmanager
    def connect(self, window: Window) -> Iterator[sa.Connection]:
        database = self.url.database
        is_file = self.url.get_backend_name() == "sqlite" and database not in (None, "", ":memory:")
        # Connecting would create an empty file where the user mistyped a path.
        if is_file and not Path(str(database)).is_file():
            raise ReportError(f"{self.description}: no such SQLite file")
        try:
            engine = sa.create_engine(self.url)
        except (sa.exc.ArgumentError, ImportError) as error:
            raise ReportError(f"cannot read {self.description}: {_first_line(error)}") from None
        try:
            with engine.connect() as conn:
                inspector = sa.inspect(conn)
                missing = [t for t in TABLE_NAMES if not inspector.has_table(t)]
                if missing:
                    raise ReportError(
                        f"{self.description} has no table {', '.join(missing)}: "
                        "is it a SQL sink's database, and has the sink received data yet?"
                    )
                yield conn
        except sa.exc.SQLAlchemyError as error:
            raise ReportError(f"cannot read {self.description}: {_first_line(error)}") from None
        finally:
            engine.dispose()


def _optional_day(value: str) -> dt.date | None:
    return dt.date.fromisoformat(value[:10]) if value else None


# What the report reads from each CSV file; the files' other columns (fetched_at, final, ides,
# languages, last_active_at) are not needed. Names and types are the table models'.
_CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "usage_daily": ("tenant", "day", "active_users", "messages"),
    "usage_daily_ide": ("tenant", "day", "ide_name", "engaged_users"),
    "usage_daily_language": ("tenant", "day", "language_name", "engaged_users"),
    "usage_user_daily": ("tenant", "day", "user", "messages", "last_active"),
}
_CSV_TABLES = sa.MetaData()
"""The models' tables cut down to _CSV_COLUMNS (all nullable: only what the files give)."""
for _model_table in USAGE_TABLES:
    sa.Table(
        _model_table.name,
        _CSV_TABLES,
        *(
            sa.Column(column.name, column.type)
            for column in _model_table.columns
            if column.name in _CSV_COLUMNS[_model_table.name]
        ),
    )


def _parser(column: sa.Column[Any]) -> tuple[str | None, Callable[[str], Any]]:
    """What the CSV text of ``column`` must be (None: any text) and how to read it."""
    if isinstance(column.type, sa.Date):
        return "a date", _optional_day if column.nullable else dt.date.fromisoformat
    if isinstance(column.type, sa.Integer):
        return "a whole number", int
    return None, str


_PARSERS: dict[str, dict[str, tuple[str | None, Callable[[str], Any]]]] = {
    table.name: {c.name: _parser(c) for c in table.columns if c.name in _CSV_COLUMNS[table.name]}
    for table in USAGE_TABLES
}
"""Table -> column -> (what it must be, parser of the CSV text), by the models' types."""


@dataclass
class CsvSource:
    """A CSV sink's root directory (``ROOT/TENANT/TABLE/YYYY-MM-DD.csv``)."""

    root: Path
    description: str
    pii: str | None = None

    @contextlib.contextmanager
    def connect(self, window: Window) -> Iterator[sa.Connection]:
        if not self.root.is_dir():
            raise ReportError(f"{self.description}: {self.root} is not a directory")
        # One in-memory database on one connection (StaticPool), gone when the engine is.
        engine = sa.create_engine("sqlite://", poolclass=StaticPool)
        try:
            with engine.connect() as conn:
                _CSV_TABLES.create_all(conn)
                for table in TABLE_NAMES:
                    self._load(conn, table, window)
                conn.commit()
                yield conn
        finally:
            engine.dispose()

    def _load(self, conn: sa.Connection, table: str, window: Window) -> None:
        # Seat hygiene looks at every user row up to the window's end; the rest needs the window.
        first = dt.date.min if table == "usage_user_daily" else window.since
        insert = _CSV_TABLES.tables[table].insert()
        rows: list[dict[str, Any]] = []
        for path in self._files(table, first, window.until):
            rows.extend(_read_csv(path, _PARSERS[table]))
            if len(rows) >= _INSERT_CHUNK:
                conn.execute(insert, rows)
                rows = []
        if rows:
            conn.execute(insert, rows)

    def _files(self, table: str, first: dt.date, last: dt.date) -> Iterator[Path]:
        try:
            tenants = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError as error:
            raise ReportError(f"{self.description}: {error.strerror} ({self.root})") from None
        for tenant_dir in tenants:
            yield from complete_partitions(tenant_dir, table, first, last)


def _read_csv(
    path: Path, parsers: Mapping[str, tuple[str | None, Callable[[str], Any]]]
) -> list[dict[str, Any]]:
    try:
        handle = path.open(encoding="utf-8", newline="")
    except FileNotFoundError:  # the sink is replacing this day right now: not there yet
        return []
    try:
        with handle:
            reader = csv.DictReader(handle)
            missing = [c for c in parsers if c not in (reader.fieldnames or ())]
            if missing:
                raise ReportError(f"{path}: no column {', '.join(missing)} in the header row")
            rows = []
            for row in reader:
                record = {}
                for column, (kind, parse) in parsers.items():
                    try:
                        record[column] = parse(row[column])
                    except (ValueError, TypeError):
                        raise ReportError(
                            f"{path}:{reader.line_num}: {column} is not {kind}"
                        ) from None
                rows.append(record)
            return rows
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise ReportError(f"{path}: cannot be read ({reason})") from None


class _SqlSettings(Protocol):
    def sqlalchemy_url(self) -> sa.URL: ...


def sink_source(name: str, config: Any) -> ReportSource:
    """The source behind the sink instance ``name`` with settings ``config`` (a SinkConfig)."""
    what = f"sink {name!r} (type {config.type})"
    pii = getattr(config, "pii", None)
    url_of = getattr(config, "sqlalchemy_url", None)
    if callable(url_of):
        settings: _SqlSettings = config
        return SqlSource(settings.sqlalchemy_url(), what, pii)
    if config.type == "csv" and getattr(config, "path", None) is not None:
        return CsvSource(Path(config.path).expanduser(), what, pii)
    raise ReportError(
        f"{what} cannot be read back: report reads SQL sinks (sqlite, sql) and csv sinks"
    )


def readable_sinks(sinks: Mapping[str, Any]) -> list[str]:
    """The names of the configured sinks a report can read, in config order."""
    readable = []
    for name, config in sinks.items():
        with contextlib.suppress(ReportError):
            sink_source(name, config)
            readable.append(name)
    return readable


def choose_sink(sinks: Mapping[str, Any], name: str | None) -> ReportSource:
    """``--sink NAME``, or the first readable sink of the config."""
    if name is not None:
        if name not in sinks:
            known = ", ".join(sinks) or "none"
            raise ReportError(f"no sink named {name!r} in the config (configured: {known})")
        return sink_source(name, sinks[name])
    readable = readable_sinks(sinks)
    if not readable:
        kinds = ", ".join(f"{n} ({c.type})" for n, c in sinks.items()) or "none"
        raise ReportError(
            f"no sink in the config can be read back (configured: {kinds}); report reads SQL "
            "sinks (sqlite, sql) and csv sinks, or give --db URL / --csv DIR"
        )
    return sink_source(readable[0], sinks[readable[0]])


def make_report(
    source: ReportSource,
    window: Window,
    *,
    names: Mapping[str, str] | None = None,
    stale_days: int = 14,
) -> UsageReport:
    """Read ``window`` from ``source`` into a report; ``names`` maps tenant ids to names."""
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
