"""The SQL sink against a real SQLite file and, given COLLECTOR_TEST_POSTGRES_URL, PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from msgspec.structs import replace
from pydantic import SecretStr, ValidationError

from collector.errors import SinkPermanentError, SinkTransientError
from collector.models import TenantDay, UserDayRecord
from collector.sink import SinkHost
from collector.testing import make_batch, make_tenant_day, refetched
from collector_sinks.sqlite import SqliteSink, SqliteSinkConfig, SqlSink

FIXTURES = Path(__file__).parent / "fixtures"
TABLE_KEYS = {
    "usage_daily": ("tenant", "day"),
    "usage_daily_ide": ("tenant", "day", "ide_name"),
    "usage_daily_language": ("tenant", "day", "language_name"),
    "usage_user_daily": ("tenant", "day", "user"),
}


def _text(value: Any) -> Any:
    """Dates and timestamps as ISO text (UTC), whatever the driver returned."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def read_tables(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the four tables through plain SQL, ordered by primary key."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables: dict[str, list[tuple[Any, ...]]] = {}
            for table, keys in TABLE_KEYS.items():
                order = ", ".join(f'"{k}"' for k in keys)
                result = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY {order}"))  # noqa: S608 - fixed table names
                tables[table] = [tuple(_text(v) for v in row) for row in result]
            return tables
    finally:
        engine.dispose()


