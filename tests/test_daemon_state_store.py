"""The daemon when its state store fails: a full disk, a corrupt or truncated file, a second
collector on the same state. Real daemon processes against the simulator, a real tmpfs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.daemon_process import DaemonProcess, eventually, sqlite_days
from tests.disk import fill, small_disk
from tests.e2e import daemon_config, expected_days, run_cli

FAILING = "state store failing: nothing new is stored until it recovers"


def _config(tmp_path: Path, sim: Any, tenants: Any, state: Path, *, lookback: int) -> Path:
    return daemon_config(
        tmp_path, sim, tenants, lookback=lookback, state={"url": f"sqlite:///{state}"}
    )


async def test_a_full_state_disk_is_one_error_a_503_and_heals(tmp_path: Path) -> None:
    """With the state database's disk full while 21 tenants try to store their days: one error
    line (no traceback per tenant), /readyz 503 with the reason, state_store_up 0 and the
    tenants failing in /status; when space returns the daemon turns ready again and every day
    reaches the sink."""
    tenants = demo_tenants(21)
    lookback = 30
    with small_disk(tmp_path / "disk", "64m") as disk:
        async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
            state = disk / "state.db"
            config = _config(tmp_path, sim, tenants[:1], state, lookback=2)
            async with DaemonProcess(config) as d:

                async def ready() -> bool:
                    return d.listen is not None and (await d.get("/readyz"))[0] == 200

                await eventually(ready, within=30, what="/readyz 200", daemon=d)
                await eventually(
                    lambda: len(sqlite_days(tmp_path / "usage.db")) == 2,
                    within=30,
                    what="the first tenant delivered",
                    daemon=d,
                )
                filler = fill(disk)
                _config(tmp_path, sim, tenants, state, lookback=lookback)
                d.signal(signal.SIGHUP)

                async def failing() -> bool:
                    status, body = await d.get("/readyz")
                    return status == 503 and "state store failing" in body

                await eventually(failing, within=30, what="/readyz 503", daemon=d)
                await asyncio.sleep(3)  # a few more failing cycles of every tenant
                status, body = await d.get("/readyz")
                assert status == 503
                assert "disk is full" in json.loads(body)["reason"]
                metrics = await d.metrics()
                assert metrics["zencoder_collector_state_store_up"] == 0
                assert metrics["zencoder_collector_state_store_errors_total"] >= 2
                snapshot = await d.status()
                assert snapshot["state_store"]["state"] == "failing"
                assert any(
                    t["state"] == "failing" and "state store" in (t.get("last_error") or "")
                    for t in snapshot["tenants"]
                )
                assert len(d.events(FAILING)) == 1
                assert not d.events("tenant task crashed")
                assert not d.events("cycle crashed")
                assert "Traceback" not in d.output()

                filler.unlink()
                await eventually(ready, within=30, what="/readyz 200 again", daemon=d)
                assert d.events("state store recovered")
                await eventually(
                    lambda: sqlite_days(tmp_path / "usage.db") == expected_days(tenants, lookback),
                    within=90,
                    what="every day delivered after the disk had space again",
                    daemon=d,
                )
                assert (await d.metrics())["zencoder_collector_state_store_up"] == 1
                assert await d.stop() == 0


async def test_a_corrupt_state_file_stops_the_daemon_like_run_once(tmp_path: Path) -> None:
    """A state file that is not a database: `run --once` and the daemon both exit 1 with the
    same message, instead of the daemon retrying for ever."""
    tenants = demo_tenants(1)
    state = tmp_path / "state.db"
    state.write_bytes(b"not a database " * 500)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = _config(tmp_path, sim, tenants, state, lookback=2)
        once = await run_cli("run", "--once", "-c", str(config))
        async with DaemonProcess(config) as d:
            code = await d.wait(30)
    assert once.returncode == 1
    message = "state database error (DatabaseError): file is not a database"
    assert message in once.stderr
    assert code == 1
    assert message in d.output()
    assert d.events("state store unusable; stopping")
    assert not d.events("state store unreachable; retrying")


async def test_a_truncated_state_file_is_refused_at_start(tmp_path: Path) -> None:
    """After a run, a state file cut to zero bytes makes the next start exit 1 saying so; the
    empty file is left as it is."""
    tenants = demo_tenants(1)
    state = tmp_path / "state.db"
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = _config(tmp_path, sim, tenants, state, lookback=2)
        first = await run_cli("run", "--once", "-c", str(config))
        assert first.returncode == 0, first.stderr
        state.write_bytes(b"")
        second = await run_cli("run", "--once", "-c", str(config))
        async with DaemonProcess(config) as d:
            code = await d.wait(30)
    assert second.returncode == 1
    assert "is empty (0 bytes) but held data before" in second.stderr
    assert code == 1
    assert "it was truncated" in d.output()
    assert state.stat().st_size == 0


async def test_a_second_daemon_on_the_same_state_refuses_to_start(tmp_path: Path) -> None:
    """Two daemons on one SQLite state: the second (and a `run --once`) exits 1 naming the first's
    pid before any cycle; the first keeps running, and after it is killed with SIGKILL a new one
    starts."""
    tenants = demo_tenants(1)
    state = tmp_path / "state.db"
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = _config(tmp_path, sim, tenants, state, lookback=2)
        async with DaemonProcess(config) as first:

            async def ready(d: DaemonProcess) -> bool:
                return d.listen is not None and (await d.get("/readyz"))[0] == 200

            await eventually(lambda: ready(first), within=30, what="first ready", daemon=first)
            async with DaemonProcess(config) as second:
                code = await second.wait(30)
            assert code == 1
            assert f"in use by another collector: pid {first.pid} on host" in second.output()
            assert not second.events("daemon started")
            assert not second.events("tenant cycle done")  # it never reached the API
            once = await run_cli("run", "--once", "-c", str(config))
            assert once.returncode == 1
            assert f"pid {first.pid}" in once.stderr
            assert first.returncode is None
            first.kill()
            await first.wait(10)
        async with DaemonProcess(config) as third:
            await eventually(lambda: ready(third), within=30, what="third ready", daemon=third)
            assert await third.stop() == 0


async def test_a_corrupt_table_found_while_running_stops_the_daemon(tmp_path: Path) -> None:
    """A database that opens but whose table of days is corrupt: the first cycle that reads it
    stops the daemon gracefully, exit 1 with the database's message, instead of failing every
    cycle for ever."""
    tenants = demo_tenants(1)
    state = tmp_path / "state.db"
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = _config(tmp_path, sim, tenants, state, lookback=2)
        first = await run_cli("run", "--once", "-c", str(config))
        assert first.returncode == 0, first.stderr
        with contextlib.closing(sqlite3.connect(state)) as raw:
            page_size = raw.execute("PRAGMA page_size").fetchone()[0]
            [root] = raw.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tenant_day'")
        with state.open("r+b") as handle:  # what a bad disk block leaves behind
            handle.seek(page_size * (root[0] - 1))
            handle.write(b"\xff" * page_size)
        async with DaemonProcess(config) as d:
            code = await d.wait(30)
    assert code == 1
    [stopping] = d.events("state store unusable; stopping")
    assert "database disk image is malformed" in stopping["error"]
    assert d.events("daemon started")
    assert d.events("daemon stopped")
    assert "error: " in d.output()
