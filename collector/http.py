"""A small keep-alive HTTP/1.1 client: the one hop the collector's hot path needs, and no more.

Every tenant-day is one ``GET``. At a few thousand requests a second, aiohttp's general-purpose
request machinery (cookie jar, tracing hooks, multidict headers, yarl URLs, response objects with
their stream readers) was about a third of the collector's CPU. :class:`HttpClient` does one
thing: send a request on a pooled connection and return the whole response as an
:class:`~collector.auth.HttpReply`. It costs about a third of aiohttp per request (see
docs/performance.md). Parsing is llhttp's (Node.js's parser, through ``httptools``), so chunked
bodies, keep-alive rules and malformed responses are handled by a parser hardened elsewhere; this
module only pools connections and enforces limits.

What it does: ``http`` and ``https`` (certificates verified against the system store, which
``SSL_CERT_FILE``/``SSL_CERT_DIR`` can replace); persistent connections per origin, idle ones
closed after ``idle_timeout``; ``Content-Length``, chunked and read-until-close bodies; gzip and
deflate bodies; one time limit per request, connecting included; a body size limit; one silent
retry of a ``GET`` whose reused connection the server had already closed. What it does not do:
proxies (the API client switches to :mod:`collector.http_proxied`, built on aiohttp, when the
environment names one), redirects (a 3xx is returned as it is), cookies, HTTP/2.

Errors, all raised from :meth:`HttpClient.request`::

    OSError                  connection refused or reset, DNS, TLS (ssl.SSLError)
    ├── ServerDisconnected   closed before the response was complete
    └── HttpProtocolError    bytes that are not an HTTP/1.1 response
    TimeoutError             no complete response within the time limit
    BodyTooLarge             the body exceeds ``max_body`` (status known)
    InvalidRequest           a header or URL that cannot be sent (CR/LF, not Latin-1)

The API client turns them into :mod:`collector.errors`. Nothing here knows about tenants or
secrets, and no message repeats a request header.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from typing import TypeVar, cast, overload

import httptools

from collector.auth import HttpReply

_T = TypeVar("_T")

DEFAULT_IDLE_TIMEOUT = 15.0
"""Seconds an idle connection is kept; servers commonly drop them after 30-75 s."""
MAX_HEAD_BYTES = 64 * 1024
"""Status line and headers of one response; a server sending more is not the API."""


class ServerDisconnected(ConnectionResetError):
    """The server closed the connection before the response was complete.

    ``unanswered``: not one byte of the response had arrived, so the request may never have
    been read (a keep-alive connection the server closed just as it was reused).
    """

    def __init__(self, message: str, *, unanswered: bool) -> None:
        self.unanswered = unanswered
        super().__init__(message)


class HttpProtocolError(OSError):
    """The server's bytes are not a valid HTTP/1.1 response (or use an unsupported encoding)."""


class BodyTooLarge(Exception):
    """The response body is larger than the client's ``max_body``."""

    def __init__(self, status: int, limit: int) -> None:
        self.status = status
        self.limit = limit
        super().__init__(f"HTTP {status} response larger than {limit} bytes")


class InvalidRequest(ValueError):
    """A request that cannot be sent as given: a header with CR/LF or outside Latin-1, a bad URL."""


