"""The four usage tables as SQLModel table models: the one declaration of the data model.

Every sink and report derives its shape from these classes: the SQL sink's DDL, upserts and
migrations (``Model.__table__``), the CSV and S3 column order, the webhook document's fields,
the report's queries, and docs/data-model.md (a test checks the docs against them). Users query
their warehouse with the same classes::

    from sqlmodel import Session, create_engine, select
    from collector.tables import UsageDaily

    with Session(create_engine("sqlite:///data/usage.db")) as session:
        for row in session.exec(select(UsageDaily).where(UsageDaily.tenant == "acme")):
            print(row.day, row.active_users)

Each column's ``description`` is its meaning, and ``api_field`` (in ``schema_extra``) names the
field of the API's ``day=`` response it comes from (``json_array``: a text column holding a JSON
array of text, a real array in JSON sinks); docs/data-model.md repeats the columns, their kinds and
API fields, and tests/test_tables.py checks that it does.

The DDL: text columns are VARCHAR without a length (255 on MySQL, which needs one); every column
is NOT NULL except ``last_active`` and ``last_active_at``; SQLite tables are ``WITHOUT ROWID``
(the primary key is the table: one b-tree per row written, not two).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

_WITHOUT_ROWID: dict[str, Any] = {"sqlite_with_rowid": False}
_UtcTimestamp = sa.DateTime(timezone=True)
# Counts are 64-bit everywhere (the parser bounds them to int64): INTEGER is 32-bit in PostgreSQL
# (the SQL sink widens the INTEGER columns of earlier releases). SQLite's INTEGER already holds
# 64 bits, and keeps the DDL that earlier versions created there.
_Count = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _key(description: str, api_field: str, **kwargs: Any) -> Any:
    return Field(
        primary_key=True,
        nullable=False,
        description=description,
        schema_extra={"json_schema_extra": {"api_field": api_field}},
        **kwargs,
    )


def _value(description: str, api_field: str, *, json_array: bool = False, **kwargs: Any) -> Any:
    kwargs.setdefault("nullable", False)
    extra: dict[str, Any] = {"api_field": api_field}
    if json_array:
        extra["json_array"] = True  # text holding a JSON array of text (an array in JSON sinks)
    return Field(description=description, schema_extra={"json_schema_extra": extra}, **kwargs)


TENANT_DOC = "The tenant's `id` from the config."
DAY_DOC = "The UTC day."


class UsageDaily(SQLModel, table=True):
    """One row per tenant and day: the day's totals."""

    __tablename__: ClassVar[str] = "usage_daily"
    __table_args__ = _WITHOUT_ROWID

    tenant: str = _key(TENANT_DOC, "(config)")
    day: dt.date = _key(DAY_DOC, "data.daily[0].day (the day= asked for)")
    active_users: int = _value(
        "Distinct users who engaged with Zencoder agents that day.",
        "data.daily[0].active_users",
        sa_type=_Count,
    )
    messages: int = _value(
        "Agent messages (interactions with Zencoder agents) that day.",
        "data.daily[0].messages",
        sa_type=_Count,
    )
    fetched_at: dt.datetime = _value(
        "When the collector fetched this version of the day.", "(collector)", sa_type=_UtcTimestamp
    )
    final: bool = _value(
        "false while the day may still change (today and the last settle_days); true once settled.",
        "(collector)",
    )


class UsageDailyIde(SQLModel, table=True):
    """One row per tenant, day and IDE used that day."""

    __tablename__: ClassVar[str] = "usage_daily_ide"
    __table_args__ = _WITHOUT_ROWID

    tenant: str = _key(TENANT_DOC, "(config)")
    day: dt.date = _key(DAY_DOC, "data.daily[0].day")
    ide_name: str = _key(
        "The IDE, as the API names it (VS Code, IntelliJ CE, WebStorm, ...).",
        "data.daily[0].ides[].ide_name",
    )
    engaged_users: int = _value(
        "Users who used Zencoder in this IDE that day.",
        "data.daily[0].ides[].engaged_users",
        sa_type=_Count,
    )


class UsageDailyLanguage(SQLModel, table=True):
    """One row per tenant, day and programming language used that day."""

    __tablename__: ClassVar[str] = "usage_daily_language"
    __table_args__ = _WITHOUT_ROWID

    tenant: str = _key(TENANT_DOC, "(config)")
    day: dt.date = _key(DAY_DOC, "data.daily[0].day")
    language_name: str = _key(
        "The language, as the API names it (TypeScript, Python, ...).",
        "data.daily[0].languages[].language_name",
    )
    engaged_users: int = _value(
        "Users who used Zencoder with this language that day.",
        "data.daily[0].languages[].engaged_users",
        sa_type=_Count,
    )


class UsageUserDaily(SQLModel, table=True):
    """One row per tenant, day and user active that day."""

    __tablename__: ClassVar[str] = "usage_user_daily"
    __table_args__ = _WITHOUT_ROWID

    tenant: str = _key(TENANT_DOC, "(config)")
    day: dt.date = _key(DAY_DOC, "(the day= asked for)")
    user: str = _key(
        "The user's email; under a sink's pii: pseudonymize, its keyed pseudonym.",
        "data.users[].email",
    )
    messages: int = _value(
        "The user's agent messages that day.", "data.users[].messages", sa_type=_Count
    )
    last_active: dt.date | None = _value(
        "The UTC day of the user's most recent activity.",
        "data.users[].last_active",
        default=None,
        nullable=True,
    )
    ides: str = _value(
        'The IDEs the user used, as a JSON array of text, e.g. ["VS Code","PyCharm"].',
        "data.users[].ides[]",
        default="[]",
        json_array=True,
    )
    languages: str = _value(
        "The languages the user used Zencoder for, as a JSON array of text.",
        "data.users[].languages[]",
        default="[]",
        json_array=True,
    )
    last_active_at: dt.datetime | None = _value(
        "The user's most recent activity as a UTC timestamp, when the API gives a time.",
        "data.users[].last_active",
        default=None,
        nullable=True,
        sa_type=_UtcTimestamp,
    )


USAGE_MODELS: tuple[type[SQLModel], ...] = (
    UsageDaily,
    UsageDailyIde,
    UsageDailyLanguage,
    UsageUserDaily,
)
"""The four models, parents first (the order tables are created and written in)."""

USAGE_TABLES: tuple[sa.Table, ...] = tuple(
    model.__table__  # type: ignore[attr-defined]  # SQLModel sets it on table=True classes
    for model in USAGE_MODELS
)


USAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    table.name: tuple(column.name for column in table.columns) for table in USAGE_TABLES
}
"""Table name -> column names in declaration order: the CSV header and the S3 column order
(``last_active_at`` was added later, so it is last everywhere)."""


def columns(model: type[SQLModel]) -> tuple[str, ...]:
    """The column names of ``model``'s table, in declaration order (the CSV and S3 order)."""
    table: sa.Table = model.__table__  # type: ignore[attr-defined]  # as above
    return tuple(column.name for column in table.columns)
