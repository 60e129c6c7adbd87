"""``zencoder-collector state migrate --to URL``: copy a SQLite state store into PostgreSQL.

The move from one process on a SQLite file to PostgreSQL (docs/operations.md, "When to move to
PostgreSQL and how") must keep everything the collector knows, or the first run on PostgreSQL
would fetch the whole lookback window again and deliver it to every sink a second time. So every
table of the state schema is copied as it is: fetched days with their raw payloads, each sink's
deliveries, outbox positions and dead letters, tenant outcomes, and the queue counter
(``store_meta``) the outbox positions are drawn from.

How, and why so:

- Both stores are opened through :meth:`Store.open` first, so both have the current schema (an
  older SQLite file is migrated like on any start) and the target's tables exist. The source is
  opened as ``run`` opens it, holding its lock file: a collector still running on it makes the
  migration refuse, and none can start on it while the copy runs.
- The target must be empty (nothing but a fresh schema): merging two histories would mix outbox
  positions and delivery marks, so a non-empty target is refused and nothing is written.
- The source is read inside one SQLite transaction (one consistent snapshot, even if someone
  wrote to it meanwhile) and the target written inside one PostgreSQL transaction: row counts of
  every table are compared before that transaction commits, so the target ends up either a
  complete copy or untouched.
- Tables are copied in foreign-key order, rows streamed in batches, so a state with millions of
  payloads never has to fit in memory.
- URLs are only ever shown with the password masked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, func, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from collector.errors import StoreError
from collector.process import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, dump_json
from collector.store import Store
from collector.store.base import describe
from collector.store.schema import metadata, schema_version, store_meta

BATCH_ROWS = 500
"""Rows per INSERT batch: payloads are a few KB each, so a batch stays a few MB."""

TARGET_ENV = "ZENCODER_COLLECTOR_MIGRATE_TO"
"""Where ``--to`` is read from when not given, so the password stays out of ``ps``."""


class MigrationError(StoreError):
    """The migration did not complete; the target is left as it was."""


class MigrationRefused(MigrationError):
    """The migration was not started: a bad URL, or a target that is not empty."""


@dataclass
class MigrationResult:
    """What was copied: rows per table, and the two stores' URLs with passwords masked."""

    source: str
    target: str
    rows: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "source": self.source, "target": self.target, "rows": self.rows}


def masked(url: URL) -> str:
    return url.render_as_string(hide_password=True)