def expected_tables(tenant_days: list[TenantDay]) -> dict[str, list[tuple[Any, ...]]]:
    """What the four tables must hold for these tenant-days, in read_tables' form."""
    daily, ides, languages, users = [], [], [], []
    for td in tenant_days:
        day = td.day.isoformat()
        stamp = td.fetched_at.astimezone(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")
        daily.append((td.tenant, day, td.daily.active_users, td.daily.messages, stamp, True))
        ides += [(td.tenant, day, i.ide_name, i.engaged_users) for i in td.ides]
        languages += [(td.tenant, day, x.language_name, x.engaged_users) for x in td.languages]
        users += [
            (
                td.tenant,
                day,
                u.user,
                u.messages,
                u.last_active.isoformat() if u.last_active else None,
                u.ides,
                u.languages,
                _text(u.last_active_at),
            )
            for u in td.users
        ]
    return {
        "usage_daily": sorted(daily),
        "usage_daily_ide": sorted(ides),
        "usage_daily_language": sorted(languages),
        "usage_user_daily": sorted(users),
    }


def comparable(tables: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """Decode the JSON arrays of user rows and booleans, so rows compare with expected_tables."""
    result = dict(tables)
    result["usage_daily"] = sorted(
        (*row[:4], _text(dt.datetime.fromisoformat(str(row[4]))), bool(row[5]))
        for row in tables["usage_daily"]
    )
    result["usage_user_daily"] = sorted(
        (
            *row[:5],
            tuple(json.loads(row[5])),
            tuple(json.loads(row[6])),
            None if row[7] is None else _text(dt.datetime.fromisoformat(str(row[7]))),
        )
        for row in tables["usage_user_daily"]
    )
    for name in ("usage_daily_ide", "usage_daily_language"):
        result[name] = sorted(tables[name])
    return result


@pytest.fixture
def postgres_schema_url(postgres_url: str) -> Iterator[str]:
    """A fresh schema in the test PostgreSQL database, dropped afterwards."""
    schema = f"sink_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL: a SQLite file in tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.db'}"
    url: str = request.getfixturevalue("postgres_schema_url")
    return url


@pytest.fixture
async def sink(target_url: str) -> AsyncIterator[SqliteSink]:
    """An opened SQL sink on target_url, closed after the test."""
    sink = SqlSink("warehouse", SqliteSinkConfig(type="sql", url=SecretStr(target_url)))
    await sink.open()
    yield sink
    await sink.aclose()


async def test_write_stores_the_four_tables_exactly(sink: SqliteSink, target_url: str) -> None:
    """Every daily, IDE, language and user row of a batch is stored with its exact values."""
    batch = make_batch(("acme", "globex"), 3, users=5)
    await sink.write(batch)
    assert comparable(read_tables(target_url)) == expected_tables(batch)


async def test_redelivery_replaces_and_never_duplicates(sink: SqliteSink, target_url: str) -> None:
    """Writing a batch again, then a changed re-fetch, leaves exactly the latest version once."""
    first = make_batch(("acme",), 2, users=6)
    await sink.write(first)
    await sink.write(first)
    assert comparable(read_tables(target_url)) == expected_tables(first)
    second = [refetched(first[0], drop_users=2), refetched(first[1], drop_users=99)]
    await sink.write(second)
    stored = comparable(read_tables(target_url))
    assert stored == expected_tables(second)
    assert len(stored["usage_user_daily"]) == 4  # two users of day 1 and all of day 2 are gone
    assert stored["usage_daily"][1][2:4] == (0, 0)


async def test_duplicate_tenant_day_in_one_batch_keeps_the_last(
    sink: SqliteSink, target_url: str
) -> None:
    """A tenant-day given twice in one batch is stored once, as its later version."""
    old = make_tenant_day("acme", dt.date(2025, 3, 1), 4)
    new = refetched(old)
    await sink.write([old, new])
    assert comparable(read_tables(target_url)) == expected_tables([new])


async def test_a_name_repeated_within_one_day_keeps_its_last_row(
    sink: SqliteSink, target_url: str
) -> None:
    """A user, IDE or language listed twice in one tenant-day is stored once, with the values of
    its last occurrence, and names needing JSON escapes are stored as json.dumps writes them."""
    td = make_tenant_day("acme", users=["b@example.com", "a@example.com"])
    users = [replace(u, ides=('Vim "classic"',), languages=("F\\#", "Go\tlang")) for u in td.users]
    again = replace(users[0], messages=users[0].messages + 100)
    ide_again = replace(td.ides[0], engaged_users=99)
    language_again = replace(td.languages[-1], engaged_users=98)
    repeated = replace(
        td,
        users=(users[0], users[1], again),
        ides=(*td.ides, ide_again),
        languages=(language_again, *td.languages),
    )
    await sink.write([repeated])
    last = replace(
        td, users=(users[1], again), ides=(*td.ides[1:], ide_again), languages=td.languages
    )
    stored = read_tables(target_url)
    assert comparable(stored) == expected_tables([last])
    assert {row[5] for row in stored["usage_user_daily"]} == {'["Vim \\"classic\\""]'}
    assert {row[6] for row in stored["usage_user_daily"]} == {json.dumps(["F\\#", "Go\tlang"])}


async def test_large_batch_replaces_stored_days_and_adds_new_ones(
    sink: SqliteSink, target_url: str
) -> None:
    """A batch of thousands of rows and hundreds of days (many statements, several key lookups)
    replaces the stored days it holds, removed users included, adds the new ones and leaves the
    other stored days as they were."""
    stored = make_batch(30, 10, users=12)  # 300 days, 3,600 user rows
    await sink.write(stored)
    changed = [refetched(td, drop_users=3) for td in stored[::2]]
    new = make_batch(30, 5, start=stored[-1].day + dt.timedelta(days=1), users=12, seed=1)
    await sink.write(changed + new)
    expected = expected_tables(changed + stored[1::2] + new)
    assert comparable(read_tables(target_url)) == expected
    assert len(expected["usage_user_daily"]) == 150 * 9 + 150 * 12 + 150 * 12


async def test_unicode_round_trip(sink: SqliteSink, target_url: str) -> None:
    """Non-ASCII emails, IDE and language names are stored unchanged (JSON arrays unescaped)."""
    batch = make_batch(("acme",), 1, users=4, unicode=True)
    await sink.write(batch)
    assert comparable(read_tables(target_url)) == expected_tables(batch)


async def test_naive_and_offset_timestamps_are_stored_in_utc(
    sink: SqliteSink, target_url: str
) -> None:
    """fetched_at with any UTC offset is stored as the same instant in UTC."""
    plus_two = dt.timezone(dt.timedelta(hours=2))
    aware = make_tenant_day("acme", fetched_at=dt.datetime(2025, 1, 16, 8, 30, tzinfo=plus_two))
    naive = make_tenant_day("globex", fetched_at=dt.datetime(2025, 1, 16, 7, 45))
    await sink.write([aware, naive])
    stamps = [row[4] for row in comparable(read_tables(target_url))["usage_daily"]]
    assert stamps == ["2025-01-16 06:30:00", "2025-01-16 07:45:00"]


async def test_last_active_at_is_stored_in_utc_or_null(sink: SqliteSink, target_url: str) -> None:
    """A user's last_active_at is stored as the same instant in UTC, and None as NULL."""
    td = make_tenant_day("acme", users=3)
    plus_two = dt.timezone(dt.timedelta(hours=2))
    stamps = [dt.datetime(2025, 1, 14, 23, 59, 58, 250000, tzinfo=plus_two), None, None]
    users = [replace(u, last_active_at=at) for u, at in zip(td.users, stamps, strict=True)]
    await sink.write([td.with_users(users)])
    stored = comparable(read_tables(target_url))["usage_user_daily"]
    assert [row[7] for row in stored] == ["2025-01-14 21:59:58.250000", None, None]
    assert stored == expected_tables([td.with_users(users)])["usage_user_daily"]


async def test_a_database_of_the_previous_release_gains_last_active_at(tmp_path: Path) -> None:
    """Opening a SQLite file written before last_active_at existed adds the column, keeps every
    row (their last_active_at is NULL), and new days store it."""
    path = tmp_path / "usage.db"
    path.write_bytes((FIXTURES / "sink_sqlite_before_last_active_at.db").read_bytes())
    before = read_tables(f"sqlite:///{path}")
    assert len(before["usage_user_daily"]) == 12
    assert all(len(row) == 7 for row in before["usage_user_daily"])
    sink = SqliteSink("warehouse", SqliteSinkConfig(type="sqlite", path=path))
    await sink.open()
    after = read_tables(f"sqlite:///{path}")
    assert after["usage_user_daily"] == [(*row, None) for row in before["usage_user_daily"]]
    assert {t: rows for t, rows in after.items() if t != "usage_user_daily"} == {
        t: rows for t, rows in before.items() if t != "usage_user_daily"
    }
    td = make_tenant_day("initech", dt.date(2025, 1, 20), users=1)
    at = dt.datetime(2025, 1, 20, 9, 30, tzinfo=dt.UTC)
    await sink.write([td.with_users([replace(td.users[0], last_active_at=at)])])
    await sink.aclose()
    with sqlite3.connect(path) as conn:
        stored = conn.execute(
            "SELECT last_active_at FROM usage_user_daily WHERE tenant = 'initech'"
        ).fetchall()
    assert stored == [("2025-01-20 09:30:00.000000",)]
    again = SqliteSink("warehouse", SqliteSinkConfig(type="sqlite", path=path))
    await again.open()  # the column is there now: nothing to add, nothing fails
    await again.aclose()


@pytest.mark.postgres
async def test_a_postgresql_table_of_the_previous_release_gains_last_active_at(
    postgres_schema_url: str,
) -> None:
    """In PostgreSQL too, a usage_user_daily created before last_active_at gets the column (a
    timestamptz) when the sink opens, and its rows stay."""
    engine = sa.create_engine(postgres_schema_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE TABLE usage_user_daily (tenant VARCHAR NOT NULL, day DATE NOT NULL,"
                    ' "user" VARCHAR NOT NULL, messages INTEGER NOT NULL, last_active DATE,'
                    " ides VARCHAR NOT NULL, languages VARCHAR NOT NULL,"
                    ' PRIMARY KEY (tenant, day, "user"))'
                )
            )
            conn.execute(
                sa.text(
                    "INSERT INTO usage_user_daily VALUES"
                    " ('acme', '2025-01-14', 'ada@acme.example', 3, '2025-01-14', '[]', '[]')"
                )
            )
        sink = SqlSink(
            "warehouse", SqliteSinkConfig(type="sql", url=SecretStr(postgres_schema_url))
        )
        await sink.open()
        await sink.aclose()
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM usage_user_daily")).fetchall()
        columns = {c["name"]: c for c in sa.inspect(engine).get_columns("usage_user_daily")}
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [
        (
            "acme",
            dt.date(2025, 1, 14),
            "ada@acme.example",
            3,
            dt.date(2025, 1, 14),
            "[]",
            "[]",
            None,
        )
    ]
    assert isinstance(columns["last_active_at"]["type"], sa.DateTime)
    assert columns["last_active_at"]["type"].timezone


@pytest.mark.postgres
async def test_postgresql_integer_counts_of_the_previous_release_become_bigint(
    postgres_schema_url: str,
) -> None:
    """Count columns an earlier release created as INTEGER in PostgreSQL are widened to BIGINT when
    the sink opens, their rows keep their values, and a count beyond 32 bits is then stored."""
    engine = sa.create_engine(postgres_schema_url)
    old_ddl = [
        "CREATE TABLE usage_daily (tenant VARCHAR NOT NULL, day DATE NOT NULL,"
        " active_users INTEGER NOT NULL, messages INTEGER NOT NULL,"
        " fetched_at TIMESTAMP WITH TIME ZONE NOT NULL, final BOOLEAN NOT NULL,"
        " PRIMARY KEY (tenant, day))",
        "CREATE TABLE usage_daily_ide (tenant VARCHAR NOT NULL, day DATE NOT NULL,"
        " ide_name VARCHAR NOT NULL, engaged_users INTEGER NOT NULL,"
        " PRIMARY KEY (tenant, day, ide_name))",
        "CREATE TABLE usage_daily_language (tenant VARCHAR NOT NULL, day DATE NOT NULL,"
        " language_name VARCHAR NOT NULL, engaged_users INTEGER NOT NULL,"
        " PRIMARY KEY (tenant, day, language_name))",
        "CREATE TABLE usage_user_daily (tenant VARCHAR NOT NULL, day DATE NOT NULL,"
        ' "user" VARCHAR NOT NULL, messages INTEGER NOT NULL, last_active DATE,'
        " ides VARCHAR NOT NULL, languages VARCHAR NOT NULL,"
        ' PRIMARY KEY (tenant, day, "user"))',
        "INSERT INTO usage_daily VALUES ('acme', '2025-01-14', 7, 2147483647,"
        " '2025-01-15 00:00:00+00', true)",
    ]
    try:
        with engine.begin() as conn:
            for statement in old_ddl:
                conn.execute(sa.text(statement))
        sink = SqlSink(
            "warehouse", SqliteSinkConfig(type="sql", url=SecretStr(postgres_schema_url))
        )
        await sink.open()
        td = make_tenant_day("globex", users=1)
        big = 2**40
        await sink.write([td.with_users([replace(td.users[0], messages=big)])])
        await sink.aclose()
        inspector = sa.inspect(engine)
        types = {
            (table, column["name"]): column["type"]
            for table in TABLE_KEYS
            for column in inspector.get_columns(table)
        }
        with engine.connect() as conn:
            old_row = conn.execute(
                sa.text("SELECT active_users, messages FROM usage_daily WHERE tenant = 'acme'")
            ).one()
            stored = conn.execute(sa.text("SELECT messages FROM usage_user_daily")).scalar_one()
    finally:
        engine.dispose()
    counts = [
        ("usage_daily", "active_users"),
        ("usage_daily", "messages"),
        ("usage_daily_ide", "engaged_users"),
        ("usage_daily_language", "engaged_users"),
        ("usage_user_daily", "messages"),
    ]
    assert all(isinstance(types[key], sa.BigInteger) for key in counts), types
    assert tuple(old_row) == (7, 2147483647)
    assert stored == big


async def test_a_missing_column_without_create_tables_is_a_clear_error(tmp_path: Path) -> None:
    """With create_tables off, an old table is not altered: opening names the missing column."""
    path = tmp_path / "usage.db"
    path.write_bytes((FIXTURES / "sink_sqlite_before_last_active_at.db").read_bytes())
    sink = SqliteSink("b", SqliteSinkConfig(type="sqlite", path=path, create_tables=False))
    with pytest.raises(
        SinkPermanentError, match=r"lacks the column.* usage_user_daily\.last_active_at"
    ):
        await sink.open()
    await sink.aclose()


async def test_data_error_is_permanent_and_hides_values(sink: SqliteSink) -> None:
    """A row the database rejects raises SinkPermanentError without any row value in the message."""
    td = make_tenant_day("acme", users=["secret.person@example.com"])
    broken = UserDayRecord("acme", td.day, "secret.person@example.com", None, None, (), ())  # type: ignore[arg-type]
    with pytest.raises(SinkPermanentError) as caught:
        await sink.write([td.with_users([broken])])
    assert "secret.person" not in str(caught.value)
    assert "warehouse" in str(caught.value)


async def test_failed_batch_leaves_nothing_behind(sink: SqliteSink, target_url: str) -> None:
    """One transaction per batch: a batch failing at its last row stores none of its rows."""
    good = make_batch(("acme",), 2)
    bad_user = UserDayRecord("acme", good[1].day, "x@example.com", None, None, (), ())  # type: ignore[arg-type]
    with pytest.raises(SinkPermanentError):
        await sink.write([good[0], good[1].with_users([bad_user])])
    assert all(not rows for rows in read_tables(target_url).values())


async def test_locked_sqlite_is_transient(tmp_path: Path) -> None:
    """A database locked by another writer past busy_timeout raises SinkTransientError."""
    path = tmp_path / "usage.db"
    sink = SqliteSink(
        "w", SqliteSinkConfig(type="sqlite", path=path, busy_timeout=dt.timedelta(milliseconds=200))
    )
    await sink.open()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(SinkTransientError, match="locked"):
            await sink.write(make_batch(("acme",), 1))
        assert time.monotonic() - started >= 0.15
    finally:
        other.execute("ROLLBACK")
        other.close()
    await sink.write(make_batch(("acme",), 1))  # the lock is gone: the same write succeeds
    await sink.aclose()


async def test_sqlite_file_is_in_wal_mode(tmp_path: Path) -> None:
    """The SQLite file is created (directories included) in WAL journal mode."""
    path = tmp_path / "nested" / "dir" / "usage.db"
    sink = SqliteSink("w", SqliteSinkConfig(type="sqlite", path=path))
    await sink.write(make_batch(("acme",), 1))
    await sink.aclose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2)])
