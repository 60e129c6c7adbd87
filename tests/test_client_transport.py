"""collector.client_transport: the API client's aiohttp layer, against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import os
import ssl
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from collector.client_transport import (
    BodyBudget,
    BodyBudgetExhausted,
    BodyTooLarge,
    InvalidRequest,
    ProxyRoutes,
    RequestDeadlines,
    Transport,
)
from tests.servers import TcpServer

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body, or b"" once the client has closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    return head


class RawServer(TcpServer):
    """A TCP server whose replies each test writes byte by byte; it counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read a request and remember it (b"" when the client closed)."""
        request = await read_request(reader)
        if request:
            self.requests.append(request)
        return request


def answer_each(response: bytes) -> Handler:
    """A handler that answers every request on a connection with the same bytes."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        while await s.next_request(r):
            w.write(response)
            await w.drain()

    return handler


def transport(**overrides: object) -> Transport:
    """A transport with small limits and no proxy, unless the test says otherwise."""
    values: dict[str, object] = {
        "headers": {"User-Agent": "test/1"},
        "max_body": 1000,
        "connections": 8,
        "timeout": 5.0,
        "budget": BodyBudget(8 << 20),
        "proxies": ProxyRoutes({}),
    }
    values.update(overrides)
    return Transport(**values)  # type: ignore[arg-type]  # the keyword types are checked there


@pytest.fixture
async def http() -> AsyncIterator[Transport]:
    client = transport()
    yield client
    await client.aclose()


# --- requests and responses -----------------------------------------------------------------------


async def test_get_returns_status_body_and_headers(http: Transport) -> None:
    """A GET returns the status, the whole body and the headers (looked up in any case)."""
    async with RawServer(answer_each(OK)) as server:
        reply = await http.request("GET", server.url + "/x?day=2025-01-01", headers={"A": "b"})
    assert (reply.status, reply.body, reply.headers["content-type"]) == (200, b"ok", "text/plain")
    assert server.requests[0].startswith(b"GET /x?day=2025-01-01 HTTP/1.1\r\n")
    assert b"\r\nA: b\r\n" in server.requests[0]


async def test_requests_reuse_one_keep_alive_connection(http: Transport) -> None:
    """Requests in a row share one connection."""
    async with RawServer(answer_each(OK)) as server:
        for _ in range(5):
            await http.request("GET", server.url + "/")
    assert server.connections == 1


async def test_post_sends_the_body(http: Transport) -> None:
    """A POST carries its body and the headers given."""
    async with RawServer(answer_each(OK)) as server:
        await http.request(
            "POST", server.url + "/t", headers={"Content-Type": "application/json"}, body=b"{}"
        )
    request = server.requests[0]
    assert request.startswith(b"POST /t HTTP/1.1\r\n")
    assert b"Content-Type: application/json" in request
    assert request.endswith(b"\r\n\r\n{}")


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_compressed_bodies_are_decoded(
    http: Transport, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    """gzip and deflate bodies come back decoded."""
    packed = compress(b'{"a": 1}')
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(packed)}"
    async with RawServer(answer_each(head.encode() + b"\r\n\r\n" + packed)) as server:
        reply = await http.request("GET", server.url + "/")
    assert reply.body == b'{"a": 1}'


async def test_a_body_of_a_few_hundred_kilobytes_arrives_whole() -> None:
    """A large legitimate body (a 5,000-user organization) is read to its end."""
    body = b"[" + b'{"email": "u@example.com"},' * 30_000 + b"{}]"
    client = transport(max_body=4 << 20)
    try:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        async with RawServer(answer_each(head + body)) as server:
            reply = await client.request("GET", server.url + "/")
    finally:
        await client.aclose()
    assert reply.body == body


CHUNKED_5000 = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + (b"3e8\r\n" + b"x" * 1000 + b"\r\n") * 5
    + b"0\r\n\r\n"
)
BOMB = gzip.compress(b"0" * 100_000)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000,
        CHUNKED_5000,
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
        + f"Content-Length: {len(BOMB)}\r\n\r\n".encode()
        + BOMB,
    ],
    ids=["declared", "chunked", "gzip-of-100-kB"],
)
async def test_bodies_over_the_cap_are_refused(http: Transport, response: bytes) -> None:
    """The cap (1,000 bytes here) holds for declared, chunked and compressed bodies, counted
    after decompression (the gzip body is 130 bytes on the wire)."""
    async with RawServer(answer_each(response)) as server:
        with pytest.raises(BodyTooLarge) as caught:
            await http.request("GET", server.url + "/")
    assert (caught.value.status, caught.value.limit) == (200, 1000)
    assert http.budget.used == 0


