"""One collector per SQLite state database, and a truncated state file refused: real files, real
``flock``, a real child process killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from collector.store import Store, StoreUnusable
from collector.store.lock import lock_path
from tests.test_store import days

_HOLDER = """
import asyncio, sys
from collector.store import Store

async def main(url):
    await Store.open(url, exclusive=True)
    print("locked", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


async def test_a_second_collector_is_refused_naming_the_first(tmp_path: Path) -> None:
    """While one exclusive store is open, a second exclusive open fails with the holder's pid,
    host and start time; readers (status, replay) still open; after close the lock is free."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    first = await Store.open(url, exclusive=True)
    try:
        with pytest.raises(StoreUnusable) as refused:
            await Store.open(url, exclusive=True)
        message = str(refused.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started 20" in message
        assert "one collector per state database" in message
        reader = await Store.open(url)
        await reader.aclose()
    finally:
        await first.aclose()
    second = await Store.open(url, exclusive=True)
    await second.aclose()


async def test_kill_9_of_the_holder_frees_the_lock(tmp_path: Path) -> None:
    """The operating system drops the lock of a process killed with SIGKILL: no stale lock."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"locked\n"
        with pytest.raises(StoreUnusable, match=f"pid {holder.pid} on host"):
            await Store.open(url, exclusive=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
    store = await Store.open(url, exclusive=True)
    await store.aclose()
    owner = json.loads(lock_path(tmp_path / "state.db").read_text())
    assert owner["pid"] == os.getpid()


async def test_a_state_file_truncated_to_zero_bytes_is_refused(tmp_path: Path) -> None:
    """A state file that held data and is now 0 bytes is refused, not re-created empty."""
    path = tmp_path / "state.db"
    url = f"sqlite:///{path}"
    store = await Store.open(url, exclusive=True)
    await store.record_fetched(days("acme", 3))
    await store.aclose()
    path.write_bytes(b"")
    for exclusive in (True, False):
        with pytest.raises(StoreUnusable, match=r"is empty \(0 bytes\) but held data before"):
            await Store.open(url, exclusive=exclusive)
    assert path.stat().st_size == 0


async def test_an_empty_or_missing_file_on_first_start_is_a_new_state(tmp_path: Path) -> None:
    """``touch state.db`` before the first start, or no file at all, gives a fresh state."""
    touched = tmp_path / "touched.db"
    touched.touch()
    for path in (touched, tmp_path / "missing" / "state.db"):
        store = await Store.open(f"sqlite:///{path}", exclusive=True)
        try:
            assert await store.days_state("acme") == {}
        finally:
            await store.aclose()


async def test_a_corrupt_state_file_is_unusable(tmp_path: Path) -> None:
    """A file that is not an SQLite database raises StoreUnusable with the driver's message, and
    leaves the lock free for the next try."""
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database, just some text " * 200)
    url = f"sqlite:///{path}"
    with pytest.raises(StoreUnusable, match="file is not a database"):
        await Store.open(url, exclusive=True)
    with pytest.raises(StoreUnusable, match="file is not a database"):
        await Store.open(url, exclusive=True)
