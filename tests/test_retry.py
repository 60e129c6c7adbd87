"""Retry policy: what is retried, how long it waits, when it gives up, and the testing switch."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
import time

import pytest
from structlog.testing import capture_logs

from collector.errors import (
    AuthError,
    BadResponse,
    RateLimited,
    RequestRejected,
    ServerError,
    TransportError,
)
from collector.retry import (
    NO_WAIT_ENV,
    FailureLog,
    Retrier,
    RetryPolicy,
    Wait,
    no_wait,
    parse_retry_after,
    waits_disabled,
)


class Flaky:
    """A call that raises the given errors in order, then returns ``result``."""

    def __init__(self, errors: list[Exception], result: str = "done") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def make_retrier(policy: RetryPolicy, waits: list[Wait], seed: int = 1) -> Retrier:
    return Retrier(
        policy, rng=random.Random(seed), on_wait=lambda _tenant, wait: waits.append(wait)
    )


# --- parse_retry_after -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), (" 120 ", 120.0), ("0", 0.0), ("1.5", 1.5), ("86400", 86400.0)],
)
def test_retry_after_in_seconds_is_parsed(header: str, expected: float) -> None:
    """A delay-seconds Retry-After becomes that many seconds (no clamping at parse time)."""
    assert parse_retry_after(header) == expected


def test_retry_after_http_date_is_seconds_from_now() -> None:
    """An HTTP-date Retry-After becomes the seconds between now and that date."""
    now = dt.datetime(2025, 10, 1, 12, 0, 0, tzinfo=dt.UTC)
    header = email.utils.format_datetime(now + dt.timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(header, now=now) == 90.0


def test_retry_after_http_date_in_the_past_means_now() -> None:
    """A date already passed gives 0 seconds rather than a negative wait."""
    now = dt.datetime(2025, 10, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after("Wed, 01 Oct 2025 11:00:00 GMT", now=now) == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1e3", "inf", "nan", "12 seconds"])
def test_garbage_retry_after_is_none(header: str | None) -> None:
    """Unusable Retry-After values give None so the caller falls back to backoff."""
    assert parse_retry_after(header) is None


# --- RetryPolicy -------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    """Each backoff lies in [0, min(max, initial * 2**(n-1))] and actually varies."""
    policy = RetryPolicy(backoff_initial=0.5, backoff_max=4.0)
    rng = random.Random(3)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (80, 4.0)]:
        draws = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8  # full jitter spans the range, not a fixed value
        assert min(draws) < ceiling * 0.2


def test_retry_after_is_waited_exactly_and_absurd_values_are_clamped() -> None:
    """A RateLimited Retry-After is the wait; one above retry_after_max is clamped and flagged."""
    policy = RetryPolicy(retry_after_max=900)
    rng = random.Random(0)
    normal = policy.plan_wait(RateLimited("x", retry_after=7), 1, rng)
    assert (normal.seconds, normal.reason, normal.clamped_from) == (7, "retry-after", None)
    absurd = policy.plan_wait(RateLimited("x", retry_after=86400), 1, rng)
    assert (absurd.seconds, absurd.clamped_from) == (900, 86400)


def test_rate_limited_without_retry_after_gets_backoff() -> None:
    """A 429 whose Retry-After was garbage (None) waits a jittered backoff instead."""
    policy = RetryPolicy(backoff_initial=0.25)
    wait = policy.plan_wait(RateLimited("x", retry_after=None), 1, random.Random(0))
    assert wait.reason == "backoff"
    assert 0 <= wait.seconds <= 0.25


def test_policy_from_config_reads_timedeltas() -> None:
    """from_config converts the config's timedeltas to seconds."""
    from collector.config import RetryConfig

    config = RetryConfig(
        max_attempts=3,
        max_time=dt.timedelta(seconds=20),
        backoff_initial=dt.timedelta(seconds=0.1),
        backoff_max=dt.timedelta(seconds=2),
    )
    policy = RetryPolicy.from_config(config)
    assert (policy.max_attempts, policy.max_time, policy.backoff_initial, policy.backoff_max) == (
        3,
        20.0,
        0.1,
        2.0,
    )


def test_policy_rejects_nonsense() -> None:
    """A policy with no attempts or negative durations is refused."""
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(backoff_max=-1)


# --- Retrier -----------------------------------------------------------------------------------


async def test_transient_errors_are_retried_until_success() -> None:
    """5xx, transport errors and 429s are retried; the result of the first success is returned."""
    waits: list[Wait] = []
    retrier = make_retrier(RetryPolicy(max_attempts=5), waits)
    call = Flaky([ServerError("500"), TransportError("reset"), RateLimited("429", retry_after=3)])
    with no_wait():
        assert await retrier.run(call, tenant="acme") == "done"
    assert call.calls == 4
    assert [w.reason for w in waits] == ["backoff", "backoff", "retry-after"]
    assert waits[-1].seconds == 3


@pytest.mark.parametrize(
    "error",
    [AuthError("bad"), RequestRejected("400"), ValueError("bug"), BadResponse("bad body")],
)
async def test_permanent_errors_and_bad_bodies_are_not_retried(error: Exception) -> None:
    """Non-retryable errors, non-API exceptions and bad 200 bodies propagate after one call."""
    waits: list[Wait] = []
    call = Flaky([error])
    with no_wait(), pytest.raises(type(error)):
        await make_retrier(RetryPolicy(max_attempts=5), waits).run(call, tenant="acme")
    assert call.calls == 1
    assert waits == []


