"""The SQL sink: the four usage tables in SQLite (a file path) or any SQLAlchemy database (a URL).

Types ``sqlite`` and its alias ``sql``::

    sinks:
      warehouse: {type: sqlite, path: data/usage.db}
      dwh: {type: sql, url: "postgresql+psycopg://collector@db/analytics", url_file: ...}

Each ``write`` is one transaction. For every tenant-day of the batch it deletes that day's IDE,
language and user rows and upserts the daily row, then inserts the new child rows, so a re-fetch
replaces (a user missing from the new version disappears) and a redelivery never duplicates.
Inserts are bulk ``executemany`` calls; the work runs in a worker thread. In SQLite the tables
are created ``WITHOUT ROWID`` (the primary key is the table: one b-tree per row written, not
two); files created by an earlier version keep their layout and work the same.

SQLite files run in WAL mode (readers never block the writer) with a busy timeout and, by
default, ``synchronous=NORMAL``: a crash of the process loses nothing, a power cut may lose the
last commits (a ``replay`` restores them; ``synchronous: full`` avoids it at the cost of an fsync
per transaction). Write transactions start with ``BEGIN IMMEDIATE``
so two writers queue instead of failing half-way. Errors leave as
:class:`~collector.errors.SinkTransientError` (locked, connection lost, disk full) or
:class:`~collector.errors.SinkPermanentError` (integrity and data errors); their messages carry
the driver's first line only, never row values or the URL's password.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import sqlalchemy as sa
from pydantic import Field as PydanticField
from pydantic import SecretStr, model_validator
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import registry
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlmodel import Field, SQLModel

from collector.errors import SinkError, SinkPermanentError, SinkTransientError
from collector.hookspecs import hookimpl
from collector.models import Batch, TenantDay
from collector.sink import Sink, SinkConfig, run_blocking

_DRIVER_HINTS = {
    "postgresql": "pip install 'zencoder-collector[postgres]'",
}


class UsageTable(SQLModel, registry=registry()):
    """Base of the usage tables: their own metadata, apart from any other SQLModel tables."""


class UsageDaily(UsageTable, table=True):
    __tablename__ = "usage_daily"
    __table_args__ = {"sqlite_with_rowid": False}

    tenant: str = Field(primary_key=True)
    day: dt.date = Field(primary_key=True)
    active_users: int
    messages: int
    fetched_at: dt.datetime = Field(sa_type=sa.DateTime(timezone=True))
    final: bool


class UsageDailyIde(UsageTable, table=True):
    __tablename__ = "usage_daily_ide"
    __table_args__ = {"sqlite_with_rowid": False}

    tenant: str = Field(primary_key=True)
    day: dt.date = Field(primary_key=True)
    ide_name: str = Field(primary_key=True)
    engaged_users: int


class UsageDailyLanguage(UsageTable, table=True):
    __tablename__ = "usage_daily_language"
    __table_args__ = {"sqlite_with_rowid": False}

    tenant: str = Field(primary_key=True)
    day: dt.date = Field(primary_key=True)
    language_name: str = Field(primary_key=True)
    engaged_users: int


class UsageUserDaily(UsageTable, table=True):
    __tablename__ = "usage_user_daily"
    __table_args__ = {"sqlite_with_rowid": False}

    tenant: str = Field(primary_key=True)
    day: dt.date = Field(primary_key=True)
    user: str = Field(primary_key=True)
    messages: int
    last_active: dt.date | None = None
    ides: str = Field(default="[]", description="JSON array of IDE names")
    languages: str = Field(default="[]", description="JSON array of language names")


DAILY: sa.Table = UsageDaily.__table__  # type: ignore[attr-defined]
IDE: sa.Table = UsageDailyIde.__table__  # type: ignore[attr-defined]
LANGUAGE: sa.Table = UsageDailyLanguage.__table__  # type: ignore[attr-defined]
USER: sa.Table = UsageUserDaily.__table__  # type: ignore[attr-defined]
TABLES: tuple[sa.Table, ...] = (DAILY, IDE, LANGUAGE, USER)
METADATA: sa.MetaData = UsageTable.metadata
_CHILDREN = (IDE, LANGUAGE, USER)


class SqliteSinkConfig(SinkConfig):
    """Settings of a ``sqlite`` / ``sql`` sink: give ``path`` or ``url``, not both."""

    type: Literal["sqlite", "sql"] = "sqlite"
    batch_size: int = PydanticField(
        default=500,
        ge=1,
        le=10_000,
        # Larger than the common default: one transaction per write makes small batches cost
        # a commit each, and a delivery that keeps pace with fetching still finds the days
        # in the store's rebuild cache instead of parsing every payload again.
        description="Tenant-days per write call (one transaction each).",
    )
    path: Path | None = PydanticField(
        default=None, description="SQLite database file; created with its directory if missing."
    )
    url: SecretStr | None = PydanticField(
        default=None,
        description="SQLAlchemy database URL, e.g. postgresql+psycopg://user:pw@host/db "
        "(a secret: it may hold a password; use url_file or ${VAR}).",
    )
    password: SecretStr | None = PydanticField(
        default=None,
        description="Database password put into the URL (or password_file), so the URL itself "
        "can stay free of secrets.",
    )
    busy_timeout: dt.timedelta = PydanticField(
        default=dt.timedelta(seconds=10),
        description="SQLite only: how long a write waits for another writer's lock.",
    )
    synchronous: Literal["normal", "full"] = PydanticField(
        default="normal",
        description="SQLite only: normal survives process crashes; full also survives power loss "
        "at the cost of an fsync per transaction.",
    )
    create_tables: bool = PydanticField(
        default=True, description="Create the four tables if they do not exist."
    )

    @model_validator(mode="after")
    def _one_target(self) -> SqliteSinkConfig:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of path (SQLite file) or url (SQLAlchemy URL)")
        if self.url is not None:
            _check_url(self.url.get_secret_value())
        return self

    def sqlalchemy_url(self) -> URL:
        """The URL to connect with, password included: never log it (see ``redacted_url``)."""
        if self.url is None:
            return URL.create("sqlite", database=str(self.path))
        url = make_url(self.url.get_secret_value())
        if self.password is not None:
            url = url.set(password=self.password.get_secret_value())
        return url

    def redacted_url(self) -> str:
        """The target with any password masked, safe for logs and ``status``."""
        return self.sqlalchemy_url().render_as_string(hide_password=True)


def _check_url(raw: str) -> None:
    """Reject an unusable URL at config time, without echoing it (it may hold a password)."""
    try:
        url = make_url(raw)
    except exc.ArgumentError:
        raise ValueError("url is not a valid SQLAlchemy URL (dialect+driver://...)") from None
    try:
        dialect = url.get_dialect()
    except exc.NoSuchModuleError:
        raise ValueError(f"url: unknown database dialect '{url.drivername}'") from None
    try:
        dialect.import_dbapi()
    except ImportError:
        hint = _DRIVER_HINTS.get(url.get_backend_name(), f"install the {url.drivername} driver")
        raise ValueError(
            f"url: the driver for '{url.drivername}' is not installed; {hint}"
        ) from None


class SqliteSink(Sink):
    """SQLite file or SQL database by URL (PostgreSQL, ...) holding the four usage tables."""

    type_name: ClassVar[str] = "sqlite"
    Config: ClassVar[type[SinkConfig]] = SqliteSinkConfig

    def __init__(self, name: str, config: SqliteSinkConfig) -> None:
        super().__init__(name, config)
        self.config: SqliteSinkConfig = config
        self._engine: Engine | None = None
        self._password = self.config.sqlalchemy_url().password or ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    async def open(self) -> None:
        if self._engine is None:
            await run_blocking(self._open_sync)

    async def write(self, batch: Batch) -> None:
        if self._engine is None:
            await self.open()
        if batch:
            await run_blocking(self._write_sync, batch)

    async def ping(self) -> None:
        if self._engine is None:
            await self.open()
        await run_blocking(self._ping_sync)

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await run_blocking(engine.dispose)

    # --- blocking work, in a worker thread ------------------------------------------------------

    def _open_sync(self) -> None:
        try:
            url = self.config.sqlalchemy_url()
            is_sqlite = url.get_backend_name() == "sqlite"
            if is_sqlite and url.database not in (None, "", ":memory:"):
                Path(url.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = _create_engine(url, self.config.busy_timeout, self.config.synchronous)
            if self.config.create_tables:
                METADATA.create_all(engine)
            else:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
        except (exc.SQLAlchemyError, OSError) as error:
            raise self._translate(error) from None
        self._engine = engine

    def _ping_sync(self) -> None:
        if self._engine is None:
            raise SinkTransientError(f"sink {self.name}: closed")
        try:
            with self._engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except (exc.SQLAlchemyError, OSError) as error:
            raise self._translate(error) from None

    def _write_sync(self, batch: Batch) -> None:
        engine = self._engine
        if engine is None:
            raise SinkTransientError(f"sink {self.name}: closed")
        # Within one batch a tenant-day delivered twice keeps its last version.
        latest: dict[tuple[str, dt.date], TenantDay] = {(td.tenant, td.day): td for td in batch}
        statements = _statements(engine.dialect)
        rows = _rows(latest.values(), sqlite=statements.sqlite)
        keys = [(tenant, statements.day(day)) for tenant, day in latest]
        try:
            with engine.begin() as conn:
                for delete in statements.deletes:
                    delete.execute(conn, keys)
                for insert, table_rows in zip(statements.inserts, rows, strict=True):
                    if table_rows:
                        insert.execute(conn, table_rows)
        except (exc.SQLAlchemyError, OSError) as error:
            raise self._translate(error) from None

    def _translate(self, error: BaseException) -> SinkError:
        if isinstance(error, exc.DBAPIError) and error.orig is not None:
            detail = f"{type(error.orig).__name__}: {_first_line(error.orig)}"
        else:
            detail = f"{type(error).__name__}: {_first_line(error)}"
        if self._password:
            detail = detail.replace(self._password, "***")
        message = f"sink {self.name}: {detail}"
        if isinstance(error, exc.IntegrityError | exc.DataError):
            return SinkPermanentError(message)
        return SinkTransientError(message)


class SqlSink(SqliteSink):
    """Alias of sqlite for databases given by URL (PostgreSQL, ...); same tables and settings."""

    type_name: ClassVar[str] = "sql"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _create_engine(url: URL, busy_timeout: dt.timedelta, synchronous: str) -> Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, hide_parameters=True, pool_pre_ping=True)
    engine = sa.create_engine(
        url,
        hide_parameters=True,
        # The engine is used from several worker threads, one at a time per sink instance.
        connect_args={"check_same_thread": False, "timeout": busy_timeout.total_seconds()},
    )
    busy_ms = int(busy_timeout.total_seconds() * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level, so that "begin" below decides how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous.upper()}")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front: a deferred transaction that upgrades later can fail with
        # "database is locked" without waiting for the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class _DriverStatement:
    """A statement compiled once for a dialect and run with driver-level ``executemany``.

    Bypassing SQLAlchemy's per-row parameter processing is what keeps a write well under a
    millisecond per tenant-day; rows arrive already in the driver's native types.
    """

    def __init__(self, statement: sa.ClauseElement, dialect: sa.Dialect, names: list[str]) -> None:
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {statement!r}")
        self.sql = compiled.string
        self.names = names
        order = list(compiled.positiontup or [])
        self.positions = [names.index(name) for name in order] if compiled.positional else None

    def execute(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        if self.positions is None:
            params: list[Any] = [dict(zip(self.names, row, strict=True)) for row in rows]
        elif self.positions == list(range(len(self.names))):
            params = rows
        else:
            params = [tuple(row[i] for i in self.positions) for row in rows]
        conn.exec_driver_sql(self.sql, params)


class _Statements:
    def __init__(self, dialect: sa.Dialect) -> None:
        self.sqlite = dialect.name == "sqlite"
        tenant: sa.BindParameter[str] = sa.bindparam("k_tenant")
        day: sa.BindParameter[dt.date] = sa.bindparam("k_day")
        upsert = dialect.name in ("sqlite", "postgresql")
        # Without ON CONFLICT support the daily row is replaced by delete + insert instead.
        deleted = _CHILDREN if upsert else TABLES
        self.deletes = [
            _DriverStatement(
                sa.delete(table).where(table.c.tenant == tenant, table.c.day == day),
                dialect,
                ["k_tenant", "k_day"],
            )
            for table in deleted
        ]
        self.inserts = [
            _DriverStatement(
                _upsert(table, dialect.name) if upsert else sa.insert(table),
                dialect,
                [c.name for c in table.columns],
            )
            for table in TABLES
        ]

    def day(self, day: dt.date) -> Any:
        return day.isoformat() if self.sqlite else day


_STATEMENTS: dict[tuple[str, str], _Statements] = {}


def _statements(dialect: sa.Dialect) -> _Statements:
    key = (dialect.name, dialect.driver)
    statements = _STATEMENTS.get(key)
    if statements is None:
        statements = _STATEMENTS[key] = _Statements(dialect)
    return statements


def _upsert(table: sa.Table, dialect: str) -> Insert:
    from sqlalchemy.dialects import postgresql, sqlite

    statement = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    keys = [c.name for c in table.primary_key.columns]
    values = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    return statement.on_conflict_do_update(index_elements=keys, set_=values)


Row = tuple[Any, ...]


def _rows(
    tenant_days: Iterable[TenantDay], *, sqlite: bool
) -> tuple[list[Row], list[Row], list[Row], list[Row]]:
    """Driver parameters for the four tables, in each table's column order (the hot path).

    SQLite gets the exact text SQLAlchemy itself would store (ISO dates, ``YYYY-MM-DD
    HH:MM:SS.ffffff`` UTC timestamps, 0/1 booleans), so the tables read back through SQLAlchemy
    or sqlmodel as usual; other drivers get Python dates and aware UTC datetimes.
    """
    daily: list[Row] = []
    ides: list[Row] = []
    languages: list[Row] = []
    users: list[Row] = []
    encoded: dict[tuple[str, ...], str] = {}
    iso_days: dict[dt.date, str] = {}

    def as_json(names: tuple[str, ...]) -> str:
        text = encoded.get(names)
        if text is None:
            text = encoded[names] = json.dumps(list(names), ensure_ascii=False)
        return text

    def as_day(moment: dt.date | None) -> Any:
        if moment is None or not sqlite:
            return moment
        text = iso_days.get(moment)
        if text is None:
            text = iso_days[moment] = moment.isoformat()
        return text

    for td in tenant_days:
        tenant = td.tenant
        day: Any = as_day(td.day)
        fetched_at = _utc(td.daily.fetched_at)
        daily.append(
            (
                tenant,
                day,
                td.daily.active_users,
                td.daily.messages,
                fetched_at.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else fetched_at,
                int(td.daily.final) if sqlite else td.daily.final,
            )
        )
        # A name repeated within one day keeps its last row: the primary key allows one.
        ides.extend(
            {i.ide_name: (tenant, day, i.ide_name, i.engaged_users) for i in td.ides}.values()
        )
        languages.extend(
            {
                x.language_name: (tenant, day, x.language_name, x.engaged_users)
                for x in td.languages
            }.values()
        )
        rows = [
            (
                tenant,
                day,
                u.user,
                u.messages,
                as_day(u.last_active),
                as_json(u.ides),
                as_json(u.languages),
            )
            for u in td.users
        ]
        if len({row[2] for row in rows}) != len(rows):
            rows = list({row[2]: row for row in rows}.values())
        users.extend(rows)
    return daily, ides, languages, users


def _utc(moment: dt.datetime) -> dt.datetime:
    # A naive timestamp is taken as UTC; SQLite has no time zones, so everything is stored in UTC.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


@hookimpl
def collector_register_sinks() -> list[type[Sink]]:
    """The SQL sink under its two names."""
    return [SqliteSink, SqlSink]