def _parse(url: str, what: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise MigrationRefused(f"{what} is not a database URL") from None


def copied_tables() -> list[Table]:
    """Every state table, parents before children (``delivery`` refers to ``tenant_day``).

    ``schema_version`` is not copied: the target records its own (the same, both stores having
    been opened by this collector)."""
    return [t for t in metadata.sorted_tables if t is not schema_version]


async def migrate_state(source_url: str, target_url: str) -> MigrationResult:
    """Copy the SQLite state store at ``source_url`` into the empty PostgreSQL one at
    ``target_url``; raise :class:`MigrationError` (target untouched) if that cannot be done."""
    source, target = _parse(source_url, "the source"), _parse(target_url, "--to")
    if source.get_backend_name() != "sqlite":
        raise MigrationRefused(f"the source must be a SQLite state store, not {masked(source)}")
    if target.get_backend_name() != "postgresql":
        raise MigrationRefused(
            f"--to must be a PostgreSQL URL (postgresql+psycopg://...), not {masked(target)}"
        )
    if not await asyncio.to_thread(_is_file, source.database):
        raise MigrationRefused(f"no SQLite state store at {masked(source)}")
    # Schema created or brought to the current version on both sides, like any start does. The
    # source's lock is held until the copy is done: a collector running on it makes this refuse,
    # and none can start on it meanwhile (what it collected would be left behind).
    source_store = await Store.open(source_url, exclusive=True)
    try:
        target_store = await Store.open(target_url)
        await target_store.aclose()
        return await asyncio.to_thread(_copy, source, target)
    finally:
        await source_store.aclose()


def _is_file(path: str | None) -> bool:
    # Store.open would create a missing file: an empty source must not pass for a state.
    return bool(path) and Path(str(path)).expanduser().is_file()


def _sqlite_snapshot_engine(url: URL) -> Engine:
    # `synchronous` is the collector's own URL option (collector.store.base), not the driver's.
    query = {k: v for k, v in url.query.items() if k != "synchronous"}
    engine = create_engine(url.set(query=query), hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we say BEGIN ourselves (below)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A deferred BEGIN: the first read takes a WAL snapshot that lasts until the end.
        conn.exec_driver_sql("BEGIN")

    return engine


def _copy(source_url: URL, target_url: URL) -> MigrationResult:
    result = MigrationResult(masked(source_url), masked(target_url))
    source_engine = _sqlite_snapshot_engine(source_url)
    target_engine = create_engine(target_url, hide_parameters=True)
    try:
        with (
            source_engine.connect() as source,
            source.begin(),
            target_engine.connect() as target,
            target.begin(),
        ):
            _refuse_non_empty(target, result.target)
            for table in copied_tables():
                result.rows[table.name] = _copy_table(source, target, table)
            _advance_sequences(target)
            _verify_counts(source, target, result.rows)
    except SQLAlchemyError as exc:
        raise MigrationError(f"migration to {result.target} failed: {describe(exc)}") from exc
    finally:
        source_engine.dispose()
        target_engine.dispose()
    return result


def _count(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _refuse_non_empty(target: Connection, display: str) -> None:
    """Nothing but a fresh schema: no rows anywhere, and the queue counter still at 0."""
    filled = [
        f"{table.name} ({count} rows)"
        for table in copied_tables()
        if table is not store_meta and (count := _count(target, table))
    ]
    used = target.execute(select(store_meta.c.key).where(store_meta.c.value != 0)).first()
    if used is not None:
        filled.append(f"store_meta ({used.key} in use)")
    if filled:
        raise MigrationRefused(
            f"{display} is not empty: {', '.join(filled)}. Migrate into a new database (or "
            "schema); an existing state is never merged or overwritten"
        )


def _copy_table(source: Connection, target: Connection, table: Table) -> int:
    if table is store_meta:
        # The fresh target has its counter at 0 (checked above); the source's replaces it.
        target.execute(store_meta.delete())
    rows = source.execution_options(yield_per=BATCH_ROWS).execute(
        select(table).order_by(*table.primary_key.columns)
    )
    copied = 0
    for batch in rows.partitions():
        target.execute(table.insert(), [dict(row._mapping) for row in batch])
        copied += len(batch)
    return copied


def _advance_sequences(target: Connection) -> None:
    """Move each serial column's sequence past the copied ids, so later inserts do not collide."""
    for table in copied_tables():
        for column in table.primary_key.columns:
            sequence = target.execute(
                text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": table.name, "column": column.name},
            ).scalar()
            if sequence is None:
                continue
            top = target.execute(select(func.max(column))).scalar()
            if top is not None:
                target.execute(
                    text("SELECT setval(:sequence, :top)"), {"sequence": sequence, "top": top}
                )


def _verify_counts(source: Connection, target: Connection, copied: dict[str, int]) -> None:
    for table in copied_tables():
        expected, found = _count(source, table), _count(target, table)
        if not expected == found == copied[table.name]:
            raise MigrationError(
                f"{table.name}: {expected} rows in the source but {found} in the target "
                "after copying; nothing was committed"
            )


# --- the command --------------------------------------------------------------------------------


def add_state_arguments(parser: argparse.ArgumentParser) -> None:
    """``state migrate``: the arguments (collector.cli's command table calls this)."""
    actions = parser.add_subparsers(dest="state_action", required=True, metavar="ACTION")
    migrate = actions.add_parser(
        "migrate", help="copy a SQLite state store into an empty PostgreSQL database"
    )
    source = migrate.add_mutually_exclusive_group(
        required="ZENCODER_COLLECTOR_CONFIG" not in os.environ
    )
    source.add_argument(
        "-c",
        "--config",
        default=os.environ.get("ZENCODER_COLLECTOR_CONFIG"),
        help="copy the state.url of this config (default: $ZENCODER_COLLECTOR_CONFIG)",
    )
    source.add_argument("--from", dest="source", help="copy this SQLite state URL instead")
    migrate.add_argument(
        "--to",
        required=TARGET_ENV not in os.environ,
        default=os.environ.get(TARGET_ENV),
        help=f"PostgreSQL URL of an empty database or schema (default: ${TARGET_ENV}, which "
        "keeps the password out of the process list)",
    )
    migrate.add_argument("--json", action="store_true", help="print the outcome as JSON")


async def state_command(args: argparse.Namespace) -> int:
    """``state migrate``: copy, then say how to switch the config over."""
    source_url = args.source or _config_state_url(args.config)
    try:
        result = await migrate_state(source_url, args.to)
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, MigrationRefused) else EXIT_INCOMPLETE
    _print_result(result, as_json=args.json, say=print)
    return EXIT_OK


def _config_state_url(path: str) -> str:
    from collector.app import load, load_plugins

    return load(path, load_plugins()).state.connection_url()


def _print_result(result: MigrationResult, *, as_json: bool, say: Callable[[str], None]) -> None:
    if as_json:
        say(dump_json(result.to_dict()))
        return
    say(f"copied {result.source} into {result.target}:")
    width = max(len(name) for name in result.rows)
    for name, rows in result.rows.items():
        say(f"  {name:<{width}}  {rows:>9} rows")
    say(
        "row counts verified. Point state.url at the new database (state.password or "
        "password_file for its password) and start the collector again."
    )