async def test_sqlite_connection_settings(tmp_path: Path, synchronous: str, level: int) -> None:
    """Every connection of the sink has the configured synchronous level and busy timeout, and
    keeps its temporary files (statement journals of the upserts) in memory."""
    config = SqliteSinkConfig.model_validate(
        {
            "type": "sqlite",
            "path": tmp_path / "u.db",
            "synchronous": synchronous,
            "busy_timeout": 3,
        }
    )
    sink = SqliteSink("w", config)
    await sink.open()
    engine = sink._engine
    assert engine is not None
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == level
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 3000
        assert conn.exec_driver_sql("PRAGMA temp_store").scalar() == 2  # MEMORY
    await sink.aclose()


async def test_unusable_sqlite_path_is_a_sink_error(tmp_path: Path) -> None:
    """A path that is a directory fails open() with SinkTransientError, not a driver error."""
    sink = SqliteSink("w", SqliteSinkConfig(type="sqlite", path=tmp_path))
    with pytest.raises(SinkTransientError, match="sink w"):
        await sink.open()
    await sink.aclose()


async def test_unreachable_server_is_transient_and_hides_password() -> None:
    """A PostgreSQL URL nobody listens on raises SinkTransientError without the password."""
    config = SqliteSinkConfig(
        type="sql",
        url=SecretStr("postgresql+psycopg://user@127.0.0.1:1/db?connect_timeout=2"),
        password=SecretStr("hunter2-canary"),
    )
    sink = SqlSink("dwh", config)
    with pytest.raises(SinkTransientError) as caught:
        await sink.ping()
    assert "hunter2-canary" not in str(caught.value)
    assert "hunter2-canary" not in repr(config)
    assert "hunter2-canary" in config.sqlalchemy_url().render_as_string(hide_password=False)
    await sink.aclose()


