"""One tenant-day as rows of the four tables, in the shapes remote sinks send: JSON, NDJSON, CSV.

The rows carry exactly the columns of the normalized data model (docs/data-model.md), in the same
order, so a file written by the S3 sink, a webhook body and a SQL table all line up:

- dates are ``YYYY-MM-DD`` strings, ``fetched_at`` and ``last_active_at`` ISO 8601 timestamps in
  UTC (``+00:00``);
- in JSON the ``ides`` and ``languages`` of a user-day are arrays; in CSV they are JSON arrays in
  one cell (``["vscode", "jetbrains"]``), ``final`` is ``true``/``false``, a missing
  ``last_active`` is an empty cell, and lines end in CRLF (RFC 4180) — byte for byte what the
  ``csv`` sink writes, so files from both sinks can be concatenated;
- in CSV, a text cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``,
  ``-``, ``@``, a tab or a carriage return: emails, IDE and language names come from the API)
  gets a leading ``'`` (:func:`collector.files.guard_formula`, the OWASP rule), unless the sink
  turns the guard off; numbers are never touched.

Everything here is pure and deterministic: the same tenant-day always gives the same bytes, so a
redelivery writes an identical object (same ETag) unless the data changed.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
from typing import Any, Final

from collector.plugin import (
    USAGE_COLUMNS,
    TenantDay,
    guard_row,
)

COLUMNS: Final[dict[str, tuple[str, ...]]] = USAGE_COLUMNS
"""Every table, in a fixed order, with its columns in the order files and bodies use: the table
models' (:mod:`collector.tables`), so every field name here comes from them."""

TABLES: Final[tuple[str, ...]] = tuple(COLUMNS)
USAGE_DAILY, USAGE_DAILY_IDE, USAGE_DAILY_LANGUAGE, USAGE_USER_DAILY = TABLES

Row = dict[str, Any]
"""One JSON-able row: column name -> str, int, bool, None or list of str."""


def _timestamp(value: dt.datetime) -> str:
    # A naive timestamp would be ambiguous downstream; the collector records UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat()


def _row(table: str, *values: Any) -> Row:
    # The values come in the model's column order; strict: a column added to a model and not
    # given here fails at once instead of shifting every field after it.
    return dict(zip(COLUMNS[table], values, strict=True))


def table_rows(day: TenantDay) -> dict[str, list[Row]]:
    """The tenant-day as JSON-able rows, keyed by table name (every table present, maybe empty)."""
    daily = day.daily
    tenant = day.tenant
    iso_day = day.day.isoformat()
    return {
        USAGE_DAILY: [
            _row(
                USAGE_DAILY,
                tenant,
                iso_day,
                daily.active_users,
                daily.messages,
                _timestamp(day.fetched_at),
                day.final,
            )
        ],
        USAGE_DAILY_IDE: [
            _row(USAGE_DAILY_IDE, tenant, iso_day, ide.ide_name, ide.engaged_users)
            for ide in day.ides
        ],
        USAGE_DAILY_LANGUAGE: [
            _row(USAGE_DAILY_LANGUAGE, tenant, iso_day, lang.language_name, lang.engaged_users)
            for lang in day.languages
        ],
        USAGE_USER_DAILY: [
            _row(
                USAGE_USER_DAILY,
                tenant,
                iso_day,
                user.user,
                user.messages,
                user.last_active.isoformat() if user.last_active else None,
                list(user.ides),
                list(user.languages),
                _timestamp(at) if (at := user.last_active_at) else None,
            )
            for user in day.users
        ],
    }


def day_document(day: TenantDay) -> dict[str, Any]:
    """The tenant-day as one JSON object: identity, hash, and the rows of the four tables.

    ``usage_daily`` is a single object (there is exactly one such row per tenant-day); the other
    tables are lists.
    """
    rows = table_rows(day)
    return {
        "tenant": day.tenant,
        "day": day.day.isoformat(),
        "content_hash": day.content_hash,
        "fetched_at": _timestamp(day.fetched_at),
        "final": day.final,
        USAGE_DAILY: rows[USAGE_DAILY][0],
        USAGE_DAILY_IDE: rows[USAGE_DAILY_IDE],
        USAGE_DAILY_LANGUAGE: rows[USAGE_DAILY_LANGUAGE],
        USAGE_USER_DAILY: rows[USAGE_USER_DAILY],
    }


def dumps(value: Any) -> str:
    """Compact JSON that keeps non-ASCII text as is (UTF-8 on the wire, not ``\\u`` escapes)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def to_ndjson(rows: list[Row]) -> bytes:
    """Rows as newline-delimited JSON (one object per line, each line ending in ``\\n``)."""
    return "".join(dumps(row) + "\n" for row in rows).encode("utf-8")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def to_csv(table: str, rows: list[Row], *, formula_guard: bool = True) -> bytes:
    """Rows as UTF-8 CSV with a header line (RFC 4180: minimal quoting, CRLF line ends).

    With ``formula_guard`` (the default) text cells are guarded
    (:func:`collector.files.guard_formula`).
    """
    columns = COLUMNS[table]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        cells = [row[column] for column in columns]
        if formula_guard:
            cells = guard_row(cells)
        writer.writerow([_csv_cell(cell) for cell in cells])
    return buffer.getvalue().encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """Gzip with a fixed header timestamp, so equal content gives equal bytes."""
    return gzip.compress(data, mtime=0)
