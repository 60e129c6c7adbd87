"""The API client's HTTP layer: one aiohttp session per process, with every limit the client needs.

:class:`Transport` sends one request and returns the whole response as an
:class:`~collector.auth.HttpReply`. It owns the process's ``aiohttp.ClientSession`` (keep-alive
connections, ``limit`` = usage concurrency + headroom for token requests) and adds what aiohttp
leaves to its caller:

- **one deadline per request**: connecting, sending and reading the body included
  (:class:`RequestDeadlines`: every request of a transport has the same timeout, so one timer,
  set for the earliest deadline in flight, serves them all; aiohttp's per-request
  ``ClientTimeout(total=...)`` machinery cost about 0.03 ms of CPU per request);
- **a body cap after decompression**: the body is read chunk by chunk as aiohttp decodes it
  (gzip, deflate), and the decoded bytes are counted; over ``max_body`` is :class:`BodyTooLarge`;
- **a memory budget for all bodies together** (:class:`BodyBudget`, process-wide): each chunk is
  charged to it as it arrives and the whole body is given back once read;
- **no redirects**: a 3xx comes back as it is (the client names its ``Location``);
- **no header injection**: a header with a line break is refused with :class:`InvalidRequest`,
  which names the header and never its value;
- **proxies resolved once** (:class:`ProxyRoutes`): ``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``
  and proxy credentials from ``~/.netrc`` (or ``$NETRC``) are read when the transport is built and
  passed with each request; the session itself has ``trust_env=False``, so aiohttp does not re-read
  the environment and ``.netrc`` on every request (that cost 1.6x the CPU per request);
- **TLS**: one ``ssl.SSLContext`` for the process (aiohttp's default, built when it is imported),
  from the system store, which ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` replace as in every OpenSSL
  program; they are read at start-up.

Errors, all raised from :meth:`Transport.request`; the API client turns them into
:mod:`collector.errors`, so no aiohttp exception leaves ``client.py``::

    TimeoutError             no complete response within the deadline
    ConnectionError          refused, reset, DNS, TLS, proxy, not HTTP (message: aiohttp's own)
    BodyTooLarge             the decoded body exceeds max_body (status known)
    BodyBudgetExhausted      bodies in flight hold the whole budget and none can finish
    InvalidRequest           a header or URL that cannot be sent
"""

from __future__ import annotations

import asyncio
import base64
import netrc
import os
import ssl
import urllib.request
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
import structlog

from collector.auth import HttpReply
from collector.log import register_secrets

log = structlog.get_logger(__name__)

BODY_MEMORY_BUDGET = 256 * 1024 * 1024
"""Bytes all response bodies being read may hold together (process-wide). 256 MiB: 64 concurrent
1 MB bodies use a quarter of it, and 8 bodies at the per-body cap fit at once."""
IDLE_CONNECTION_SECONDS = 15.0
"""Seconds an idle keep-alive connection is kept; servers commonly drop them after 30-75 s."""


class BodyTooLarge(Exception):
    """The decoded response body is larger than ``limit`` bytes."""

    def __init__(self, status: int, limit: int) -> None:
        self.status = status
        self.limit = limit
        super().__init__(f"HTTP {status} response larger than {limit} bytes")


class BodyBudgetExhausted(Exception):
    """Every body being read waits for memory that only another waiting body could free."""

    def __init__(self, status: int, budget: int) -> None:
        self.status = status
        self.budget = budget
        super().__init__(
            f"HTTP {status} response bodies in flight hold the whole {budget} byte budget"
        )


class InvalidRequest(ValueError):
    """A request that cannot be sent as given (a header with a line break, a bad URL)."""


# --- the memory budget of bodies in flight --------------------------------------------------------


