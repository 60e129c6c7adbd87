"""collector.http: the keep-alive HTTP/1.1 client, against byte-scripted servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
import uvloop
from aiohttp import web

from collector.http import (
    BodyTooLarge,
    HttpClient,
    HttpProtocolError,
    InvalidRequest,
    ServerDisconnected,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "RawServer"], Awaitable[None]]


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


class RawServer:
    """A TCP server whose replies each test writes byte by byte; it counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = 0
        self.received = asyncio.Event()
        self.hung_up = asyncio.Event()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def next_request(self, reader: asyncio.StreamReader) -> bytes:
        """Read a request and remember it; b"" (and a count) when the client closed."""
        request = await read_request(reader)
        if request:
            self.requests.append(request)
            self.received.set()
        else:
            self.closed_by_client += 1
            self.hung_up.set()
        return request


def answer_each(response: bytes) -> Handler:
    """A handler that answers every request on a connection with the same bytes."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        while await s.next_request(r):
            w.write(response)
            await w.drain()

    return handler


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    http = HttpClient(headers={"User-Agent": "test/1"}, max_body=1000)
    yield http
    await http.aclose()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


async def test_get_returns_status_body_and_headers(client: HttpClient) -> None:
    """A GET returns the status, the body and headers looked up in any case."""
    async with RawServer(answer_each(OK)) as server:
        reply = await client.request("GET", server.url + "/a?day=2026-11-01", timeout=5)
    assert (reply.status, reply.body) == (200, b"ok")
    assert reply.headers["content-type"] == reply.headers.get("Content-Type") == "text/plain"
    assert "CONTENT-LENGTH" in reply.headers
    assert server.requests[0].startswith(b"GET /a?day=2026-11-01 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in server.requests[0]
    assert b"\r\nUser-Agent: test/1\r\n" in server.requests[0]


async def test_requests_reuse_one_keep_alive_connection(client: HttpClient) -> None:
    """Sequential requests to one origin share a single connection."""
    async with RawServer(answer_each(OK)) as server:
        for _ in range(5):
            assert (await client.request("GET", server.url + "/", timeout=5)).body == b"ok"
    assert server.connections == 1
    assert len(server.requests) == 5


async def test_post_sends_body_and_content_type(client: HttpClient) -> None:
    """A POST carries its body with Content-Length and the given Content-Type."""
    async with RawServer(answer_each(OK)) as server:
        await client.request(
            "POST", server.url + "/t", body=b'{"a": 1}', content_type="application/json", timeout=5
        )
    request = server.requests[0]
    assert b"\r\nContent-Type: application/json\r\n" in request
    assert b"\r\nContent-Length: 8\r\n" in request
    assert request.endswith(b'\r\n\r\n{"a": 1}')


async def test_chunked_body_is_reassembled(client: HttpClient) -> None:
    """A chunked response arrives as one body."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    async with RawServer(answer_each(chunked)) as server:
        first = await client.request("GET", server.url + "/", timeout=5)
        second = await client.request("GET", server.url + "/", timeout=5)
    assert first.body == second.body == b"abcde"
    assert server.connections == 1


async def test_body_delimited_by_closing_the_connection(client: HttpClient) -> None:
    """A response without length ends when the server closes, and the body is complete."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
        await w.drain()
        w.write(b'{"data": 1}')

    async with RawServer(handler) as server:
        reply = await client.request("GET", server.url + "/", timeout=5)
        assert reply.body == b'{"data": 1}'
        assert (await client.request("GET", server.url + "/", timeout=5)).status == 200
    assert server.connections == 2  # the closed one was not reused


async def test_connection_close_header_is_honoured(client: HttpClient) -> None:
    """``Connection: close`` makes the next request open a new connection."""
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(answer_each(response)) as server:
        for _ in range(3):
            await client.request("GET", server.url + "/", timeout=5)
    assert server.connections == 3


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
    ],
)
async def test_compressed_bodies_are_decoded(
    client: HttpClient, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    """gzip, zlib-wrapped deflate and raw deflate bodies come back decoded."""
    data = compress(b'{"daily": []}')
    response = (
        f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    async with RawServer(answer_each(response)) as server:
        reply = await client.request("GET", server.url + "/", timeout=5)
    assert reply.body == b'{"daily": []}'


async def test_unknown_content_encoding_is_a_protocol_error(client: HttpClient) -> None:
    """A body in an encoding we cannot decode is refused, not passed on as data."""
    response = b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nxx"
    async with RawServer(answer_each(response)) as server:
        with pytest.raises(HttpProtocolError, match="unsupported Content-Encoding 'br'"):
            await client.request("GET", server.url + "/", timeout=5)


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"100\r\n" + b"x" * 256 + b"\r\n" for _ in range(8))
        + b"0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 48\r\n\r\n"
        + gzip.compress(b"x" * 20000, mtime=0)[:48],
    ],
    ids=["content-length", "chunked", "gzip-bomb"],
)
async def test_bodies_over_the_limit_are_refused(client: HttpClient, response: bytes) -> None:
    """A body over max_body (declared, streamed or inflated) raises BodyTooLarge with the status."""
    if b"gzip" in response:  # the header above guessed the length: make it exact
        data = gzip.compress(b"x" * 20000, mtime=0)
        response = (
            f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode() + data
    async with RawServer(answer_each(response)) as server:
        with pytest.raises(BodyTooLarge) as caught:
            await client.request("GET", server.url + "/", timeout=5)
    assert (caught.value.status, caught.value.limit) == (200, 1000)


async def test_garbage_instead_of_http_is_a_protocol_error(client: HttpClient) -> None:
    """Bytes that are not an HTTP response raise HttpProtocolError (an OSError)."""
    async with RawServer(answer_each(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as server:
        with pytest.raises(HttpProtocolError, match="invalid HTTP response"):
            await client.request("GET", server.url + "/", timeout=5)


async def test_server_closing_mid_response_is_a_disconnect(client: HttpClient) -> None:
    """A response cut short by the server raises ServerDisconnected, marked as answered."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await w.drain()

    async with RawServer(handler) as server:
        with pytest.raises(ServerDisconnected) as caught:
            await client.request("GET", server.url + "/", timeout=5)
    assert caught.value.unanswered is False


