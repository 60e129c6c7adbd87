"""The ops HTTP server over a real socket: /healthz, /readyz, /metrics, /status."""

from __future__ import annotations

import datetime as dt
from typing import Any

import aiohttp
import pytest

from collector.metrics import Metrics
from collector.server import make_app, parse_listen, serving


class _Probe:
    """The daemon's side of the endpoints, with state the test can flip."""

    def __init__(self) -> None:
        self.not_ready: str | None = "starting: state store not open yet"
        self.refreshes = 0
        self.metrics = Metrics()

    async def ready(self) -> str | None:
        return self.not_ready

    async def status(self) -> dict[str, Any]:
        return {"tenants": [{"tenant": "acme", "last_success_at": dt.datetime(2026, 1, 2)}]}

    async def refresh(self) -> None:
        self.refreshes += 1
        self.metrics.sink_backlog.set(self.refreshes, sink="hook")


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9000", ("::1", 9000)),
        (":9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),  # noqa: S104 - a parsing case, nothing binds here
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    """``host:port`` splits into host and port; IPv6 brackets are removed; no host is loopback."""
    assert parse_listen(listen) == expected


async def test_endpoints_over_a_real_socket() -> None:
    """healthz is always 200; readyz is 503 with the reason until ready, then 200; metrics are
    refreshed per scrape and served as text; status is JSON with datetimes as strings."""
    probe = _Probe()
    app = make_app(probe.metrics, probe.status, probe.ready, probe.refresh)
    async with serving(app, "127.0.0.1:0") as where, aiohttp.ClientSession() as http:
        base = f"http://{where}"
        assert not where.endswith(":0")
        async with http.get(base + "/healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        async with http.get(base + "/readyz") as response:
            assert response.status == 503
            assert (await response.json())["reason"] == probe.not_ready
        probe.not_ready = None
        async with http.get(base + "/readyz") as response:
            assert response.status == 200
        for expected in (1, 2):
            async with http.get(base + "/metrics") as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
                text = await response.text()
            assert f'zencoder_collector_sink_backlog{{sink="hook"}} {expected}' in text
        async with http.get(base + "/status") as response:
            assert response.status == 200
            body = await response.json()
        assert body == {"tenants": [{"tenant": "acme", "last_success_at": "2026-01-02T00:00:00"}]}
        async with http.get(base + "/nothing") as response:
            assert response.status == 404


async def test_serving_releases_the_port() -> None:
    """After the block the port is closed: a connection is refused."""
    probe = _Probe()
    async with serving(make_app(probe.metrics, probe.status, probe.ready), "127.0.0.1:0") as where:
        pass
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://{where}/healthz")
