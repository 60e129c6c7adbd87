"""The Zencoder Analytics API client: one connection pool, every tenant, no transport error leaks.

::

    async with ApiClient(cfg.api) as client:
        fetched = await client.fetch_day(tenant, day)   # FetchedDay or an ApiError subclass

One request for one tenant-day goes like this:

1. a tenant parked as ``auth_failed`` (:class:`~collector.auth.AuthFailures`) fails at once, without
   touching the network, until its park ends or its credentials change;
2. OAuth tenants get a token from the per-tenant cache (:class:`~collector.auth.TokenProvider`:
   refreshed ahead of expiry, one refresh at a time per tenant); API-key tenants send
   ``zencoder-api-key``. The token is fetched *before* the request queues for a global slot, so a
   slow token endpoint for one tenant never holds a slot other tenants need;
3. the request passes the tenant's token bucket, the optional global bucket and the global
   concurrency cap (:class:`~collector.ratelimit.RateLimiter`), then goes out with the configured
   timeout;
4. the status decides: 200 is validated (:func:`~collector.models.parse_usage`; HTML, bad JSON,
   missing fields, wrong types, negative counts, another day -> :class:`BadResponse`); 401 on a
   token invalidates it, refreshes once and retries once, a second 401 is an :class:`AuthError`;
   429 and 503 are :class:`RateLimited` with ``Retry-After`` parsed (seconds or HTTP-date) and
   pause that tenant's bucket; other 5xx :class:`ServerError`; other 4xx :class:`RequestRejected`
   with the API's message (``message`` or ``error.message``); a 3xx names its ``Location`` and is
   not followed. Connection errors and timeouts become :class:`TransportError` and
   :class:`ApiTimeout`; the request itself goes through the process's aiohttp session
   (:class:`~collector.client_transport.Transport`: one deadline, body caps, proxies);
5. transient errors are retried by :class:`~collector.retry.Retrier` (bounded by attempts and
   time, full jitter, Retry-After honoured) unless ``retry=False``.

:class:`ClientMetrics` counts requests by tenant and outcome, token requests, rate-limit and
retry waits, for ``/metrics``. Secrets appear in no log line, exception, repr or metric: every
text from the server goes through :func:`~collector.log.scrub` (the tenant's secrets, every
registered secret and token, credential shapes), and a 200 body that echoes the credential sent
with it has it replaced by ``***`` before anything reads or stores it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import structlog

from collector import __version__
from collector.auth import (
    AuthFailures,
    Credentials,
    HttpReply,
    TokenCache,
    TokenProvider,
    error_message,
    reload_secrets,
    secret_values,
)
from collector.client_transport import (
    BodyBudget,
    BodyBudgetExhausted,
    BodyTooLarge,
    InvalidRequest,
    ProxyRoutes,
    Transport,
)
from collector.errors import (
    ApiTimeout,
    AuthError,
    BadResponse,
    RateLimited,
    RequestRejected,
    ServerError,
    TransportError,
)
from collector.log import scrub
from collector.models import UsageResponse, body_digest, parse_usage
from collector.ratelimit import RateLimiter, RateSettings
from collector.retry import (
    Retrier,
    RetryPolicy,
    RetrySettings,
    Wait,
    parse_retry_after,
    waits_disabled,
)

log = structlog.get_logger(__name__)

USAGE_PATH = "/api/v1/data/usage"
MAX_BODY_BYTES = 32 * 1024 * 1024
"""A day's payload is kilobytes; anything this big is not the documented API."""
TOKEN_CONNECTION_HEADROOM = 16
"""Connections beyond the usage-request cap (the session's connection limit is the sum), so
token requests never queue behind usage requests."""
MASK = b"***"


class ApiSettings(Protocol):
    """The shape of ``ApiConfig``."""

    @property
    def base_url(self) -> str: ...
    @property
    def token_url(self) -> str: ...
    @property
    def timeout(self) -> dt.timedelta: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def rate_limit(self) -> RateSettings: ...
    @property
    def global_rate_limit(self) -> RateSettings | None: ...
    @property
    def retry(self) -> RetrySettings: ...


