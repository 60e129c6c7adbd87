"""Statements compiled once and run at the driver level, many rows per statement.

Used by the state store's hot path and by the SQL sink, on SQLite and PostgreSQL. Why, as
profiled with py-spy on ``run --once``:

- SQLAlchemy Core spends more per statement than SQLite spends running it: building the
  statement and its cache key, binding every value through the column types' processors, and
  processing each result row. Here a statement is compiled once per dialect and run through
  ``exec_driver_sql`` with plain driver values.
- The SQLite driver releases the GIL around every step of a statement, and ``executemany`` steps
  once per row. While the event loop keeps the GIL busy (a fetch in full swing), each step then
  waits for the GIL to come back, up to the 5 ms switch interval: a batch written row by row
  took many times its CPU time in wall time, and delivery fell behind the fetch. An insert here
  takes up to :data:`MAX_PARAMS` values per statement (one step), and key lookups use one
  statement per batch (a ``VALUES`` list joined on the primary key).

:class:`Codec` converts values exactly as SQLAlchemy's own column types store them (ISO dates,
UTC timestamps as ``YYYY-MM-DD HH:MM:SS.ffffff`` text and 0/1 booleans on SQLite; native
objects on PostgreSQL), so every row still reads back through the Core tables as before.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

from sqlalchemy import (
    ClauseElement,
    Connection,
    CursorResult,
    Dialect,
    Select,
    column,
    table,
)
from sqlalchemy.sql.compiler import SQLCompiler

MAX_PARAMS = 4000 if sqlite3.sqlite_version_info >= (3, 32) else 999
"""Bound values per statement (SQLite before 3.32 allows 999). Larger statements mean fewer
waits for the GIL, and more memory per prepared statement (about 90 bytes a value, for each
connection that has run it). With 4,000 a 500-day write of the SQLite sink is about 25
statements instead of 80, and delivery kept pace with a 1,000-tenant backfill that it fell
10,000 days behind with 999 (on two busy cores it can still fall behind, more slowly)."""

_PYFORMAT = re.compile(r"%\((\w+)\)s")

ROWS_PER_LOOKUP = 256
"""Keys per ``VALUES`` lookup (two values each)."""


class Codec:
    """Values in the driver's own types, exactly as SQLAlchemy's column types store them."""

    def __init__(self, dialect_name: str) -> None:
        self.sqlite = dialect_name == "sqlite"
        self.placeholder = "?" if self.sqlite else "%s"

    def day(self, value: dt.date) -> Any:
        """A ``Date`` column value."""
        return value.isoformat() if self.sqlite else value

    def moment(self, value: dt.datetime | None) -> Any:
        """A ``UtcDateTime`` (or ``DateTime``) column value; a naive datetime is taken as UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        elif value.tzinfo is not dt.UTC:
            value = value.astimezone(dt.UTC)
        if self.sqlite:
            # SQLAlchemy's SQLite DATETIME storage format: always with microseconds.
            return value.replace(tzinfo=None).isoformat(" ", "microseconds")
        return value

    def flag(self, value: bool) -> Any:
        """A ``Boolean`` column value."""
        return int(value) if self.sqlite else bool(value)

    def read_day(self, value: Any) -> dt.date:
        """A ``Date`` read back."""
        day: dt.date = dt.date.fromisoformat(value) if isinstance(value, str) else value
        return day

    def read_moment(self, value: Any) -> dt.datetime | None:
        """A ``UtcDateTime`` read back: timezone-aware, in UTC."""
        if value is None:
            return None
        moment: dt.datetime = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=dt.UTC)
        return moment.astimezone(dt.UTC)


class Prepared:
    """One statement compiled for a dialect; its parameters are given in ``names`` order.

    Every bound parameter must be one of ``names``: a literal that SQLAlchemy would bind
    (``0``, ``None`` in a ``SET``) would be missing at the driver level, so it is refused here;
    write it as ``literal_column("0")``, ``null()``, ``false()`` instead. An ``INSERT`` binds
    the columns named in ``names`` (all of them, or those of ``column_keys``).
    """

    def __init__(
        self,
        statement: ClauseElement,
        dialect: Dialect,
        names: Sequence[str],
        *,
        column_keys: Sequence[str] | None = None,
    ) -> None:
        keys = None if column_keys is None else list(column_keys)
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {statement!r}")
        bound = set(compiled.bind_names.values())
        if bound != set(names):
            raise TypeError(f"statement binds {sorted(bound)}, expected {sorted(names)}")
        self.sql = compiled.string
        self._named: tuple[str, ...] | None = None
        self._order: list[int] | None = None
        if compiled.positional:
            index = {name: i for i, name in enumerate(names)}
            order = [index[name] for name in compiled.positiontup or ()]
            if order != list(range(len(names))):
                self._order = order
        else:
            self._named = tuple(names)

    def params(self, values: Iterable[Any]) -> Any:
        """Driver parameters from values in ``names`` order."""
        if self._named is not None:
            return dict(zip(self._named, values, strict=True))
        if self._order is None:
            return tuple(values)
        flat = tuple(values)
        return tuple([flat[i] for i in self._order])

    def execute(
        self, conn: Connection, values: Iterable[Any] = ()
    ) -> CursorResult[*tuple[Any, ...]]:
        return conn.exec_driver_sql(self.sql, self.params(values))

    def executemany(self, conn: Connection, rows: Iterable[Iterable[Any]]) -> None:
        params = [self.params(row) for row in rows]
        if params:
            conn.exec_driver_sql(self.sql, params)


