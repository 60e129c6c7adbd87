"""The aiohttp application that imitates the Zencoder token and usage endpoints.

Behaviour follows the Zencoder API notes, with the assumed answers to their open questions:
the usage endpoint authenticates first (401 ``Unauthorized``), then applies the fault knobs a
gateway would (403, 429, 503), then validates parameters (both-present, then ``period``, then
``day``), then the data-backend failures (500 ``Failed to fetch data``), then answers 200.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import re
import resource
import signal
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from collector.simulator.data import UsageGenerator, stable_int
from collector.simulator.faults import OMIT, Faults, defective_body
from collector.simulator.settings import SimTenant, SimulatorSettings
from collector.simulator.stats import SimStats
from collector.simulator.variants import variant_answer

USAGE_PATH = "/api/v1/data/usage"
TOKEN_PATH = "/oauth/token"  # noqa: S105 (a URL path, not a password)
STATS_PATH = "/_simulator/stats"  # not part of the Zencoder API: counters for benchmarks
PERIODS = {"7d": 7, "30d": 30, "90d": 90}
DAY_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

MSG_BOTH = "Only one parameter is expected. Provide either 'day' or 'period', not both"
MSG_PERIOD = "Invalid period parameter. Period has to be one of 7d, 30d, 90d"
MSG_DAY = "Invalid day parameter. Day must be in YYYY-MM-DD format"
MSG_FAILED = "Failed to fetch data"
MSG_UNAUTHORIZED = "Unauthorized"
MSG_FORBIDDEN = "Forbidden"
MSG_TOO_MANY = "Too many requests"
MSG_UNAVAILABLE = "Service unavailable"


def _error(message: str) -> bytes:
    return json.dumps({"status": "error", "message": message}, separators=(",", ":")).encode()


def _token_error(message: str, code: str | None = None) -> bytes:
    body: dict[str, Any] = {"errors": [message]}
    if code is not None:
        body["errorCode"] = code
    return json.dumps(body, separators=(",", ":")).encode()


BODY_BOTH, BODY_PERIOD, BODY_DAY = _error(MSG_BOTH), _error(MSG_PERIOD), _error(MSG_DAY)
BODY_FAILED, BODY_UNAUTHORIZED = _error(MSG_FAILED), _error(MSG_UNAUTHORIZED)
BODY_INVALID_JSON = _token_error("Invalid input json", "ER-00006")
BODY_INVALID_AUTH = _token_error("Invalid authentication")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    tenant_id: str
    expires_at: float  # monotonic
    generation: int
    global_generation: int


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    retry_after: str | None = None
    content_encoding: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Simulator:
    """One simulated Zencoder API: tenants, tokens, generated data, fault knobs and stats."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.faults = Faults(settings.seed)
        self.stats = SimStats(settings.request_log_size)
        self.generator = UsageGenerator(settings.seed, cache_size=settings.body_cache_size)
        self.base_url = ""
        self.token_url = ""
        self.usage_url = ""
        self._tenants: dict[str, SimTenant] = {}
        self._by_client: dict[str, SimTenant] = {}
        self._by_key: dict[str, SimTenant] = {}
        for tenant in settings.tenants:
            self.add_tenant(tenant)
        self._tokens: dict[str, IssuedToken] = {}
        self._revisions: dict[tuple[str, int], int] = {}
        self._signing_key = stable_int(settings.seed, "signing-key").to_bytes(8, "big")
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_post(TOKEN_PATH, self._handle_token)
        self.app.router.add_get(USAGE_PATH, self._handle_usage)
        self.app.router.add_get(STATS_PATH, self._handle_stats)

    # --- tenants and data -----------------------------------------------------------------------

    def add_tenant(self, tenant: SimTenant) -> None:
        """Serve another tenant (or replace one with new credentials) without a restart."""
        old = self._tenants.get(tenant.id)
        if old is not None:
            self._by_client.pop(old.client_id, None)
            if old.api_key is not None:
                self._by_key.pop(old.api_key, None)
        self._tenants[tenant.id] = tenant
        self._by_client[tenant.client_id] = tenant
        if tenant.api_key is not None:
            self._by_key[tenant.api_key] = tenant

    def tenant(self, tenant_id: str) -> SimTenant:
        return self._tenants[tenant_id]

    @property
    def tenants(self) -> list[SimTenant]:
        return list(self._tenants.values())

    def today(self) -> dt.date:
        """The simulated UTC date: ``settings.today`` or the real UTC date now."""
        return self.settings.today or dt.datetime.now(dt.UTC).date()

    def has_data(self, day: dt.date, today: dt.date | None = None) -> bool:
        """Days in the future or older than ``history_days`` come back empty."""
        today = today or self.today()
        return today - dt.timedelta(days=self.settings.history_days) <= day <= today

    def change_day(self, tenant_id: str, day: dt.date) -> None:
        """Make a day's figures different from now on (a late correction by the API)."""
        key = (tenant_id, day.toordinal())
        self._revisions[key] = self._revisions.get(key, 0) + 1

    def _revision(self, tenant_id: str, day: dt.date) -> int:
        return self._revisions.get((tenant_id, day.toordinal()), 0)

    def day_data(self, tenant_id: str, day: dt.date) -> dict[str, Any]:
        """Exactly the ``data`` object a ``day=`` request for this tenant returns now."""
        tenant = self._tenants[tenant_id]
        return self.generator.day_data(
            tenant.id, tenant.users, day, self._revision(tenant.id, day), self.has_data(day)
        )

    def period_data(self, tenant_id: str, period: str) -> dict[str, Any]:
        """Exactly the ``data`` object a ``period=`` request (``7d``, ``30d``, ``90d``) returns."""
        tenant = self._tenants[tenant_id]
        today = self.today()
        n = PERIODS[period]
        start = today - dt.timedelta(days=n)
        dates = [start + dt.timedelta(days=i) for i in range(n + 1)]
        with_data = [(d, self._revision(tenant.id, d)) for d in dates if self.has_data(d, today)]
        return self.generator.period_data(tenant.id, tenant.users, start, today, n, with_data)

    # --- token endpoint -------------------------------------------------------------------------

    def _issue_token(self, tenant: SimTenant, lifetime: float) -> str:
        now = time.time()
        header = _b64(b'{"alg":"HS256","typ":"JWT"}')
        claims = {
            "iss": "zencoder-simulator",
            "sub": tenant.client_id,
            "tenant": tenant.id,
            "iat": int(now),
            "exp": int(now + lifetime),
            "jti": uuid.uuid4().hex,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode()
        signature = _b64(hmac.new(self._signing_key, signing_input, hashlib.sha256).digest())
        token = f"{header}.{payload}.{signature}"
        if len(self._tokens) > 4 * max(1, len(self._tenants)) + 1000:
            self._prune_tokens()
        self._tokens[token] = IssuedToken(
            tenant_id=tenant.id,
            expires_at=time.monotonic() + lifetime,
            generation=self.faults.token_generation.get(tenant.id, 0),
            global_generation=self.faults.global_token_generation,
        )
        self.stats.tokens_issued[tenant.id] += 1
        return token

    def issued_tokens(self) -> list[str]:
        """Every access token still remembered (for leak canaries: none may appear anywhere)."""
        return list(self._tokens)

    def _prune_tokens(self) -> None:
        now = time.monotonic()
        self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now}

    @staticmethod
    def _parse_token_request(request: web.Request, raw: bytes) -> dict[str, Any] | None:
        if request.content_type == "application/x-www-form-urlencoded":
            try:
                form = parse_qs(raw.decode("utf-8"), keep_blank_values=True)
            except UnicodeDecodeError:
                return None
            return {key: values[0] for key, values in form.items()}
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def _handle_token(self, request: web.Request) -> web.Response:
        raw = await request.read()
        fields = self._parse_token_request(request, raw)
        client_id = fields.get("client_id") if fields is not None else None
        client_key = client_id if isinstance(client_id, str) else ""
        self.stats.token_requests[client_key] += 1
        answer = await self._answer_token(client_key, fields)
        self.stats.token_responses[answer.status] += 1
        return web.Response(status=answer.status, body=answer.body, content_type="application/json")

    async def _answer_token(self, client_key: str, fields: dict[str, Any] | None) -> Answer:
        faults = self.faults
        delay = faults.token(client_key, "delay", 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        if faults.consume_token(client_key) or faults.token(client_key, "fail", False):
            return Answer(500, _token_error("Internal server error"))
        if fields is None:
            return Answer(400, BODY_INVALID_JSON)
        tenant = self._by_client.get(client_key)
        secret = fields.get("client_secret")
        if (
            tenant is None
            or fields.get("grant_type") != "client_credentials"
            or not isinstance(secret, str)
            or not hmac.compare_digest(secret.encode(), tenant.client_secret.encode())
        ):
            return Answer(401, BODY_INVALID_AUTH)
        if faults.token(client_key, "locked_out", False):
            return Answer(400, _token_error("User is locked out"))
        lifetime = float(faults.token(client_key, "lifetime", self.settings.token_lifetime))
        token = self._issue_token(tenant, lifetime)
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": token,
            "id_token": token,
            "refresh_token": str(uuid.uuid4()),
        }
        expires_in = faults.token(client_key, "expires_in", self.settings.token_lifetime)
        if expires_in is not OMIT:
            body["expires_in"] = expires_in
        return Answer(200, json.dumps(body, separators=(",", ":")).encode())

    # --- usage endpoint -------------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> SimTenant | None:
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or self.faults.reject_all_tokens:
                return None
            issued = self._tokens.get(token.strip())
            if issued is None:
                return None
            if (
                issued.expires_at <= time.monotonic()
                or issued.generation != self.faults.token_generation.get(issued.tenant_id, 0)
                or issued.global_generation != self.faults.global_token_generation
            ):
                return None
            return self._tenants.get(issued.tenant_id)
        api_key = request.headers.get("zencoder-api-key")
        if api_key is not None:
            return self._by_key.get(api_key)
        return None

    async def _handle_usage(self, request: web.Request) -> web.Response:
        arrival = time.monotonic()
        query = request.rel_url.query
        tenant = self._authenticate(request)
        tenant_id = tenant.id if tenant is not None else None
        if "period" in query and "day" in query:
            param = request.rel_url.raw_query_string
        else:
            param = query.get("day", query.get("period", "7d"))
        if tenant is None:
            answer = Answer(401, BODY_UNAUTHORIZED)
            everyone = self.faults.everyone.latency
            latency = self.settings.latency if everyone is None else everyone
        else:
            self.stats.usage_requests[tenant.id] += 1
            answer = self._answer_usage(tenant, query)
            latency = self.faults.usage(tenant.id, "latency", self.settings.latency)
        self.stats.enter(tenant_id)
        try:
            if latency > 0:
                await asyncio.sleep(latency)
        finally:
            self.stats.leave(tenant_id)
        self.stats.record(arrival, tenant_id, param, answer.status)
        headers = {"Retry-After": answer.retry_after} if answer.retry_after is not None else None
        if answer.content_encoding is not None:
            headers = {**(headers or {}), "Content-Encoding": answer.content_encoding}
        return web.Response(
            status=answer.status,
            body=answer.body,
            content_type=answer.content_type,
            headers=headers,
        )

    def _retry_after(self, tenant_id: str, seconds: float) -> str | None:
        raw = self.faults.usage(tenant_id, "retry_after_value", None)
        if raw is not None:
            return raw or None
        whole = max(1, int(-(-seconds // 1)))
        if self.faults.usage(tenant_id, "retry_after_format", "seconds") == "http-date":
            # An HTTP-date has whole-second resolution; one extra second keeps it a lower bound.
            when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=whole + 1)
            return email.utils.format_datetime(when, usegmt=True)
        return str(whole)

    def _answer_usage(self, tenant: SimTenant, query: Mapping[str, str]) -> Answer:
        faults, tid = self.faults, tenant.id
        if faults.usage(tid, "forbidden", False):
            return Answer(403, _error(MSG_FORBIDDEN))
        wait = faults.throttle_wait(
            tid,
            faults.usage(tid, "rate_limit", self.settings.rate_limit),
            faults.usage(tid, "rate_limit_burst", None),
        )
        announced = float(faults.usage(tid, "retry_after_seconds", 1.0))
        if wait > 0:
            return Answer(429, _error(MSG_TOO_MANY), retry_after=self._retry_after(tid, wait))
        if faults.consume(tid, "throttle_next"):
            return Answer(429, _error(MSG_TOO_MANY), retry_after=self._retry_after(tid, announced))
        if faults.consume(tid, "unavailable_next") or faults.usage(tid, "unavailable", False):
            retry_after = self._retry_after(tid, announced)
            return Answer(503, _error(MSG_UNAVAILABLE), retry_after=retry_after)

        day: dt.date | None = None
        if "period" in query and "day" in query:
            return Answer(400, BODY_BOTH)
        if "period" in query:
            period = query["period"]
            if period not in PERIODS:
                return Answer(400, BODY_PERIOD)
        elif "day" in query:
            text = query["day"]
            if not DAY_PATTERN.fullmatch(text):
                return Answer(400, BODY_DAY)
            try:
                day = dt.date.fromisoformat(text)
            except ValueError:
                return Answer(400, BODY_DAY)
        else:
            period = "7d"

        if (
            faults.usage(tid, "down", False)
            or faults.consume(tid, "fail_next")
            or faults.roll_failure(
                tid, faults.usage(tid, "failure_rate", self.settings.failure_rate)
            )
        ):
            return Answer(500, BODY_FAILED)

        if day is not None:
            body = self.generator.day_body(
                tid, tenant.users, day, self._revision(tid, day), self.has_data(day)
            )
        else:
            body = json.dumps(
                {"status": "success", "data": self.period_data(tid, period)}, separators=(",", ":")
            ).encode()
        mode = faults.usage(tid, "bad_response", None)
        if mode is not None:
            defective, content_type = defective_body(mode, body, day.isoformat() if day else "")
            return Answer(200, defective, content_type)
        variant = faults.usage(tid, "variant", tenant.variant)
        if variant is not None and day is not None:
            served = variant_answer(variant, body, day)
            return Answer(
                served.status,
                served.body,
                served.content_type,
                content_encoding=served.content_encoding,
            )
        return Answer(200, body)

    def answer_day(self, tenant_id: str, day: dt.date) -> Answer:
        """What an authenticated ``day=`` request of the tenant gets now, without a socket (the
        fault knobs apply, as for a request: counters are consumed, the bucket is charged)."""
        return self._answer_usage(self._tenants[tenant_id], {"day": day.isoformat()})

    # --- simulator's own stats (not part of the Zencoder API) ------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.Response:
        """Counters and this process's CPU seconds, to measure the simulator apart in benchmarks."""
        stats = self.stats
        usage = resource.getrusage(resource.RUSAGE_SELF)
        body = {
            "token_requests": stats.token_requests.total(),
            "tokens_issued": stats.tokens_issued.total(),
            "usage_requests": stats.usage_requests.total(),
            "responses": {str(k): v for k, v in sorted(stats.responses.items())},
            "max_in_flight": stats.max_in_flight,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "max_rss_kib": usage.ru_maxrss,
        }
        return web.json_response(body)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Listen on host:port (0: an ephemeral port) and fill in the URLs; with
        ``ssl_context`` (a server context) over HTTPS."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        scheme = "http" if ssl_context is None else "https"
        self.base_url = f"{scheme}://{shown}:{bound_port}"
        self.token_url = self.base_url + TOKEN_PATH
        self.usage_url = self.base_url + USAGE_PATH

    async def stop(self) -> None:
        """Close the listener and every open connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@asynccontextmanager
async def running_simulator(
    settings: SimulatorSettings,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Simulator]:
    """Serve a simulator for the duration of the block (over HTTPS given ``ssl_context``)."""
    sim = Simulator(settings)
    await sim.start(host, port, ssl_context=ssl_context)
    try:
        yield sim
    finally:
        await sim.stop()


def serve(
    settings: SimulatorSettings,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    on_start: Callable[[Simulator], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM (blocking); ``on_start`` runs once the port is bound.

    On uvloop when installed, like the collector: the simulator shares the machine with the
    clients it serves in tests and benchmarks, so its CPU is taken from theirs.
    """
    from collector.loop import run_async  # the CLI's loop choice (and its opt-out variable)

    run_async(_serve(settings, host, port, on_start))


async def _serve(
    settings: SimulatorSettings,
    host: str,
    port: int,
    on_start: Callable[[Simulator], None] | None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with running_simulator(settings, host, port) as sim:
            if on_start is not None:
                on_start(sim)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