class BodyBudget:
    """Bytes that response bodies being read may hold together, shared by every request.

    A body charges each chunk as it arrives (:meth:`BodyLease.charge`) and gives everything back
    once read (:meth:`BodyLease.close`). A chunk that does not fit waits for other bodies to
    finish; if every other body holding memory is waiting too, no one could ever finish, so the
    request that would complete the deadlock fails with :class:`BodyBudgetExhausted` (a transient
    error: its bytes go back and the others proceed). aiohttp stops reading a socket whose buffer
    passes 128 KiB, so a waiting body holds at most that much beyond what it was charged.
    """

    def __init__(self, total: int = BODY_MEMORY_BUDGET) -> None:
        if total <= 0:
            raise ValueError("the body memory budget must be positive")
        self.total = total
        self.used = 0
        self.holders = 0
        self.waiting_holders = 0  # bodies that hold bytes and wait for more
        self._wakeups: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"BodyBudget(total={self.total}, used={self.used}, holders={self.holders})"

    def lease(self) -> BodyLease:
        """A share of the budget for one body, charged as it is read."""
        return BodyLease(self)

    def _wake_all(self) -> None:
        wakeups, self._wakeups = self._wakeups, []
        for future in wakeups:
            if not future.done():
                future.set_result(None)


class BodyLease:
    """One body's share of a :class:`BodyBudget`; close it when the body has been read."""

    __slots__ = ("_budget", "held", "holding")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0
        self.holding = False

    def try_charge(self, size: int) -> bool:
        """Charge ``size`` bytes if they fit now (no waiting): the path of nearly every chunk."""
        budget = self._budget
        if budget.used + size > budget.total:
            return False
        if not self.holding:
            self.holding = True
            budget.holders += 1
        budget.used += size
        self.held += size
        return True

    async def charge(self, size: int, *, status: int, deadline: float) -> None:
        """Charge ``size`` bytes, waiting until ``deadline`` (loop time) for other bodies to finish.

        Raises :class:`BodyBudgetExhausted` rather than wait when every other body holding memory
        is waiting too, and ``TimeoutError`` at the deadline.
        """
        budget = self._budget
        async with asyncio.timeout_at(deadline):
            while not self.try_charge(size):
                others = budget.holders - (1 if self.holding else 0)
                if budget.waiting_holders >= others:
                    raise BodyBudgetExhausted(status, budget.total)
                wakeup = asyncio.get_running_loop().create_future()
                budget._wakeups.append(wakeup)
                holding = self.holding
                budget.waiting_holders += holding
                try:
                    await wakeup
                finally:
                    budget.waiting_holders -= holding

    def close(self) -> None:
        """Give every byte back (the body has been read, or failed)."""
        if not self.holding:
            return
        budget = self._budget
        budget.used -= self.held
        budget.holders -= 1
        self.held = 0
        self.holding = False
        if budget._wakeups:
            budget._wake_all()


PROCESS_BODY_BUDGET = BodyBudget()
"""The budget every :class:`Transport` shares unless given its own (tests)."""


# --- proxies, resolved once -----------------------------------------------------------------------


