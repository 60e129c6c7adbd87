"""Concurrency helpers: worker threads bounded by runtime.worker_threads, and first_of."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import pytest

from collector.app import load, load_plugins, open_runtime
from collector.concurrency import first_of, run_sync, set_worker_threads, worker_threads
from collector.simulator import Simulator
from tests.e2e import write_config
from tests.simulator_helpers import make_settings


async def test_no_more_calls_run_at_once_than_worker_threads() -> None:
    """With three worker threads, six blocking calls run three at a time, never more."""
    set_worker_threads(3)
    together = threading.Barrier(3, timeout=10)  # three must overlap, or this call fails
    lock = threading.Lock()
    active = most = 0

    def blocking() -> None:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        together.wait()
        with lock:
            active -= 1

    async with anyio.create_task_group() as group:
        for _ in range(6):
            group.start_soon(run_sync, blocking)
    assert most == 3


async def test_run_sync_returns_the_result_and_raises_the_error() -> None:
    """A worker call gives back the function's value, and its exception unchanged."""
    assert await run_sync(sum, [1, 2, 3]) == 6

    def broken() -> None:
        raise ValueError("in the thread")

    with pytest.raises(ValueError, match="in the thread"):
        await run_sync(broken)


async def test_a_runtime_sizes_the_threads_from_the_config(sim: Simulator, tmp_path: Path) -> None:
    """Opening a runtime applies runtime.worker_threads to the loop's worker threads."""
    tenants = make_settings().tenants[:1]
    path = write_config(
        tmp_path / "c.yaml",
        sim,
        tenants,
        workdir=tmp_path,
        sinks={},
        extra={"runtime": {"worker_threads": 5}},
    )
    plugins = load_plugins()
    async with open_runtime(load(path, plugins), plugins):
        assert worker_threads() == 5


async def test_first_of_returns_with_the_first_and_cancels_the_rest() -> None:
    """first_of returns once one wait is over; the waits still pending are cancelled."""
    ready = anyio.Event()
    cancelled = False

    async def forever() -> None:
        nonlocal cancelled
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled = True
            raise

    ready.set()
    await first_of(forever, ready.wait)
    assert cancelled
