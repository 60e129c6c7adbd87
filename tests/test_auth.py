"""Token lifetime logic, auth-failure parking, and the token lifecycle against the simulator."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from collector.auth import (
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    NONPOSITIVE_LIFETIME,
    AuthFailures,
    TokenCache,
    error_message,
    refresh_margin,
    sanitize_expires_in,
)
from collector.client import ApiClient
from collector.config import ApiConfig, TenantConfig
from collector.errors import ApiTimeout, AuthError, ServerError
from collector.retry import no_wait
from collector.simulator import (
    OMIT,
    Simulator,
    SimulatorSettings,
    demo_tenants,
    running_simulator,
)
from tests.client_helpers import body_data, sim_config, tenant_config

TODAY = dt.date(2025, 10, 1)
DAY = dt.date(2025, 9, 30)
SIM_TENANTS = demo_tenants(3)
A, B, C = SIM_TENANTS


class FakeClock:
    """A settable monotonic clock for the I/O-free parts."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def api_config(sim: Simulator, **overrides: Any) -> ApiConfig:
    """The client tests' config, with a shorter first backoff."""
    return sim_config(sim, retry={"backoff_initial": dt.timedelta(seconds=0.1)}, **overrides)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(SimulatorSettings(tenants=SIM_TENANTS, today=TODAY)) as server:
        yield server


# --- expires_in and refresh timing (no I/O) -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "corrected"),
    [
        (86400, 86400.0, False),
        (3600.5, 3600.5, False),
        ("3600", 3600.0, False),
        (" 7200 ", 7200.0, False),
        (None, DEFAULT_LIFETIME, True),
        ("soon", DEFAULT_LIFETIME, True),
        (True, DEFAULT_LIFETIME, True),
        ([3600], DEFAULT_LIFETIME, True),
        (math.nan, DEFAULT_LIFETIME, True),
        (0, NONPOSITIVE_LIFETIME, True),
        (-5, NONPOSITIVE_LIFETIME, True),
        ("-5", NONPOSITIVE_LIFETIME, True),
        (0.2, 1.0, True),
        (10**12, MAX_LIFETIME, True),
        (math.inf, MAX_LIFETIME, True),
    ],
)
def test_odd_expires_in_gives_a_bounded_lifetime(
    raw: object, expected: float, corrected: bool
) -> None:
    """Every expires_in (missing, string, 0, negative, huge, junk) gives a lifetime in 1 s..24 h."""
    lifetime, note = sanitize_expires_in(raw)
    assert lifetime == expected
    assert 1.0 <= lifetime <= MAX_LIFETIME
    assert (note is not None) == corrected


@pytest.mark.parametrize(
    ("lifetime", "margin"),
    [(86400, 8640), (3600, 360), (300, 60), (60, 30), (2, 1)],
)
def test_refresh_margin(lifetime: float, margin: float) -> None:
    """Refresh max(60 s, 10 %) ahead of expiry, but never earlier than half the lifetime."""
    assert refresh_margin(lifetime) == margin


def test_token_state_refreshes_ahead_of_expiry() -> None:
    """A 1 h token is used as is until 54 min, then due for refresh while still usable."""
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    state = cache.store("acme", "tok-1", 3600, "fp")
    assert not state.needs_refresh(clock.now + 3239)
    assert state.needs_refresh(clock.now + 3240)
    assert state.is_usable(clock.now + 3599)
    assert not state.is_usable(clock.now + 3600)


def test_changed_fingerprint_drops_the_cached_token() -> None:
    """A token cached under one credentials fingerprint is gone when asked with another."""
    cache = TokenCache(clock=FakeClock())
    cache.store("acme", "tok-1", 3600, "old")
    assert cache.get("acme", "old") is not None
    assert cache.get("acme", "new") is None
    assert "acme" not in cache


def test_invalidate_only_drops_the_token_it_was_given() -> None:
    """invalidate(state) is a compare-and-drop: a newer token survives a late 401 for an older."""
    cache = TokenCache(clock=FakeClock())
    old = cache.store("acme", "tok-1", 3600, "fp")
    new = cache.store("acme", "tok-2", 3600, "fp")
    assert new.generation == old.generation + 1
    assert not cache.invalidate("acme", old)
    assert cache.get("acme") is new
    assert cache.invalidate("acme", new)
    assert cache.get("acme") is None
    assert not cache.invalidate("acme", new)