async def test_attempts_are_bounded() -> None:
    """A call that keeps failing is tried max_attempts times, then its last error is raised."""
    waits: list[Wait] = []
    call = Flaky([ServerError(f"500 #{i}") for i in range(10)])
    with no_wait(), pytest.raises(ServerError, match="#2") as caught:
        await make_retrier(RetryPolicy(max_attempts=3), waits).run(call, tenant="acme")
    assert call.calls == 3
    assert len(waits) == 2
    assert any("gave up after 3 attempt" in note for note in caught.value.__notes__)


async def test_total_time_is_bounded_even_when_waits_are_skipped() -> None:
    """Skipped waits count against max_time: 4 s waits with a 10 s budget allow 3 attempts."""
    waits: list[Wait] = []
    call = Flaky([RateLimited("429", retry_after=4) for _ in range(50)])
    policy = RetryPolicy(max_attempts=50, max_time=10)
    started = time.monotonic()
    with no_wait(), pytest.raises(RateLimited) as caught:
        await make_retrier(policy, waits).run(call, tenant="acme")
    assert call.calls == 3  # t=0, 4, 8; a third wait would end at 12 > 10
    assert [w.seconds for w in waits] == [4, 4]
    assert time.monotonic() - started < 1.0
    assert any("retry budget" in note for note in caught.value.__notes__)


async def test_a_wait_longer_than_the_budget_is_not_started() -> None:
    """A Retry-After beyond max_time fails at once instead of sleeping past the budget."""
    waits: list[Wait] = []
    call = Flaky([RateLimited("429", retry_after=300)])
    with pytest.raises(RateLimited):
        await make_retrier(RetryPolicy(max_time=60), waits).run(call, tenant="acme")
    assert call.calls == 1
    assert waits == []


async def test_real_waits_happen_without_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the testing switch the planned backoff is really slept."""
    monkeypatch.delenv(NO_WAIT_ENV, raising=False)
    waits: list[Wait] = []
    call = Flaky([ServerError("500"), ServerError("500")])
    policy = RetryPolicy(backoff_initial=0.1, backoff_max=0.1)
    started = time.monotonic()
    assert await make_retrier(policy, waits, seed=7).run(call, tenant="acme") == "done"
    elapsed = time.monotonic() - started
    planned = sum(w.seconds for w in waits)
    assert planned > 0
    assert elapsed >= planned * 0.9


async def test_no_wait_skips_waits_but_counts_attempts() -> None:
    """Inside no_wait() 40 s of planned waits take no time, and every attempt still happens."""
    waits: list[Wait] = []
    call = Flaky([RateLimited("429", retry_after=10) for _ in range(4)])
    started = time.monotonic()
    with no_wait():
        assert waits_disabled()
        await make_retrier(RetryPolicy(max_attempts=5, max_time=100), waits).run(call, tenant="a")
    assert call.calls == 5
    assert sum(w.seconds for w in waits) == 40
    assert time.monotonic() - started < 1.0


def test_no_wait_env_var_switches_waits_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """COLLECTOR_TESTING_NO_WAIT=1 turns waits off like no_wait(); 0 leaves them on."""
    monkeypatch.setenv(NO_WAIT_ENV, "0")
    assert not waits_disabled()
    monkeypatch.setenv(NO_WAIT_ENV, "1")
    assert waits_disabled()


def test_no_wait_nests_and_restores() -> None:
    """Leaving nested no_wait() blocks restores the previous state."""
    base = waits_disabled()
    with no_wait():
        with no_wait():
            assert waits_disabled()
        assert waits_disabled()
    assert waits_disabled() == base


# --- logging -----------------------------------------------------------------------------------


async def test_failure_and_recovery_are_logged_once_each() -> None:
    """A streak of transient failures logs one warning; the success after it logs one info line."""
    waits: list[Wait] = []
    retrier = make_retrier(RetryPolicy(max_attempts=10, max_time=1000), waits)
    with capture_logs() as logs, no_wait():
        await retrier.run(Flaky([ServerError("500") for _ in range(4)]), tenant="acme")
        await retrier.run(Flaky([]), tenant="acme")
    failing = [e for e in logs if e["event"] == "api calls failing, retrying with backoff"]
    recovered = [e for e in logs if e["event"] == "api calls recovered"]
    assert len(failing) == 1
    assert failing[0]["tenant"] == "acme"
    assert failing[0]["log_level"] == "warning"
    assert len(recovered) == 1


async def test_failure_log_is_per_tenant() -> None:
    """One tenant failing does not mark another as failing: only the failing one logs recovery."""
    failures = FailureLog()
    retrier = Retrier(RetryPolicy(max_attempts=2), failures=failures, rng=random.Random(0))
    with capture_logs() as logs, no_wait():
        with pytest.raises(ServerError):
            await retrier.run(Flaky([ServerError("a"), ServerError("b")]), tenant="broken")
        await retrier.run(Flaky([]), tenant="fine")
        await retrier.run(Flaky([]), tenant="broken")
    recovered = [e["tenant"] for e in logs if e["event"] == "api calls recovered"]
    assert recovered == ["broken"]


async def test_clamped_retry_after_is_reported_once() -> None:
    """Several absurd Retry-After values in a row produce one 'clamped' warning, not one each."""
    waits: list[Wait] = []
    retrier = make_retrier(RetryPolicy(max_attempts=5, max_time=10_000), waits)
    call = Flaky([RateLimited("429", retry_after=86400) for _ in range(3)])
    with capture_logs() as logs, no_wait():
        await retrier.run(call, tenant="acme")
    clamped = [e for e in logs if e["event"] == "retry-after clamped"]
    assert len(clamped) == 1
    assert clamped[0]["retry_after_seconds"] == 86400
    assert clamped[0]["honoured_seconds"] == 900
    assert [w.seconds for w in waits] == [900, 900, 900]
