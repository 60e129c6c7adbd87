"""Replicas on one PostgreSQL state: collection throughput for 1, 2 and 4 replicas, and failover.

    python bench/bench_replicas.py --url postgresql+psycopg://USER:PW@HOST/DB [--tenants 60]
        [--replicas 1 2 4] [--kills 10] [--verbose] [--json]

Give it a database of its own (``CREATE DATABASE collector_bench``): the transaction and
statement counts are per database. The user must be allowed to reset ``pg_stat_statements``
(a superuser, or ``GRANT EXECUTE ON FUNCTION pg_stat_statements_reset``), and the server must
preload it (``shared_preload_libraries = 'pg_stat_statements'``); without it the statement
columns read "n/a".

Each run gets a fresh schema, the simulator (``--latency`` per request, ``--rate`` requests/s
per tenant) and K daemons (``run``, ``state.replicas: true``, no sinks, ``api.max_concurrency``
per replica), started with no tenant; once all K are registered the tenants are added
(SIGHUP) and the K replicas claim their shares. Throughput counts the tenant-days stored
between the moment every tenant is held and the moment the whole window is stored, so process
start-up is left out. Over the same window: database transactions (``pg_stat_database``) and
statements (``pg_stat_statements``, reset at the window's start; the benchmark's own polling is
left out) per tenant-day; ``--verbose`` lists the statements called most.

Failover (``--kills``, three replicas, its own schema): SIGKILL the oldest replica, then time
(a) until a day of one of its tenants is stored by another replica (``tenant_day.fetched_at``
after the kill: the new holder schedules a gained tenant at once, and re-fetches at least today)
and (b) until the others hold every tenant; a new replica joins and the spread settles before
the next kill. The output is markdown, ready for docs/performance.md ("Replicas").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
import yaml

from collector.simulator import SimulatorSettings, demo_tenants, running_simulator

LEASE_TTL = 3.0
OWN = "/* bench_replicas */ "
"""Prefix of the benchmark's own queries, which the statement count leaves out."""

STORED = OWN + "SELECT count(*) FROM tenant_day WHERE status IN ('fetched', 'final')"
LIVE = OWN + "SELECT count(*) FROM replica WHERE expires_at > now()"
COMMITS = OWN + (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)
_THIS_DB = "(SELECT oid FROM pg_database WHERE datname = current_database())"
STATEMENTS = OWN + (
    f"SELECT sum(calls) FROM pg_stat_statements WHERE dbid = {_THIS_DB} AND query NOT LIKE "
    "'/* bench_replicas */%'"
)
TOP_STATEMENTS = OWN + (
    "SELECT calls, rows, regexp_replace(query, '\\s+', ' ', 'g') FROM pg_stat_statements "
    f"WHERE dbid = {_THIS_DB} AND query NOT LIKE '/* bench_replicas */%' "
    "ORDER BY calls DESC LIMIT 12"
)
RESET = OWN + f"SELECT pg_stat_statements_reset(0, {_THIS_DB}, 0)"
HELD_BY_LIVE = OWN + (
    "SELECT count(*) FROM tenant_lease l JOIN replica r ON r.id = l.replica "
    "WHERE l.expires_at > now() AND r.expires_at > now()"
)
SMALLEST_SHARE = OWN + (
    "SELECT min(n) FROM (SELECT count(l.tenant) AS n FROM replica r LEFT JOIN tenant_lease l "
    "ON l.replica = r.id AND l.expires_at > now() WHERE r.expires_at > now() GROUP BY r.id) s"
)