async def test_ping_and_double_close(sink: SqliteSink) -> None:
    """ping() succeeds on a reachable database and aclose() may be called twice."""
    await sink.ping()
    await sink.aclose()
    await sink.aclose()


async def test_existing_tables_without_create(tmp_path: Path) -> None:
    """create_tables: false works against tables created earlier and fails cleanly without them."""
    path = tmp_path / "usage.db"
    creator = SqliteSink("a", SqliteSinkConfig(type="sqlite", path=path))
    await creator.open()
    await creator.aclose()
    reuser = SqliteSink("b", SqliteSinkConfig(type="sqlite", path=path, create_tables=False))
    await reuser.write(make_batch(("acme",), 1))
    await reuser.aclose()
    empty = SqliteSink(
        "c", SqliteSinkConfig(type="sqlite", path=tmp_path / "empty.db", create_tables=False)
    )
    with pytest.raises(SinkTransientError, match="no such table"):
        await empty.write(make_batch(("acme",), 1))
    await empty.aclose()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "exactly one of path"),
        ({"path": "a.db", "url": "sqlite:///b.db"}, "exactly one of path"),
        ({"url": "not a url"}, "not a valid SQLAlchemy URL"),
        ({"url": "nosuchdb://host/db"}, "unknown database dialect"),
        ({"url": "mysql+nosuchdriver://host/db"}, "unknown database dialect"),
        ({"path": "a.db", "pii": "pseudonymize"}, "pii_key"),
        ({"path": "a.db", "bogus": 1}, "Extra inputs are not permitted"),
    ],
)
def test_config_validation(settings: dict[str, Any], message: str) -> None:
    """Invalid settings are rejected at config time with a message naming the problem."""
    with pytest.raises(ValidationError, match=message):
        SqliteSinkConfig.model_validate({"type": "sqlite", **settings})