class ProxyRoutes:
    """Which proxy (and proxy credentials) each origin goes through, read from the environment once.

    ``proxies`` is what :func:`urllib.request.getproxies` returns (``{"https": url, "no": hosts}``);
    a proxy URL's ``user:password@`` or, failing that, the proxy host's ``.netrc`` entry gives the
    credentials. Decisions are cached per ``scheme://host:port``.
    """

    def __init__(
        self, proxies: Mapping[str, str] | None = None, netrc_path: Path | None = None
    ) -> None:
        self.proxies = dict(urllib.request.getproxies() if proxies is None else proxies)
        self._netrc = _read_netrc(netrc_path) if self.configured else None
        self._routes: dict[str, tuple[str | None, dict[str, str] | None]] = {}
        for url in self.proxies.values():
            password = urlsplit(url).password if "://" in url else None
            if password:
                register_secrets([password, unquote(password)])

    @property
    def configured(self) -> bool:
        """True if the environment names any proxy."""
        return any(key != "no" and value for key, value in self.proxies.items())

    def route(self, url: str) -> tuple[str | None, dict[str, str] | None]:
        """``(proxy_url, proxy_headers)`` for a request to ``url``; ``(None, None)``: go direct."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        known = self._routes.get(origin)
        if known is None:
            known = self._routes[origin] = self._decide(parts.scheme, parts.netloc)
        return known

    def _decide(self, scheme: str, netloc: str) -> tuple[str | None, dict[str, str] | None]:
        proxy = self.proxies.get(scheme) or self.proxies.get("all")
        host = netloc.rpartition("@")[2]
        # proxy_bypass_environment: NO_PROXY rules from the snapshot, not from os.environ again.
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # no stub
        if not proxy or bypass(host, self.proxies):
            return None, None
        if "://" not in proxy:
            proxy = "http://" + proxy  # curl and requests accept a bare host:port, so do we
        parts = urlsplit(proxy)
        if parts.username is not None:
            bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
            return bare, _basic_auth(unquote(parts.username), unquote(parts.password or ""))
        entry = self._netrc.authenticators(parts.hostname or "") if self._netrc else None
        if entry is not None:
            login, _account, password = entry
            register_secrets([password or ""])
            return proxy, _basic_auth(login or "", password or "")
        return proxy, None

    def describe(self) -> dict[str, str]:
        """The proxy settings without credentials, for a start-up log line."""
        shown: dict[str, str] = {}
        for key, value in self.proxies.items():
            if key == "no" or "://" not in value:
                shown[key] = value
            else:
                parts = urlsplit(value)
                shown[key] = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        return shown


def _basic_auth(user: str, password: str) -> dict[str, str]:
    """Proxy headers carrying these credentials (the encoded value is registered as a secret).

    Named ``Authorization``: aiohttp moves that proxy header to ``Proxy-Authorization`` on the
    request itself (plain HTTP) or on the ``CONNECT`` (HTTPS), whichever the proxy reads.
    """
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    register_secrets([encoded])
    return {"Authorization": "Basic " + encoded}


def _read_netrc(path: Path | None) -> netrc.netrc | None:
    if path is None:
        named = os.environ.get("NETRC")
        path = Path(named) if named else Path.home() / ".netrc"
    try:
        return netrc.netrc(str(path))
    except FileNotFoundError:
        return None
    except (netrc.NetrcParseError, OSError) as exc:
        log.warning("could not read the netrc file; no proxy credentials from it", error=str(exc))
        return None


# --- deadlines ------------------------------------------------------------------------------------


class _Deadline:
    """One request's deadline: the task to cancel at ``when`` (loop time), until it is done."""

    __slots__ = ("cancelling", "done", "fired", "task", "when")

    def __init__(self, when: float, task: asyncio.Task[object], cancelling: int) -> None:
        self.when = when
        self.task = task
        self.cancelling = cancelling  # the task's pending cancellations when the request began
        self.done = False
        self.fired = False


