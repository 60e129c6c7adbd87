"""Bounded retries for API calls, decided by error class, with full-jitter exponential backoff.

What is retried is decided by the exception's class (``exc.retryable``, see
:mod:`collector.errors`): 5xx, 429/503, timeouts and connection errors are; every other 4xx and
every credentials failure is not. Neither is a :class:`~collector.errors.BadResponse` (a 200 whose
body is not the documented payload), although it is transient for the day: asking again at once
returns the same body, so the day is quarantined and asked for again next cycle instead.

A retried call is bounded twice: by a number of attempts and by a total time. A wait that would
end past the time budget is not started; the last error is raised at once instead, so the caller
can record the day as failed and plan it again.

Waits:

- the backoff before attempt ``n + 1`` is drawn uniformly from ``[0, min(backoff_max,
  backoff_initial * 2 ** (n - 1))]`` ("full jitter"), which spreads retries of many tenants apart;
- a :class:`~collector.errors.RateLimited` error that carries ``retry_after`` waits exactly that
  long instead (the server said when), clamped to ``retry_after_max`` (15 minutes by default) so an
  absurd value such as a day cannot stall a tenant; a clamp is reported once per tenant;
- a ``Retry-After`` that could not be parsed arrives as ``retry_after=None`` and gets the backoff.

The loop itself is tenacity's (:class:`Retrier`); this module supplies the policy through its
hooks and keeps only what tenacity has no words for: the Retry-After wait and its clamp, a stop
that refuses a wait ending past the budget, and the testing switch below.

Testing switch, in the spirit of stamina's testing mode: inside :func:`no_wait` (or with the
environment variable ``COLLECTOR_TESTING_NO_WAIT=1``) every wait is skipped, but attempts are
still counted, and the skipped waits still count against the time budget, so a test sees exactly
the attempts production would make, instantly.

Logging follows the Home Assistant coordinator habit: one warning when a tenant's calls start
failing transiently, one info line when they work again, and nothing in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import math
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
import tenacity

from collector.errors import BadResponse, RateLimited

T = TypeVar("T")

NOT_RETRIED_NOW: tuple[type[Exception], ...] = (BadResponse,)
"""Transient for the day (planned again next cycle) but not worth retrying within the cycle."""

NO_WAIT_ENV = "COLLECTOR_TESTING_NO_WAIT"
DEFAULT_RETRY_AFTER_MAX = 900.0
"""The longest a single Retry-After is honoured (seconds); longer values are clamped to this."""

log = structlog.get_logger(__name__)

_no_wait_depth = 0


def waits_disabled() -> bool:
    """True inside :func:`no_wait` or when ``COLLECTOR_TESTING_NO_WAIT`` is set to a true value."""
    if _no_wait_depth > 0:
        return True
    return os.environ.get(NO_WAIT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def no_wait() -> Iterator[None]:
    """Make every backoff and Retry-After wait zero while the block runs (tests only).

    A process-wide switch rather than a context variable: tasks the code under test started
    before the block began must see it too.
    """
    global _no_wait_depth
    _no_wait_depth += 1
    try:
        yield
    finally:
        _no_wait_depth -= 1


async def sleep(seconds: float) -> None:
    """``asyncio.sleep`` that honours the testing switch (still yields to the loop once)."""
    await asyncio.sleep(0 if waits_disabled() else max(0.0, seconds))


_DELAY_SECONDS = re.compile(r"\d{1,30}(?:\.\d{1,9})?")


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delay-seconds or an HTTP-date; ``None`` if unusable.

    Garbage (words, negative numbers, a date without a zone it could be read in) gives ``None`` so
    the caller falls back to backoff. A date in the past means "now" (0). No upper bound is applied
    here: :meth:`RetryPolicy.clamp_retry_after` clamps, so the absurd value can still be reported.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; a zone-less parse means the text was "-0000" style.
        when = when.replace(tzinfo=dt.UTC)
    reference = now if now is not None else dt.datetime.now(dt.UTC)
    return max(0.0, (when - reference).total_seconds())


class RetrySettings(Protocol):
    """The shape of ``ApiConfig.retry`` (durations as ``timedelta``)."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def max_time(self) -> Any: ...
    @property
    def backoff_initial(self) -> Any: ...
    @property
    def backoff_max(self) -> Any: ...


