"""Run ``python -m collector run -c FILE`` as a real child process and watch it from a test.

The daemon runs in its own process (so SIGTERM, SIGHUP and SIGKILL are real) while the test's
event loop keeps serving the simulator and the webhook receiver. The helper reads the daemon's
JSON log lines as they come, finds the ops server's real port in the "ops server listening" line,
and offers small polling helpers with deadlines so a broken daemon fails a test instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp


class DaemonProcess:
    """One daemon child process; ``await start()``, then ``signal``/``kill``/``wait``."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, "COLLECTOR_TESTING_NO_WAIT": "1", **(env or {})}
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.listen: str | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> DaemonProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collector",
            "--log-format",
            "json",
            "run",
            "-c",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        while True:
            raw = await self.process.stdout.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if self.listen is None and "ops server listening" in line:
                with contextlib.suppress(ValueError):
                    self.listen = json.loads(line)["listen"]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every JSON log line whose event is ``name``."""
        found = []
        for line in self.lines:
            if name not in line:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == name:
                    found.append(record)
        return found

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, like a power cut for the process."""
        self.signal(signal.SIGKILL)

    async def wait(self, within: float) -> int:
        """The exit code; TimeoutError if the process is still running after ``within`` s."""
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), within)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def stop(self, within: float = 30) -> int:
        """SIGTERM and wait for the exit code (SIGKILL if it does not come)."""
        if self.returncode is not None:
            return self.returncode
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(within)
        except TimeoutError:
            self.kill()
            await self.wait(10)
            raise

    async def get(self, path: str) -> tuple[int, str]:
        """GET an ops endpoint; (status, body)."""
        assert self.listen is not None, "the daemon has no ops server (server.listen)"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://{self.listen}{path}") as response,
        ):
            return response.status, await response.text()

    async def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``name{labels}`` -> value."""
        status, text = await self.get("/metrics")
        assert status == 200
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    async def status(self) -> dict[str, Any]:
        status, text = await self.get("/status")
        assert status == 200
        result: dict[str, Any] = json.loads(text)
        return result

    async def __aenter__(self) -> DaemonProcess:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        if self.returncode is None:
            self.kill()
            with contextlib.suppress(TimeoutError):
                await self.wait(10)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    *,
    within: float,
    what: str,
    daemon: DaemonProcess | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` (with the daemon's log) after
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if daemon is not None and daemon.returncode is not None:
            raise AssertionError(
                f"daemon exited ({daemon.returncode}) waiting for {what}:\n"
                f"{daemon.output()[-4000:]}"
            )
        if time.monotonic() > deadline:
            log = daemon.output()[-4000:] if daemon is not None else ""
            raise AssertionError(f"timed out after {within}s waiting for {what}\n{log}")
        await asyncio.sleep(interval)


def sqlite_days(db: Path, table: str = "usage_daily") -> list[tuple[str, str]]:
    """(tenant, day) of every row of ``table`` in a sink database; [] while it does not exist."""
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            return list(conn.execute(f"SELECT tenant, day FROM {table} ORDER BY 1, 2"))  # noqa: S608 - test-owned table names
    except sqlite3.OperationalError:  # the sink has not created its tables yet
        return []