async def test_redirects_are_returned_not_followed(http: Transport) -> None:
    """A 302 comes back with its Location; the target is never requested."""
    response = (
        b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.invalid/x\r\nContent-Length: 0\r\n\r\n"
    )
    async with RawServer(answer_each(response)) as server:
        reply = await http.request("GET", server.url + "/")
    assert (reply.status, reply.headers["Location"]) == (302, "http://elsewhere.invalid/x")
    assert len(server.requests) == 1


async def test_a_header_with_a_line_break_is_refused_without_echoing_it(http: Transport) -> None:
    """CR/LF in a header value raises InvalidRequest naming the header, not its value."""
    async with RawServer(answer_each(OK)) as server:
        with pytest.raises(InvalidRequest) as caught:
            await http.request("GET", server.url + "/", headers={"X-Key": "sec\r\nret-value"})
    assert "X-Key" in str(caught.value)
    assert "ret-value" not in str(caught.value)
    assert server.requests == []


# --- failures -------------------------------------------------------------------------------------


async def test_no_complete_response_within_the_deadline_is_a_timeout() -> None:
    """One deadline covers the whole exchange: headers in time but a body that never ends."""

    async def trickle(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx")
        await w.drain()
        await asyncio.sleep(5)

    client = transport(timeout=0.3)
    try:
        async with RawServer(trickle) as server:
            with pytest.raises(TimeoutError):
                await client.request("GET", server.url + "/")
    finally:
        await client.aclose()


async def test_each_request_times_out_at_its_own_deadline() -> None:
    """Of two requests begun apart, the first times out while the second is still in flight,
    and the second times out later: each at its own deadline, not at another's."""

    async def never(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        await asyncio.sleep(5)

    client = transport(timeout=0.4)
    try:
        async with RawServer(never) as server:
            first = asyncio.create_task(client.request("GET", server.url + "/"))
            await asyncio.sleep(0.2)
            second = asyncio.create_task(client.request("GET", server.url + "/"))
            with pytest.raises(TimeoutError):
                await first
            second_in_flight = not second.done()
            with pytest.raises(TimeoutError):
                await second
    finally:
        await client.aclose()
    assert second_in_flight


async def test_a_request_that_ends_in_time_leaves_its_task_uncancelled() -> None:
    """After a request ends before its deadline, the task can await past that deadline."""
    client = transport(timeout=0.2)
    try:
        async with RawServer(answer_each(OK)) as server:
            reply = await client.request("GET", server.url + "/")
            await asyncio.sleep(0.4)  # past the deadline of the request above
            again = await client.request("GET", server.url + "/")
    finally:
        await client.aclose()
    assert (reply.status, again.status) == (200, 200)


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    """A task cancelled while its request is in flight ends cancelled, never with TimeoutError,
    and the other requests in flight still time out at their deadlines."""

    async def never(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        await asyncio.sleep(5)

    client = transport(timeout=0.5)
    try:
        async with RawServer(never) as server:
            cancelled = asyncio.create_task(client.request("GET", server.url + "/"))
            timing_out = asyncio.create_task(client.request("GET", server.url + "/"))
            await asyncio.sleep(0.1)
            cancelled.cancel()
            results = await asyncio.gather(cancelled, timing_out, return_exceptions=True)
    finally:
        await client.aclose()
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], TimeoutError)


async def deadline_outcome(deadlines: RequestDeadlines, outside_cancel_at_deadline: bool) -> str:
    """Run one 'request' (a long sleep) under ``deadlines``: how it ended."""
    loop = asyncio.get_running_loop()
    began: list[float] = []

    async def request() -> str:
        entry = deadlines.begin()
        began.append(entry.when)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            if deadlines.timed_out(entry):
                return "timed out"
            raise
        finally:
            deadlines.end(entry)
        return "completed"

    task = asyncio.create_task(request())
    await asyncio.sleep(0)  # the request begins: its deadline is set
    if outside_cancel_at_deadline:
        loop.call_at(began[0], task.cancel)  # due together with the deadline's timer
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


async def test_a_deadline_alone_is_a_timeout() -> None:
    """A request still running at its deadline is told it timed out."""
    assert await deadline_outcome(RequestDeadlines(0.05), False) == "timed out"


async def test_a_cancellation_at_the_deadline_is_still_a_cancellation() -> None:
    """An outside cancellation due at the same moment as the deadline propagates as one."""
    assert await deadline_outcome(RequestDeadlines(0.05), True) == "cancelled"


async def test_garbage_instead_of_http_is_a_connection_error(http: Transport) -> None:
    """Bytes that are not an HTTP response raise ConnectionError, not an aiohttp exception."""
    async with RawServer(answer_each(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as server:
        with pytest.raises(ConnectionError) as caught:
            await http.request("GET", server.url + "/")
    assert type(caught.value) is ConnectionError


async def test_server_closing_mid_response_is_a_connection_error(http: Transport) -> None:
    """A body cut short by the server closing the connection raises ConnectionError."""

    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()

    async with RawServer(cut) as server:
        with pytest.raises(ConnectionError):
            await http.request("GET", server.url + "/")


async def test_connection_refused_is_a_connection_error(http: Transport) -> None:
    """Nobody listening raises ConnectionError."""
    async with RawServer(answer_each(OK)) as server:
        url = server.url
    with pytest.raises(ConnectionError):
        await http.request("GET", url + "/")


# --- the memory budget of bodies in flight --------------------------------------------------------


def test_budget_wait_that_would_deadlock_fails_instead() -> None:
    """When every other body holding memory waits too, the would-be last waiter fails at once."""

    async def scenario() -> None:
        budget = BodyBudget(100)
        first, second = budget.lease(), budget.lease()
        assert first.try_charge(60)
        assert second.try_charge(40)
        waiting = asyncio.create_task(first.charge(10, status=200, deadline=1e12))
        await asyncio.sleep(0)
        assert budget.waiting_holders == 1
        with pytest.raises(BodyBudgetExhausted):
            await second.charge(10, status=200, deadline=1e12)
        second.close()  # what the transport does with a failed body: its bytes go back
        await waiting
        assert (budget.used, first.held) == (70, 70)
        first.close()
        assert (budget.used, budget.holders) == (0, 0)

    asyncio.run(scenario())


async def test_bodies_beyond_the_budget_wait_for_memory_then_complete() -> None:
    """Two 70 kB bodies under a 100 kB budget: the second waits for the first, both arrive whole."""
    gate = asyncio.Event()
    size = 70_000

    async def two_halves(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode() + b"a" * 60_000)
        await w.drain()
        await gate.wait()
        w.write(b"a" * (size - 60_000))
        await w.drain()
        await asyncio.sleep(1)

    budget = BodyBudget(100_000)
    client = transport(budget=budget, max_body=size)
    try:
        async with RawServer(two_halves) as server:
            first = asyncio.create_task(client.request("GET", server.url + "/1"))
            second = asyncio.create_task(client.request("GET", server.url + "/2"))
            for _ in range(500):  # until one body holds memory and the other waits for some
                if budget._wakeups:
                    break
                await asyncio.sleep(0.01)
            assert budget._wakeups, "no body waited: the test would prove nothing"
            assert budget.used <= budget.total
            gate.set()
            replies = await asyncio.gather(first, second)
    finally:
        await client.aclose()
    assert [len(r.body) for r in replies] == [size, size]
    assert (budget.used, budget.holders) == (0, 0)


# --- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
async def https_url(authority: trustme.CA) -> AsyncIterator[str]:
    """An aiohttp HTTPS server on 127.0.0.1 with a certificate from ``authority``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(context)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": request.headers.get("X-Name")})

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_https_refuses_an_untrusted_certificate(https_url: str) -> None:
    """By default the system trust store decides, and a self-made CA is not in it."""
    client = transport()
    try:
        with pytest.raises(ConnectionError, match=r"[Cc]ertificate"):
            await client.request("GET", https_url + "/hello")
    finally:
        await client.aclose()


async def test_ssl_cert_file_names_a_private_ca(
    authority: trustme.CA, https_url: str, tmp_path: Path
) -> None:
    """``SSL_CERT_FILE`` in the environment the collector starts with replaces the trust store,
    as docs/configuration.md tells users (a fresh interpreter: it is read once, at start-up)."""
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    script = (
        "import asyncio\n"
        "from collector.client_transport import BodyBudget, ProxyRoutes, Transport\n"
        "async def main():\n"
        "    t = Transport(headers={}, max_body=1000, connections=2, timeout=5,\n"
        "                  budget=BodyBudget(1000), proxies=ProxyRoutes({}))\n"
        f"    reply = await t.request('GET', {https_url + '/hello'!r}, headers={{'X-Name': 'z'}})\n"
        "    await t.aclose()\n"
        "    print(reply.status, reply.body.decode())\n"
        "asyncio.run(main())\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SSL_CERT_FILE": str(bundle)},
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert out.decode().strip() == '200 {"hello": "z"}', err.decode()[-2000:]
