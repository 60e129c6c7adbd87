"""The ops HTTP server over a real socket: /healthz, /readyz, /metrics, /status."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any

import aiohttp
import pytest

from collector.metrics import Metrics
from collector.server import make_app, parse_listen, serving


class _Document:
    """A status document as the daemon hands it to the server: turned into JSON there."""

    def __init__(self, content: dict[str, Any]) -> None:
        self.content = content

    def to_dict(self) -> dict[str, Any]:
        return self.content


class _Probe:
    """The daemon's side of the endpoints, with state the test can flip."""

    def __init__(self) -> None:
        self.not_ready: str | None = "starting: state store not open yet"
        self.refreshes = 0
        self.metrics = Metrics()

    async def ready(self) -> str | None:
        return self.not_ready

    async def status(self) -> _Document:
        return _Document(
            {"tenants": [{"tenant": "acme", "last_success_at": dt.datetime(2026, 1, 2)}]}
        )

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


_MALFORMED = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello on a plain port
]


async def _send_raw(where: str, data: bytes) -> bytes:
    host, port = parse_listen(where)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await reader.read(65536)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_malformed_requests_are_counted_and_logged_at_debug_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Garbage sent to the ops port gets a 400 and one debug line per request, never an error
    with a traceback, and is counted in ops_bad_requests_total; the server keeps answering."""
    probe = _Probe()
    app = make_app(probe.metrics, probe.status, probe.ready)
    caplog.set_level(logging.DEBUG)
    async with serving(app, "127.0.0.1:0") as where:
        for data in _MALFORMED:
            answer = await _send_raw(where, data)
            assert answer == b"" or answer.startswith(b"HTTP/1.")
        async with aiohttp.ClientSession() as http, http.get(f"http://{where}/healthz") as ok:
            assert ok.status == 200
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert probe.metrics.bad_requests.samples == {(): float(len(_MALFORMED))}


async def test_a_crashing_handler_is_still_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """Only malformed requests are quietened: an exception in an endpoint stays an error log."""
    probe = _Probe()

    async def broken_status() -> _Document:
        raise RuntimeError("boom")

    app = make_app(probe.metrics, broken_status, probe.ready)
    async with (
        serving(app, "127.0.0.1:0") as where,
        aiohttp.ClientSession() as http,
        http.get(f"http://{where}/status") as response,
    ):
        assert response.status == 500
    errors = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [r.levelno for r in errors] == [logging.ERROR]
    assert errors[0].exc_info is not None
    assert probe.metrics.bad_requests.samples.get((), 0.0) == 0
