"""The ops HTTP server, on its own port: /healthz, /readyz, /metrics, /status.

- ``/healthz``: 200 while the event loop answers (the process is alive).
- ``/readyz``: 200 once the config is loaded and the state store answers a query; 503 otherwise,
  with the reason in the JSON body.
- ``/metrics``: Prometheus text format (see :mod:`collector.metrics`); gauges that come from the
  store (backlog, dead letters, lag, days complete) are refreshed at scrape time.
- ``/status``: the same JSON as ``zencoder-collector status --json``.

Nothing here holds a secret: the status snapshot is built from tenant ids, counts, dates and
secret-free error reasons.

Malformed requests (not HTTP, a bad header, TLS on the plain port) get aiohttp's 400 and are
logged at debug level only, counted in ``ops_bad_requests_total``: anyone who can connect could
otherwise fill the log with one traceback per request. An exception inside an endpoint is still
an error with its traceback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from collector.errors import CollectorError
from collector.metrics import Metrics

_METRICS = web.AppKey("metrics", Metrics)


class StatusDocument(Protocol):
    """What ``/status`` serves: a typed snapshot, turned into JSON only here."""

    def to_dict(self) -> dict[str, Any]: ...


StatusProvider = Callable[[], Awaitable[StatusDocument]]
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
        return web.json_response((await status()).to_dict(), dumps=_dumps)

    app = web.Application()
    app[_METRICS] = metrics
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/status", status_handler)
    return app


class _RequestLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's request-handling logger, minus the tracebacks of malformed requests.

    aiohttp logs every request it cannot parse with ``logger.exception`` (an ERROR with a
    traceback) and only a first-request bad method at debug; both end here and are counted.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._metrics = metrics

    def _malformed(self, exc_info: Any) -> bool:
        if isinstance(exc_info, BadHttpMessage):
            self._metrics.bad_requests.inc()
            return True
        return False

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        if self._malformed(exc_info):
            self.logger.debug(msg, *args, exc_info=exc_info, **kw)
        else:
            self.logger.error(msg, *args, exc_info=exc_info, **kw)

    def debug(self, msg: object, *args: object, **kw: Any) -> None:
        self._malformed(kw.get("exc_info"))
        self.logger.debug(msg, *args, **kw)


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
    metrics = app.get(_METRICS)
    logger = _RequestLog(metrics) if metrics is not None else logging.getLogger("aiohttp.server")
    runner = web.AppRunner(app, access_log=None, logger=logger)
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