@dataclass(frozen=True)
class FetchedDay:
    """One tenant-day as the API returned it: the validated model and the raw body."""

    tenant: str
    day: dt.date
    response: UsageResponse
    payload: str  # the response body as received: what the state store keeps
    digest: str  # sha256 of the body: the day's content hash


@dataclass
class ClientMetrics:
    """Counters for ``/metrics``; keys are tenant ids (and an outcome where it says so).

    ``requests`` outcomes: ``ok`` (2xx), ``unauthorized`` (401), ``rate_limited`` (429/503),
    ``server_error`` (other 5xx), ``rejected`` (other 4xx and 3xx), ``timeout``,
    ``transport_error``. ``token_requests`` outcomes: ``ok``, ``rejected``, ``error``.
    """

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    request_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    bad_responses: Counter[str] = field(default_factory=Counter)
    token_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    token_refreshes: Counter[str] = field(default_factory=Counter)
    rate_limit_wait_seconds: defaultdict[str, float] = field(
        default_factory=lambda: defaultdict(float)
    )
    retries: Counter[str] = field(default_factory=Counter)
    retry_wait_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    retry_after_clamped: Counter[str] = field(default_factory=Counter)

    def count_token_request(self, tenant: str, outcome: str) -> None:
        """Record one token request and its outcome."""
        self.token_requests[(tenant, outcome)] += 1
        if outcome == "ok":
            self.token_refreshes[tenant] += 1

    def count_wait(self, tenant: str, wait: Wait) -> None:
        """Record one retry and the wait planned before it."""
        self.retries[tenant] += 1
        self.retry_wait_seconds[tenant] += wait.seconds


def _status_outcome(status: int) -> str:
    if status == 401:
        return "unauthorized"
    if status in (429, 503):
        return "rate_limited"
    if status >= 500:
        return "server_error"
    if 200 <= status < 300:
        return "ok"
    return "rejected"


def _seconds(value: Any) -> float:
    total = getattr(value, "total_seconds", None)
    return float(total() if callable(total) else value)


