"""collector.http_proxied: the API client behind an HTTP proxy named in the environment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from collector.client import ApiClient
from collector.http import BodyTooLarge
from collector.http_proxied import ProxiedHttpClient
from collector.simulator import Simulator, SimulatorSettings, demo_tenants, running_simulator
from tests.client_helpers import DAY, TODAY, closed_port, sim_config, tenant_config

TENANT = demo_tenants(1)[0]
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class ForwardProxy:
    """A plain HTTP forward proxy on 127.0.0.1: absolute-form requests, one per connection."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def __aenter__(self) -> ForwardProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            self.targets.append(f"{method} {target}")
            length = 0
            kept = []
            for line in header_lines:
                name = line.partition(":")[0].lower()
                if name == "content-length":
                    length = int(line.partition(":")[2])
                if line and name not in ("connection", "proxy-connection", "keep-alive"):
                    kept.append(line)
            body = await reader.readexactly(length)
            url = urlsplit(target)
            upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
            path = url.path + (f"?{url.query}" if url.query else "")
            upstream_writer.write(
                f"{method} {path} {version}\r\n".encode("latin-1")
                + "".join(f"{line}\r\n" for line in kept).encode("latin-1")
                + b"Connection: close\r\n\r\n"
                + body
            )
            writer.write(await upstream_reader.read())  # the whole response, until close
            upstream_writer.close()
            await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variables from the machine running the tests."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(SimulatorSettings(tenants=[TENANT], today=TODAY)) as server:
        yield server


async def test_requests_go_through_the_proxy_the_environment_names(
    sim: Simulator, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set, the token request and the usage request both pass the proxy."""
    async with ForwardProxy() as proxy:
        clean_proxy_env.setenv("HTTP_PROXY", proxy.url)
        async with ApiClient(sim_config(sim)) as client:
            fetched = await client.fetch_day(tenant_config(TENANT), DAY)
    assert fetched.data == sim.day_data(TENANT.id, DAY)
    assert proxy.targets == [
        f"POST {sim.token_url}",
        f"GET {sim.base_url}/api/v1/data/usage?day={DAY.isoformat()}",
    ]


async def test_no_proxy_bypasses_the_proxy(
    sim: Simulator, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """A host listed in NO_PROXY is reached directly even though HTTP_PROXY is set."""
    async with ForwardProxy() as proxy:
        clean_proxy_env.setenv("HTTP_PROXY", proxy.url)
        clean_proxy_env.setenv("NO_PROXY", "127.0.0.1")
        async with ApiClient(sim_config(sim)) as client:
            await client.fetch_day(tenant_config(TENANT), DAY)
    assert proxy.targets == []


async def test_without_proxy_variables_requests_go_direct(
    sim: Simulator, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """With no proxy in the environment, the proxy (though running) sees nothing."""
    async with ForwardProxy() as proxy, ApiClient(sim_config(sim)) as client:
        await client.fetch_day(tenant_config(TENANT), DAY)
    assert proxy.targets == []


async def test_unreachable_proxy_is_a_connection_error(clean_proxy_env: pytest.MonkeyPatch) -> None:
    """A proxy nobody listens on raises ConnectionError, not an aiohttp exception."""
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    http = ProxiedHttpClient(headers={}, max_body=1000, connections=4)
    try:
        with pytest.raises(ConnectionError) as caught:
            await http.request("GET", "http://example.invalid/", timeout=5)
    finally:
        await http.aclose()
    assert type(caught.value) is ConnectionError


async def test_body_over_the_limit_is_refused(clean_proxy_env: pytest.MonkeyPatch) -> None:
    """The size limit holds on this transport too, whether the length is declared or not."""

    async def big(request: web.Request) -> web.StreamResponse:
        if request.query.get("declared"):
            return web.Response(body=b"x" * 5000)
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(5):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/big", big)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/big"
    http = ProxiedHttpClient(headers={}, max_body=1000, connections=4)
    try:
        for query in ("?declared=1", ""):
            with pytest.raises(BodyTooLarge) as caught:
                await http.request("GET", url + query, timeout=5)
            assert caught.value.status == 200
    finally:
        await http.aclose()
        await runner.cleanup()