def test_config_errors_never_echo_the_url() -> None:
    """A rejected URL is not repeated in the error (it may hold a password)."""
    with pytest.raises(ValidationError) as caught:
        SqliteSinkConfig.model_validate({"type": "sql", "url": "nosuchdb://u:topsecret@h/db"})
    assert "topsecret" not in str(caught.value)


async def test_write_cost_per_tenant_day(tmp_path: Path) -> None:
    """Writing a tenant-day of 30 users costs well under a millisecond of CPU (target 0.3 ms)."""
    sink = SqliteSink("w", SqliteSinkConfig(type="sqlite", path=tmp_path / "usage.db"))
    await sink.open()
    batches = [make_batch(20, 10, users=30, seed=k) for k in range(2)]
    started = time.process_time()
    for batch in batches:
        await sink.write(batch)
    per_tenant_day = (time.process_time() - started) / sum(len(b) for b in batches)
    await sink.aclose()
    assert per_tenant_day < 0.001, f"{per_tenant_day * 1000:.3f} ms per tenant-day"


async def test_an_integer_the_database_cannot_store_is_permanent(sink: SqliteSink) -> None:
    """A count beyond the column's range (2**64: past SQLite's 64 bits, PostgreSQL's INTEGER) is
    a permanent error naming the sink, not a driver exception that would be retried forever."""
    td = make_tenant_day("acme", users=["big.counter@example.com"])
    huge = [replace(user, messages=2**64) for user in td.users]
    with pytest.raises(SinkPermanentError, match="sink warehouse") as caught:
        await sink.write([td.with_users(huge)])
    assert "big.counter" not in str(caught.value)