class Headers(Mapping[str, str]):
    """Response headers, looked up case-insensitively; repeated fields joined with ``", "``."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields  # keys are lower-case

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...

    def get(self, name: str, /, default: object = None) -> object:
        # Mapping.get would go through __getitem__ and an exception for every missing header.
        return self._fields.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


class _Origin:
    """Where requests for one ``scheme://host:port`` go, and its idle connections."""

    __slots__ = ("host", "idle", "key", "port", "tls")

    def __init__(self, key: str, host: str, port: int, tls: bool) -> None:
        self.key = key
        self.host = host
        self.port = port
        self.tls = tls
        self.idle: deque[_Connection] = deque()


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; carries one request at a time.

    The parser calls back into this object; a response ends in ``waiter`` (an ``HttpReply`` or an
    exception). Callbacks after a failure are ignored, because ``waiter`` is then None.
    """

    def __init__(self, max_body: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[HttpReply] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.keep_alive = False
        self._parser = httptools.HttpResponseParser(self)
        self._max_body = max_body
        self._received = False
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._status = 0
        self._head_bytes = 0
        self._until_close = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Bytes nobody asked for: the connection's state is unknown, so it cannot be reused.
            self.close()
            return
        self._received = True
        if not self._status:
            # Still in the status line and headers, which httptools buffers without a bound.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(HttpProtocolError(f"response headers over {MAX_HEAD_BYTES} bytes"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HttpProtocolError("the server switched protocols, which was not asked for"))
        except httptools.HttpParserError as exc:
            self._fail(HttpProtocolError(f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool:
        if self.waiter is None:
            self.closed = True  # an idle connection the server is closing: never reuse it
        return False  # let the transport close; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None:
            return
        if self._status and self._until_close:
            self._complete()  # a body delimited by the end of the connection
            return
        self.waiter = None
        if waiter.done():
            return
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionResetError):
            waiter.set_exception(exc)  # e.g. a TLS failure, which says more than "closed"
        elif not self._received:
            waiter.set_exception(
                ServerDisconnected("the server closed the connection unanswered", unanswered=True)
            )
        else:
            waiter.set_exception(
                ServerDisconnected(
                    "the server closed the connection mid-response", unanswered=False
                )
            )

    # --- httptools callbacks ----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prior = self._headers.get(key)
        self._headers[key] = text if prior is None else f"{prior}, {text}"

    def on_headers_complete(self) -> None:
        if self.waiter is None:
            return
        self._status = status = self._parser.get_status_code()
        if status < 200:
            self._status = 0  # an interim response (100 Continue, 103 Early Hints): the real
            return  # one follows, and its headers count against the limit afresh
        length = self._headers.get("content-length")
        if length is None:
            chunked = "chunked" in self._headers.get("transfer-encoding", "").lower()
            # llhttp ends no-length bodies only at EOF, which httptools cannot tell it about.
            self._until_close = not chunked and status not in (204, 304)
        elif length.isdigit() and int(length) > self._max_body:
            self._fail(BodyTooLarge(status, self._max_body))

    def on_body(self, chunk: bytes) -> None:
        if self.waiter is None:
            return
        self._size += len(chunk)
        if self._size > self._max_body:
            self._fail(BodyTooLarge(self._status, self._max_body))
            return
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if self.waiter is None:
            return
        if self._status == 0:
            self._reset()  # the end of an interim response
            return
        self.keep_alive = self._parser.should_keep_alive()
        self._until_close = False
        self._complete()

    # --- the request cycle ------------------------------------------------------------------

    def send(self, head: bytes, waiter: asyncio.Future[HttpReply]) -> None:
        """Write one request; its response will end in ``waiter``."""
        assert self.transport is not None
        self._reset()
        self._received = False
        self.keep_alive = False
        self.waiter = waiter
        self.transport.write(head)

    def close(self) -> None:
        """Close the connection (idempotent); a pending response fails as disconnected."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """Forget the request in flight (timed out or cancelled) and close the connection."""
        self.waiter = None
        self.close()

    def _reset(self) -> None:
        self._headers = {}
        self._body = []
        self._size = 0
        self._status = 0
        self._head_bytes = 0
        self._until_close = False

    def _complete(self) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is None or waiter.done():
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        headers = self._headers
        encoding = headers.get("content-encoding")
        if encoding is not None and encoding.lower() != "identity":
            try:
                body = _decode(body, encoding.lower(), self._max_body)
            except BodyTooLarge:
                waiter.set_exception(BodyTooLarge(self._status, self._max_body))
                self.close()
                return
            except HttpProtocolError as exc:
                waiter.set_exception(exc)
                self.close()
                return
        waiter.set_result(HttpReply(self._status, body, Headers(headers)))

    def _fail(self, exc: BaseException) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()


def _decode(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a gzip or deflate ``Content-Encoding``, never inflating past ``limit`` bytes."""
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":
        # "deflate" is meant to be zlib-wrapped; some servers send raw deflate. 32+ detects both
        # zlib and gzip headers; raw deflate is tried below.
        wbits = 32 + zlib.MAX_WBITS
    else:
        raise HttpProtocolError(f"unsupported Content-Encoding {encoding!r}")
    try:
        inflater = zlib.decompressobj(wbits)
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        if encoding != "deflate":
            raise HttpProtocolError(f"a {encoding} body that does not decompress") from None
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(body, limit + 1)
        except zlib.error:
            raise HttpProtocolError("a deflate body that does not decompress") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(0, limit)
    return data


