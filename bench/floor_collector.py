"""The floor: the least a collector on the specified stack must do, and nothing else.

What it does is what ``zencoder-collector run --once`` must do at the very least, with the same
libraries used the same way as our hot path:

- **aiohttp**: one ``ClientSession`` (no cookie jar, no environment lookups, no per-request
  timeout objects), at most ``--concurrency`` requests in flight, keep-alive connections, on uvloop;
- a token per tenant (JSON body, as the docs show), then ``day=`` for every day of the window;
- the body decoded by **msgspec** (into plain dicts: no schema, no checks);
- **raw first** (unless ``--no-raw``): every 200 body is committed, with the tenant and day, to a
  state database before its rows are written, as issue 10 asks;
- the four usage tables written through **SQLAlchemy** Core into the **SQLModel** tables of
  ``collector.tables``, with statements compiled once and executed with driver-level values in a
  worker thread, one transaction per batch of the days that came in meanwhile (SQLite, WAL,
  ``synchronous=NORMAL``, as both our state store and our SQLite sink are).

What it leaves out is everything else the product does: schema validation and its reasons,
retries with backoff, rate limiting, auth failure handling, quarantine, versions and the outbox,
status, hooks, logs, metrics, redaction, leases. A 429/503 waits out its Retry-After; anything
else that is not a 200 stops the run. Its CPU time per tenant-day is therefore a floor under any
collector on this stack that keeps raw bodies first, and what is left of a budget after it is what
all of the product's own logic may cost.

    python bench/floor_collector.py --base-url URL --token-url URL --tenants-file T.json \\
        --since 2025-09-01 --until 2025-09-30 --db usage.db [--state-db state.db | --no-raw]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import sqlalchemy as sa

from collector.tables import USAGE_TABLES, UsageDaily

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

USAGE_PATH = "/api/v1/data/usage"
RAW = sa.Table(
    "raw_day",
    sa.MetaData(),
    sa.Column("tenant", sa.String, primary_key=True),
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("fetched_at", sa.DateTime, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)
Fetched = tuple[str, str, bytes, Any]  # tenant, ISO day, raw body, decoded body


def sqlite_engine(path: Path) -> sa.Engine:
    """A SQLite engine configured as our state store and sink configure theirs."""
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


class Writer:
    """Raw bodies first (optional), then the four tables; one transaction each per batch."""

    def __init__(self, db: Path, state_db: Path | None) -> None:
        self.sink = sqlite_engine(db)
        tables = USAGE_TABLES  # the SQLModel tables' Core tables, parents first
        UsageDaily.metadata.create_all(self.sink, tables=tables)
        dialect = self.sink.dialect
        self.inserts = [
            str(t.insert().prefix_with("OR REPLACE").compile(dialect=dialect)) for t in tables
        ]
        self.state = sqlite_engine(state_db) if state_db is not None else None
        if self.state is not None:
            RAW.metadata.create_all(self.state)
            self.raw_insert = str(
                RAW.insert().prefix_with("OR REPLACE").compile(dialect=self.state.dialect)
            )

    def write(self, batch: list[Fetched]) -> None:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        if self.state is not None:
            with self.state.begin() as conn:
                conn.exec_driver_sql(
                    self.raw_insert, [(t, d, now, body.decode()) for t, d, body, _ in batch]
                )
        daily: list[tuple[Any, ...]] = []
        ides: list[tuple[Any, ...]] = []
        languages: list[tuple[Any, ...]] = []
        users: list[tuple[Any, ...]] = []
        encode = msgspec.json.encode
        for tenant, day, _, decoded in batch:
            data = decoded["data"]
            entry: dict[str, Any] = data["daily"][0] if data["daily"] else {}
            daily.append(
                (tenant, day, entry.get("active_users", 0), entry.get("messages", 0), now, 0)
            )
            for ide in entry.get("ides", ()):
                ides.append((tenant, day, ide["ide_name"], ide["engaged_users"]))
            for lang in entry.get("languages", ()):
                languages.append((tenant, day, lang["language_name"], lang["engaged_users"]))
            for user in data["users"]:
                seen = user.get("last_active")  # the simulator sends a date: no time to convert
                users.append(
                    (
                        tenant,
                        day,
                        user["email"],
                        user["messages"],
                        seen[:10] if seen else None,
                        encode(user["ides"]).decode(),
                        encode(user["languages"]).decode(),
                        None,
                    )
                )
        with self.sink.begin() as conn:
            for statement, rows in zip(self.inserts, (daily, ides, languages, users), strict=True):
                if rows:
                    conn.exec_driver_sql(statement, rows)

    def close(self) -> None:
        self.sink.dispose()
        if self.state is not None:
            self.state.dispose()


def days_between(since: dt.date, until: dt.date) -> Iterator[str]:
    for offset in range((until - since).days + 1):
        yield (since + dt.timedelta(days=offset)).isoformat()


async def collect(args: argparse.Namespace, tenants: list[dict[str, str]]) -> int:
    writer = Writer(Path(args.db), None if args.no_raw else Path(args.state_db))
    connector = aiohttp.TCPConnector(limit=args.concurrency + 8, limit_per_host=0)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    usage_url = args.base_url.rstrip("/") + USAGE_PATH
    tokens: dict[str, str] = {}
    pending: list[Fetched] = []
    wrote = asyncio.Event()
    done = False

    async def token(tenant: dict[str, str]) -> None:
        body = {
            "client_id": tenant["client_id"],
            "client_secret": tenant["client_secret"],
            "grant_type": "client_credentials",
        }
        async with session.post(args.token_url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"token for {tenant['id']}: HTTP {response.status}")
            tokens[tenant["id"]] = (await response.json())["access_token"]

    async def fetch(tenant: str, day: str) -> None:
        headers = {"Authorization": f"Bearer {tokens[tenant]}"}
        while True:
            async with session.get(usage_url, params={"day": day}, headers=headers) as response:
                body = await response.read()
                if response.status == 200:
                    pending.append((tenant, day, body, msgspec.json.decode(body)))
                    wrote.set()
                    return
                if response.status in (429, 503):
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                    continue
                raise RuntimeError(f"{tenant} {day}: HTTP {response.status}")

    async def worker(jobs: Iterator[tuple[str, str]]) -> None:
        for tenant, day in jobs:
            await fetch(tenant, day)

    async def write_loop() -> None:
        while not done or pending:
            await wrote.wait()
            wrote.clear()
            if pending:
                batch = pending[:]
                pending.clear()
                await asyncio.to_thread(writer.write, batch)

    jobs = ((t["id"], d) for t in tenants for d in days_between(args.since, args.until))
    try:
        limit = asyncio.Semaphore(args.concurrency)

        async def limited_token(tenant: dict[str, str]) -> None:
            async with limit:
                await token(tenant)

        await asyncio.gather(*(limited_token(t) for t in tenants))
        writing = asyncio.create_task(write_loop())
        await asyncio.gather(*(worker(jobs) for _ in range(args.concurrency)))
        done = True
        wrote.set()
        await writing
    finally:
        await session.close()
        writer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--tenants-file", required=True, help="JSON list of id/client_id/secret")
    parser.add_argument("--since", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--until", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--db", required=True, help="SQLite file for the four usage tables")
    parser.add_argument("--state-db", help="SQLite file for the raw bodies (raw first)")
    parser.add_argument("--no-raw", action="store_true", help="keep no raw bodies")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.no_raw and not args.state_db:
        parser.error("--state-db is required unless --no-raw")
    run = uvloop.run if uvloop is not None else asyncio.run
    tenants = json.loads(Path(args.tenants_file).read_text())
    return run(collect(args, tenants))


if __name__ == "__main__":
    sys.exit(main())