def test_postponed_refresh_keeps_the_token_and_retries_later() -> None:
    """After a failed refresh the old token stays cached and the next refresh is 30 s later."""
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    state = cache.store("acme", "tok-1", 3600, "fp")
    clock.now = state.refresh_at + 1
    kept = cache.postpone_refresh("acme", state)
    assert kept.access_token == "tok-1"
    assert cache.get("acme") is kept
    assert not kept.needs_refresh(clock.now + 29)
    assert kept.needs_refresh(clock.now + 30)


def test_reprs_hide_the_token() -> None:
    """Neither a token's nor the cache's repr shows the access token or the fingerprint."""
    cache = TokenCache(clock=FakeClock())
    state = cache.store("acme", "eyJ-very-secret-token", 3600, "fingerprint-xyz")
    for text in (repr(state), str(state), repr(cache)):
        assert "eyJ-very-secret-token" not in text
        assert "fingerprint-xyz" not in text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"status": "error", "message": "Too many requests"}', "Too many requests"),
        (b'{"error": {"code": 500, "message": "Failed to fetch data"}}', "Failed to fetch data"),
        (b'{"error": "upstream timeout"}', "upstream timeout"),
        (b"<html>502 Bad Gateway</html>", None),
        (b'{"message": ""}', None),
        (b"[" * 5000 + b"]" * 5000, None),
    ],
)
def test_error_message_reads_either_envelope(body: bytes, message: str | None) -> None:
    """The message comes from ``message`` or ``error.message``; anything else gives None."""
    assert error_message(body) == message


# --- AuthFailures (no I/O) ----------------------------------------------------------------------


def test_two_failures_in_a_row_park_the_tenant() -> None:
    """One failure does not park; the second in a row parks for 15 minutes."""
    clock = FakeClock()
    failures = AuthFailures(clock=clock)
    assert not failures.record_failure("acme", "401")
    assert not failures.is_parked("acme")
    assert failures.record_failure("acme", "401")
    assert failures.is_parked("acme")
    clock.now += 899
    assert failures.is_parked("acme")
    clock.now += 2
    assert not failures.is_parked("acme")


def test_success_in_between_resets_the_streak() -> None:
    """A success between two failures means they were not in a row."""
    failures = AuthFailures(clock=FakeClock())
    failures.record_failure("acme", "401")
    failures.record_success("acme")
    assert not failures.record_failure("acme", "401")
    assert failures.record_failure("acme", "401")  # the second since the success parks


def test_the_same_failure_seen_twice_counts_once() -> None:
    """Failures carrying the same event (one failed token request) count once."""
    failures = AuthFailures(clock=FakeClock())
    failures.record_failure("acme", "rejected", event=("token-request", 7))
    assert not failures.record_failure("acme", "rejected", event=("token-request", 7))
    assert failures.record_failure("acme", "rejected", event=("token-request", 8))  # second


def test_park_doubles_up_to_six_hours_and_logs_once_per_park() -> None:
    """Each new park without a success between lasts twice as long, capped at 6 h."""
    clock = FakeClock()
    failures = AuthFailures(clock=clock)
    durations = []
    with capture_logs() as logs:
        for _ in range(8):
            failures.record_failure("acme", "401")
            failures.record_failure("acme", "401")
            until = failures.parked_until("acme")
            assert until is not None
            remaining = (until - dt.datetime.now(dt.UTC)).total_seconds()
            durations.append(round(remaining / 60))
            clock.now += 7 * 3600  # let the park run out
    assert durations == [15, 30, 60, 120, 240, 360, 360, 360]
    parked_lines = [e for e in logs if e["event"] == "tenant parked as auth_failed"]
    assert len(parked_lines) == 8


def test_changed_credentials_lift_the_park() -> None:
    """A tenant parked with one fingerprint is not parked when asked with a new one."""
    failures = AuthFailures(clock=FakeClock())
    failures.record_failure("acme", "401", fingerprint="old")
    failures.record_failure("acme", "401", fingerprint="old")
    assert failures.is_parked("acme", "old")
    assert not failures.is_parked("acme", "new")
    # The streak started again: one failure with the new credentials does not park.
    assert not failures.record_failure("acme", "401", fingerprint="new")