class ApiClient:
    """Fetches tenant-days from the usage API; use as ``async with ApiClient(cfg.api) as c``.

    Everything is built from ``api`` (an ``ApiConfig``); the keyword arguments replace one part,
    for tests or for sharing state across a config reload: ``limiter`` (buckets and the
    concurrency cap), ``retry_policy``, ``token_cache``, ``auth_failures``, ``body_budget`` (the
    memory all bodies being read may hold; default: the process's, 256 MiB), ``proxies`` (default:
    read from the environment and ``.netrc`` once, when the client is built), ``max_body``.
    """

    def __init__(
        self,
        api: ApiSettings,
        *,
        limiter: RateLimiter | None = None,
        retry_policy: RetryPolicy | None = None,
        token_cache: TokenCache | None = None,
        auth_failures: AuthFailures | None = None,
        body_budget: BodyBudget | None = None,
        proxies: ProxyRoutes | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        self.api = api
        self.metrics = ClientMetrics()
        if limiter is None:
            limiter = RateLimiter(
                api.rate_limit,
                max_concurrency=api.max_concurrency,
                global_rate=api.global_rate_limit,
            )
        self.limiter = limiter
        policy = retry_policy if retry_policy is not None else RetryPolicy.from_config(api.retry)
        self.retrier = Retrier(policy, on_wait=self.metrics.count_wait)
        self.auth_failures = auth_failures if auth_failures is not None else AuthFailures()
        self._tokens = TokenProvider(
            api.token_url,
            self._post_json,
            cache=token_cache if token_cache is not None else TokenCache(),
            failures=self.auth_failures,
            on_token_request=self.metrics.count_token_request,
        )
        self._usage_url = api.base_url.rstrip("/") + USAGE_PATH
        self._timeout = _seconds(api.timeout)
        self._body_budget = body_budget
        self._proxies = proxies if proxies is not None else ProxyRoutes()
        self._max_body = max_body
        self._http: Transport | None = None

    def __repr__(self) -> str:
        tokens = len(self.token_cache)
        return f"ApiClient(base_url={self.api.base_url!r}, tenants_with_tokens={tokens})"

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> ApiClient:
        headers = {"User-Agent": f"zencoder-collector/{__version__}", "Accept": "application/json"}
        self._http = Transport(
            headers=headers,
            max_body=self._max_body,
            connections=self.api.max_concurrency + TOKEN_CONNECTION_HEADROOM,
            timeout=self._timeout,
            budget=self._body_budget,
            proxies=self._proxies,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel token requests in flight and close the HTTP connections."""
        await self._tokens.aclose()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # --- state the pipeline and /status read ----------------------------------------------------

    @property
    def token_cache(self) -> TokenCache:
        """Per-tenant tokens (no token value is ever exposed through its repr)."""
        return self._tokens.cache

    def forget_token(self, tenant_id: str) -> None:
        """Drop the tenant's cached token; the next request gets a new one."""
        self.token_cache.invalidate(tenant_id)

    def forget_tenant(self, tenant_id: str) -> None:
        """Drop everything kept about a tenant that left the config (token, bucket, streak)."""
        self.token_cache.forget(tenant_id)
        self.limiter.forget(tenant_id)
        self.auth_failures.forget(tenant_id)

    def parked_until(self, tenant: str | Credentials) -> dt.datetime | None:
        """When an ``auth_failed`` tenant will be tried again (None if it is not parked).

        Pass the tenant's config rather than its id where possible: a changed credentials
        fingerprint (the user fixed the secret) then lifts the park at once.
        """
        if isinstance(tenant, str):
            return self.auth_failures.parked_until(tenant)
        return self.auth_failures.parked_until(tenant.id, tenant.credentials_fingerprint)

    # --- fetching -------------------------------------------------------------------------------

    async def fetch_day(
        self, tenant: Credentials, day: dt.date, *, retry: bool = True
    ) -> FetchedDay:
        """The tenant's usage for one day; raises only :class:`~collector.errors.ApiError`\\ s.

        Transient failures are retried under the configured policy unless ``retry=False``.
        """
        if not retry:
            return await self._fetch_once(tenant, day)
        return await self.retrier.run(lambda: self._fetch_once(tenant, day), tenant=tenant.id)

    async def check_credentials(self, tenant: Credentials) -> None:
        """Make one real request for today (no retries); raises the error if it fails."""
        await self.fetch_day(tenant, dt.datetime.now(dt.UTC).date(), retry=False)

    async def _fetch_once(self, tenant: Credentials, day: dt.date) -> FetchedDay:
        self._refuse_if_parked(tenant)
        self._refuse_if_paused(tenant)
        # An ISO date needs no escaping: the query is built as text, not through urlencode.
        query = "day=" + day.isoformat()
        if tenant.auth_mode == "api_key":
            reply = await self._get_usage(tenant, query, self._api_key_headers(tenant))
            if reply.status == 401:
                self.auth_failures.record_failure(
                    tenant.id,
                    "the API rejected the API key (HTTP 401)",
                    fingerprint=tenant.credentials_fingerprint,
                )
                raise AuthError("the API rejected the API key", tenant=tenant.id, status=401)
            sent = tenant.api_key.get_secret_value() if tenant.api_key is not None else ""
        else:
            reply, sent = await self._get_with_token(tenant, query)
        self.auth_failures.record_success(tenant.id)
        if sent.encode() in reply.body:
            # The server echoed the credential we sent: it goes no further than this line.
            reply = HttpReply(reply.status, reply.body.replace(sent.encode(), MASK), reply.headers)
        return self._interpret(tenant, day, reply)

    async def _get_with_token(self, tenant: Credentials, query: str) -> tuple[HttpReply, str]:
        """The reply and the access token it was sent with."""
        state = await self._tokens.token_for(tenant)
        reply = await self._get_usage(
            tenant, query, {"Authorization": f"Bearer {state.access_token}"}
        )
        if reply.status != 401:
            return reply, state.access_token
        # The token expired early or was revoked: drop it (only if no one else has yet, so many
        # concurrent 401s cause one refresh), get a fresh one, and try exactly once more.
        fingerprint = tenant.credentials_fingerprint
        if self.token_cache.invalidate(tenant.id, state):
            log.info("token rejected with 401; refreshing", tenant=tenant.id)
            self.auth_failures.record_failure(
                tenant.id, "401 with a cached token", fingerprint=fingerprint
            )
        state = await self._tokens.token_for(tenant)
        reply = await self._get_usage(
            tenant, query, {"Authorization": f"Bearer {state.access_token}"}
        )
        if reply.status != 401:
            return reply, state.access_token
        if self.token_cache.invalidate(tenant.id, state):
            self.auth_failures.record_failure(
                tenant.id, "the API rejected a fresh token (HTTP 401)", fingerprint=fingerprint
            )
        raise AuthError(
            "the API rejected a fresh token (HTTP 401 twice in a row)", tenant=tenant.id, status=401
        )

    def _refuse_if_parked(self, tenant: Credentials) -> None:
        # The fingerprint (an HMAC) is only worth computing for a tenant that is parked at all.
        if not self.auth_failures.is_parked(tenant.id):
            return
        if not self.auth_failures.is_parked(tenant.id, tenant.credentials_fingerprint):
            return
        # A secret file may have been fixed since: re-read it before refusing.
        reload_secrets(tenant)
        until = self.auth_failures.parked_until(tenant.id, tenant.credentials_fingerprint)
        if until is None:
            return
        reason = self.auth_failures.reason(tenant.id) or "authentication failed"
        raise AuthError(
            f"parked as auth_failed until {until:%Y-%m-%d %H:%M:%S} UTC after repeated "
            f"authentication failures (last: {reason})",
            tenant=tenant.id,
        )

    def _refuse_if_paused(self, tenant: Credentials) -> None:
        paused = self.limiter.paused_for(tenant.id)
        if paused > self.retrier.policy.max_time:
            raise RateLimited(
                f"paused for another {paused:.0f}s by the API's Retry-After",
                tenant=tenant.id,
                retry_after=paused,
            )

    @staticmethod
    def _api_key_headers(tenant: Credentials) -> dict[str, str]:
        key = tenant.api_key.get_secret_value() if tenant.api_key is not None else ""
        if not key:
            raise AuthError("no api_key configured", tenant=tenant.id)
        return {"zencoder-api-key": key}

    async def _get_usage(
        self, tenant: Credentials, query: str, headers: Mapping[str, str]
    ) -> HttpReply:
        rate = getattr(tenant, "rate_limit", None)
        # acquire/release rather than a context manager: a generator-based one costs a few
        # microseconds per request, and every request passes here.
        waited = await self.limiter.acquire(tenant.id, rate)
        self.metrics.rate_limit_wait_seconds[tenant.id] += waited
        started = time.monotonic()
        try:
            reply = await self._send(
                "GET", f"{self._usage_url}?{query}", headers=headers, tenant=tenant
            )
        except ApiTimeout:
            self.metrics.requests[(tenant.id, "timeout")] += 1
            raise
        except TransportError:
            self.metrics.requests[(tenant.id, "transport_error")] += 1
            raise
        finally:
            self.limiter.release(tenant.id)
            self.metrics.request_seconds[tenant.id] += time.monotonic() - started
        self.metrics.requests[(tenant.id, _status_outcome(reply.status))] += 1
        return reply

    async def _post_json(self, url: str, body: Mapping[str, str]) -> HttpReply:
        return await self._send("POST", url, json_body=body)

    async def _send(
        self,
        method: str,
        url: str,
        *,
        json_body: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        tenant: Credentials | None = None,
    ) -> HttpReply:
        """One HTTP exchange; every transport failure becomes TransportError or ApiTimeout."""
        http = self._http
        if http is None:
            raise RuntimeError("ApiClient is not open: use it as 'async with ApiClient(...)'")
        tenant_id = tenant.id if tenant is not None else None
        what = "token request" if json_body is not None else "usage request"
        try:
            if json_body is None:
                return await http.request(method, url, headers=headers)
            return await http.request(
                method,
                url,
                headers={**(headers or {}), "Content-Type": "application/json"},
                body=json.dumps(json_body).encode(),
            )
        except TimeoutError:
            raise ApiTimeout(
                f"{what}: no complete response within {self._timeout:g}s", tenant=tenant_id
            ) from None
        except BodyTooLarge as exc:
            raise BadResponse(
                f"{what}: response larger than {exc.limit} bytes",
                tenant=tenant_id,
                status=exc.status,
            ) from None
        except BodyBudgetExhausted as exc:
            raise TransportError(
                f"{what}: response bodies in flight fill the {exc.budget >> 20} MiB memory budget; "
                "retried later",
                tenant=tenant_id,
                status=exc.status,
            ) from None
        except InvalidRequest as exc:
            # Never the header's value: it may be a token. The message names the header only.
            raise TransportError(f"{what} could not be sent: {exc}", tenant=tenant_id) from None
        except OSError as exc:
            detail = scrub(str(exc), secret_values(tenant) if tenant is not None else ())
            raise TransportError(f"{what} failed: {detail}", tenant=tenant_id) from None

    # --- interpreting a usage response ----------------------------------------------------------

    def _interpret(self, tenant: Credentials, day: dt.date, reply: HttpReply) -> FetchedDay:
        status = reply.status
        if status == 200:
            try:
                return self._parse_day(tenant.id, day, reply)
            except BadResponse as exc:
                self.metrics.bad_responses[tenant.id] += 1
                exc.body = reply.body  # raw first: the caller quarantines the day with it
                raise
        message = error_message(reply.body)
        shown = scrub(message, secret_values(tenant)) if message else "no error message"
        if status in (429, 503):
            retry_after = parse_retry_after(reply.headers.get("Retry-After"))
            self._pause(tenant.id, retry_after)
            raise RateLimited(
                f"rate limited: {shown}", tenant=tenant.id, status=status, retry_after=retry_after
            )
        if status >= 500:
            raise ServerError(f"server error: {shown}", tenant=tenant.id, status=status)
        if 300 <= status < 400:
            location = reply.headers.get("Location", "?")
            raise RequestRejected(
                f"unexpected redirect to {scrub(location, secret_values(tenant))}; "
                "check api.base_url",
                tenant=tenant.id,
                status=status,
            )
        if status >= 400:
            raise RequestRejected(
                f"the API rejected the request: {shown}", tenant=tenant.id, status=status
            )
        raise BadResponse(
            f"unexpected HTTP {status} instead of 200", tenant=tenant.id, status=status
        )

    def _pause(self, tenant_id: str, retry_after: float | None) -> None:
        if retry_after is None:
            return  # garbage or no Retry-After: the retry backoff applies
        policy = self.retrier.policy
        seconds = policy.clamp_retry_after(retry_after)
        if seconds < retry_after:
            self.metrics.retry_after_clamped[tenant_id] += 1
        if not waits_disabled():
            self.limiter.pause(tenant_id, seconds)

    @staticmethod
    def _parse_day(tenant_id: str, day: dt.date, reply: HttpReply) -> FetchedDay:
        body = reply.body
        content_type = reply.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not body.strip():
            raise BadResponse("HTTP 200 with an empty body", tenant=tenant_id, status=200)
        if "html" in content_type or body.lstrip()[:1] == b"<":
            raise BadResponse(
                f"HTTP 200 with an HTML page instead of JSON (Content-Type: {content_type or '?'})",
                tenant=tenant_id,
                status=200,
            )
        response = parse_usage(body, tenant=tenant_id)
        other_days = sorted({d.day.isoformat() for d in response.data.daily if d.day != day})
        if other_days:
            raise BadResponse(
                f"asked for day {day.isoformat()} but the response covers {other_days}",
                tenant=tenant_id,
                status=200,
            )
        # The body as received is what the store keeps, and its hash is the day's content hash:
        # no second decoding or encoding. A re-fetch that returned the same figures in another
        # order would count as changed and be delivered once more, which idempotent sinks absorb.
        try:
            payload = body.decode()
        except UnicodeDecodeError:
            raise BadResponse("HTTP 200 with a body that is not UTF-8", tenant=tenant_id) from None
        return FetchedDay(
            tenant=tenant_id,
            day=day,
            response=response,
            payload=payload,
            digest=body_digest(body),
        )