class RequestDeadlines:
    """Deadlines of the requests in flight, in the order they began, served by a single timer.

    The timeout is the same for every request, so deadlines come in the order requests begin:
    the first one still in flight is always the earliest, and the one timer is set for it. At a
    deadline the request's task is cancelled and :meth:`timed_out` turns that cancellation into
    ``TimeoutError``, with the bookkeeping of :func:`asyncio.timeout` (``cancelling`` and
    ``uncancel``), so a cancellation from outside (a cancel scope, shutdown) still propagates as
    one, even when it coincides with the deadline.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._pending: deque[_Deadline] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> _Deadline:
        """Start the current task's request; call :meth:`end` when it is over, however it ends."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a request runs in a task")
        loop = task.get_loop()
        entry = _Deadline(loop.time() + self.timeout, task, task.cancelling())
        pending = self._pending
        while pending and pending[0].done:  # requests end mostly in the order they began
            pending.popleft()
        pending.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry.when, self._expire, loop)
        return entry

    def close(self) -> None:
        """Stop the timer (the transport is closed; no request is in flight any more)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()

    @staticmethod
    def end(entry: _Deadline) -> None:
        """The request is over: its deadline no longer applies."""
        entry.done = True

    @staticmethod
    def timed_out(entry: _Deadline) -> bool:
        """For a ``CancelledError`` ending the request: True if the deadline caused it alone."""
        return entry.fired and entry.task.uncancel() <= entry.cancelling

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        pending = self._pending
        while pending:
            entry = pending[0]
            if not entry.done and entry.when > now:
                self._timer = loop.call_at(entry.when, self._expire, loop)
                return
            pending.popleft()
            if not entry.done:
                entry.fired = True
                entry.task.cancel()


# --- the transport --------------------------------------------------------------------------------


class Transport:
    """Sends requests on the process's aiohttp session; see the module docstring for the rules.

    Create it inside a running event loop (the session binds to it) and :meth:`aclose` it.
    """

    def __init__(
        self,
        *,
        headers: Mapping[str, str],
        max_body: int,
        connections: int,
        timeout: float,
        budget: BodyBudget | None = None,
        proxies: ProxyRoutes | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.budget = budget if budget is not None else PROCESS_BODY_BUDGET
        if max_body > self.budget.total:
            raise ValueError("a single body may not be allowed more than the whole budget")
        self.max_body = max_body
        self.timeout = timeout
        self.proxies = proxies if proxies is not None else ProxyRoutes()
        self._route = self.proxies.route if self.proxies.configured else None
        if self._route is not None:
            log.info("proxies from the environment apply", **self.proxies.describe())
        connector = aiohttp.TCPConnector(
            limit=connections,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=IDLE_CONNECTION_SECONDS,
            # True: aiohttp's own context, built once when aiohttp is imported with
            # ssl.create_default_context() (system store, or SSL_CERT_FILE/SSL_CERT_DIR). Building
            # a second one would cost 30-80 ms of every start.
            ssl=ssl_context if ssl_context is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=dict(headers),
            # No aiohttp timer: the deadline of each request is kept by self._deadlines.
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,  # proxies are resolved once, above
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
            auto_decompress=True,
        )
        self._deadlines = RequestDeadlines(timeout)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> HttpReply:
        """Send one request and read the whole response; raises only the module's errors."""
        proxy, proxy_headers = self._route(url) if self._route is not None else (None, None)
        deadlines = self._deadlines
        entry = deadlines.begin()
        try:
            async with self._session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                proxy=proxy,
                proxy_headers=proxy_headers,
            ) as response:
                body = await self._read(response, entry.when)
                return HttpReply(response.status, body, response.headers)
        except asyncio.CancelledError:
            if deadlines.timed_out(entry):
                raise TimeoutError("no complete response in time") from None
            raise
        except (BodyTooLarge, BodyBudgetExhausted):
            raise
        except TimeoutError:
            raise TimeoutError("no complete response in time") from None
        except aiohttp.InvalidURL:
            raise InvalidRequest("the URL cannot be used") from None
        except aiohttp.ClientError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
        except ValueError:
            # aiohttp refuses a header with a line break (no value in its message either).
            raise InvalidRequest(_unsendable(headers)) from None
        except OSError as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
        finally:
            deadlines.end(entry)

    async def _read(self, response: aiohttp.ClientResponse, deadline: float) -> bytes:
        """The decoded body, counted against ``max_body`` and the memory budget as it arrives."""
        limit = self.max_body
        status = response.status
        declared = response.content_length
        if declared is not None and declared > limit and "Content-Encoding" not in response.headers:
            raise BodyTooLarge(status, limit)
        content = response.content
        lease = self.budget.lease()
        chunks: list[bytes] = []
        size = 0
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(status, limit)
                if not lease.try_charge(len(chunk)):
                    await lease.charge(len(chunk), status=status, deadline=deadline)
                chunks.append(chunk)
        finally:
            lease.close()
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def aclose(self) -> None:
        """Close the session and its connections."""
        await self._session.close()
        self._deadlines.close()


def _unsendable(headers: Mapping[str, str] | None) -> str:
    """Which header could not be sent, by name only: its value may be a token."""
    for name, value in (headers or {}).items():
        if any(c in name or c in value for c in "\r\n\0"):
            return f"header {name!r} has a line break in it"
    return "aiohttp refused a header or the URL"