# --- token lifecycle against the simulator ------------------------------------------------------


async def test_token_is_reused_across_requests(sim: Simulator) -> None:
    """Five fetches of one tenant use one token."""
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        for offset in range(5):
            await client.fetch_day(tenant, DAY - dt.timedelta(days=offset))
    assert sim.stats.token_requests[A.client_id] == 1
    assert sim.stats.usage_requests[A.id] == 5
    assert client.metrics.token_refreshes[A.id] == 1


async def test_token_is_refreshed_ahead_of_expiry(sim: Simulator) -> None:
    """A 1 s token is replaced after half its life, before the API ever answers 401."""
    sim.faults.set_token(A.client_id, lifetime=1.0, expires_in=1)
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        await client.fetch_day(tenant, DAY)
        await asyncio.sleep(0.6)
        await client.fetch_day(tenant, DAY)
    assert sim.stats.token_requests[A.client_id] == 2
    assert sim.stats.responses[401] == 0


async def test_200_concurrent_requests_at_expiry_cause_one_token_request(sim: Simulator) -> None:
    """When the cached token is due, 200 concurrent fetches share a single refresh."""
    sim.faults.set_token(A.client_id, lifetime=1.0, expires_in=1)
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        await client.fetch_day(tenant, DAY)
        await asyncio.sleep(0.6)  # past the refresh point
        sim.faults.set_token(A.client_id, lifetime=3600.0, expires_in=3600)
        results = await asyncio.gather(*(client.fetch_day(tenant, DAY) for _ in range(200)))
    assert len(results) == 200
    assert sim.stats.token_requests[A.client_id] == 2
    assert sim.stats.responses[401] == 0


async def test_200_concurrent_401s_cause_one_refresh(sim: Simulator) -> None:
    """A revoked token rejected by 200 concurrent requests is refreshed once, each retried once."""
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        await client.fetch_day(tenant, DAY)
        sim.faults.revoke_tokens(A.id)
        results = await asyncio.gather(*(client.fetch_day(tenant, DAY) for _ in range(200)))
    assert {r.tenant for r in results} == {A.id}
    assert sim.stats.token_requests[A.client_id] == 2
    assert sim.stats.responses[401] == 200
    assert not client.auth_failures.is_parked(A.id)


@pytest.mark.parametrize(
    ("announced", "lifetime"),
    [
        (OMIT, DEFAULT_LIFETIME),
        (None, DEFAULT_LIFETIME),
        ("3600", 3600.0),
        ("soon", DEFAULT_LIFETIME),
        (0, NONPOSITIVE_LIFETIME),
        (-5, NONPOSITIVE_LIFETIME),
        (10**15, MAX_LIFETIME),
    ],
)
async def test_odd_expires_in_from_the_endpoint(
    sim: Simulator, announced: object, lifetime: float
) -> None:
    """Whatever expires_in the token endpoint announces, the cached token gets a sane lifetime."""
    sim.faults.set_token(A.client_id, expires_in=announced)
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        await client.fetch_day(tenant, DAY)
        await client.fetch_day(tenant, DAY)
        state = client.token_cache.get(A.id)
    assert state is not None
    assert state.lifetime == lifetime
    assert sim.stats.token_requests[A.client_id] == 1


async def test_slow_token_endpoint_for_one_tenant_does_not_delay_another(sim: Simulator) -> None:
    """A's token endpoint taking 2 s, with one global slot, leaves B's fetch well under 1 s."""
    sim.faults.set_token(A.client_id, delay=2.0)
    tenant_a, tenant_b = tenant_config(A), tenant_config(B)
    async with ApiClient(api_config(sim, max_concurrency=1)) as client:
        started = time.monotonic()
        slow = [asyncio.create_task(client.fetch_day(tenant_a, DAY)) for _ in range(5)]
        await asyncio.sleep(0.05)  # A's requests are all waiting for A's token now
        await client.fetch_day(tenant_b, DAY)
        b_seconds = time.monotonic() - started
        await asyncio.gather(*slow)
        a_seconds = time.monotonic() - started
    assert b_seconds < 1.0
    assert a_seconds >= 2.0
    assert sim.stats.token_requests[A.client_id] == 1


