"""Tenant credentials: OAuth2 token cache with single-flight refresh, and auth-failure parking.

Two schemes (see zencoder-api.md): OAuth2 ``client_credentials`` (``POST token_url`` with a JSON
body, then ``Authorization: Bearer <access_token>``) or an API key (``zencoder-api-key`` header,
no token at all).

The token logic is split in two:

- :class:`TokenState` / :class:`TokenCache` decide, without any I/O, whether a cached token is
  still usable and when to refresh it: ``refresh_margin`` ahead of expiry, that is
  ``max(60 s, 10 % of the lifetime)`` but never more than half the lifetime. The announced
  ``expires_in`` is sanitized first (:func:`sanitize_expires_in`). A token is cached together with
  the tenant's ``credentials_fingerprint``; a different fingerprint (a changed secret) drops it.
- :class:`TokenProvider` does the refreshing: at most one token request per tenant at a time,
  however many requests wait for it (one ``asyncio.Task`` per tenant, awaited through
  ``asyncio.shield`` so a cancelled waiter does not cancel the others' refresh). Tenants never
  share a lock, so a slow token endpoint for one tenant adds no latency for another, and a failing
  token request releases every waiter with the same error.

:class:`AuthFailures` parks a tenant as ``auth_failed`` after two authentication failures in a
row (401 on the usage endpoint, credentials refused by the token endpoint), for 15 minutes, then
30, 60, ... up to 6 hours, so a tenant with bad credentials is retried on a long backoff instead
of in a loop. Failures seen by many concurrent requests for the same token count once.

No secret ever leaves this module in a message: errors are built from status codes, the API's
own ``errors`` text (scrubbed) and tenant ids. A token is registered with the log redactor the
moment it arrives, so no later text (a log line, an echoed body) can carry it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from pydantic import SecretStr

from collector.errors import (
    AuthError,
    BadResponse,
    RateLimited,
    RequestRejected,
    ServerError,
    TransientApiError,
)
from collector.log import register_token, scrub
from collector.retry import parse_retry_after

log = structlog.get_logger(__name__)

DEFAULT_LIFETIME = 3600.0
"""Seconds a token is trusted when ``expires_in`` is missing or unreadable."""
NONPOSITIVE_LIFETIME = 60.0
"""Seconds a token is used when ``expires_in`` is 0 or negative (see sanitize_expires_in)."""
MIN_LIFETIME = 1.0
"""Smallest lifetime accepted from a positive ``expires_in``."""
MAX_LIFETIME = 86400.0
"""Largest lifetime trusted (24 h, the real API's value); larger values are clamped."""
MIN_REFRESH_MARGIN = 60.0
REFRESH_MARGIN_SHARE = 0.1
FALLBACK_RETRY_REFRESH = 30.0
"""After a failed refresh that kept a still-valid token: seconds before trying to refresh again."""


# --- I/O-free token logic -----------------------------------------------------------------------


def sanitize_expires_in(raw: object) -> tuple[float, str | None]:
    """A sane token lifetime in seconds from whatever ``expires_in`` the endpoint sent.

    Returns ``(seconds, note)``; ``note`` says what was corrected (None if the value was fine):

    - missing, ``null``, a boolean, or not a number -> :data:`DEFAULT_LIFETIME` (1 h);
    - a numeric string (``"3600"``) -> parsed;
    - 0 or negative -> :data:`NONPOSITIVE_LIFETIME` (60 s). Taken literally the token would be
      expired before its first use, and asking for a new one on every request would hammer the
      token endpoint; one minute bounds the cost, and if the token really is dead, the 401 path
      (invalidate, refresh, retry once) recovers;
    - below :data:`MIN_LIFETIME` (1 s) -> 1 s;
    - above :data:`MAX_LIFETIME` (24 h), infinite -> 24 h.
    """
    value: float | None = None
    if isinstance(raw, bool) or raw is None:
        value = None
    elif isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or math.isnan(value):
        return DEFAULT_LIFETIME, f"expires_in {_describe(raw)} is not a number; assuming 1 hour"
    if value <= 0:
        return NONPOSITIVE_LIFETIME, f"expires_in {_describe(raw)} is not positive; using 60 s"
    if value < MIN_LIFETIME:
        return MIN_LIFETIME, f"expires_in {_describe(raw)} is below 1 s; using 1 s"
    if value > MAX_LIFETIME:
        return MAX_LIFETIME, f"expires_in {_describe(raw)} is above 24 h; clamped to 24 h"
    return value, None


def _describe(raw: object) -> str:
    if raw is None:
        return "missing"
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def refresh_margin(lifetime: float) -> float:
    """How long before expiry to refresh: max(60 s, 10 %), but at most half the lifetime."""
    return min(max(MIN_REFRESH_MARGIN, REFRESH_MARGIN_SHARE * lifetime), lifetime / 2)


@dataclass(frozen=True)
class TokenState:
    """A cached access token; times are on the cache's (monotonic) clock."""

    access_token: str = field(repr=False)
    obtained_at: float
    lifetime: float
    fingerprint: str = field(repr=False)
    generation: int = 0
    refresh_at: float = 0.0

    @property
    def expires_at(self) -> float:
        """When the token stops being usable."""
        return self.obtained_at + self.lifetime

    def is_usable(self, now: float) -> bool:
        """True until the token expires."""
        return now < self.expires_at

    def needs_refresh(self, now: float) -> bool:
        """True once the refresh margin before expiry is reached (or after expiry)."""
        return now >= self.refresh_at

    def __repr__(self) -> str:
        return (
            f"TokenState(generation={self.generation}, lifetime={self.lifetime:.0f}s, "
            f"access_token='***')"
        )


class TokenCache:
    """Per-tenant tokens; entries carry the credentials fingerprint they were obtained with."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tokens: dict[str, TokenState] = {}
        self._generations: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, tenant_id: object) -> bool:
        return tenant_id in self._tokens

    def __repr__(self) -> str:
        return f"TokenCache(tenants={sorted(self._tokens)!r})"

    def get(self, tenant_id: str, fingerprint: str | None = None) -> TokenState | None:
        """The tenant's token, if any; dropped first if ``fingerprint`` differs (secret changed)."""
        state = self._tokens.get(tenant_id)
        if state is not None and fingerprint is not None and state.fingerprint != fingerprint:
            del self._tokens[tenant_id]
            log.info("credentials changed; cached token dropped", tenant=tenant_id)
            return None
        return state

    def next_generation(self, tenant_id: str) -> int:
        """A new, increasing number for the tenant's next token (or token request)."""
        generation = self._generations.get(tenant_id, 0) + 1
        self._generations[tenant_id] = generation
        return generation

    def store(
        self, tenant_id: str, access_token: str, expires_in: object, fingerprint: str
    ) -> TokenState:
        """Cache a fresh token; ``expires_in`` is sanitized (an odd value is logged)."""
        lifetime, note = sanitize_expires_in(expires_in)
        if note is not None:
            log.warning("odd token lifetime", tenant=tenant_id, note=note)
        now = self.clock()
        state = TokenState(
            access_token=access_token,
            obtained_at=now,
            lifetime=lifetime,
            fingerprint=fingerprint,
            generation=self.next_generation(tenant_id),
            refresh_at=now + lifetime - refresh_margin(lifetime),
        )
        self._tokens[tenant_id] = state
        return state

    def postpone_refresh(self, tenant_id: str, state: TokenState) -> TokenState:
        """After a failed refresh, keep using ``state`` and try again a little later."""
        now = self.clock()
        delay = min(FALLBACK_RETRY_REFRESH, max(0.0, (state.expires_at - now) / 2))
        kept = TokenState(
            access_token=state.access_token,
            obtained_at=state.obtained_at,
            lifetime=state.lifetime,
            fingerprint=state.fingerprint,
            generation=state.generation,
            refresh_at=now + delay,
        )
        if self._tokens.get(tenant_id) is state:
            self._tokens[tenant_id] = kept
        return kept

    def invalidate(self, tenant_id: str, state: TokenState | None = None) -> bool:
        """Drop the tenant's token; with ``state``, only if that token is still the cached one.

        The compare step is what keeps 200 requests that all got a 401 with the same token from
        causing 200 refreshes: the first one drops it, the rest find a fresh token or join the
        refresh already running.
        """
        current = self._tokens.get(tenant_id)
        if current is None or (state is not None and current is not state):
            return False
        del self._tokens[tenant_id]
        return True

    def forget(self, tenant_id: str) -> None:
        """Drop everything about a tenant (removed from the config)."""
        self._tokens.pop(tenant_id, None)
        self._generations.pop(tenant_id, None)


# --- auth-failure parking -----------------------------------------------------------------------


@dataclass
class _Streak:
    count: int = 0
    last_event: object = None
    reason: str = ""
    fingerprint: str | None = None
    parked_until: float | None = None
    parkings: int = 0


class AuthFailures:
    """Counts authentication failures in a row per tenant and parks the tenant after ``threshold``.

    A parked tenant is skipped until its park expires; the park lasts ``initial_park`` seconds and
    doubles each time the tenant is parked again without a success in between, up to
    ``max_park``. Parking is logged once per park; a success ends the streak (logged once too).
    A changed credentials fingerprint ends a park at once: the user fixed the secret.
    """

    def __init__(
        self,
        *,
        threshold: int = 2,
        initial_park: float = 900.0,
        max_park: float = 6 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.initial_park = initial_park
        self.max_park = max_park
        self.clock = clock
        self._streaks: dict[str, _Streak] = {}

    def record_failure(
        self,
        tenant_id: str,
        reason: str,
        *,
        fingerprint: str | None = None,
        event: object = None,
    ) -> bool:
        """Count one failure; returns True if the tenant is parked now.

        ``event`` identifies the failure (e.g. the token generation that got the 401): a failure
        with the same event as the previous one is the same failure seen by another concurrent
        request and does not count again. ``None`` always counts.
        """
        streak = self._streaks.setdefault(tenant_id, _Streak())
        if event is not None and event == streak.last_event:
            return self._parked(streak)
        streak.last_event = event
        streak.count += 1
        streak.reason = reason
        streak.fingerprint = fingerprint
        if streak.count >= self.threshold and not self._parked(streak):
            seconds = min(self.max_park, self.initial_park * 2.0 ** min(streak.parkings, 30))
            streak.parked_until = self.clock() + seconds
            streak.parkings += 1
            log.warning(
                "tenant parked as auth_failed",
                tenant=tenant_id,
                failures_in_a_row=streak.count,
                retry_in_seconds=round(seconds),
                reason=reason,
            )
        return self._parked(streak)

    def record_success(self, tenant_id: str) -> None:
        """End the tenant's failure streak (authentication worked)."""
        streak = self._streaks.pop(tenant_id, None)
        if streak is not None and streak.parkings:
            log.info("authentication works again", tenant=tenant_id)

    def _parked(self, streak: _Streak) -> bool:
        return streak.parked_until is not None and self.clock() < streak.parked_until

    def is_parked(self, tenant_id: str, fingerprint: str | None = None) -> bool:
        """True while the tenant is parked; a different ``fingerprint`` than at parking unparks."""
        streak = self._streaks.get(tenant_id)
        if streak is None or not self._parked(streak):
            return False
        if fingerprint is not None and streak.fingerprint not in (None, fingerprint):
            del self._streaks[tenant_id]
            log.info("credentials changed; auth_failed park lifted", tenant=tenant_id)
            return False
        return True

    def parked_until(self, tenant_id: str, fingerprint: str | None = None) -> dt.datetime | None:
        """When the park ends (UTC wall time), or None if the tenant is not parked."""
        if not self.is_parked(tenant_id, fingerprint):
            return None
        until = self._streaks[tenant_id].parked_until
        remaining = (until if until is not None else 0.0) - self.clock()
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=max(0.0, remaining))

    def reason(self, tenant_id: str) -> str | None:
        """The last failure's reason, while a streak lasts."""
        streak = self._streaks.get(tenant_id)
        return streak.reason if streak is not None else None

    def forget(self, tenant_id: str) -> None:
        """Drop a removed tenant's streak."""
        self._streaks.pop(tenant_id, None)


# --- the async part: token requests, single flight per tenant -----------------------------------


class Credentials(Protocol):
    """What auth needs from a ``TenantConfig``."""

    @property
    def id(self) -> str: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def client_secret(self) -> SecretStr | None: ...
    @property
    def api_key(self) -> SecretStr | None: ...
    @property
    def auth_mode(self) -> str: ...
    @property
    def credentials_fingerprint(self) -> str: ...


@dataclass(frozen=True)
class HttpReply:
    """A complete HTTP response: status, body bytes and headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


PostJson = Callable[[str, Mapping[str, str]], Awaitable[HttpReply]]
"""Sends a JSON body to a URL; raises only ``TransportError``/``ApiTimeout`` (the client's)."""


def secret_values(tenant: Credentials) -> list[str]:
    """The tenant's secret strings, for scrubbing text that might echo them."""
    values = []
    for secret in (tenant.client_secret, tenant.api_key):
        if secret is not None and secret.get_secret_value():
            values.append(secret.get_secret_value())
    return values


def error_message(body: bytes) -> str | None:
    """The message of ``{"message": ...}`` or ``{"error": {"message": ...}}``, unscrubbed."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return _envelope_message(payload)


def _envelope_message(payload: object) -> str | None:
    if not isinstance(payload, dict):
        return None
    message = payload.get("message")
    if isinstance(message, str) and message.strip():
        return message
    error = payload.get("error")  # {"error": {"message": ...}} or {"error": "..."}
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) and error.strip() else None


def reload_secrets(tenant: Credentials) -> None:
    """Re-read the tenant's secret files, if its config supports that (``reload_secrets()``)."""
    reload = getattr(tenant, "reload_secrets", None)
    if not callable(reload):
        return
    try:
        reload()
    except Exception as exc:  # a broken secret file must not take down the refresh
        log.warning(
            "could not re-read secrets; keeping the loaded ones",
            tenant=tenant.id,
            error=scrub(f"{type(exc).__name__}: {exc}", secret_values(tenant)),
        )


def _error_text(body: bytes, secrets: Iterable[str]) -> str:
    """The token endpoint's ``errors`` (or the usage API's ``message``) as one line of text."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return "no error details in the response"
    parts: list[str] = []
    if isinstance(payload, dict):
        errors = payload.get("errors")
        if isinstance(errors, list):
            parts.extend(str(e) for e in errors[:5])
        elif isinstance(errors, str):
            parts.append(errors)
        message = _envelope_message(payload) if not parts else None
        if message is not None:
            parts.append(message)
        code = payload.get("errorCode")
        if parts and isinstance(code, str):
            parts[-1] += f" ({code})"
    return scrub("; ".join(parts), secrets) if parts else "no error details in the response"


TokenEvent = Callable[[str, str], None]
"""Called with (tenant_id, outcome) after every token request: ok, rejected or error."""


class TokenProvider:
    """Hands out a valid token per tenant, refreshing it at most once at a time per tenant."""

    def __init__(
        self,
        token_url: str,
        post_json: PostJson,
        *,
        cache: TokenCache | None = None,
        failures: AuthFailures | None = None,
        on_token_request: TokenEvent | None = None,
    ) -> None:
        self.token_url = token_url
        self.cache = cache if cache is not None else TokenCache()
        self.failures = failures if failures is not None else AuthFailures()
        self._post = post_json
        self._on_token_request = on_token_request
        self._inflight: dict[str, asyncio.Task[TokenState]] = {}

    async def token_for(self, tenant: Credentials) -> TokenState:
        """A token for the tenant that is not due for refresh (or a still-valid fallback)."""
        state = self.cache.get(tenant.id, tenant.credentials_fingerprint)
        if state is not None and not state.needs_refresh(self.cache.clock()):
            return state
        task = self._inflight.get(tenant.id)
        if task is None:
            task = asyncio.create_task(self._refresh(tenant, state), name=f"token:{tenant.id}")
            self._inflight[tenant.id] = task
            task.add_done_callback(functools.partial(self._settled, tenant.id))
        # shield: a waiter that is cancelled must not cancel the refresh the others wait for.
        return await asyncio.shield(task)

    def _settled(self, tenant_id: str, task: asyncio.Task[TokenState]) -> None:
        if self._inflight.get(tenant_id) is task:
            del self._inflight[tenant_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported as lost

    async def _refresh(self, tenant: Credentials, stale: TokenState | None) -> TokenState:
        reload_secrets(tenant)
        fingerprint = tenant.credentials_fingerprint
        attempt = self.cache.next_generation(tenant.id)
        try:
            access_token, expires_in = await self._request(tenant)
        except AuthError as exc:
            self._count("rejected", tenant.id)
            self.failures.record_failure(
                tenant.id, exc.reason, fingerprint=fingerprint, event=("token-request", attempt)
            )
            raise
        except TransientApiError as exc:
            self._count("error", tenant.id)
            now = self.cache.clock()
            if stale is not None and stale.fingerprint == fingerprint and stale.is_usable(now):
                log.warning(
                    "token refresh failed; using the current token until it expires",
                    tenant=tenant.id,
                    reason=exc.reason,
                    expires_in_seconds=round(stale.expires_at - now),
                )
                return self.cache.postpone_refresh(tenant.id, stale)
            raise
        self._count("ok", tenant.id)
        register_token(tenant.id, access_token)  # hidden everywhere before anything can echo it
        state = self.cache.store(tenant.id, access_token, expires_in, fingerprint)
        log.debug("token obtained", tenant=tenant.id, lifetime_seconds=round(state.lifetime))
        return state

    def _count(self, outcome: str, tenant_id: str) -> None:
        if self._on_token_request is not None:
            self._on_token_request(tenant_id, outcome)

    async def _request(self, tenant: Credentials) -> tuple[str, object]:
        """POST the client_credentials grant; returns (access_token, raw expires_in)."""
        secret = tenant.client_secret.get_secret_value() if tenant.client_secret else ""
        if not tenant.client_id or not secret:
            raise AuthError("no client_id/client_secret configured", tenant=tenant.id)
        grant = {
            "client_id": tenant.client_id,
            "client_secret": secret,
            "grant_type": "client_credentials",
        }
        try:
            reply = await self._post(self.token_url, grant)
        except TransientApiError as exc:
            exc.tenant = exc.tenant or tenant.id
            raise
        secrets = secret_values(tenant)
        status = reply.status
        if status == 200:
            return self._parse_token(reply.body, tenant.id)
        details = _error_text(reply.body, secrets)
        if status in (400, 401, 403):
            raise AuthError(
                f"token endpoint rejected the credentials: {details}",
                tenant=tenant.id,
                status=status,
            )
        if status in (429, 503):
            raise RateLimited(
                f"token endpoint is throttling: {details}",
                tenant=tenant.id,
                status=status,
                retry_after=parse_retry_after(reply.headers.get("Retry-After")),
            )
        if status >= 500:
            raise ServerError(f"token endpoint failed: {details}", tenant=tenant.id, status=status)
        if 300 <= status < 400:
            location = scrub(reply.headers.get("Location", "?"), secrets)
            raise RequestRejected(
                f"token endpoint redirected to {location} (redirects are not followed); "
                "check api.token_url",
                tenant=tenant.id,
                status=status,
            )
        raise RequestRejected(
            f"token endpoint refused the request: {details}", tenant=tenant.id, status=status
        )

    @staticmethod
    def _parse_token(body: bytes, tenant_id: str) -> tuple[str, object]:
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = None
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise BadResponse(
                "token endpoint answered 200 without an access_token", tenant=tenant_id, status=200
            )
        return token.strip(), payload.get("expires_in")

    async def aclose(self) -> None:
        """Cancel token requests still in flight (client shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