def _seconds(value: Any) -> float:
    total = getattr(value, "total_seconds", None)
    return float(total() if callable(total) else value)


@dataclass(frozen=True)
class Wait:
    """A planned wait before the next attempt; ``clamped_from``: the absurd Retry-After, if any."""

    seconds: float
    reason: str
    clamped_from: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; durations in seconds."""

    max_attempts: int = 5
    max_time: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = DEFAULT_RETRY_AFTER_MAX

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.max_time, self.backoff_initial, self.backoff_max, self.retry_after_max) < 0:
            raise ValueError("retry durations must not be negative")

    @classmethod
    def from_config(
        cls, settings: RetrySettings, *, retry_after_max: float = DEFAULT_RETRY_AFTER_MAX
    ) -> RetryPolicy:
        """Build a policy from ``ApiConfig.retry`` (timedelta durations)."""
        return cls(
            max_attempts=settings.max_attempts,
            max_time=_seconds(settings.max_time),
            backoff_initial=_seconds(settings.backoff_initial),
            backoff_max=_seconds(settings.backoff_max),
            retry_after_max=retry_after_max,
        )

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter backoff after failed attempt number ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 62)  # 2**62 already dwarfs any backoff_max
        ceiling = min(self.backoff_max, self.backoff_initial * 2.0**exponent)
        return rng.uniform(0.0, ceiling)

    def clamp_retry_after(self, retry_after: float) -> float:
        """A Retry-After in seconds, bounded to ``[0, retry_after_max]``."""
        if math.isnan(retry_after):
            return 0.0
        return min(max(retry_after, 0.0), self.retry_after_max)

    def plan_wait(self, exc: BaseException, attempt: int, rng: random.Random) -> Wait:
        """The wait before the next attempt after ``exc`` ended attempt number ``attempt``."""
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            clamped = self.clamp_retry_after(exc.retry_after)
            absurd = exc.retry_after if clamped < exc.retry_after else None
            return Wait(clamped, "retry-after", clamped_from=absurd)
        return Wait(self.backoff(attempt, rng), "backoff")


class FailureLog:
    """Says once when a tenant's calls start failing transiently and once when they recover."""

    def __init__(self, logger: Any = None) -> None:
        self._log = logger if logger is not None else log
        self._failing: dict[str, str] = {}
        self._clamp_reported: set[str] = set()

    def failed(self, tenant: str, reason: str) -> None:
        """Record a transient failure; only the first one of a streak is logged (as a warning)."""
        if tenant not in self._failing:
            self._log.warning(
                "api calls failing, retrying with backoff", tenant=tenant, reason=reason
            )
        self._failing[tenant] = reason

    def recovered(self, tenant: str) -> None:
        """Record a success; logged (as info) only if the tenant was failing."""
        self._clamp_reported.discard(tenant)
        reason = self._failing.pop(tenant, None)
        if reason is not None:
            self._log.info("api calls recovered", tenant=tenant, last_error=reason)

    def clamped(self, tenant: str, retry_after: float, used: float) -> None:
        """Report an absurd Retry-After once per tenant (until the tenant succeeds again)."""
        if tenant in self._clamp_reported:
            return
        self._clamp_reported.add(tenant)
        self._log.warning(
            "retry-after clamped",
            tenant=tenant,
            retry_after_seconds=retry_after,
            honoured_seconds=used,
        )


OnWait = Callable[[str, Wait], None]


