"""Offboarding one tenant: ``tenant export`` (its stored data as files) and ``tenant purge``.

Under a data-processing agreement a client that leaves gets its data back and then has it deleted.
``export`` writes every state-store table that has a ``tenant`` column, restricted to that tenant,
as ``TABLE.csv`` and ``TABLE.json`` plus a ``manifest.json``. ``purge`` deletes the tenant from
every sink whose plugin implements ``collector_sink_purge`` (the first-party ``sqlite``/``sql``,
``csv`` and ``s3`` do; a webhook cannot take anything back), then from the state store, and lists
the sinks it could not purge so the operator can handle them by hand.

The tables are found on the store's schema (any table with a ``tenant`` column), so a table added
to the store later is exported and purged without a change here.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
from sqlalchemy import Connection, Table, select

from collector.process import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, dump_json
from collector.store import Store
from collector.store.schema import metadata

if TYPE_CHECKING:
    from collector.app import Plugins
    from collector.config import AppConfig

log = structlog.get_logger(__name__)


def tenant_tables() -> list[Table]:
    """The state store's tables that hold per-tenant data, parents before children (not the
    replicas' leases: coordination, kept so a re-added tenant's fencing token still grows)."""
    return [t for t in metadata.sorted_tables if "tenant" in t.c and not t.info.get("coordination")]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):  # a quarantined API body, as received: give it back as text
        return value.decode("utf-8", "replace")
    return value


class TenantStore(Store):
    """The state store with the two offboarding operations."""

    async def tenant_rows(self, tenant: str) -> dict[str, list[dict[str, Any]]]:
        """Every row of ``tenant`` in every per-tenant table, by table name, in key order."""

        def work(conn: Connection) -> dict[str, list[dict[str, Any]]]:
            rows: dict[str, list[dict[str, Any]]] = {}
            for table in tenant_tables():
                query = select(table).where(table.c.tenant == tenant)
                query = query.order_by(*table.primary_key.columns)
                rows[table.name] = [dict(r._mapping) for r in conn.execute(query)]
            return rows

        return await self._read(work)

    async def purge_tenant(self, tenant: str) -> dict[str, int]:
        """Delete ``tenant`` from every per-tenant table in one transaction; rows per table."""

        def work(conn: Connection) -> dict[str, int]:
            deleted: dict[str, int] = {}
            for table in reversed(tenant_tables()):  # children (delivery) before parents
                result = conn.execute(table.delete().where(table.c.tenant == tenant))
                deleted[table.name] = result.rowcount
            return deleted

        return await self._write(work)


# --- export -------------------------------------------------------------------------------------


def write_export(directory: Path, tenant: str, rows: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """``TABLE.csv`` and ``TABLE.json`` per table, and ``manifest.json``; returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, table_rows in rows.items():
        columns = [c.name for c in metadata.tables[name].columns]
        as_json = [{k: _jsonable(v) for k, v in row.items()} for row in table_rows]
        json_path = directory / f"{name}.json"
        json_path.write_text(json.dumps(as_json, indent=2, ensure_ascii=False) + "\n", "utf-8")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in as_json:
            writer.writerow(["" if row[c] is None else row[c] for c in columns])
        csv_path = directory / f"{name}.csv"
        csv_path.write_text(buffer.getvalue(), encoding="utf-8")
        written += [csv_path, json_path]
    manifest = {
        "tenant": tenant,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(),
        "tables": {name: len(table_rows) for name, table_rows in rows.items()},
    }
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return [*written, manifest_path]


async def export_command(config: AppConfig, tenant: str, directory: Path) -> int:
    """``tenant export T -o DIR``."""
    store = await TenantStore.open(config.state.connection_url())
    try:
        rows = await store.tenant_rows(tenant)
    finally:
        await store.aclose()
    if not any(rows.values()):
        print(f"error: the state store holds nothing for tenant {tenant!r}", file=sys.stderr)
        return EXIT_INCOMPLETE
    from collector.concurrency import run_sync

    files = await run_sync(write_export, directory, tenant, rows)
    counts = ", ".join(f"{name} {len(r)}" for name, r in rows.items())
    print(f"exported tenant {tenant} to {directory}: {counts} row(s); {len(files)} file(s)")
    return EXIT_OK


