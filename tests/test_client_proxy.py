"""The API client behind an HTTP proxy named in the environment (collector.client_transport's
ProxyRoutes): proxy settings and .netrc are read once, when the client is built."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from collector.client import ApiClient
from collector.errors import TransportError
from collector.log import redact
from collector.simulator import Simulator, SimulatorSettings, demo_tenants, running_simulator
from tests.client_helpers import DAY, TODAY, body_data, closed_port, sim_config, tenant_config
from tests.servers import TcpServer

TENANT = demo_tenants(1)[0]
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class ForwardProxy(TcpServer):
    """A plain HTTP forward proxy on 127.0.0.1: absolute-form requests, one per connection."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.credentials: list[str | None] = []  # Proxy-Authorization, decoded, per request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            self.targets.append(f"{method} {target}")
            length = 0
            kept = []
            credentials = None
            for line in header_lines:
                name, _, value = line.partition(":")
                name = name.lower()
                if name == "content-length":
                    length = int(value)
                if name == "proxy-authorization":
                    credentials = base64.b64decode(value.split()[-1]).decode()
                    continue
                if line and name not in ("connection", "proxy-connection", "keep-alive"):
                    kept.append(line)
            self.credentials.append(credentials)
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
    assert body_data(fetched) == sim.day_data(TENANT.id, DAY)
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


async def test_proxy_settings_are_read_once_when_the_client_is_built(
    sim: Simulator, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """The environment is read when the client is built, not per request: a variable removed
    afterwards changes nothing until the next start."""
    async with ForwardProxy() as proxy:
        clean_proxy_env.setenv("HTTP_PROXY", proxy.url)
        client = ApiClient(sim_config(sim))
        clean_proxy_env.delenv("HTTP_PROXY")
        async with client:
            await client.fetch_day(tenant_config(TENANT), DAY)
            await client.fetch_day(tenant_config(TENANT), TODAY)
    assert len(proxy.targets) == 3  # the token request and both days


async def test_proxy_credentials_in_the_url_are_sent_and_never_shown(
    sim: Simulator, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """user:password in the proxy URL become Proxy-Authorization; the password is hidden in logs."""
    async with ForwardProxy() as proxy:
        host = proxy.url.removeprefix("http://")
        clean_proxy_env.setenv("HTTP_PROXY", f"http://alice:pr%40xy-pass@{host}")
        async with ApiClient(sim_config(sim)) as client:
            await client.fetch_day(tenant_config(TENANT), DAY)
    assert proxy.credentials == ["alice:pr@xy-pass", "alice:pr@xy-pass"]
    assert redact("proxy said pr@xy-pass") == "proxy said ***"


async def test_proxy_credentials_come_from_netrc(
    sim: Simulator, clean_proxy_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A proxy URL without credentials takes them from the proxy host's .netrc entry ($NETRC)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login bob password netrc-proxy-pass\n", encoding="utf-8")
    netrc.chmod(0o600)
    async with ForwardProxy() as proxy:
        clean_proxy_env.setenv("HTTP_PROXY", proxy.url)
        clean_proxy_env.setenv("NETRC", str(netrc))
        async with ApiClient(sim_config(sim)) as client:
            await client.fetch_day(tenant_config(TENANT), DAY)
    assert proxy.credentials == ["bob:netrc-proxy-pass", "bob:netrc-proxy-pass"]


async def test_unreachable_proxy_is_a_transport_error(
    sim: Simulator, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """A proxy nobody listens on gives a TransportError naming the token request."""
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    async with ApiClient(sim_config(sim)) as client:
        with pytest.raises(TransportError, match="token request failed"):
            await client.fetch_day(tenant_config(TENANT), DAY, retry=False)
