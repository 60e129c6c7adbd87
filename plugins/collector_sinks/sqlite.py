"""The SQL sink: the four usage tables in SQLite (a file path) or any SQLAlchemy database (a URL).

Types ``sqlite`` and its alias ``sql``::

    sinks:
      warehouse: {type: sqlite, path: data/usage.db}
      dwh: {type: sql, url: "postgresql+psycopg://collector@db/analytics", url_file: ...}

Each ``write`` is one transaction. For every tenant-day of the batch it deletes that day's IDE,
language and user rows and upserts the daily row, then inserts the new child rows, so a re-fetch
replaces (a user missing from the new version disappears) and a redelivery never duplicates.
The tables are the SQLModel table models of :mod:`collector.tables` (``Model.__table__``): their
DDL, and the statements below built over them; inserts are multi-row Core statements compiled once
(:class:`~collector.plugin.BulkInsert`), and the work runs in a worker thread. Opening a database
made by an earlier version migrates it additively: missing (nullable) columns are added, and in
PostgreSQL count columns created as ``INTEGER`` become ``BIGINT``. In SQLite the tables are created
``WITHOUT ROWID`` (the primary key is the table: one b-tree per row written, not two); files
created by an earlier version keep their layout and work the same.

SQLite files run in WAL mode (readers never block the writer) with a busy timeout and, by
default, ``synchronous=NORMAL``: a crash of the process loses nothing, a power cut may lose the
last commits (a ``replay`` restores them; ``synchronous: full`` avoids it at the cost of an fsync
per transaction). Write transactions start with ``BEGIN IMMEDIATE``
so two writers queue instead of failing half-way. Errors leave as
:class:`~collector.errors.SinkTransientError` (locked, connection lost, disk full) or
:class:`~collector.errors.SinkPermanentError` (integrity and data errors, an integer SQLite cannot
store); their messages carry the driver's first line only, never row values or the URL's
password. A SQLite file the sink creates is 0600 (0640 with ``files.shared_group``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Awaitable, Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar, Literal

import sqlalchemy as sa
import structlog
from pydantic import Field, SecretStr, model_validator
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.sql.dml import Insert

from collector.plugin import (
    KEYS,
    USAGE_TABLES,
    Batch,
    BulkInsert,
    Codec,
    KeyLookup,
    Prepared,
    Sink,
    SinkConfig,
    SinkError,
    SinkPermanentError,
    SinkTransientError,
    TenantDay,
    create_private_file,
    ensure_private_dir,
    hookimpl,
    insert_for,
    run_blocking,
)

_log = structlog.get_logger(__name__)

_DRIVER_HINTS = {
    "postgresql": "pip install 'zencoder-collector[postgres]'",
}


# The four tables are the SQLModel table models' (collector.tables, the one declaration of the
# data model): the DDL, upserts, deletes and the additive migration below all come from them,
# while rows go in through Core statements compiled once (collector.plugin's BulkInsert).
DAILY, IDE, LANGUAGE, USER = USAGE_TABLES
TABLES: tuple[sa.Table, ...] = USAGE_TABLES
_CHILDREN = (IDE, LANGUAGE, USER)
# Counts the previous releases created as INTEGER in PostgreSQL (32 bits), widened on open.
_COUNTS = {
    table.name: [c.name for c in table.columns if isinstance(c.type, sa.BigInteger)]
    for table in TABLES
}


class SqliteSinkConfig(SinkConfig):
    """Settings of a ``sqlite`` / ``sql`` sink: give ``path`` or ``url``, not both."""

    type: Literal["sqlite", "sql"] = "sqlite"
    batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        # Larger than the common default: one transaction per write makes small batches cost
        # a commit each, and a delivery that keeps pace with fetching still finds the days
        # in the store's rebuild cache instead of parsing every payload again.
        description="Tenant-days per write call (one transaction each).",
    )
    path: Path | None = Field(
        default=None, description="SQLite database file; created with its directory if missing."
    )
    url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy database URL, e.g. postgresql+psycopg://user:pw@host/db "
        "(a secret: it may hold a password; use url_file or ${VAR}).",
    )
    password: SecretStr | None = Field(
        default=None,
        description="Database password put into the URL (or password_file), so the URL itself "
        "can stay free of secrets.",
    )
    busy_timeout: dt.timedelta = Field(
        default=dt.timedelta(seconds=10),
        description="SQLite only: how long a write waits for another writer's lock.",
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description="SQLite only: normal survives process crashes; full also survives power loss "
        "at the cost of an fsync per transaction.",
    )
    create_tables: bool = Field(
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
        """The URL to connect with, password included: never log it."""
        if self.url is None:
            return URL.create("sqlite", database=str(self.path))
        url = make_url(self.url.get_secret_value())
        if self.password is not None:
            url = url.set(password=self.password.get_secret_value())
        return url


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
                # Created here first, the file (and its -wal and -shm files, which SQLite gives
                # the database's mode) is owner-only whatever the umask: it holds emails.
                database = Path(url.database or "").expanduser()
                ensure_private_dir(database.parent, self.host.shared_group)
                create_private_file(database, self.host.shared_group)
            engine = _create_engine(url, self.config.busy_timeout, self.config.synchronous)
            if self.config.create_tables:
                DAILY.metadata.create_all(engine, tables=list(TABLES))
            missing = _missing_columns(engine)
            if missing and self.config.create_tables:
                _migrate(engine, missing, self.name)
                _log.info("sink.columns_added", sink=self.name, columns=_names(missing))
            elif missing:
                raise SinkPermanentError(
                    f"sink {self.name}: the database lacks the column(s) {_names(missing)}, and "
                    "create_tables is off: add them (docs/data-model.md) or turn create_tables on"
                )
            if self.config.create_tables and engine.dialect.name == "postgresql":
                widened = _widen_counts(engine)
                if widened:
                    _log.info("sink.counts_widened", sink=self.name, columns=widened)
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
        rows = _rows(latest.values(), statements.codec)
        try:
            with engine.begin() as conn:
                statements.write(conn, list(latest), rows)
        except (exc.SQLAlchemyError, OSError, OverflowError) as error:
            # OverflowError: sqlite3 cannot bind an integer beyond 64 bits, a value of the data.
            raise self._translate(error) from None

    def _translate(self, error: BaseException) -> SinkError:
        if isinstance(error, exc.DBAPIError) and error.orig is not None:
            detail = f"{type(error.orig).__name__}: {_first_line(error.orig)}"
        else:
            detail = f"{type(error).__name__}: {_first_line(error)}"
        if self._password:
            detail = detail.replace(self._password, "***")
        message = f"sink {self.name}: {detail}"
        if isinstance(error, exc.IntegrityError | exc.DataError | OverflowError):
            # The database refuses a value of this data (a constraint, a type's range): the same
            # rows fail every time, so only a dead letter (and a fix, then replay) helps.
            return SinkPermanentError(message)
        return SinkTransientError(message)


def _names(columns: list[sa.Column[Any]]) -> str:
    return ", ".join(f"{column.table.name}.{column.name}" for column in columns)


def _missing_columns(engine: Engine) -> list[sa.Column[Any]]:
    """Columns of the models that the tables of a database made by an earlier version lack."""
    # The columns of an empty result rather than the inspector: reflection is the part of a
    # dialect most often incomplete (duckdb-engine's queries PostgreSQL catalogs DuckDB lacks).
    quote = engine.dialect.identifier_preparer
    missing: list[sa.Column[Any]] = []
    for table in TABLES:
        probe = f"SELECT * FROM {quote.format_table(table)} WHERE 1 = 0"  # noqa: S608 - our own table names
        try:
            # A connection per table: in PostgreSQL a failed probe spoils its transaction.
            with engine.connect() as conn:
                present = set(conn.execute(sa.text(probe)).keys())
        except exc.DBAPIError:
            continue  # create_tables is off and the table does not exist: the write says so
        missing += [column for column in table.columns if column.name not in present]
    return missing


def _migrate(engine: Engine, missing: list[sa.Column[Any]], sink: str) -> None:
    """Additive migration: add each missing column; existing rows keep their values and read the
    new column as NULL. Only nullable columns can be added so: another one is an error."""
    required = [column for column in missing if not column.nullable]
    if required:
        raise SinkPermanentError(
            f"sink {sink}: the column(s) {_names(required)} are missing and, being NOT NULL, "
            "cannot be added to existing rows: see docs/data-model.md"
        )
    quote = engine.dialect.identifier_preparer
    try:
        with engine.begin() as conn:
            for column in missing:
                column_type = column.type.compile(dialect=engine.dialect)
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {quote.format_table(column.table)} "
                        f"ADD COLUMN {quote.format_column(column)} {column_type}"
                    )
                )
    except exc.DBAPIError:
        # Another process opening the same database may have added them first.
        if _missing_columns(engine):
            raise


def _widen_counts(engine: Engine) -> list[str]:
    """PostgreSQL: turn count columns that an earlier release created as INTEGER (32 bits) into
    the models' BIGINT, so counts up to 2**63 - 1 fit; returns the columns widened.

    The catalog says which are narrow (one query; nothing to do on every later open). ``ALTER
    COLUMN ... TYPE BIGINT`` rewrites the table under an exclusive lock, once.
    """
    quote = engine.dialect.identifier_preparer
    narrow = sa.text(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND data_type = 'integer'"
        " AND table_name IN :tables"
    ).bindparams(sa.bindparam("tables", expanding=True))
    with engine.begin() as conn:
        found = {tuple(row) for row in conn.execute(narrow, {"tables": list(_COUNTS)})}
        widened = []
        for table in TABLES:
            for name in _COUNTS[table.name]:
                if (table.name, name) in found:
                    column = table.c[name]
                    conn.execute(
                        sa.text(
                            f"ALTER TABLE {quote.format_table(table)} "
                            f"ALTER COLUMN {quote.format_column(column)} TYPE BIGINT"
                        )
                    )
                    widened.append(f"{table.name}.{name}")
    return widened


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
        # Statement journals (each upsert batch inside a transaction has one) and sort trees stay
        # in memory instead of spilling to files under /var/tmp, a write and read per page.
        cursor.execute("PRAGMA temp_store=MEMORY")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front: a deferred transaction that upgrades later can fail with
        # "database is locked" without waiting for the busy timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class _Statements:
    """The write statements for one dialect, compiled once (see :mod:`collector.store.prepared`
    for why they bypass SQLAlchemy's per-row parameter processing)."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self.codec = Codec(dialect.name)
        tenant: sa.BindParameter[str] = sa.bindparam("k_tenant")
        day: sa.BindParameter[dt.date] = sa.bindparam("k_day")
        # SQLite and PostgreSQL: many rows per statement, upserts, and the children of a day
        # are deleted only where it has some (one lookup per batch, not three deletes per day).
        # Other databases: row by row, and the daily row replaced by delete + insert.
        self.bulk = dialect.name in ("sqlite", "postgresql")
        self._deletes = [
            Prepared(
                sa.delete(table).where(table.c.tenant == tenant, table.c.day == day),
                dialect,
                ["k_tenant", "k_day"],
            )
            for table in (_CHILDREN if self.bulk else TABLES)
        ]
        self._widths = [len(table.columns) for table in TABLES]
        self._bulk_inserts: list[BulkInsert] = []
        self._inserts: list[Prepared] = []
        if self.bulk:
            self._bulk_inserts = [
                BulkInsert(_upsert(table, dialect.name), dialect, [c.name for c in table.columns])
                for table in TABLES
            ]
            stored = sa.select(KEYS.c.tenant, KEYS.c.day).where(
                sa.or_(
                    *(
                        sa.exists().where(
                            table.c.tenant == KEYS.c.tenant, table.c.day == KEYS.c.day
                        )
                        for table in _CHILDREN
                    )
                )
            )
            self._stored = KeyLookup(stored, dialect)
        else:
            self._inserts = [
                Prepared(sa.insert(table), dialect, [c.name for c in table.columns])
                for table in TABLES
            ]

    def day(self, day: dt.date) -> Any:
        return self.codec.day(day)

    def write(
        self,
        conn: Connection,
        keys: list[tuple[str, dt.date]],
        values: tuple[Values, Values, Values, Values],
    ) -> None:
        """Replace the tenant-days ``keys`` with ``values`` (per table, see :func:`_rows`), in
        the caller's transaction."""
        if self.bulk:
            stored = {(tenant, day) for tenant, day in self._stored.rows(conn, keys)}
            keys = [(t, d) for t, d in ((t, self.day(d)) for t, d in keys) if (t, d) in stored]
        else:
            keys = [(tenant, self.day(day)) for tenant, day in keys]
        for delete in self._deletes:
            delete.executemany(conn, keys)
        for index, table_values in enumerate(values):
            if not table_values:
                continue
            if self.bulk:
                self._bulk_inserts[index].execute(conn, table_values)
                continue
            width = self._widths[index]
            rows = (table_values[i : i + width] for i in range(0, len(table_values), width))
            self._inserts[index].executemany(conn, rows)


_STATEMENTS: dict[tuple[str, str], _Statements] = {}


def _statements(dialect: sa.Dialect) -> _Statements:
    key = (dialect.name, dialect.driver)
    statements = _STATEMENTS.get(key)
    if statements is None:
        statements = _STATEMENTS[key] = _Statements(dialect)
    return statements


def _upsert(table: sa.Table, dialect: str) -> Insert:
    statement = insert_for(dialect)(table)
    keys = [c.name for c in table.primary_key.columns]
    values = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    upsert: Insert = statement.on_conflict_do_update(index_elements=keys, set_=values)
    return upsert


Values = list[Any]
_day_key = attrgetter("tenant", "day")
_ide_key = attrgetter("ide_name")
_language_key = attrgetter("language_name")
_user_key = attrgetter("user")
_NO_NAME = object()  # before the first row of a day: equal to no name
# What json.dumps escapes (ensure_ascii=False): quotes, backslashes and control characters.
_needs_escape = re.compile(r'[\x00-\x1f"\\]').search


class _Iso(dict[Any, Any]):
    """ISO text of each date (and None of None), worked out once per batch."""

    def __missing__(self, key: dt.date | None) -> str | None:
        value = self[key] = None if key is None else key.isoformat()
        return value


class _Same(dict[Any, Any]):
    """Each date as it is: what :class:`_Iso` is for drivers that take Python dates."""

    def __missing__(self, key: dt.date | None) -> dt.date | None:
        self[key] = key
        return key


class _Json(dict[tuple[str, ...], str]):
    """The JSON array of each tuple of names, encoded once per batch."""

    def __missing__(self, key: tuple[str, ...]) -> str:
        # The text json.dumps(list(key), ensure_ascii=False) gives, built directly when no
        # name needs escaping (nearly always): a tenth of json.dumps' cost.
        try:
            plain = _needs_escape("".join(key)) is None
        except TypeError:  # not all names are strings: leave it to json.dumps
            plain = False
        if not key:
            value = "[]"
        elif plain:
            value = '["' + '", "'.join(key) + '"]'
        else:
            value = json.dumps(list(key), ensure_ascii=False)
        self[key] = value
        return value


def _rows(tenant_days: Iterable[TenantDay], codec: Codec) -> tuple[Values, Values, Values, Values]:
    """Driver parameters for the four tables, in each table's column order (the hot path).

    One flat list of values per table, row after row: a tuple per row would keep tens of
    thousands of containers alive per batch, and set off the cyclic garbage collector again and
    again. SQLite gets the exact text SQLAlchemy itself would store (ISO dates, ``YYYY-MM-DD
    HH:MM:SS.ffffff`` UTC timestamps, 0/1 booleans), so the tables read back through SQLAlchemy
    as usual; other drivers get Python dates and aware UTC datetimes.
    """
    daily: Values = []
    ides: Values = []
    languages: Values = []
    users: Values = []
    as_json = _Json()
    dates: dict[Any, Any] = _Iso() if codec.sqlite else _Same()
    moment = codec.moment
    # Rows in primary-key order: each insert lands next to the previous one in the table's
    # b-tree, which costs SQLite a quarter less than the order the days arrive in.
    for td in sorted(tenant_days, key=_day_key):
        tenant = td.tenant
        day = dates[td.day]
        record = td.daily
        daily += (
            tenant,
            day,
            record.active_users,
            record.messages,
            codec.moment(record.fetched_at),
            codec.flag(record.final),
        )
        # A name repeated within one day keeps its last row (the primary key allows one): the
        # sort is stable, so it is the last of the run of equal names, which replaces the rows
        # before it. Cheaper than looking for repeats first, as there almost never are any.
        name: Any = _NO_NAME
        for ide in sorted(td.ides, key=_ide_key):
            if ide.ide_name == name:
                del ides[-4:]
            name = ide.ide_name
            ides += (tenant, day, name, ide.engaged_users)
        name = _NO_NAME
        for language in sorted(td.languages, key=_language_key):
            if language.language_name == name:
                del languages[-4:]
            name = language.language_name
            languages += (tenant, day, name, language.engaged_users)
        name = _NO_NAME
        for user in sorted(td.users, key=_user_key):
            if user.user == name:
                del users[-8:]
            name = user.user
            users += (
                tenant,
                day,
                name,
                user.messages,
                dates[user.last_active],
                as_json[user.ides],
                as_json[user.languages],
                # Mostly None (the API sends a bare date): no call for it, once per user row.
                None if (at := user.last_active_at) is None else moment(at),
            )
    return daily, ides, languages, users


@hookimpl
def collector_register_sinks() -> list[type[Sink]]:
    """The SQL sink under its two names."""
    return [SqliteSink, SqlSink]


# --- tenant purge (``zencoder-collector tenant purge``) ----------------------------------------


@hookimpl
def collector_sink_purge(sink: Sink, tenant: str) -> Awaitable[int] | None:
    """Delete the tenant's rows from the four tables of a sqlite/sql sink; None for others."""
    if not isinstance(sink, SqliteSink):
        return None
    return run_blocking(_purge_tenant_rows, sink, tenant)


def _purge_tenant_rows(sink: SqliteSink, tenant: str) -> int:
    """One transaction over the four tables; returns the number of rows deleted."""
    engine = sink._engine  # opened by the host before the purge
    if engine is None:
        raise SinkTransientError(f"sink {sink.name}: closed")
    deleted = 0
    try:
        with engine.begin() as conn:
            for table in (*_CHILDREN, DAILY):
                deleted += conn.execute(table.delete().where(table.c.tenant == tenant)).rowcount
    except (exc.SQLAlchemyError, OSError) as error:
        raise sink._translate(error) from None
    return deleted
