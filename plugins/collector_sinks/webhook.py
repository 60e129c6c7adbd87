"""The ``webhook`` sink: POSTs each tenant-day (or each batch) as signed JSON (Standard Webhooks).

Every request carries the three Standard Webhooks headers:

- ``webhook-id``: ``msg_`` + 32 hex digits of SHA-256 over (tenant, day, content hash, final), the
  same on every retry and every redelivery of the same content, so a receiver can deduplicate;
- ``webhook-timestamp``: the attempt's time in Unix seconds (each retry is signed afresh);
- ``webhook-signature``: ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")). A secret
  of the form ``whsec_<base64>`` is base64-decoded to get the key (the Standard Webhooks
  convention); any other secret is used as its UTF-8 bytes.

Delivery: redirects are never followed (a 3xx is a permanent error); 5xx, 408, 429 (honouring
``Retry-After`` in seconds or as an HTTP date), timeouts and connection errors are retried inside
the write with full-jitter backoff up to ``max_retries`` times, never past the write's ``timeout``,
and then raise :class:`~collector.errors.SinkTransientError` so the collector retries later. Any
other 4xx raises :class:`~collector.errors.SinkPermanentError` with the status and the start of
the response body: that is the dead-letter record. That body is the receiver's text and may echo
the request: the configured header values, the signing secret, tokens in the URL and every
registered secret are replaced by ``***`` before it goes into any error (see :func:`url_secrets`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import hashlib
import hmac
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import ConfigDict, Field, SecretStr, field_validator

from collector.plugin import (
    Batch,
    RetryPolicy,
    Sink,
    SinkConfig,
    SinkPermanentError,
    SinkTransientError,
    TenantDay,
    hookimpl,
    register_secrets,
    scrub,
    sleep,
    waits_disabled,
)
from collector_sinks import _serialize as ser

if TYPE_CHECKING:
    import aiohttp

DAY_EVENT: Final = "zencoder.usage.day"
BATCH_EVENT: Final = "zencoder.usage.batch"
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the Standard Webhooks prefix, not a secret
MAX_ERROR_BODY: Final = 500
"""Characters of a rejecting receiver's response body kept in the error (the dead-letter record)."""