async def test_failing_token_endpoint_releases_every_waiter(sim: Simulator) -> None:
    """A token endpoint answering 500 fails all 50 waiting fetches with one token request."""
    sim.faults.set_token(A.client_id, fail=True)
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        results = await asyncio.gather(
            *(client.fetch_day(tenant, DAY, retry=False) for _ in range(50)),
            return_exceptions=True,
        )
    assert all(isinstance(r, ServerError) for r in results)
    assert sim.stats.token_requests[A.client_id] == 1
    assert sim.stats.usage_requests[A.id] == 0


async def test_hanging_token_endpoint_releases_waiters_within_the_timeout(sim: Simulator) -> None:
    """A token endpoint that does not answer fails every waiter with ApiTimeout near the timeout."""
    sim.faults.set_token(A.client_id, delay=1.5)
    tenant = tenant_config(A)
    config = api_config(sim, timeout=dt.timedelta(seconds=0.3))
    async with ApiClient(config) as client:
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.fetch_day(tenant, DAY, retry=False) for _ in range(50)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
    assert all(isinstance(r, ApiTimeout) for r in results)
    assert elapsed < 1.0
    assert sim.stats.token_requests[A.client_id] == 1


async def test_failed_refresh_keeps_the_still_valid_token(sim: Simulator) -> None:
    """If the refresh ahead of expiry fails, the current token is used until it expires."""
    sim.faults.set_token(A.client_id, lifetime=2.0, expires_in=2)
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        first = await client.fetch_day(tenant, DAY)
        await asyncio.sleep(1.1)  # refresh due, token still valid for ~0.9 s
        sim.faults.set_token(A.client_id, fail=True)
        second = await client.fetch_day(tenant, DAY, retry=False)
        third = await client.fetch_day(tenant, DAY, retry=False)
    assert body_data(second) == body_data(first) == body_data(third)
    assert sim.stats.token_requests[A.client_id] == 2  # the postponed retry is not yet due
    assert sim.stats.responses[401] == 0


async def test_bad_credentials_fail_that_tenant_only(sim: Simulator) -> None:
    """A tenant with a wrong secret gets AuthError with the API's text while another succeeds."""
    bad = tenant_config(A, client_secret="wrong-secret-canary-1234")
    good = tenant_config(B)
    days = [DAY - dt.timedelta(days=i) for i in range(5)]
    with capture_logs() as logs:
        async with ApiClient(api_config(sim)) as client:
            outcomes = await asyncio.gather(
                *(client.fetch_day(bad, d) for d in days),
                *(client.fetch_day(good, d) for d in days),
                return_exceptions=True,
            )
    bad_results, good_results = outcomes[:5], outcomes[5:]
    assert all(isinstance(r, AuthError) for r in bad_results)
    assert "Invalid authentication" in str(bad_results[0])
    assert [body_data(r) for r in good_results] == [sim.day_data(B.id, d) for d in days]  # type: ignore[arg-type]
    assert sim.stats.token_requests[A.client_id] == 1
    for text in [*(str(r) for r in bad_results), repr(logs), repr(client.token_cache)]:
        assert "wrong-secret-canary-1234" not in text


async def test_locked_out_user_is_an_auth_error(sim: Simulator) -> None:
    """The token endpoint's 400 'User is locked out' becomes an AuthError carrying that text."""
    sim.faults.set_token(A.client_id, locked_out=True)
    async with ApiClient(api_config(sim)) as client:
        with pytest.raises(AuthError, match="User is locked out"):
            await client.fetch_day(tenant_config(A), DAY)


async def test_bad_credentials_park_the_tenant_after_two_failures(sim: Simulator) -> None:
    """Two rejected token requests park the tenant: the third fetch makes no request at all."""
    bad = tenant_config(A, client_secret="wrong")
    with capture_logs() as logs:
        async with ApiClient(api_config(sim)) as client:
            for _ in range(2):
                with pytest.raises(AuthError, match="Invalid authentication"):
                    await client.fetch_day(bad, DAY)
            with pytest.raises(AuthError, match="parked as auth_failed"):
                await client.fetch_day(bad, DAY)
            until = client.parked_until(bad)
    assert sim.stats.token_requests[A.client_id] == 2
    assert until is not None
    assert dt.timedelta(minutes=14) < until - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=15)
    assert len([e for e in logs if e["event"] == "tenant parked as auth_failed"]) == 1