class Retrier:
    """Runs a call under a :class:`RetryPolicy`, for one tenant at a time, through tenacity.

    tenacity runs the loop; what stays ours is the policy it is given: retry decided by the
    exception's class (``retryable``), the wait (a server's Retry-After, clamped, else full
    jitter), a stop that also refuses a wait which would end past the time budget (waits the
    testing switch skipped still count), and the log-once-per-episode bookkeeping.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        failures: FailureLog | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_wait: OnWait | None = None,
    ) -> None:
        self.policy = policy
        self.failures = failures if failures is not None else FailureLog()
        # Jitter is not security relevant; a seeded Random keeps tests reproducible.
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter only
        self._clock = clock
        self._on_wait = on_wait

    async def run(self, call: Callable[[], Awaitable[T]], *, tenant: str) -> T:
        """Await ``call()`` until it succeeds, fails permanently, or the budget runs out."""
        started = self._clock()
        # Nearly every call succeeds at once: only a failure pays for tenacity's loop (building
        # one costs about as much CPU as the request it would wrap).
        try:
            result = await call()
        except Exception as exc:
            if not getattr(exc, "retryable", False):
                raise
            first: list[Exception] = [exc]
        else:
            self.failures.recovered(tenant)
            return result
        attempt = _Attempt(self, tenant, started)
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(attempt.failed),
            wait=attempt.wait,
            stop=attempt.stop,
            before_sleep=attempt.before_sleep,
            sleep=attempt.sleep,
            reraise=True,
        )

        async def one_attempt() -> T:
            # Attempt 1 already ran above: tenacity sees its failure, then makes the others.
            # (A coroutine function, so tenacity awaits it: ``call`` is often a lambda.)
            if first:
                raise first.pop()
            return await call()

        result = await retrying(one_attempt)
        self.failures.recovered(tenant)
        return result


class _Attempt:
    """The state of one :meth:`Retrier.run`, as tenacity's retry, wait, stop and sleep hooks."""

    def __init__(self, retrier: Retrier, tenant: str, started: float) -> None:
        self.retrier = retrier
        self.tenant = tenant
        self.started = started
        self.skipped = 0.0  # waits the testing switch skipped still count against max_time
        self.planned: Wait | None = None

    def failed(self, exc: BaseException) -> bool:
        """Whether ``exc`` is retried (by its class); a retried one counts as a failure."""
        if not getattr(exc, "retryable", False) or isinstance(exc, NOT_RETRIED_NOW):
            return False
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        self.retrier.failures.failed(self.tenant, str(reason))
        return True

    def wait(self, state: tenacity.RetryCallState) -> float:
        exc = _exception(state)
        self.planned = self.retrier.policy.plan_wait(exc, state.attempt_number, self.retrier._rng)
        return self.planned.seconds

    def stop(self, state: tenacity.RetryCallState) -> bool:
        policy, exc, attempts = self.retrier.policy, _exception(state), state.attempt_number
        if attempts >= policy.max_attempts:
            exc.add_note(f"gave up after {attempts} attempt(s)")
            return True
        wait = state.upcoming_sleep
        if self.retrier._clock() - self.started + self.skipped + wait > policy.max_time:
            exc.add_note(
                f"gave up after {attempts} attempt(s): waiting {wait:.1f}s more "
                f"would exceed the {policy.max_time:.0f}s retry budget"
            )
            return True
        return False

    def before_sleep(self, state: tenacity.RetryCallState) -> None:
        wait = self.planned
        if wait is None:  # pragma: no cover - tenacity always plans before it sleeps
            return
        if wait.clamped_from is not None:
            self.retrier.failures.clamped(self.tenant, wait.clamped_from, wait.seconds)
        if self.retrier._on_wait is not None:
            self.retrier._on_wait(self.tenant, wait)
        log.debug(
            "retrying",
            tenant=self.tenant,
            attempt=state.attempt_number,
            wait_seconds=round(wait.seconds, 3),
            why=wait.reason,
        )

    async def sleep(self, seconds: float) -> None:
        if waits_disabled():
            self.skipped += seconds
        await sleep(seconds)


def _exception(state: tenacity.RetryCallState) -> BaseException:
    outcome = state.outcome
    exc = outcome.exception() if outcome is not None else None
    if exc is None:  # pragma: no cover - only failed attempts reach the wait and the stop
        raise RuntimeError("tenacity asked for a wait after a successful attempt")
    return exc
