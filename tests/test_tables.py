"""The table models of collector.tables: the docs, the sinks' rows, a user's SQLModel query."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from msgspec.structs import replace
from sqlmodel import Session, SQLModel, col, create_engine, select

from collector.tables import (
    USAGE_COLUMNS,
    USAGE_MODELS,
    USAGE_TABLES,
    UsageDaily,
    UsageUserDaily,
    columns,
)
from collector.testing import make_tenant_day
from collector_sinks import _serialize
from collector_sinks.sqlite import SqliteSink, SqliteSinkConfig

DATA_MODEL = Path(__file__).parent.parent / "docs" / "data-model.md"


def doc_kind(model: type[SQLModel], column: sa.Column[Any]) -> str:
    """The "Type" cell docs/data-model.md must give ``column`` of ``model``."""
    extra = model.model_fields[column.name].json_schema_extra
    assert isinstance(extra, dict)
    kinds = {
        str: "text",
        int: "integer",
        bool: "boolean",
        dt.date: "date",
        dt.datetime: "timestamp (UTC)",
    }
    # sqlmodel's AutoString is a TypeDecorator over String: its python_type is the String's.
    type_ = column.type.impl_instance if isinstance(column.type, sa.TypeDecorator) else column.type
    kind = "JSON array of text" if extra.get("json_array") else kinds[type_.python_type]
    if column.primary_key:
        return f"{kind}, key"
    return f"{kind}, may be empty" if column.nullable else kind


def model_columns() -> dict[str, list[tuple[str, str, str]]]:
    """Table -> (column, type cell, API field) for every column of the models, in order."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    for model in USAGE_MODELS:
        table: sa.Table = model.__table__  # type: ignore[attr-defined]
        rows = []
        for column in table.columns:
            extra = model.model_fields[column.name].json_schema_extra
            assert isinstance(extra, dict)
            rows.append((column.name, doc_kind(model, column), str(extra["api_field"])))
        tables[table.name] = rows
    return tables


def documented_columns(markdown: str) -> dict[str, list[tuple[str, str, str]]]:
    """Table -> (column, type cell, API field) from each "## table" section's column table, with
    the Markdown code marks removed."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    for section in re.split(r"^## ", markdown, flags=re.MULTILINE)[1:]:
        title, _, body = section.partition("\n")
        lines = [line.strip() for line in body.splitlines() if line.startswith("|")]
        if not lines or not lines[0].startswith("| Column | Type |"):
            continue
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        rows = []
        for line in lines[2:]:
            cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            rows.append(
                (
                    cells["Column"].strip("`"),
                    cells["Type"].replace("`", ""),
                    cells["API field"].replace("`", ""),
                )
            )
        tables[title.strip()] = rows
    return tables


def test_the_docs_list_every_column_of_the_models_with_its_type_and_api_field() -> None:
    """docs/data-model.md has a section per table model whose column table lists exactly the
    model's columns, in order, each with the model's kind (key, may be empty) and API field."""
    documented = documented_columns(DATA_MODEL.read_text(encoding="utf-8"))
    expected = model_columns()
    assert list(documented) == list(expected)
    for table, rows in expected.items():
        assert documented[table] == rows, table


def test_usage_columns_are_the_models_columns_in_declaration_order() -> None:
    """USAGE_COLUMNS and columns() give each model's columns in declaration order, the new
    last_active_at last."""
    assert tuple(USAGE_COLUMNS) == tuple(table.name for table in USAGE_TABLES)
    for model in USAGE_MODELS:
        assert USAGE_COLUMNS[model.__tablename__] == columns(model)  # type: ignore[misc]
        assert columns(model) == tuple(model.model_fields)
    assert USAGE_COLUMNS["usage_user_daily"][-1] == "last_active_at"


def test_webhook_documents_and_s3_rows_carry_exactly_the_models_columns() -> None:
    """Every row the webhook and S3 sinks send has the model's columns as its fields, in order."""
    day = make_tenant_day("acme", users=2)
    rows = _serialize.table_rows(day)
    assert tuple(rows) == tuple(USAGE_COLUMNS)
    for table, table_rows in rows.items():
        assert table_rows, table
        assert all(tuple(row) == USAGE_COLUMNS[table] for row in table_rows), table
    document = _serialize.day_document(day)
    assert tuple(document["usage_daily"]) == USAGE_COLUMNS["usage_daily"]
    header = _serialize.to_csv("usage_user_daily", rows["usage_user_daily"]).split(b"\r\n")[0]
    assert tuple(header.decode().split(",")) == USAGE_COLUMNS["usage_user_daily"]


async def test_a_user_queries_the_sinks_sqlite_database_with_sqlmodel(tmp_path: Path) -> None:
    """A database the SQL sink wrote reads back through the models with SQLModel's Session and
    select, with Python types (dates, booleans, UTC timestamps)."""
    path = tmp_path / "usage.db"
    at = dt.datetime(2025, 1, 14, 16, 3, 11, tzinfo=dt.UTC)
    acme = make_tenant_day("acme", dt.date(2025, 1, 14), users=["ada@acme.example"])
    acme = acme.with_users([replace(acme.users[0], last_active_at=at)])
    globex = make_tenant_day("globex", dt.date(2025, 1, 14), users=2)
    sink = SqliteSink("warehouse", SqliteSinkConfig(type="sqlite", path=path))
    await sink.write([acme, globex])
    await sink.aclose()

    engine = create_engine(f"sqlite:///{path}")
    try:
        with Session(engine) as session:
            daily = session.exec(select(UsageDaily).where(UsageDaily.tenant == "acme")).one()
            by_key = (col(UsageUserDaily.tenant), col(UsageUserDaily.user))
            users = session.exec(select(UsageUserDaily).order_by(*by_key)).all()
    finally:
        engine.dispose()
    assert (daily.day, daily.active_users, daily.messages, daily.final) == (
        dt.date(2025, 1, 14),
        acme.daily.active_users,
        acme.daily.messages,
        acme.final,
    )
    assert daily.fetched_at == acme.fetched_at.astimezone(dt.UTC).replace(tzinfo=None)
    assert [u.tenant for u in users] == ["acme", "globex", "globex"]
    ada = users[0]
    assert (ada.user, ada.messages) == ("ada@acme.example", acme.users[0].messages)
    assert json.loads(ada.ides) == list(acme.users[0].ides)
    assert ada.last_active_at == at.replace(tzinfo=None)