class BulkInsert:
    """An ``INSERT`` (or upsert) that writes up to :data:`MAX_PARAMS` values per statement.

    ``statement`` inserts one row of ``columns`` (given in the table's column order), e.g.
    ``insert(table)`` or an upsert built on it, with no other parameter. It is compiled once;
    the statement for *n* rows repeats its ``VALUES`` group (compiling one per size with
    SQLAlchemy cost more than writing the rows). A batch is split into full chunks and then
    power-of-two pieces, so a connection prepares few distinct statements.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect, columns: Sequence[str]) -> None:
        self.columns = tuple(columns)
        compiled = statement.compile(dialect=dialect, column_keys=list(self.columns))
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {statement!r}")
        if dialect.paramstyle not in ("qmark", "format", "pyformat"):
            raise TypeError(f"unsupported parameter style {dialect.paramstyle!r}")
        sql = compiled.string
        if compiled.positional:
            order = list(compiled.positiontup or ())
        else:  # named parameters (psycopg): the same text with positional ones, which repeat
            order = _PYFORMAT.findall(sql)
            sql = _PYFORMAT.sub("%s", sql)
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        start = sql.index(" VALUES (") + len(" VALUES ")
        end = _closing(sql, start)
        group = sql[start:end]
        if order != list(self.columns) or group.count(mark) != sql.count(mark):
            raise TypeError(f"not a one-row insert of {self.columns}: {sql}")
        self._head, self._group, self._tail = sql[:start], group, sql[end:]
        self.chunk = max(1, MAX_PARAMS // len(self.columns))
        self._by_size: dict[int, str] = {}

    def _sql(self, size: int) -> str:
        text = self._by_size.get(size)
        if text is None:
            values = ", ".join([self._group] * size)
            text = self._by_size[size] = self._head + values + self._tail
        return text

    def execute(self, conn: Connection, values: Sequence[Any]) -> None:
        """Insert the rows whose values follow one another in ``values`` (row after row, each
        in ``columns`` order). One flat list rather than a tuple per row: tens of thousands of
        row tuples alive at once set off the cyclic garbage collector again and again."""
        width = len(self.columns)
        total = len(values) // width
        if total * width != len(values):
            raise ValueError(f"{len(values)} values are not rows of {width}")
        done = 0
        while done < total:
            left = total - done
            size = self.chunk if left >= self.chunk else 1 << (left.bit_length() - 1)
            params = tuple(values[done * width : (done + size) * width])
            conn.exec_driver_sql(self._sql(size), params)
            done += size


def _closing(sql: str, start: int) -> int:
    """The index after the parenthesis that closes the one opening at ``start``."""
    depth = 0
    for index in range(start, len(sql)):
        char = sql[index]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index + 1
    raise TypeError(f"unbalanced parentheses in {sql}")


KEYS = table("k", column("tenant"), column("day"))
"""The key list of a :class:`KeyLookup`, to select from and join on."""


class KeyLookup:
    """``SELECT`` of rows by (tenant, day) keys: one statement per :data:`ROWS_PER_LOOKUP` keys.

    ``select`` reads the keys from :data:`KEYS` (e.g. joins it on a table's primary key); it is
    run with the keys as a ``VALUES`` list named ``k``. SQLite scans that short list and
    searches the primary key for each, where a row-value ``IN`` list would scan the whole
    table. The key count is rounded up to a power of two by repeating the last key (few
    distinct statements), so the caller must tolerate a row more than once.
    """

    def __init__(self, select: Select[Any], dialect: Dialect) -> None:
        self._codec = Codec(dialect.name)
        compiled = select.compile(dialect=dialect)
        if compiled.binds:
            raise TypeError(f"a key lookup takes no parameters: {sorted(compiled.binds)}")
        self._select = compiled.string
        self._sql: dict[int, str] = {}

    def _text(self, size: int) -> str:
        text = self._sql.get(size)
        if text is None:
            mark = self._codec.placeholder
            keys = ", ".join([f"({mark}, {mark})"] * size)
            text = self._sql[size] = f"WITH k (tenant, day) AS (VALUES {keys}) {self._select}"
        return text

    def rows(self, conn: Connection, keys: Sequence[tuple[str, dt.date]]) -> list[Any]:
        found: list[Any] = []
        day = self._codec.day
        for start in range(0, len(keys), ROWS_PER_LOOKUP):
            part = list(keys[start : start + ROWS_PER_LOOKUP])
            size = 1 << (len(part) - 1).bit_length()
            part.extend([part[-1]] * (size - len(part)))
            params = tuple(chain.from_iterable((tenant, day(d)) for tenant, d in part))
            found.extend(conn.exec_driver_sql(self._text(size), params).fetchall())
        return found


def rows_by_key(rows: Iterable[Sequence[Any]], codec: Codec) -> Mapping[tuple[str, dt.date], Any]:
    """Result rows keyed by their first two columns (tenant, day)."""
    return {(row[0], codec.read_day(row[1])): row for row in rows}