def closes_the_second_request() -> Handler:
    """Answers once, then reads the next request on that connection and hangs up unanswered."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        if not await s.next_request(r):
            return
        if s.connections == 1:
            w.write(OK)
            await w.drain()
            await s.next_request(r)  # the reuse: close without answering
            return
        w.write(OK)
        await w.drain()

    return handler


async def test_stale_keep_alive_get_is_retried_once_on_a_new_connection(
    client: HttpClient,
) -> None:
    """A GET on a reused connection the server closed unanswered goes again on a new one."""
    async with RawServer(closes_the_second_request()) as server:
        await client.request("GET", server.url + "/", timeout=5)
        reply = await client.request("GET", server.url + "/", timeout=5)
    assert reply.body == b"ok"
    assert server.connections == 2


async def test_stale_keep_alive_post_is_not_resent(client: HttpClient) -> None:
    """A POST on such a connection is not sent twice: the disconnect is raised."""
    async with RawServer(closes_the_second_request()) as server:
        await client.request("GET", server.url + "/", timeout=5)
        with pytest.raises(ServerDisconnected):
            await client.request("POST", server.url + "/", body=b"{}", timeout=5)
    assert server.connections == 1


async def test_no_answer_within_the_time_limit_is_a_timeout(client: HttpClient) -> None:
    """A server that never answers gives TimeoutError, and the connection is dropped."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        await s.next_request(r)  # until the client closes its end

    async with RawServer(handler) as server:
        with pytest.raises(TimeoutError):
            await client.request("GET", server.url + "/", timeout=0.2)
        await asyncio.wait_for(server.hung_up.wait(), 5)
    assert server.closed_by_client == 1


async def test_cancelled_request_drops_its_connection(client: HttpClient) -> None:
    """Cancelling a request closes its connection instead of returning it to the pool."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        if not await s.next_request(r):
            return
        if s.connections == 1:
            await s.next_request(r)
            return
        w.write(OK)
        await w.drain()

    async with RawServer(handler) as server:
        task = asyncio.create_task(client.request("GET", server.url + "/", timeout=5))
        await asyncio.wait_for(server.received.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await client.request("GET", server.url + "/", timeout=5)).body == b"ok"
    assert server.connections == 2


async def test_requests_beyond_max_in_flight_wait_for_a_slot() -> None:
    """With max_in_flight=2, five concurrent requests never hold more than two connections."""
    busy = 0
    most = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        nonlocal busy, most
        while await s.next_request(r):
            busy += 1
            most = max(most, busy)
            await asyncio.sleep(0.05)
            busy -= 1
            w.write(OK)
            await w.drain()

    http = HttpClient(headers={}, max_body=1000, max_in_flight=2)
    async with RawServer(handler) as server:
        replies = await asyncio.gather(
            *(http.request("GET", server.url + "/", timeout=5) for _ in range(5))
        )
        await http.aclose()
    assert [r.body for r in replies] == [b"ok"] * 5
    assert most == 2
    assert server.connections == 2


async def test_endless_headers_are_a_protocol_error(client: HttpClient) -> None:
    """A server that keeps sending header bytes is cut off at 64 KiB, not buffered forever."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: RawServer) -> None:
        await s.next_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        for _ in range(100):
            w.write(b"a" * 1024)
            await w.drain()

    async with RawServer(handler) as server:
        with pytest.raises(HttpProtocolError, match="headers over 65536 bytes"):
            await client.request("GET", server.url + "/", timeout=5)