async def test_a_constraint_violation_is_permanent(tmp_path: Path) -> None:
    """A row that breaks a constraint of a DBA-managed table (create_tables: false) is permanent."""
    path = tmp_path / "usage.db"
    creator = SqliteSink("a", SqliteSinkConfig(type="sqlite", path=path))
    await creator.open()
    await creator.aclose()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE usage_user_daily")
        conn.execute(
            "CREATE TABLE usage_user_daily (tenant VARCHAR NOT NULL, day DATE NOT NULL, "
            "user VARCHAR NOT NULL, messages INTEGER NOT NULL CHECK (messages < 1000), "
            "last_active DATE, ides VARCHAR NOT NULL, languages VARCHAR NOT NULL, "
            "last_active_at DATETIME, "
            "PRIMARY KEY (tenant, day, user))"
        )
    sink = SqliteSink("w", SqliteSinkConfig(type="sqlite", path=path, create_tables=False))
    td = make_tenant_day("acme", users=1)
    with pytest.raises(SinkPermanentError, match="IntegrityError"):
        await sink.write([td.with_users([replace(td.users[0], messages=5000)])])
    await sink.write([td])  # within the constraint: stored
    await sink.aclose()


async def test_a_created_database_is_owner_only(tmp_path: Path) -> None:
    """Under umask 022 a new SQLite file, its -wal and -shm files are 0600 and its new
    directory 0700; with files.shared_group 0640 and 0750."""
    old = os.umask(0o022)
    try:
        private = SqliteSink("p", SqliteSinkConfig(type="sqlite", path=tmp_path / "p" / "u.db"))
        await private.write(make_batch(("acme",), 1))
        shared = SqliteSink("s", SqliteSinkConfig(type="sqlite", path=tmp_path / "s" / "u.db"))
        shared.host = SinkHost(shared_group=True)
        await shared.write(make_batch(("acme",), 1))
    finally:
        os.umask(old)
    for directory, dir_mode, file_mode in (
        (tmp_path / "p", 0o700, 0o600),
        (tmp_path / "s", 0o750, 0o640),
    ):
        assert stat.S_IMODE(directory.stat().st_mode) == dir_mode
        names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
        assert names == {"u.db": file_mode, "u.db-wal": file_mode, "u.db-shm": file_mode}
    await private.aclose()
    await shared.aclose()


async def test_an_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    """A database file that already exists is used as it is, contents and mode."""
    path = tmp_path / "usage.db"
    first = SqliteSink("a", SqliteSinkConfig(type="sqlite", path=path))
    await first.write(make_batch(("acme",), 1))
    await first.aclose()
    path.chmod(0o644)
    again = SqliteSink("b", SqliteSinkConfig(type="sqlite", path=path))
    await again.write(make_batch(("globex",), 1))
    await again.aclose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert {row[0] for row in read_tables(f"sqlite:///{path}")["usage_daily"]} == {"acme", "globex"}