def _config(path: Path, sim: Any, tenants: Any, url: str, args: argparse.Namespace) -> Path:
    config = {
        "api": {
            "base_url": sim.base_url,
            "token_url": sim.token_url,
            "max_concurrency": args.concurrency,
            "rate_limit": {"per_second": 1000, "burst": 100},
        },
        "collection": {
            "lookback_days": args.days,
            "settle_days": 1,
            "schedule": {"every": "1h", "jitter": "0s"},
        },
        "state": {"url": url, "replicas": True, "lease_ttl": f"{LEASE_TTL}s"},
        "server": {"listen": None},
        "sinks": {},
        "tenants": [
            {"id": t.id, "client_id": t.client_id, "client_secret": t.client_secret}
            for t in tenants
        ],
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def _daemon(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collector", "--log-level", "warning", "run", "-c", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


class Database:
    """The benchmark's view of one schema: polling queries in autocommit (no BEGIN/ROLLBACK of
    its own in the statement count)."""

    def __init__(self, url: sqlalchemy.URL, base: sqlalchemy.URL) -> None:
        self.engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1)
        # The statistics views live in the extension's schema, outside the bench's search_path.
        self.stats = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT", pool_size=1)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sqlalchemy.text(sql), params))

    def scalar(self, sql: str, **params: Any) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text(sql), params).scalar() or 0)

    def statements(self) -> int | None:
        """Statements run in this database since the last reset; None without the extension."""
        try:
            with self.stats.connect() as conn:
                return int(conn.execute(sqlalchemy.text(STATEMENTS)).scalar() or 0)
        except sqlalchemy.exc.DBAPIError:
            return None

    def top_statements(self) -> list[Any]:
        with self.stats.connect() as conn:
            return list(conn.execute(sqlalchemy.text(TOP_STATEMENTS)))

    def reset_statements(self) -> None:
        with contextlib.suppress(sqlalchemy.exc.DBAPIError), self.stats.connect() as conn:
            conn.execute(sqlalchemy.text(RESET))

    def dispose(self) -> None:
        self.engine.dispose()
        self.stats.dispose()

    async def until(self, test: Callable[[], bool], what: str, limit: float) -> float:
        """Poll ``test`` every 50 ms; the time (perf_counter) it first held."""
        deadline = time.perf_counter() + limit
        while not test():
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{what} did not happen within {limit}s")
            await asyncio.sleep(0.05)
        return time.perf_counter()

    async def count_reaches(self, sql: str, wanted: int, limit: float, **params: Any) -> float:
        return await self.until(lambda: self.scalar(sql, **params) >= wanted, sql, limit)


@asynccontextmanager
async def _replicas(
    args: argparse.Namespace, count: int, workdir: Path
) -> AsyncIterator[tuple[Database, Path, list[asyncio.subprocess.Process]]]:
    """A fresh schema, the simulator and ``count`` registered replicas; torn down after."""
    tenants = demo_tenants(args.tenants)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    base = sqlalchemy.make_url(args.url)
    admin = sqlalchemy.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    db = Database(url, base)
    settings = SimulatorSettings(tenants=tenants, latency=args.latency)
    processes: list[asyncio.subprocess.Process] = []
    try:
        async with running_simulator(settings) as sim:
            sim.faults.set(None, rate_limit=args.rate)
            raw_url = url.render_as_string(hide_password=False)
            # The replicas start with no tenant, and get them all at once (SIGHUP) when every
            # one is registered: the first to start does not collect alone meanwhile, and the
            # tenants are spread evenly from the first claim.
            config = _config(workdir / f"{schema}.yaml", sim, [], raw_url, args)
            processes.append(await _daemon(config))  # creates the schema before the others start
            created = (
                OWN + "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = :schema AND table_name = 'replica'"
            )
            await db.count_reaches(created, 1, 60, schema=schema)
            processes += [await _daemon(config) for _ in range(count - 1)]
            await db.count_reaches(LIVE, count, 60)
            _config(config, sim, tenants, raw_url, args)
            for process in processes:
                process.send_signal(signal.SIGHUP)
            await db.count_reaches(HELD_BY_LIVE, args.tenants, 60)
            yield db, config, processes
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in processes))
        db.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


async def _throughput(args: argparse.Namespace, count: int, workdir: Path) -> dict[str, Any]:
    async with _replicas(args, count, workdir) as (db, _, _):
        db.reset_statements()
        started = time.perf_counter()
        stored_before, commits_before = db.scalar(STORED), db.scalar(COMMITS)
        total = args.tenants * args.days
        done = await db.count_reaches(STORED, total, 600)
        commits = db.scalar(COMMITS) - commits_before
        statements = db.statements()
        top = db.top_statements() if args.verbose and statements is not None else []
    days = max(total - stored_before, 1)
    return {
        "replicas": count,
        "tenant_days": days,
        "seconds": round(done - started, 3),
        "tenant_days_per_second": round(days / (done - started), 1),
        "transactions_per_tenant_day": round(commits / days, 2),
        "statements_per_tenant_day": None if statements is None else round(statements / days, 2),
        "top_statements": [
            {"calls": calls, "per_tenant_day": round(calls / days, 2), "rows": rows, "query": q}
            for calls, rows, q in top
        ],
    }


