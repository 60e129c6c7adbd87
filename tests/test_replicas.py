"""Three daemons as real processes on one PostgreSQL state (``state.replicas: true``) against the
simulator and a webhook receiver: they split the tenants, deliver every tenant-day, and take over
the tenants of a replica killed with SIGKILL or frozen with SIGSTOP; SQLite refuses the setting."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.pipeline import utc_today
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.daemon_process import DaemonProcess, eventually
from tests.e2e import run_cli, write_config
from tests.postgres_helpers import fresh_schema
from tests.servers import WebhookReceiver

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtMTIzNA=="
TENANTS = 12
LOOKBACK = 3
LEASE = "3s"


@pytest.fixture
def state_url(postgres_url: str) -> Iterator[str]:
    with fresh_schema(postgres_url, "r") as (_, url):
        yield url


def _replica_config(
    tmp_path: Path, sim: Any, tenants: Any, receiver: WebhookReceiver, url: str
) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        sim,
        tenants,
        workdir=tmp_path,
        lookback_days=LOOKBACK,
        sinks={"hook": {"type": "webhook", "url": receiver.url, "secret": SECRET}},
        extra={
            "state": {"url": url, "replicas": True, "lease_ttl": LEASE},
            "server": {"listen": "127.0.0.1:0"},
            "collection": {"schedule": {"every": "1h", "jitter": "0s"}},
        },
    )


async def _holdings(daemon: DaemonProcess) -> dict[str, list[str]]:
    """Live replica id -> tenants it holds, from a daemon's /status."""
    status = await daemon.status()
    return {r["id"]: r["tenants"] for r in status.get("replicas", []) if r["live"]}


def _spread_ok(holdings: dict[str, list[str]], replicas: int, ids: list[str]) -> bool:
    held = sorted(t for tenants in holdings.values() for t in tenants)
    fair = len(ids) // replicas
    return (
        len(holdings) == replicas
        and held == sorted(ids)  # every tenant, each exactly once
        and max(len(t) for t in holdings.values()) <= fair + 1
    )


@pytest.mark.postgres
async def test_three_replicas_split_tenants_deliver_each_day_and_survive_a_kill(
    tmp_path: Path, state_url: str
) -> None:
    """Three replicas hold every tenant exactly once (fair share + 1 at most), every tenant-day
    reaches the webhook with one body per webhook-id, status lists the replicas, and after a
    SIGKILL the two others hold all tenants once the lease expired; a replica frozen (SIGSTOP) past
    its lease loses its tenants, and after SIGCONT counts the losses and takes its share again."""
    tenants = demo_tenants(TENANTS)
    ids = [t.id for t in tenants]
    today = utc_today()
    wanted = {(t, (today - dt.timedelta(days=i)).isoformat()) for t in ids for i in range(LOOKBACK)}
    async with (
        running_simulator(SimulatorSettings(tenants=tenants)) as sim,
        WebhookReceiver(SECRET) as receiver,
        contextlib.AsyncExitStack() as stack,
    ):
        config = _replica_config(tmp_path, sim, tenants, receiver, state_url)
        daemons = [await stack.enter_async_context(DaemonProcess(config)) for _ in range(3)]
        for daemon in daemons:
            await eventually(
                lambda d=daemon: d.listen is not None, within=30, what="ops", daemon=daemon
            )

        async def spread() -> bool:
            return _spread_ok(await _holdings(daemons[0]), 3, ids)

        await eventually(spread, within=60, what="an even spread", daemon=daemons[0])

        def delivered() -> set[tuple[str, str]]:
            return {(p["tenant"], p["day"]) for p in map(_day_of, receiver.accepted)}

        await eventually(lambda: delivered() >= wanted, within=90, what="every tenant-day")
        bodies: dict[str, set[bytes]] = defaultdict(set)
        for request in receiver.accepted:
            bodies[request.webhook_id].add(request.body)
        assert all(len(b) == 1 for b in bodies.values())  # a redelivery is identical

        cli = await run_cli("status", "-c", str(config), "--json")
        assert cli.returncode == 0, cli.stderr
        assert len([r for r in json.loads(cli.stdout)["replicas"] if r["live"]]) == 3

        victim, *survivors = daemons
        victim.kill()
        await victim.wait(10)

        async def taken_over() -> bool:
            return _spread_ok(await _holdings(survivors[0]), 2, ids)

        await eventually(taken_over, within=30, what="the takeover", daemon=survivors[0])

        async def leases_held() -> float:
            return sum([(await d.metrics())[HELD] for d in survivors])

        await eventually(
            lambda: _equals(leases_held(), TENANTS), within=15, what="the held-leases gauges"
        )
        assert [(await d.get("/readyz"))[0] for d in survivors] == [200, 200]

        frozen, last = survivors
        frozen.signal(signal.SIGSTOP)  # paused past its lease expiry

        async def all_on_last() -> bool:
            return _spread_ok(await _holdings(last), 1, ids)

        await eventually(all_on_last, within=30, what="the takeover from the frozen one")
        frozen.signal(signal.SIGCONT)
        await eventually(taken_over, within=30, what="the frozen one back", daemon=frozen)
        losses = (await frozen.metrics())[LOSSES]
        assert losses > 0  # it learned at its heartbeat that its leases were gone
        assert (await frozen.get("/readyz"))[0] == 200
        bodies = defaultdict(set)
        for request in receiver.accepted:
            bodies[request.webhook_id].add(request.body)
        assert all(len(b) == 1 for b in bodies.values())  # nothing delivered differently twice
        for daemon in survivors:
            assert await daemon.stop() == 0


