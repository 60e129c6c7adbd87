"""kill -9: the daemon killed at random moments, over and over, loses and duplicates nothing.

The daemon runs as a child process against the simulator with three sinks (SQLite, CSV, a webhook
receiver) while the simulator keeps correcting recent days, so fetches, store commits and sink
writes are in flight all the time. One tenant is an organization of 2,000 people whose
``last_active`` are date-times (bodies of about 100 KB, hundreds of user rows per day). The daemon
is killed with SIGKILL at least 30 times (some kills during start-up, most while it works),
restarted each time, and finally left to finish. Then:

- every tenant-day of the lookback window is in SQLite exactly once, with the simulator's latest
  figures (and the large tenant's ``last_active_at``), and in each of the four CSV partitions of
  that day exactly once; every CSV parses;
- ``PRAGMA integrity_check`` is ``ok`` on the state database and on the sink database;
- every webhook redelivery of the same content carried the same ``webhook-id``, and a different
  content never shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import random
import sqlite3
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from collector.pipeline import utc_today
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from collector_sinks.csv import COLUMNS
from tests.daemon_process import DaemonProcess, eventually
from tests.e2e import daemon_config
from tests.servers import WebhookReceiver

KILLS = 32
HANG_BEFORE = {9, 17, 25}
LOOKBACK = 12
HOOK_SECRET = "crash-test-secret"
LARGE_TENANT = "tenant-03"
LARGE_USERS = 2000


def _window() -> list[dt.date]:
    today = utc_today()
    return [today - dt.timedelta(days=i) for i in range(LOOKBACK)]


async def _keep_correcting(sim: Any, tenants: list[str], stop: asyncio.Event) -> None:
    """Change today's or yesterday's figures of a random tenant every 0.2 s (late corrections),
    so every cycle has changed content to commit and deliver."""
    rng = random.Random(5)
    while not stop.is_set():
        sim.change_day(rng.choice(tenants), utc_today() - dt.timedelta(days=rng.randint(0, 1)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def _run_and_kill(config: Path, rng: random.Random, index: int) -> str:
    """Start the daemon, SIGKILL it at a random moment; returns when in its life it was killed."""
    async with DaemonProcess(config) as daemon:
        if index % 4 == 0:
            # During start-up: imports, config, schema creation, sink opening.
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            moment = "start-up"
        else:
            await eventually(
                lambda: bool(daemon.events("daemon started")),
                within=20,
                what="daemon start",
                daemon=daemon,
                interval=0.02,
            )
            await asyncio.sleep(rng.uniform(0.0, 1.2))
            moment = "working"
        if daemon.returncode is not None:
            raise AssertionError(f"daemon exited by itself:\n{daemon.output()[-3000:]}")
        daemon.kill()
        assert await daemon.wait(10) == -9
    return moment


def _integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def _check_sqlite(db: Path, sim: Any, tenants: list[str]) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        daily = conn.execute(
            "SELECT tenant, day, active_users, messages FROM usage_daily ORDER BY 1, 2"
        ).fetchall()
        keys = [(t, d) for t, d, _, _ in daily]
        expected = sorted((t, day.isoformat()) for t in tenants for day in _window())
        assert keys == expected  # every tenant-day, each exactly once
        for tenant, day_text, active, messages in daily:
            data = sim.day_data(tenant, dt.date.fromisoformat(day_text))
            entry = data["daily"][0] if data["daily"] else {"active_users": 0, "messages": 0}
            assert (active, messages) == (entry["active_users"], entry["messages"]), (
                tenant,
                day_text,
            )
            users = conn.execute(
                'SELECT "user", last_active_at FROM usage_user_daily WHERE tenant=? AND day=?',
                (tenant, day_text),
            ).fetchall()
            assert sorted(u for u, _ in users) == sorted(u["email"] for u in data["users"])
            # Only the large tenant's API sends date-times, so only it has last_active_at.
            assert all((at is not None) == (tenant == LARGE_TENANT) for _, at in users)


def _check_csv(root: Path, sim: Any, tenants: list[str]) -> None:
    for tenant in tenants:
        for day in _window():
            data = sim.day_data(tenant, day)
            for table, columns in COLUMNS.items():
                path = root / tenant / table / f"{day.isoformat()}.csv"
                assert path.is_file(), path
                with path.open(newline="", encoding="utf-8") as handle:
                    reader = csv.DictReader(handle)
                    assert tuple(reader.fieldnames or ()) == columns, path
                    rows = list(reader)
                assert all(r["tenant"] == tenant and r["day"] == day.isoformat() for r in rows)
                if table == "usage_daily":
                    assert len(rows) == 1, path
                    entry = data["daily"][0] if data["daily"] else {"messages": 0}
                    assert int(rows[0]["messages"]) == entry["messages"], path
                if table == "usage_user_daily":
                    users = [r["user"] for r in rows]
                    assert len(users) == len(set(users)), path
                    assert sorted(users) == sorted(u["email"] for u in data["users"]), path
    # Every file under the root is a partition that parsed above, or a temp file the sink's
    # atomic replace left behind when killed mid-write (never read as data).
    for path in root.rglob("*"):
        if path.is_file():
            assert path.suffix == ".csv" or path.name.startswith("."), path


def _check_webhook_ids(receiver: WebhookReceiver, sim: Any, tenants: list[str]) -> int:
    """Same content, same webhook-id; different content, different id. Returns redeliveries."""
    ids_by_content: dict[tuple[str, str, str, bool], set[str]] = defaultdict(set)
    contents_by_id: dict[str, set[tuple[str, str, str, bool]]] = defaultdict(set)
    arrivals = 0
    for request in receiver.requests:
        if not request.signature_valid:
            continue
        body = request.json()
        content = (body["tenant"], body["day"], body["content_hash"], body["final"])
        ids_by_content[content].add(request.webhook_id)
        contents_by_id[request.webhook_id].add(content)
        arrivals += 1
    assert all(len(ids) == 1 for ids in ids_by_content.values())
    assert all(len(contents) == 1 for contents in contents_by_id.values())
    delivered = {(p["tenant"], p["day"]) for p in receiver.payloads()}
    assert delivered == {(t, day.isoformat()) for t in tenants for day in _window()}
    return arrivals - len(ids_by_content)


async def test_kill_dash_nine_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Killed with SIGKILL 32 times at random moments and restarted, the daemon still ends with
    every tenant-day exactly once in SQLite and CSV, intact databases, and stable webhook ids,
    a 2,000-user tenant included."""
    sim_tenants = [
        replace(t, users=LARGE_USERS, variant="datetime_last_active") if t.id == LARGE_TENANT else t
        for t in demo_tenants(3)
    ]
    tenants = [t.id for t in sim_tenants]
    rng = random.Random(20260101)
    async with (
        running_simulator(SimulatorSettings(tenants=sim_tenants, latency=0.05)) as sim,
        WebhookReceiver(HOOK_SECRET) as receiver,
    ):
        config = daemon_config(
            tmp_path,
            sim,
            sim_tenants,
            lookback=LOOKBACK,
            sinks={
                "warehouse": {
                    "type": "sqlite",
                    "path": str(tmp_path / "usage.db"),
                    "batch_size": 4,
                },
                "sheets": {"type": "csv", "path": str(tmp_path / "csv"), "batch_size": 4},
                "hook": {
                    "type": "webhook",
                    "url": receiver.url,
                    "secret": HOOK_SECRET,
                    "batch_size": 4,
                },
            },
        )
        stop = asyncio.Event()
        corrections = asyncio.create_task(_keep_correcting(sim, tenants, stop))
        started = time.monotonic()
        moments = []
        for index in range(KILLS):
            if index in HANG_BEFORE:
                # The next webhook posts hang until the kill: a sure redelivery of the same
                # content, whatever the random timing does.
                receiver.hang(3.0, times=2)
            moments.append(await _run_and_kill(config, rng, index))
        kill_phase = time.monotonic() - started
        stop.set()
        await corrections
        receiver.clear_answers()
        assert moments.count("working") >= 20

        async with DaemonProcess(config) as daemon:

            async def settled() -> bool:
                if daemon.listen is None or not daemon.events("daemon started"):
                    return False
                status = await daemon.status()
                return (
                    all(s["backlog"] == 0 for s in status["sinks"])
                    and all(
                        t["days_complete"] == LOOKBACK and t["last_cycle"]["changed"] == 0
                        for t in status["tenants"]
                        if "last_cycle" in t
                    )
                    and len([t for t in status["tenants"] if "last_cycle" in t]) == len(tenants)
                )

            await eventually(settled, within=60, what="everything delivered", daemon=daemon)
            assert await daemon.stop() == 0

    assert _integrity(tmp_path / "state.db") == "ok"
    assert _integrity(tmp_path / "usage.db") == "ok"
    _check_sqlite(tmp_path / "usage.db", sim, tenants)
    _check_csv(tmp_path / "csv", sim, tenants)
    redeliveries = _check_webhook_ids(receiver, sim, tenants)
    assert redeliveries >= 1
    assert receiver.bad_signatures == 0
    # The kill phase must have cost real work to be a test of anything.
    assert sim.stats.responses[200] > len(tenants) * LOOKBACK
    leftovers = sum(1 for p in (tmp_path / "csv").rglob(".*.tmp"))
    print(
        f"kill phase {kill_phase:.1f}s; webhook redeliveries of the same content: {redeliveries}; "
        f"CSV temp files left by kills: {leftovers}"
    )