async def test_two_401s_in_a_row_park_the_tenant(sim: Simulator) -> None:
    """A 401 on a token and another on the fresh one give AuthError and park the tenant."""
    sim.faults.reject_all_tokens = True
    tenant = tenant_config(A)
    async with ApiClient(api_config(sim)) as client:
        with pytest.raises(AuthError, match="rejected a fresh token"):
            await client.fetch_day(tenant, DAY)
        assert client.parked_until(tenant) is not None
        requests_before = sim.stats.responses[401]
        with pytest.raises(AuthError, match="parked"):
            await client.fetch_day(tenant, DAY)
    assert requests_before == 2
    assert sim.stats.responses[401] == 2
    assert sim.stats.token_requests[A.client_id] == 2


async def test_rejected_api_key_parks_the_tenant(sim: Simulator) -> None:
    """An API key answered 401 twice parks the tenant; the key never shows in the error."""
    tenant = TenantConfig(id=A.id, api_key="zak_test_wrong_canary")
    async with ApiClient(api_config(sim)) as client:
        with pytest.raises(AuthError, match="rejected the API key") as first:
            await client.fetch_day(tenant, DAY)
        with pytest.raises(AuthError, match="rejected the API key"):
            await client.fetch_day(tenant, DAY)
        with pytest.raises(AuthError, match="parked"):
            await client.fetch_day(tenant, DAY)
    assert "zak_test_wrong_canary" not in str(first.value)
    assert sim.stats.responses[401] == 2


async def test_fixed_credentials_lift_the_park(sim: Simulator) -> None:
    """After a parked tenant's config gets the right secret, its next fetch goes through."""
    async with ApiClient(api_config(sim)) as client:
        for _ in range(2):
            with pytest.raises(AuthError):
                await client.fetch_day(tenant_config(A, client_secret="wrong"), DAY)
        assert client.parked_until(A.id) is not None
        fixed = tenant_config(A)
        fetched = await client.fetch_day(fixed, DAY)
        assert client.parked_until(fixed) is None
    assert body_data(fetched) == sim.day_data(A.id, DAY)


async def test_changed_secret_drops_the_cached_token(sim: Simulator) -> None:
    """A reloaded config with another secret does not reuse the token of the old secret."""
    async with ApiClient(api_config(sim)) as client:
        await client.fetch_day(tenant_config(A), DAY)
        with pytest.raises(AuthError, match="Invalid authentication"):
            await client.fetch_day(tenant_config(A, client_secret="rotated-wrong"), DAY)
    assert sim.stats.token_requests[A.client_id] == 2
    assert sim.stats.usage_requests[A.id] == 1


async def test_rotated_secret_file_is_read_before_the_next_token_request(
    sim: Simulator, tmp_path: Path
) -> None:
    """A secret file rotated on disk is re-read before a token request, and its token replaced."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(A.client_secret)
    tenant = tenant_config(A, client_secret_file=str(secret_file))
    async with ApiClient(api_config(sim)) as client:
        await client.fetch_day(tenant, DAY)
        old_fingerprint = tenant.credentials_fingerprint
        secret_file.write_text("rotated-but-wrong")
        sim.faults.revoke_tokens(A.id)  # forces a token request
        with pytest.raises(AuthError, match="Invalid authentication"):
            await client.fetch_day(tenant, DAY)
    assert tenant.credentials_fingerprint != old_fingerprint
    assert client.token_cache.get(A.id, tenant.credentials_fingerprint) is None


async def test_no_wait_switch_applies_to_token_failures(sim: Simulator) -> None:
    """Transient token failures are retried by fetch_day, instantly under no_wait()."""
    sim.faults.set_token(A.client_id, fail_next=2)
    async with ApiClient(api_config(sim)) as client:
        with no_wait():
            fetched = await client.fetch_day(tenant_config(A), DAY)
    assert body_data(fetched) == sim.day_data(A.id, DAY)
    assert sim.stats.token_requests[A.client_id] == 3
    assert client.metrics.token_requests[(A.id, "error")] == 2