HELD = "zencoder_collector_replica_leases_held"
LOSSES = "zencoder_collector_replica_lease_losses_total"


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)


def _day_of(request: Any) -> dict[str, str]:
    """(tenant, day) of a per-day webhook body."""
    body = request.json()
    return {"tenant": body["tenant"], "day": body["day"]}


async def test_sqlite_state_refuses_replicas(tmp_path: Path) -> None:
    """replicas: true on a SQLite state is a config error that says why and what to do."""
    async with running_simulator(SimulatorSettings(tenants=demo_tenants(1))) as sim:
        config = write_config(
            tmp_path / "config.yaml",
            sim,
            demo_tenants(1),
            workdir=tmp_path,
            extra={"state": {"url": f"sqlite:///{tmp_path / 'state.db'}", "replicas": True}},
        )
        result = await run_cli("validate", "-c", str(config))
    assert result.returncode == 2
    assert "replicas: true needs a PostgreSQL state.url" in result.stderr


@pytest.mark.postgres
async def test_rolling_restart_keeps_every_tenant_held_and_delivers_nothing_differently(
    tmp_path: Path, state_url: str
) -> None:
    """Restarting three replicas one by one (SIGTERM, then a new process) ends with an even
    spread each time, exit code 0 for each stopped one, every tenant-day delivered and one body
    per webhook-id."""
    tenants = demo_tenants(TENANTS)
    ids = [t.id for t in tenants]
    today = utc_today()
    wanted = {(t, (today - dt.timedelta(days=i)).isoformat()) for t in ids for i in range(LOOKBACK)}
    async with (
        running_simulator(SimulatorSettings(tenants=tenants)) as sim,
        WebhookReceiver(SECRET) as receiver,
        contextlib.AsyncExitStack() as stack,
    ):
        config = _replica_config(tmp_path, sim, tenants, receiver, state_url)
        daemons = [await stack.enter_async_context(DaemonProcess(config)) for _ in range(3)]
        for index in range(3):
            newest = daemons[-1]
            await eventually(lambda d=newest: d.listen is not None, within=30, what="ops")

            async def spread(d: DaemonProcess = newest) -> bool:
                return _spread_ok(await _holdings(d), 3, ids)

            await eventually(spread, within=30, what=f"the spread before restart {index}")
            old = daemons.pop(0)
            assert await old.stop() == 0
            daemons.append(await stack.enter_async_context(DaemonProcess(config)))
        newest = daemons[-1]
        await eventually(lambda: newest.listen is not None, within=30, what="ops")
        await eventually(
            lambda: _all_delivered(receiver, wanted), within=60, what="every tenant-day"
        )

        async def final_spread() -> bool:
            return _spread_ok(await _holdings(newest), 3, ids)

        await eventually(final_spread, within=30, what="the spread after the restarts")
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for request in receiver.accepted:
        bodies[request.webhook_id].add(request.body)
    assert all(len(b) == 1 for b in bodies.values())


def _all_delivered(receiver: WebhookReceiver, wanted: set[tuple[str, str]]) -> bool:
    """Every wanted (tenant, day) reached the receiver."""
    got = {(p["tenant"], p["day"]) for p in map(_day_of, receiver.accepted)}
    return got >= wanted
