"""Three daemons as real processes on one PostgreSQL state (``state.replicas: true``) against the
simulator, one SQLite sink file, one CSV directory and a webhook receiver shared by all three:
they split the tenants, take over the tenants of a replica killed with SIGKILL or frozen with
SIGSTOP in the middle of a cycle, and every tenant-day the simulator served reaches each sink
exactly once; SQLite as the state store refuses the setting."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import sqlalchemy

from collector.app import load, load_plugins, open_runtime
from collector.simulator import Simulator, SimulatorSettings, demo_tenants, running_simulator
from tests.daemon_process import DaemonProcess, eventually
from tests.e2e import run_cli, write_config
from tests.postgres_helpers import fresh_schema
from tests.servers import WebhookReceiver

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtMTIzNA=="
TENANTS = 60
LOOKBACK = 3
LEASE_TTL = 3.0
HEARTBEAT = LEASE_TTL / 3  # collector.replicas: a replica beats every third of the lease
LATENCY = 0.5  # s per usage request: a replica's cycle over its 20 tenants takes ~10 s
CONCURRENCY = 3  # api.max_concurrency per replica
TAKEOVER_SLACK = 15.0  # process scheduling on a loaded CI machine, the new holder's queue
HELD = "zencoder_collector_replica_leases_held"
LOSSES = "zencoder_collector_replica_lease_losses_total"
FENCED = "zencoder_collector_replica_fenced_writes_total"
SINK_FAILURES = "zencoder_collector_sink_failures_total"
SINKS = ("warehouse", "sheets", "hook")


@pytest.fixture
def state_url(postgres_url: str) -> Iterator[str]:
    with fresh_schema(postgres_url, "r") as (_, url):
        yield url


@pytest.fixture
def state_db(state_url: str) -> Iterator[sqlalchemy.Engine]:
    """The test's own connection to the replicas' state database (to see what is stored)."""
    engine = sqlalchemy.create_engine(state_url, pool_size=1)
    yield engine
    engine.dispose()


@dataclass
class Cluster:
    """The simulator, the webhook receiver and the config every replica runs with."""

    sim: Simulator
    receiver: WebhookReceiver
    config: Path
    workdir: Path
    ids: list[str]

    @property
    def sqlite_sink(self) -> Path:
        return self.workdir / "usage.db"

    @property
    def csv_sink(self) -> Path:
        return self.workdir / "csv"


@contextlib.asynccontextmanager
async def _cluster(
    tmp_path: Path, url: str, tenants: int, *, latency: float = 0.0, concurrency: int = 32
) -> AsyncIterator[Cluster]:
    simulated = demo_tenants(tenants)
    async with (
        running_simulator(SimulatorSettings(tenants=simulated, latency=latency)) as sim,
        WebhookReceiver(SECRET) as receiver,
    ):
        config = write_config(
            tmp_path / "config.yaml",
            sim,
            simulated,
            workdir=tmp_path,
            lookback_days=LOOKBACK,
            sinks={
                "warehouse": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
                "sheets": {"type": "csv", "path": str(tmp_path / "csv")},
                "hook": {"type": "webhook", "url": receiver.url, "secret": SECRET},
            },
            extra={
                # A frozen replica's requests in flight must outlive the freeze (then its
                # writes of their days meet the fence).
                "api": {"max_concurrency": concurrency, "timeout": "60s"},
                "state": {"url": url, "replicas": True, "lease_ttl": f"{LEASE_TTL}s"},
                "server": {"listen": "127.0.0.1:0"},
                "collection": {"schedule": {"every": "1h", "jitter": "0s"}},
            },
        )
        yield Cluster(sim, receiver, config, tmp_path, [t.id for t in simulated])


async def _start(
    stack: contextlib.AsyncExitStack, cluster: Cluster, count: int
) -> list[DaemonProcess]:
    daemons = [await stack.enter_async_context(DaemonProcess(cluster.config)) for _ in range(count)]
    for daemon in daemons:
        await _listening(daemon)
    return daemons


async def _listening(daemon: DaemonProcess) -> None:
    await eventually(lambda: daemon.listen is not None, within=30, what="ops", daemon=daemon)


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


async def _even_spread(observer: DaemonProcess, replicas: int, ids: list[str]) -> None:
    async def spread() -> bool:
        return _spread_ok(await _holdings(observer), replicas, ids)

    await eventually(spread, within=60, what=f"an even spread on {replicas}", daemon=observer)


async def _stored(
    engine: sqlalchemy.Engine, tenants: list[str], after: dt.datetime | None = None
) -> list[tuple[str, str]]:
    """(tenant, day) of the days of ``tenants`` the state store holds (fetched after ``after``)."""
    query = sqlalchemy.text(
        "SELECT tenant, day FROM tenant_day WHERE status IN ('fetched', 'final') "
        "AND tenant = ANY(:tenants) AND fetched_at > :after"
    )
    since = after or dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

    def read() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            rows = conn.execute(query, {"tenants": tenants, "after": since})
            return [(row.tenant, row.day.isoformat()) for row in rows]

    return await anyio.to_thread.run_sync(read)


async def _mid_cycle_replica(
    daemons: list[DaemonProcess], engine: sqlalchemy.Engine
) -> tuple[DaemonProcess, list[str]]:
    """A replica some but not all of whose tenants' days are stored, and its tenants."""
    found: list[tuple[DaemonProcess, list[str]]] = []

    async def some_stored() -> bool:
        status = await daemons[0].status()
        by_pid = {r["pid"]: r["tenants"] for r in status["replicas"] if r["live"]}
        for daemon in daemons:
            tenants = by_pid.get(daemon.pid, [])
            done = len(await _stored(engine, tenants))
            if tenants and 0 < done < len(tenants) * LOOKBACK:
                found.append((daemon, tenants))
                return True
        return False

    await eventually(some_stored, within=60, what="a replica in the middle of its cycle")
    return found[0]