# Headers the sink owns; a user-configured header may not replace them.
_RESERVED_HEADERS: Final = frozenset(
    {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "content-length"}
    | {"host", "transfer-encoding"}
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zencoder-collector")
    except PackageNotFoundError:
        return "0"


def signing_key(secret: str) -> bytes:
    """The HMAC key for a secret: base64-decoded after ``whsec_``, else the UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    return secret.encode("utf-8")


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one request (Standard Webhooks scheme ``v1``)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def message_id(days: Sequence[TenantDay]) -> str:
    """A ``webhook-id`` that depends only on the content delivered, never on time or attempt."""
    digest = hashlib.sha256()
    for day in sorted(days, key=lambda d: (d.tenant, d.day)):
        identity = f"{day.tenant}\x1f{day.day.isoformat()}\x1f{day.content_hash}\x1f{day.final}"
        digest.update(identity.encode("utf-8") + b"\x1e")
    return "msg_" + digest.hexdigest()[:32]


def url_secrets(url: str) -> list[str]:
    """Parts of a webhook URL that may be credentials: a password, query values, and path
    segments shaped like tokens (16+ characters, or 8+ with a digit, as in Slack's
    ``/services/T000/B000/XXXX``). Whole URLs with such parts count too."""
    parts = urlsplit(url)
    found = [parts.password or "", unquote(parts.password or "")]
    found += [value for _name, value in parse_qsl(parts.query)]
    for segment in parts.path.split("/"):
        if len(segment) >= 16 or (len(segment) >= 8 and any(c.isdigit() for c in segment)):
            found.append(segment)
    found = [value for value in found if value]
    if found:
        found += [url, parts.path + (f"?{parts.query}" if parts.query else "")]
    return list(dict.fromkeys(found))


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent
    or unreadable. A date in the past gives 0."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        now = now or dt.datetime.now(dt.UTC)
        return max(0.0, (when - now).total_seconds())
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


class WebhookSinkConfig(SinkConfig):
    """Settings of one ``webhook`` sink instance."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    type: Literal["webhook"] = "webhook"
    url: str = Field(description="The receiver's http(s) URL; redirects are not followed.")
    secret: SecretStr = Field(
        description="Signing secret: `whsec_<base64>` (Standard Webhooks) or any string, used "
        "as its UTF-8 bytes. Usually given as `secret_file:` or `${VAR}`."
    )
    mode: Literal["per_day", "batch"] = Field(
        default="per_day",
        description="per_day: one POST per tenant-day; batch: one POST per write call, "
        "carrying a list of tenant-days.",
    )
    request_timeout: dt.timedelta = Field(
        default=dt.timedelta(seconds=10),
        gt=dt.timedelta(0),
        description="Upper bound for one HTTP request (connect, send, answer).",
    )
    max_retries: int = Field(
        default=3, ge=0, le=20, description="Retries of one POST inside a write call."
    )
    backoff_initial: dt.timedelta = Field(
        default=dt.timedelta(seconds=1),
        ge=dt.timedelta(0),
        description="First backoff ceiling; doubles per retry (full jitter).",
    )
    backoff_max: dt.timedelta = Field(
        default=dt.timedelta(seconds=30),
        ge=dt.timedelta(0),
        description="Largest backoff ceiling between two retries.",
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Extra request headers (values are kept hidden like secrets); the "
        "webhook-* and content headers are the sink's own.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an absolute http:// or https:// URL")
        return value

    @field_validator("secret")
    @classmethod
    def _usable_secret(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        try:
            key = signing_key(secret)
        except (binascii.Error, ValueError):
            raise ValueError("a secret starting with whsec_ must continue in base64") from None
        if not key:
            raise ValueError("secret must not be empty")
        return value

    @field_validator("headers")
    @classmethod
    def _no_reserved_headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        clash = sorted(name for name in value if name.strip().lower() in _RESERVED_HEADERS)
        if clash:
            raise ValueError(f"headers may not set {', '.join(clash)}: the sink sets them itself")
        return value


@dataclass
class _Budget:
    """The time one write call may take; waits skipped by the testing switch still count."""

    started: float
    limit: float
    skipped: float = 0.0

    def allows(self, wait: float, then: float) -> bool:
        """Whether waiting ``wait`` seconds and then ``then`` more still fits."""
        return time.monotonic() - self.started + self.skipped + wait + then <= self.limit


@dataclass(frozen=True)
class _Failure:
    """Why one attempt failed, and whether (and when) to try again."""

    reason: str
    retryable: bool
    retry_after: float | None = None


class WebhookSink(Sink):
    """POSTs tenant-days as signed JSON to one URL."""

    type_name: ClassVar[str] = "webhook"
    Config: ClassVar[type[SinkConfig]] = WebhookSinkConfig

    def __init__(self, name: str, config: WebhookSinkConfig) -> None:
        super().__init__(name, config)
        self.config: WebhookSinkConfig = config
        self._session: aiohttp.ClientSession | None = None
        self._key = signing_key(config.secret.get_secret_value())
        parts = urlsplit(config.url)
        # Messages name the origin only: webhook URLs often carry tokens in the path or query.
        self._origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self._policy = RetryPolicy(
            max_attempts=config.max_retries + 1,
            max_time=config.timeout.total_seconds(),
            backoff_initial=config.backoff_initial.total_seconds(),
            backoff_max=config.backoff_max.total_seconds(),
        )
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not security relevant
        # What a receiver's error body may echo back: hidden in this sink's errors and in logs.
        self._secrets = [
            config.secret.get_secret_value(),
            *(value.get_secret_value() for value in config.headers.values()),
            *url_secrets(config.url),
        ]
        register_secrets(self._secrets)

    def __repr__(self) -> str:
        return (
            f"WebhookSink(name={self.name!r}, origin={self._origin!r}, mode={self.config.mode!r})"
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the HTTP session (connection pool); no request is sent."""
        import aiohttp  # only configs with a webhook sink pay for aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"zencoder-collector/{_version()}"},
                # Cookies from one receiver response must not ride along on later deliveries.
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def aclose(self) -> None:
        """Close the HTTP session; safe to call twice."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- writing --------------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """Deliver the batch: one POST per tenant-day (per_day) or one for all (batch).

        In per_day mode a tenant-day the receiver rejects (4xx) does not stop the others; the
        write then raises SinkPermanentError naming the rejected days. A transient failure stops
        the write at once (the receiver is unwell; the collector retries the batch later, and
        days already delivered are resent with the same webhook-id).
        """
        if not batch:
            return
        await self.open()
        budget = _Budget(time.monotonic(), self._policy.max_time)
        if self.config.mode == "batch":
            document = {"type": BATCH_EVENT, "days": [self._day_document(d) for d in batch]}
            body = ser.dumps(document).encode("utf-8")
            await self._deliver(message_id(batch), body, f"batch of {len(batch)}", budget)
            return
        rejected: list[SinkPermanentError] = []
        for day in batch:
            body = ser.dumps(self._day_document(day)).encode("utf-8")
            try:
                what = f"{day.tenant} {day.day.isoformat()}"
                await self._deliver(message_id([day]), body, what, budget)
            except SinkPermanentError as exc:
                rejected.append(exc)
        if len(rejected) == 1:
            raise rejected[0]
        if rejected:
            raise SinkPermanentError(
                f"{len(rejected)} of {len(batch)} tenant-days rejected; first: {rejected[0]}"
            )

    @staticmethod
    def _day_document(day: TenantDay) -> dict[str, Any]:
        return {"type": DAY_EVENT, **ser.day_document(day)}

    async def _deliver(self, msg_id: str, body: bytes, what: str, budget: _Budget) -> None:
        """POST one body, retrying transient failures within the write's time budget."""
        policy = self._policy
        attempt = 0
        while True:
            attempt += 1
            failure = await self._attempt(msg_id, body)
            if failure is None:
                return
            head = f"webhook sink {self.name!r}: POST {self._origin} ({what}, {msg_id})"
            if not failure.retryable:
                raise SinkPermanentError(f"{head}: {failure.reason}")
            if attempt >= policy.max_attempts:
                raise SinkTransientError(
                    f"{head}: {failure.reason}; gave up after {attempt} attempt(s)",
                    retry_after=failure.retry_after,
                )
            if failure.retry_after is not None:
                wait = policy.clamp_retry_after(failure.retry_after)
            else:
                wait = policy.backoff(attempt, self._rng)
            if not budget.allows(wait, then=self.config.request_timeout.total_seconds()):
                # Waiting would outlive the write's timeout: hand the wait to the collector.
                raise SinkTransientError(
                    f"{head}: {failure.reason}; next try in {wait:.1f}s would exceed the "
                    f"{policy.max_time:.0f}s write timeout",
                    retry_after=wait,
                )
            if waits_disabled():
                budget.skipped += wait
            await sleep(wait)

    async def _attempt(self, msg_id: str, body: bytes) -> _Failure | None:
        """One signed POST; None on 2xx, else why it failed."""
        import aiohttp  # loaded by open() already; see there

        session = self._session
        if session is None:
            return _Failure("the sink was closed during the write", retryable=True)
        timestamp = int(time.time())
        headers = {name: value.get_secret_value() for name, value in self.config.headers.items()}
        headers |= {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, msg_id, timestamp, body),
        }
        seconds = self.config.request_timeout.total_seconds()
        try:
            async with session.post(
                self.config.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=seconds),
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return None
                if 300 <= status < 400:
                    location = _origin_of(response.headers.get("Location", ""))
                    where = f" to {location}" if location else ""
                    return _Failure(
                        f"HTTP {status} redirect{where}: redirects are not followed; "
                        "set `url` to the final address",
                        retryable=False,
                    )
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if status >= 500 or status in (408, 429):
                    return _Failure(f"HTTP {status}", retryable=True, retry_after=retry_after)
                text = scrub(await _read_text(response), self._secrets, limit=MAX_ERROR_BODY)
                return _Failure(f"HTTP {status}: {text}" if text else f"HTTP {status}", False)
        except TimeoutError:
            return _Failure(f"no answer within {seconds:g}s (request_timeout)", retryable=True)
        except (aiohttp.ClientError, OSError) as exc:
            return _Failure(f"connection failed ({type(exc).__name__})", retryable=True)


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return ""
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


async def _read_text(response: aiohttp.ClientResponse) -> str:
    """Up to MAX_ERROR_BODY characters of the body, for the dead-letter record."""
    import aiohttp  # loaded by open() already; see there

    raw = b""
    try:
        # UTF-8 needs at most 4 bytes a character; a huge error page is not read to its end.
        while len(raw) < MAX_ERROR_BODY * 4:
            chunk = await response.content.read(MAX_ERROR_BODY * 4 - len(raw))
            if not chunk:
                break
            raw += chunk
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass  # what arrived is enough for the record
    return raw.decode("utf-8", errors="replace")[:MAX_ERROR_BODY]


@hookimpl
def collector_register_sinks() -> list[type[Sink]]:
    """Register the ``webhook`` sink type."""
    return [WebhookSink]


__all__ = [
    "BATCH_EVENT",
    "DAY_EVENT",
    "WebhookSink",
    "WebhookSinkConfig",
    "message_id",
    "parse_retry_after",
    "sign",
    "signing_key",
    "url_secrets",
]