def _expire(waiter: asyncio.Future[HttpReply]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _check_header(name: str, value: str) -> str:
    line = f"{name}: {value}\r\n"
    if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
        raise InvalidRequest(f"header {name!r} has a line break or colon in it")
    return line


class HttpClient:
    """Sends HTTP/1.1 requests over pooled keep-alive connections; ``await aclose()`` when done.

    ``headers`` go on every request (``User-Agent``, ``Accept``). ``max_body`` bounds every
    response body, after decompression. ``max_in_flight`` bounds requests under way at once (and
    so open connections, with ``max_idle_per_origin``): a thousand tenants asking for tokens at
    start-up queue here instead of opening a thousand sockets. ``ssl_context`` replaces the
    default (system trust store, hostname checked) for ``https`` origins.
    """

    def __init__(
        self,
        *,
        headers: Mapping[str, str],
        max_body: int,
        max_in_flight: int = 128,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_idle_per_origin: int = 128,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._default_headers = "".join(_check_header(k, v) for k, v in headers.items())
        self._max_body = max_body
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle_per_origin
        self._ssl_context = ssl_context
        self._origins: dict[str, _Origin] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,  # noqa: ASYNC109 (one timer per request is cheaper than asyncio.timeout)
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> HttpReply:
        """Send one request and return the whole response; see the module for what it raises.

        ``timeout`` starts once the request has a slot (``max_in_flight``): waiting for one is
        queueing in this process, not an unresponsive server.
        """
        if self._closed:
            raise RuntimeError("HttpClient is closed")
        origin, target = self._route(url)
        head = self._head(method, origin, target, headers, body, content_type)
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await self._send(method, origin, head, loop.time() + timeout, loop)

    async def _send(
        self,
        method: str,
        origin: _Origin,
        head: bytes,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> HttpReply:
        connection = self._take_idle(origin, loop.time())
        if connection is not None:
            try:
                return await self._exchange(origin, connection, head, deadline, loop)
            except ServerDisconnected as exc:
                # The server closed the idle connection just as we reused it (its keep-alive ran
                # out). Nothing was answered, so a GET goes again, once, on a new connection.
                if method != "GET" or not exc.unanswered:
                    raise
        connection = await self._connect(origin, deadline, loop)
        return await self._exchange(origin, connection, head, deadline, loop)

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        self._closed = True
        for origin in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    # --- internals --------------------------------------------------------------------------

    def _route(self, url: str) -> tuple[_Origin, str]:
        scheme, sep, rest = url.partition("://")
        end = len(rest)
        for mark in "/?#":
            found = rest.find(mark)
            if 0 <= found < end:
                end = found
        netloc, target = rest[:end], rest[end:].partition("#")[0]
        key = scheme + "://" + netloc
        origin = self._origins.get(key)
        if origin is None:
            origin = self._new_origin(scheme.lower(), netloc, bool(sep))
            self._origins[key] = origin
        if not target.startswith("/"):
            target = "/" + target
        if " " in target or "\r" in target or "\n" in target:
            raise InvalidRequest("the URL has a space or line break in its path or query")
        return origin, target

    @staticmethod
    def _new_origin(scheme: str, netloc: str, has_scheme: bool) -> _Origin:
        if not has_scheme or scheme not in ("http", "https"):
            raise InvalidRequest(f"not an http(s) URL (scheme {scheme if has_scheme else ''!r})")
        if "@" in netloc:
            raise InvalidRequest("user credentials in the URL are not supported")
        host, port_text = netloc, ""
        if netloc.startswith("["):  # an IPv6 literal: [::1]:8080
            close = netloc.find("]")
            host, port_text = netloc[1:close], netloc[close + 2 :] if close > 0 else ""
        elif ":" in netloc:
            host, _, port_text = netloc.rpartition(":")
        if not host or (port_text and not port_text.isdigit()):
            raise InvalidRequest("the URL has no valid host and port")
        tls = scheme == "https"
        port = int(port_text) if port_text else (443 if tls else 80)
        return _Origin(netloc, host, port, tls)

    def _head(
        self,
        method: str,
        origin: _Origin,
        target: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
        content_type: str | None,
    ) -> bytes:
        parts = [f"{method} {target} HTTP/1.1\r\nHost: {origin.key}\r\n", self._default_headers]
        if headers:
            parts.extend(_check_header(k, v) for k, v in headers.items())
        if body is not None:
            if content_type is not None:
                parts.append(_check_header("Content-Type", content_type))
            parts.append(f"Content-Length: {len(body)}\r\n")
        parts.append("\r\n")
        try:
            head = "".join(parts).encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidRequest("a header has characters outside Latin-1") from None
        return head if body is None else head + body

    def _take_idle(self, origin: _Origin, now: float) -> _Connection | None:
        idle = origin.idle
        # The oldest sit at the left: drop those the server closed or that idled too long.
        while idle and (idle[0].closed or now - idle[0].idle_since > self._idle_timeout):
            idle.popleft().close()
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(
        self, origin: _Origin, deadline: float, loop: asyncio.AbstractEventLoop
    ) -> _Connection:
        context: ssl.SSLContext | None = None
        if origin.tls:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        max_body = self._max_body
        async with asyncio.timeout_at(deadline):
            _, connection = await loop.create_connection(
                lambda: _Connection(max_body),
                origin.host,
                origin.port,
                ssl=context,
                server_hostname=origin.host if context is not None else None,
            )
        return connection

    async def _exchange(
        self,
        origin: _Origin,
        connection: _Connection,
        head: bytes,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> HttpReply:
        waiter: asyncio.Future[HttpReply] = loop.create_future()
        connection.send(head, waiter)
        timer = loop.call_at(deadline, _expire, waiter)
        try:
            reply = await waiter
        except BaseException:
            connection.abandon()  # timed out, cancelled or broken: its state is unknown
            raise
        finally:
            timer.cancel()
        reusable = connection.keep_alive and not connection.closed and not self._closed
        if reusable and len(origin.idle) < self._max_idle:
            connection.idle_since = loop.time()
            origin.idle.append(connection)
            return reply
        connection.close()
        return reply