async def _failovers(args: argparse.Namespace, workdir: Path) -> list[dict[str, float]]:
    """SIGKILL the oldest of three replicas, time the takeover, start a new one; repeat."""
    times = []
    async with _replicas(args, 3, workdir) as (db, config, processes):
        await db.count_reaches(STORED, args.tenants * args.days, 600)
        for _ in range(args.kills):
            await db.count_reaches(HELD_BY_LIVE, args.tenants, 60)
            await db.count_reaches(SMALLEST_SHARE, args.tenants // 3, 60)  # settled
            victim = processes.pop(0)
            its_tenants = [
                row.tenant
                for row in db.rows(
                    OWN + "SELECT l.tenant FROM tenant_lease l JOIN replica r ON r.id = l.replica "
                    "WHERE r.pid = :pid AND l.expires_at > now()",
                    pid=victim.pid,
                )
            ]
            killed_at = dt.datetime.now(dt.UTC)
            victim.send_signal(signal.SIGKILL)
            killed = time.perf_counter()
            await victim.wait()
            collected = OWN + (
                "SELECT count(*) FROM tenant_day WHERE tenant = ANY(:tenants) AND fetched_at > :t"
            )
            # Every tenant held by a replica other than the dead one (its rows look live until
            # its lease ends, so it is told apart by its pid).
            by_others = OWN + f"{HELD_BY_LIVE.removeprefix(OWN)} AND r.pid <> :pid"
            first: float | None = None
            held: float | None = None
            deadline = killed + 60
            while first is None or held is None:
                now = time.perf_counter()
                if now > deadline:
                    raise TimeoutError("no takeover within 60 s of a kill")
                if first is None and db.scalar(collected, tenants=its_tenants, t=killed_at) > 0:
                    first = now
                if held is None and db.scalar(by_others, pid=victim.pid) >= args.tenants:
                    held = now
                await asyncio.sleep(0.05)
            times.append({"first_collection": first - killed, "all_held": held - killed})
            processes.append(await _daemon(config))
            await db.count_reaches(LIVE, 3, 60)
    return times


def _markdown(results: list[dict[str, Any]], failover: list[dict[str, float]]) -> str:
    one = next((r for r in results if r["replicas"] == 1), None)
    lines = [
        "| Replicas | Tenant-days measured | Seconds | Tenant-days/s | vs one "
        "| DB transactions per tenant-day | DB statements per tenant-day |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speedup = (
            f"{r['tenant_days_per_second'] / one['tenant_days_per_second']:.2f}" if one else "-"
        )
        statements = r["statements_per_tenant_day"]
        lines.append(
            f"| {r['replicas']} | {r['tenant_days']} | {r['seconds']:.1f} "
            f"| {r['tenant_days_per_second']:.1f} | {speedup} "
            f"| {r['transactions_per_tenant_day']:.2f} "
            f"| {'n/a' if statements is None else f'{statements:.2f}'} |"
        )
    for r in results:
        if r["top_statements"]:
            lines += [
                "",
                f"Statements called most, {r['replicas']} replica(s):",
                "",
                "| Calls | Per tenant-day | Rows | Statement |",
                "|---|---|---|---|",
            ]
            for s in r["top_statements"]:
                query = s["query"].replace("|", "\\|")
                query = query if len(query) <= 160 else query[:157] + "..."
                lines.append(f"| {s['calls']} | {s['per_tenant_day']} | {s['rows']} | `{query}` |")
    if failover:
        lines += [
            "",
            "| Failover, kill to ... | Median (s) | Max (s) | Each (s) |",
            "|---|---|---|---|",
        ]
        for key, label in (
            ("first_collection", "first day stored by another replica"),
            ("all_held", "the others hold every tenant"),
        ):
            values = [round(f[key], 2) for f in failover]
            lines.append(
                f"| {label} | {statistics.median(values):.2f} | {max(values):.2f} "
                f"| {', '.join(f'{v:.2f}' for v in values)} |"
            )
    return "\n".join(lines)


def _machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.node()}: {os.cpu_count()} CPUs, load average {load}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("COLLECTOR_TEST_POSTGRES_URL"))
    parser.add_argument("--tenants", type=int, default=60)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=5.0, help="requests/s per tenant")
    parser.add_argument("--concurrency", type=int, default=8, help="api.max_concurrency")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--kills", type=int, default=10, help="0: no failover measurement")
    parser.add_argument("--verbose", action="store_true", help="the statements called most")
    parser.add_argument("--json", action="store_true", help="JSON instead of markdown")
    args = parser.parse_args()
    if not args.url:
        parser.error("--url (or COLLECTOR_TEST_POSTGRES_URL) is required")
    before = _machine()
    with tempfile.TemporaryDirectory() as tmp:
        results = [await _throughput(args, k, Path(tmp)) for k in args.replicas]
        failover = await _failovers(args, Path(tmp)) if args.kills else []
    if args.json:
        print(json.dumps({"throughput": results, "failover": failover}, indent=2))
        return
    print(
        f"{args.tenants} tenants x {args.days} days, {args.latency * 1000:.0f} ms per request, "
        f"{args.rate:g} requests/s per tenant, api.max_concurrency {args.concurrency} per "
        f"replica, lease_ttl {LEASE_TTL:g}s, no sinks. Before: {before}; after: {_machine()}.\n"
    )
    print(_markdown(results, failover))


if __name__ == "__main__":
    asyncio.run(main())