def _served(sim: Simulator) -> set[tuple[str, str]]:
    """(tenant, day) of every day the simulator answered with data."""
    return {(r.tenant, r.param) for r in sim.stats.log if r.status == 200 and r.tenant}


def _sqlite_rows(db: Path) -> Counter[tuple[str, str]]:
    """Rows of usage_daily in the SQLite sink, per (tenant, day)."""
    if not db.exists():
        return Counter()
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            return Counter(conn.execute("SELECT tenant, day FROM usage_daily"))
    except sqlite3.OperationalError:  # the sink has not created its tables yet
        return Counter()


def _csv_rows(root: Path) -> Counter[tuple[str, str]]:
    """Rows of the usage_daily files of the CSV sink, per (tenant, day)."""
    rows: Counter[tuple[str, str]] = Counter()
    for path in root.glob("*/usage_daily/*.csv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows.update((row["tenant"], row["day"]) for row in csv.DictReader(f))
    return rows


def _webhook_days(receiver: WebhookReceiver) -> set[tuple[str, str]]:
    return {(body["tenant"], body["day"]) for body in receiver.payloads()}


async def _everything_delivered_once(cluster: Cluster) -> None:
    """Every tenant-day the simulator served reaches the SQLite sink, the CSV sink and the webhook;
    then each is in the SQLite and the CSV sink exactly once and each webhook-id carried one
    body."""

    def arrived() -> bool:
        served = _served(cluster.sim)
        per_tenant = Counter(t for t, _ in served)
        return (
            all(per_tenant[t] >= LOOKBACK for t in cluster.ids)
            and set(_sqlite_rows(cluster.sqlite_sink)) >= served
            and set(_csv_rows(cluster.csv_sink)) >= served
            and _webhook_days(cluster.receiver) >= served
        )

    await eventually(arrived, within=60, what="every served tenant-day in the three sinks")
    served = _served(cluster.sim)
    for name, rows in (
        ("sqlite", _sqlite_rows(cluster.sqlite_sink)),
        ("csv", _csv_rows(cluster.csv_sink)),
    ):
        assert set(rows) == served, name
        assert [key for key, n in rows.items() if n != 1] == [], f"{name}: duplicated days"
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for request in cluster.receiver.accepted:
        bodies[request.webhook_id].add(request.body)
    differing = {i: sorted(b) for i, b in bodies.items() if len(b) != 1}
    assert differing == {}, "a redelivery differs from the first delivery"


@pytest.mark.postgres
async def test_three_replicas_survive_a_kill_mid_cycle_and_deliver_each_day_once(
    tmp_path: Path, state_url: str, state_db: sqlalchemy.Engine
) -> None:
    """Three replicas over 60 tenants hold each tenant exactly once (fair share + 1 at most);
    after one is SIGKILLed mid-cycle the two others collect every one of its tenants within the
    lease expiry plus a heartbeat (plus slack), and every tenant-day the simulator served is in
    the shared SQLite sink and CSV sink exactly once (no write to them failed) and was delivered
    to the webhook with one body per webhook-id."""
    async with (
        _cluster(tmp_path, state_url, TENANTS, latency=LATENCY, concurrency=CONCURRENCY) as cluster,
        contextlib.AsyncExitStack() as stack,
    ):
        daemons = await _start(stack, cluster, 3)
        await _even_spread(daemons[0], 3, cluster.ids)
        cli = await run_cli("status", "-c", str(cluster.config), "--json")
        assert cli.returncode == 0, cli.stderr
        assert len([r for r in json.loads(cli.stdout)["replicas"] if r["live"]]) == 3

        victim, its_tenants = await _mid_cycle_replica(daemons, state_db)
        survivors = [d for d in daemons if d is not victim]
        killed_at = dt.datetime.now(dt.UTC)
        killed = time.monotonic()
        victim.kill()
        await victim.wait(10)

        async def all_collected_again() -> bool:
            again = {t for t, _ in await _stored(state_db, its_tenants, after=killed_at)}
            return again == set(its_tenants)

        bound = LEASE_TTL + HEARTBEAT + TAKEOVER_SLACK
        await eventually(all_collected_again, within=bound + 30, what="the victim's tenants")
        took = time.monotonic() - killed
        assert took <= bound, f"the victim's tenants were collected again {took:.1f}s after"

        await _even_spread(survivors[0], 2, cluster.ids)

        async def leases_held() -> bool:
            return sum([(await d.metrics())[HELD] for d in survivors]) == TENANTS

        await eventually(leases_held, within=15, what="the held-leases gauges")
        assert [(await d.get("/readyz"))[0] for d in survivors] == [200, 200]
        await _everything_delivered_once(cluster)
        for daemon in survivors:
            # Three processes on one SQLite file and one CSV directory: no write failed (the
            # SQLite writers queue on its lock within busy_timeout).
            metrics = await daemon.metrics()
            failures = {s: metrics[f'{SINK_FAILURES}{{sink="{s}"}}'] for s in SINKS}
            assert failures == dict.fromkeys(SINKS, 0.0)
            assert await daemon.stop() == 0


@pytest.mark.postgres
async def test_a_replica_frozen_past_its_lease_is_fenced_and_rejoins_without_duplicates(
    tmp_path: Path, state_url: str, state_db: sqlalchemy.Engine
) -> None:
    """A replica frozen with SIGSTOP mid-cycle until the two others hold all 60 tenants has, once
    resumed (SIGCONT), its writes refused by fencing, counts the leases it lost, registers again
    and takes its share back; nothing is lost or delivered twice."""
    async with (
        _cluster(tmp_path, state_url, TENANTS, latency=LATENCY, concurrency=CONCURRENCY) as cluster,
        contextlib.AsyncExitStack() as stack,
    ):
        daemons = await _start(stack, cluster, 3)
        await _even_spread(daemons[0], 3, cluster.ids)
        frozen, _ = await _mid_cycle_replica(daemons, state_db)
        others = [d for d in daemons if d is not frozen]
        frozen.signal(signal.SIGSTOP)  # its requests in flight are answered while it sleeps
        await _even_spread(others[0], 2, cluster.ids)
        frozen.signal(signal.SIGCONT)

        async def fenced() -> bool:
            return (await frozen.metrics())[FENCED] > 0

        await eventually(fenced, within=15, what="a fenced write", daemon=frozen)
        assert (await frozen.metrics())[LOSSES] > 0  # it learned at its heartbeat
        await _even_spread(frozen, 3, cluster.ids)
        assert (await frozen.get("/readyz"))[0] == 200
        await _everything_delivered_once(cluster)
        for daemon in daemons:
            assert await daemon.stop() == 0


@pytest.mark.postgres
@pytest.mark.parametrize(("replicas", "expected"), [(True, "3s"), (False, "30s")])
async def test_state_sessions_end_transactions_idle_past_the_lease(
    tmp_path: Path, state_url: str, replicas: bool, expected: str
) -> None:
    """The daemon's PostgreSQL sessions end a transaction left idle (its process frozen) after
    the lease TTL when it is a replica, so its locks go with its leases; after 30 s otherwise."""
    async with running_simulator(SimulatorSettings(tenants=demo_tenants(1))) as sim:
        config_path = write_config(
            tmp_path / "config.yaml",
            sim,
            demo_tenants(1),
            workdir=tmp_path,
            extra={"state": {"url": state_url, "replicas": replicas, "lease_ttl": "3s"}},
        )
        plugins = load_plugins()
        async with open_runtime(load(config_path, plugins), plugins) as runtime:
            setting = await runtime.store._read(
                lambda conn: conn.exec_driver_sql(
                    "SHOW idle_in_transaction_session_timeout"
                ).scalar()
            )
    assert setting == expected


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
async def test_rolling_restart_keeps_every_tenant_held_and_delivers_each_day_once(
    tmp_path: Path, state_url: str
) -> None:
    """Restarting three replicas one by one (SIGTERM, then a new process) ends with an even
    spread each time, exit code 0 for each stopped one, and every tenant-day in the SQLite and
    CSV sinks exactly once and at the webhook with one body per webhook-id."""
    async with _cluster(tmp_path, state_url, 12) as cluster, contextlib.AsyncExitStack() as stack:
        daemons = await _start(stack, cluster, 3)
        for index in range(3):
            await _even_spread(daemons[-1], 3, cluster.ids)
            old = daemons.pop(0)
            assert await old.stop() == 0, f"restart {index}"
            daemons += await _start(stack, cluster, 1)
        await _even_spread(daemons[-1], 3, cluster.ids)
        await _everything_delivered_once(cluster)