async def test_interim_response_is_skipped(client: HttpClient) -> None:
    """A 100 Continue before the real response is not mistaken for it."""
    response = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    async with RawServer(answer_each(response)) as server:
        reply = await client.request("GET", server.url + "/", timeout=5)
    assert (reply.status, reply.body) == (200, b"ok")


async def test_repeated_header_fields_are_joined(client: HttpClient) -> None:
    """Two fields of one name read as one comma-separated value."""
    response = b"HTTP/1.1 429 Too Many\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n"
    async with RawServer(answer_each(response)) as server:
        reply = await client.request("GET", server.url + "/", timeout=5)
    assert (reply.status, reply.headers.get("X-A")) == (429, "1, 2")


@pytest.mark.parametrize(
    "value", ["Bearer abc\r\nX-Injected: 1", "Bearer abc\ndef", "Bearer caf\u00e9\u2603"]
)
async def test_unsendable_header_is_refused_without_echoing_it(
    client: HttpClient, value: str
) -> None:
    """A header value with a line break or outside Latin-1 is refused; the message omits it."""
    async with RawServer(answer_each(OK)) as server:
        with pytest.raises(InvalidRequest) as caught:
            await client.request(
                "GET", server.url + "/", headers={"Authorization": value}, timeout=5
            )
    assert "abc" not in str(caught.value)
    assert "caf" not in str(caught.value)
    assert server.requests == []


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/x", "127.0.0.1:80/x", "http://user:pw@127.0.0.1/", "http://h:x/"]
)
async def test_urls_it_cannot_use_are_refused(client: HttpClient, url: str) -> None:
    """Other schemes, missing schemes, credentials in the URL and bad ports are InvalidRequest."""
    with pytest.raises(InvalidRequest) as caught:
        await client.request("GET", url, timeout=5)
    assert "pw" not in str(caught.value)


async def test_idle_connections_expire() -> None:
    """A connection idle longer than idle_timeout is closed rather than reused."""
    http = HttpClient(headers={}, max_body=1000, idle_timeout=0.05)
    async with RawServer(answer_each(OK)) as server:
        await http.request("GET", server.url + "/", timeout=5)
        await asyncio.sleep(0.1)
        await http.request("GET", server.url + "/", timeout=5)
        await http.aclose()
    assert server.connections == 2


async def test_aclose_closes_idle_connections() -> None:
    """aclose() hangs up every pooled connection."""
    http = HttpClient(headers={}, max_body=1000)
    async with RawServer(answer_each(OK)) as server:
        await http.request("GET", server.url + "/", timeout=5)
        await http.aclose()
        await asyncio.wait_for(server.hung_up.wait(), 5)
    assert server.closed_by_client == 1
    with pytest.raises(RuntimeError, match="closed"):
        await http.request("GET", server.url + "/", timeout=5)


def test_works_on_uvloop() -> None:
    """The protocol runs on uvloop (whose transports are not asyncio.Transport subclasses)."""

    async def scenario() -> tuple[int, bytes, int]:
        http = HttpClient(headers={}, max_body=1000)
        async with RawServer(answer_each(OK)) as server:
            first = await http.request("GET", server.url + "/", timeout=5)
            second = await http.request("GET", server.url + "/", timeout=5)
            await http.aclose()
        return second.status, first.body, server.connections

    assert uvloop.run(scenario()) == (200, b"ok", 1)


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
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    yield f"https://127.0.0.1:{port}"
    await runner.cleanup()


async def test_https_with_a_trusted_certificate(authority: trustme.CA, https_url: str) -> None:
    """HTTPS works when the server's certificate chains to a trusted CA."""
    context = ssl.create_default_context()
    authority.configure_trust(context)
    http = HttpClient(headers={}, max_body=1000, ssl_context=context)
    try:
        reply = await http.request("GET", https_url + "/hello", headers={"X-Name": "z"}, timeout=5)
        again = await http.request("GET", https_url + "/hello", timeout=5)
    finally:
        await http.aclose()
    assert (reply.status, reply.body) == (200, b'{"hello": "z"}')
    assert again.status == 200


async def test_https_refuses_an_untrusted_certificate(https_url: str) -> None:
    """By default the system trust store decides, and a self-made CA is not in it."""
    http = HttpClient(headers={}, max_body=1000)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await http.request("GET", https_url + "/hello", timeout=5)
    finally:
        await http.aclose()


async def test_ssl_cert_file_names_a_private_ca(
    authority: trustme.CA, https_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SSL_CERT_FILE`` replaces the trust store, as docs/configuration.md tells users."""
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    http = HttpClient(headers={}, max_body=1000)
    try:
        reply = await http.request("GET", https_url + "/hello", timeout=5)
    finally:
        await http.aclose()
    assert reply.status == 200


async def test_connection_refused_is_an_os_error(client: HttpClient) -> None:
    """Nobody listening gives an OSError (ConnectionRefusedError)."""
    async with RawServer(answer_each(OK)) as server:
        url = server.url
    with pytest.raises(ConnectionRefusedError):
        await client.request("GET", url + "/", timeout=5)
