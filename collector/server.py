"""The ops HTTP server, on its own port: /healthz, /readyz, /metrics, /status.

- ``/healthz``: 200 while the event loop answers (the process is alive).
- ``/readyz``: 200 once the config is loaded and the state store answers a query; 503 otherwise,
  with the reason in the JSON body.
- ``/metrics``: Prometheus text format (see :mod:`collector.metrics`); gauges that come from the
  store (backlog, dead letters, lag, days complete) are refreshed at scrape time.
- ``/status``: the same JSON as ``zencoder-collector status --json``.

Nothing here holds a secret: the status snapshot is built from tenant ids, counts, dates and
secret-free error reasons.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from collector.errors import CollectorError
from collector.metrics import Metrics

StatusProvider = Callable[[], Awaitable[dict[str, Any]]]
ReadyCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, or the reason it is not."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) into its parts."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def make_app(
    metrics: Metrics,
    status: StatusProvider,
    ready: ReadyCheck,
    refresh_metrics: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    """The aiohttp application of the ops endpoints."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reason = await ready()
        if reason is None:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reason": reason}, status=503)

    async def metrics_handler(_: web.Request) -> web.Response:
        if refresh_metrics is not None:
            await refresh_metrics()
        return web.Response(
            text=metrics.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def status_handler(_: web.Request) -> web.Response:
        return web.json_response(await status(), dumps=_dumps)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/status", status_handler)
    return app


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_jsonable, sort_keys=True)


def _jsonable(value: Any) -> str:
    """Dates and datetimes as ISO 8601; anything else as its string."""
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return str(value)


@contextlib.asynccontextmanager
async def serving(app: web.Application, listen: str) -> AsyncIterator[str]:
    """Serve ``app`` on ``listen`` until the block exits; yields the actual ``host:port``."""
    host, port = parse_listen(listen)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc)
        raise CollectorError(
            f"cannot serve the ops endpoints on {listen}: {reason}; set server.listen to a free "
            "host:port (or null to run without them)"
        ) from None
    # runner.addresses tells the real port when port 0 (any free port) was asked for.
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    try:
        yield f"{host}:{bound}"
    finally:
        await runner.cleanup()