# --- purge --------------------------------------------------------------------------------------


@dataclass
class SinkPurge:
    """What purging one sink did: ``purged``, ``cannot delete`` or ``failed``."""

    sink: str
    type: str
    outcome: str
    deleted: int = 0
    error: str | None = None


async def purge_sinks(config: AppConfig, plugins: Plugins, tenant: str) -> list[SinkPurge]:
    """Ask each configured sink's plugin to delete ``tenant``; a failing sink spoils no other."""
    results: list[SinkPurge] = []
    impls = list(reversed(plugins.pm.hook.collector_sink_purge.get_hookimpls()))
    for name, sink_config in config.sinks.items():
        entry = SinkPurge(sink=name, type=sink_config.type, outcome="cannot delete")
        results.append(entry)
        try:
            sink = plugins.registry.create(name, sink_config)
            await sink.open()
        except Exception as exc:  # reported per sink; the others are still purged
            entry.outcome, entry.error = "failed", f"{type(exc).__name__}: {exc}"
            continue
        try:
            for impl in impls:
                call = cast("Callable[..., Awaitable[int] | None]", impl.function)
                arguments = {"sink": sink, "tenant": tenant}
                pending = call(*[arguments[a] for a in impl.argnames])
                if pending is not None:
                    entry.deleted = int(await pending)
                    entry.outcome = "purged"
                    break
        except Exception as exc:  # reported per sink; the others are still purged
            entry.outcome, entry.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            await sink.aclose()
        log.info("sink purged", sink=name, tenant=tenant, outcome=entry.outcome)
    return results


def _confirm(tenant: str, config: AppConfig) -> bool:
    sinks = ", ".join(config.sinks) or "none"
    print(
        f"This deletes every stored day of tenant {tenant!r} from the state store and from the "
        f"sinks that can delete ({sinks}). It cannot be undone; `tenant export` first if the "
        f"data must be kept.\nType the tenant id to confirm: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    try:
        answer = input()
    except EOFError:
        return False
    return answer.strip() == tenant


async def purge_command(
    config: AppConfig, plugins: Plugins, tenant: str, *, assume_yes: bool, as_json: bool
) -> int:
    """``tenant purge T [--yes] [--json]``."""
    configured = next((t for t in config.tenants if t.id == tenant), None)
    if configured is not None and configured.enabled:
        print(
            f"error: tenant {tenant!r} is still enabled in the config: remove it (or set "
            "`enabled: false`) and reload the daemon first, or its next cycle collects it again",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not assume_yes and not _confirm(tenant, config):
        print("aborted: nothing was deleted (pass --yes to skip the question)", file=sys.stderr)
        return EXIT_USAGE
    sinks = await purge_sinks(config, plugins, tenant)
    store = await TenantStore.open(config.state.connection_url())
    try:
        state = await store.purge_tenant(tenant)
    finally:
        await store.aclose()
    failed = [s for s in sinks if s.outcome == "failed"]
    if as_json:
        document = {
            "tenant": tenant,
            "ok": not failed,
            "state_store": state,
            "sinks": [asdict(s) for s in sinks],
            "cannot_delete": [s.sink for s in sinks if s.outcome == "cannot delete"],
        }
        print(dump_json(document))
    else:
        print(f"state store: deleted {', '.join(f'{n} {c}' for n, c in state.items())} row(s)")
        for s in sinks:
            detail = {
                "purged": f"deleted {s.deleted} item(s)",
                "cannot delete": "CANNOT DELETE: remove the tenant's data there by hand",
                "failed": f"FAILED: {s.error}; run the purge again",
            }[s.outcome]
            print(f"sink {s.sink} ({s.type}): {detail}")
    return EXIT_OK if not failed else EXIT_INCOMPLETE
