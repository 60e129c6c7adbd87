"""Replicas on one PostgreSQL state: collection throughput for 1, 2 and 4 replicas, and failover.

    python bench/bench_replicas.py --url postgresql+psycopg://USER:PW@HOST/DB [--tenants 60]

Each run gets a fresh schema, the simulator (``--latency`` per request, ``--rate`` requests/s
per tenant) and K daemons (``run``, ``state.replicas: true``, no sinks, ``api.max_concurrency``
per replica). Throughput counts the tenant-days stored between the moment all K replicas are
registered and the moment the whole window is stored, so process start-up is left out. Database
transactions per tenant-day come from ``pg_stat_database`` (the whole database: run it alone).
Failover: with three replicas, SIGKILL one and time until the others hold every tenant (its
leases expired and were claimed), ``--kills`` times, a new replica started after each.
Figures and the machine they were taken on: docs/performance.md ("Replicas").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy
import yaml

from collector.simulator import SimulatorSettings, demo_tenants, running_simulator

LEASE_TTL = 3.0


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


def _scalar(engine: sqlalchemy.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql(sql).scalar() or 0)


async def _until(engine: sqlalchemy.Engine, sql: str, wanted: int, limit: float) -> float:
    deadline = time.perf_counter() + limit
    while _scalar(engine, sql) < wanted:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{sql} did not reach {wanted} within {limit}s")
        await asyncio.sleep(0.05)
    return time.perf_counter()


STORED = "SELECT count(*) FROM tenant_day WHERE status IN ('fetched', 'final')"
LIVE = "SELECT count(*) FROM replica WHERE expires_at > now()"
COMMITS = (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)


async def _throughput(args: argparse.Namespace, replicas: int, workdir: Path) -> dict[str, Any]:
    tenants = demo_tenants(args.tenants)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    base = sqlalchemy.make_url(args.url)
    admin = sqlalchemy.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    engine = sqlalchemy.create_engine(url)
    settings = SimulatorSettings(tenants=tenants, latency=args.latency)
    processes: list[asyncio.subprocess.Process] = []
    try:
        async with running_simulator(settings) as sim:
            sim.faults.set(None, rate_limit=args.rate)
            config = _config(workdir / f"r{replicas}.yaml", sim, tenants, url.render_as_string(
                hide_password=False), args)  # fmt: skip
            first = await _daemon(config)  # creates the schema before the others start
            processes.append(first)
            created = (
                "SELECT count(*) FROM information_schema.tables "
                f"WHERE table_schema = '{schema}' AND table_name = 'replica'"
            )
            await _until(engine, created, 1, 60)
            processes += [await _daemon(config) for _ in range(replicas - 1)]
            started = await _until(engine, LIVE, replicas, 60)
            stored_before, commits_before = _scalar(engine, STORED), _scalar(engine, COMMITS)
            total = args.tenants * args.days
            done = await _until(engine, STORED, total, 600)
            commits = _scalar(engine, COMMITS) - commits_before
            days = total - stored_before
            failover = await _failovers(engine, config, processes, args) if replicas == 3 else []
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in processes))
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
    result: dict[str, Any] = {
        "replicas": replicas,
        "tenant_days": days,
        "seconds": round(done - started, 3),
        "tenant_days_per_second": round(days / (done - started), 1),
        "transactions_per_tenant_day": round(commits / max(days, 1), 2),
    }
    if failover:
        result["failover_seconds"] = failover
    return result


async def _failovers(
    engine: sqlalchemy.Engine, config: Path, processes: list[asyncio.subprocess.Process],
    args: argparse.Namespace,
) -> list[float]:  # fmt: skip
    """SIGKILL a replica, time until the others hold every tenant; start a new one; repeat."""
    held_by_live = (
        "SELECT count(*) FROM tenant_lease l JOIN replica r ON r.id = l.replica "
        "WHERE l.expires_at > now() AND r.expires_at > now()"
    )
    times = []
    for _ in range(args.kills):
        await _until(engine, held_by_live, args.tenants, 60)
        victim = processes.pop(0)
        victim.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        await victim.wait()
        # Every tenant held by a replica other than the dead one (its rows look live until
        # its lease ends, so it is told apart by its pid).
        by_others = f"{held_by_live} AND r.pid <> {victim.pid}"
        taken = await _until(engine, by_others, args.tenants, 60)
        times.append(round(taken - killed, 2))
        processes.append(await _daemon(config))
        await _until(engine, LIVE, 3, 60)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("COLLECTOR_TEST_POSTGRES_URL"))
    parser.add_argument("--tenants", type=int, default=60)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--rate", type=float, default=5.0, help="requests/s per tenant")
    parser.add_argument("--concurrency", type=int, default=8, help="api.max_concurrency")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    if not args.url:
        parser.error("--url (or COLLECTOR_TEST_POSTGRES_URL) is required")
    with tempfile.TemporaryDirectory() as tmp:
        results = [await _throughput(args, k, Path(tmp)) for k in args.replicas]
    one = next((r for r in results if r["replicas"] == 1), None)
    for r in results:
        if one:
            r["speedup"] = round(r["tenant_days_per_second"] / one["tenant_days_per_second"], 2)
        if "failover_seconds" in r:
            r["failover_median"] = statistics.median(r["failover_seconds"])
            r["failover_max"] = max(r["failover_seconds"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
