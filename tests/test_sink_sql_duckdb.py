"""The sql sink on DuckDB (duckdb-engine): the conformance kit and a round trip through SQLModel."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from collector.testing import SinkConformance, SinkFactory, make_batch
from collector_sinks.sqlite import SqliteSinkConfig, SqlSink

pytest.importorskip("duckdb_engine", reason="the duckdb extra is not installed")

TABLES = ("usage_daily", "usage_daily_ide", "usage_daily_language", "usage_user_daily")


def duckdb_sink(path: Path) -> SqlSink:
    """A sql sink writing to the DuckDB file at path."""
    return SqlSink("lake", SqliteSinkConfig(type="sql", url=SecretStr(f"duckdb:///{path}")))


def read_tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the four tables of the DuckDB file at path, sorted."""
    engine = sa.create_engine(f"duckdb:///{path}")
    try:
        with engine.connect() as conn:
            return {
                t: sorted(tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t}")))  # noqa: S608 - fixed names
                for t in TABLES
            }
    finally:
        engine.dispose()


class TestDuckdbConformance(SinkConformance):
    """The sql sink against real DuckDB files, one per sink instance."""

    @pytest.fixture
    def sink_factory(self, tmp_path: Path) -> SinkFactory:
        return lambda: duckdb_sink(tmp_path / f"{uuid.uuid4().hex}.duckdb")

    @pytest.fixture
    def broken_sink_factory(self, tmp_path: Path) -> SinkFactory:
        return lambda: duckdb_sink(tmp_path)  # a directory, not a database file

    def read_back(self, sink: Any) -> dict[str, list[tuple[Any, ...]]]:
        return read_tables(Path(sink.config.sqlalchemy_url().database))


async def test_rows_read_back_through_the_table_models(tmp_path: Path) -> None:
    """What the sink wrote to DuckDB reads back with SQLModel and collector.tables' models."""
    from sqlmodel import Session, create_engine, select

    from collector.tables import UsageDaily, UsageUserDaily

    path = tmp_path / "usage.duckdb"
    batch = make_batch(("acme", "globex"), 2, users=3)
    sink = duckdb_sink(path)
    await sink.write(batch)
    await sink.aclose()
    engine = create_engine(f"duckdb:///{path}")
    try:
        with Session(engine) as session:
            daily = session.exec(select(UsageDaily).order_by(UsageDaily.tenant, UsageDaily.day))
            got = [(row.tenant, row.day, row.active_users) for row in daily]
            users = session.exec(select(UsageUserDaily)).all()
    finally:
        engine.dispose()
    assert got == sorted((td.tenant, td.day, td.daily.active_users) for td in batch)
    assert isinstance(got[0][1], dt.date)
    assert len(users) == sum(len(td.users) for td in batch)
