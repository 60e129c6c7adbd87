"""The API client against the simulator over real sockets: statuses, retries, bad bodies, errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from collector.client import ApiClient, FetchedDay
from collector.config import RateLimitConfig, TenantConfig
from collector.errors import (
    ApiError,
    ApiTimeout,
    BadResponse,
    RateLimited,
    RequestRejected,
    ServerError,
    TransportError,
)
from collector.retry import NO_WAIT_ENV, no_wait
from collector.simulator import (
    BAD_RESPONSE_MODES,
    Simulator,
    SimulatorSettings,
    demo_tenants,
    running_simulator,
)
from tests.client_helpers import (
    DAY,
    TODAY,
    api_config,
    body_data,
    closed_port,
    sim_config,
    tenant_config,
)
from tests.servers import EchoingApi, SlowConnectRelay

SIM_TENANTS = demo_tenants(3)
A, B, C = SIM_TENANTS


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(SimulatorSettings(tenants=SIM_TENANTS, today=TODAY)) as server:
        yield server


# --- the happy path ----------------------------------------------------------------------------


async def test_fetch_day_returns_the_simulators_data(sim: Simulator) -> None:
    """A fetched day carries the validated response and exactly the raw data the API sent."""
    async with ApiClient(sim_config(sim)) as client:
        fetched = await client.fetch_day(tenant_config(A), DAY)
    assert isinstance(fetched, FetchedDay)
    assert (fetched.tenant, fetched.day) == (A.id, DAY)
    assert body_data(fetched) == sim.day_data(A.id, DAY)
    assert fetched.response.data.period.start == DAY
    assert [e.day for e in fetched.response.data.daily] in ([DAY], [])
    assert sim.stats.log[-1].param == DAY.isoformat()
    assert client.metrics.requests[(A.id, "ok")] == 1


async def test_api_key_mode_needs_no_token(sim: Simulator) -> None:
    """An API-key tenant is served through the zencoder-api-key header, with no token request."""
    tenant = TenantConfig(id=A.id, api_key=A.api_key)
    async with ApiClient(sim_config(sim)) as client:
        fetched = await client.fetch_day(tenant, DAY)
    assert body_data(fetched) == sim.day_data(A.id, DAY)
    assert sum(sim.stats.token_requests.values()) == 0


async def test_a_key_that_cannot_be_sent_fails_without_showing_it(sim: Simulator) -> None:
    """A secret with a line break is a TransportError naming the header, never its value."""
    tenant = TenantConfig(id=A.id, api_key="zak_half\r\nX-Injected: yes")
    async with ApiClient(sim_config(sim)) as client:
        with pytest.raises(TransportError, match="'zencoder-api-key'") as caught:
            await client.fetch_day(tenant, DAY, retry=False)
    assert "zak_half" not in str(caught.value)
    assert sum(sim.stats.usage_requests.values()) == 0


async def test_401_on_a_cached_token_refreshes_once_and_retries_once(sim: Simulator) -> None:
    """A revoked token costs one 401, one token request and one retried usage request."""
    tenant = tenant_config(A)
    async with ApiClient(sim_config(sim)) as client:
        await client.fetch_day(tenant, DAY)
        sim.faults.revoke_tokens(A.id)
        fetched = await client.fetch_day(tenant, DAY, retry=False)
    assert body_data(fetched) == sim.day_data(A.id, DAY)
    assert sim.stats.token_requests[A.client_id] == 2
    assert sim.stats.responses[401] == 1
    assert sim.stats.usage_requests[A.id] == 2
    assert client.metrics.requests[(A.id, "unauthorized")] == 1


# --- Retry-After and retries -------------------------------------------------------------------


async def test_retry_after_seconds_is_honoured(sim: Simulator) -> None:
    """A 429 with Retry-After: 7 is retried after a recorded wait of exactly 7 s."""
    sim.faults.set(A.id, throttle_next=1, retry_after_seconds=7)
    async with ApiClient(sim_config(sim)) as client:
        with no_wait():
            fetched = await client.fetch_day(tenant_config(A), DAY)
    assert body_data(fetched) == sim.day_data(A.id, DAY)
    assert client.metrics.retries[A.id] == 1
    assert client.metrics.retry_wait_seconds[A.id] == 7
    assert sim.stats.responses[429] == 1


async def test_retry_after_http_date_is_honoured(sim: Simulator) -> None:
    """A 503 whose Retry-After is an HTTP-date 30 s ahead waits about 30 s (whole seconds)."""
    sim.faults.set(A.id, unavailable_next=1, retry_after_seconds=30, retry_after_format="http-date")
    async with ApiClient(sim_config(sim)) as client:
        with no_wait():
            await client.fetch_day(tenant_config(A), DAY)
    assert sim.stats.responses[503] == 1
    assert 29 <= client.metrics.retry_wait_seconds[A.id] <= 32


async def test_garbage_retry_after_falls_back_to_backoff(sim: Simulator) -> None:
    """A Retry-After of 'soon' is ignored: the wait is the first jittered backoff (<= 0.25 s)."""
    sim.faults.set(A.id, throttle_next=1, retry_after_value="soon")
    async with ApiClient(sim_config(sim)) as client:
        with no_wait():
            await client.fetch_day(tenant_config(A), DAY)
    assert client.metrics.retries[A.id] == 1
    assert 0 <= client.metrics.retry_wait_seconds[A.id] <= 0.25


async def test_absurd_retry_after_is_clamped_and_reported(sim: Simulator) -> None:
    """Retry-After: 86400 is honoured as 15 minutes, counted and logged once for two 429s."""
    sim.faults.set(A.id, throttle_next=2, retry_after_value="86400")
    config = sim_config(sim, retry={"max_attempts": 5, "max_time": dt.timedelta(hours=1)})
    with capture_logs() as logs:
        async with ApiClient(config) as client:
            with no_wait():
                await client.fetch_day(tenant_config(A), DAY)
    assert client.metrics.retry_wait_seconds[A.id] == 2 * 900
    assert client.metrics.retry_after_clamped[A.id] == 2
    clamped = [e for e in logs if e["event"] == "retry-after clamped"]
    assert len(clamped) == 1
    assert clamped[0]["tenant"] == A.id


async def test_retry_after_pauses_only_that_tenant(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a 429 with Retry-After: 1, the tenant's next request waits ~1 s while others do not."""
    monkeypatch.delenv(NO_WAIT_ENV, raising=False)  # this test needs the real pause
    sim.faults.set(A.id, throttle_next=1, retry_after_seconds=1)
    tenant_a, tenant_b = tenant_config(A), tenant_config(B)
    async with ApiClient(sim_config(sim)) as client:
        await client.fetch_day(tenant_b, DAY)  # tokens in place, so timings are request-only
        with pytest.raises(RateLimited) as caught:
            await client.fetch_day(tenant_a, DAY, retry=False)
        assert caught.value.retry_after == 1
        started = time.monotonic()
        paused = asyncio.create_task(client.fetch_day(tenant_a, DAY, retry=False))
        await client.fetch_day(tenant_b, DAY, retry=False)
        b_seconds = time.monotonic() - started
        await paused
        a_seconds = time.monotonic() - started
    assert b_seconds < 0.3
    assert a_seconds >= 0.8


async def test_retries_are_bounded_by_attempts(sim: Simulator) -> None:
    """A tenant whose API answers 500 forever is tried max_attempts (3) times, then ServerError."""
    sim.faults.set(A.id, down=True)
    async with ApiClient(sim_config(sim)) as client:
        with no_wait(), pytest.raises(ServerError, match="Failed to fetch data") as caught:
            await client.fetch_day(tenant_config(A), DAY)
    assert sim.stats.usage_requests[A.id] == 3
    assert caught.value.status == 500
    assert client.metrics.requests[(A.id, "server_error")] == 3


async def test_retries_are_bounded_by_total_time(sim: Simulator) -> None:
    """With 4 s Retry-Afters and a 10 s budget only 3 attempts are made despite 50 allowed."""
    sim.faults.set(A.id, throttle_next=100, retry_after_seconds=4)
    config = sim_config(sim, retry={"max_attempts": 50, "max_time": dt.timedelta(seconds=10)})
    async with ApiClient(config) as client:
        with no_wait(), pytest.raises(RateLimited):
            await client.fetch_day(tenant_config(A), DAY)
    assert sim.stats.usage_requests[A.id] == 3


async def test_transient_500s_are_retried_to_success(sim: Simulator) -> None:
    """Two 500 'Failed to fetch data' answers are retried and the third attempt succeeds."""
    sim.faults.set(A.id, fail_next=2)
    async with ApiClient(sim_config(sim)) as client:
        with no_wait():
            fetched = await client.fetch_day(tenant_config(A), DAY)
    assert body_data(fetched) == sim.day_data(A.id, DAY)
    assert sim.stats.usage_requests[A.id] == 3


async def test_4xx_is_not_retried(sim: Simulator) -> None:
    """A 403 fails at once with the API's message: exactly one request reaches the API."""
    sim.faults.set(A.id, forbidden=True)
    async with ApiClient(sim_config(sim)) as client:
        with no_wait(), pytest.raises(RequestRejected, match="Forbidden") as caught:
            await client.fetch_day(tenant_config(A), DAY)
    assert caught.value.status == 403
    assert (
        caught.value.reason == "RequestRejected: HTTP 403: the API rejected the request: Forbidden"
    )
    assert sim.stats.usage_requests[A.id] == 1


# --- bad responses ------------------------------------------------------------------------------

EXPECTED_REASON = {
    "malformed_json": "not valid JSON",
    "html_200": "HTML page instead of JSON",
    "missing_fields": "missing required field",
    "wrong_types": "Expected `int`, got `str`",
    "negative_numbers": "Expected `int` >= 0",
    "wrong_day": "asked for day 2025-09-29 but the response covers ['2025-09-28']",
    "empty_body": "empty body",
}


@pytest.mark.parametrize("mode", BAD_RESPONSE_MODES)
async def test_each_bad_response_shape_is_a_bad_response(sim: Simulator, mode: str) -> None:
    """Every defective 200 body becomes BadResponse with a reason naming the defect."""
    sim.faults.set(A.id, bad_response=mode)
    async with ApiClient(sim_config(sim)) as client:
        with pytest.raises(BadResponse) as caught:
            await client.fetch_day(tenant_config(A), DAY, retry=False)
    assert EXPECTED_REASON[mode] in caught.value.reason
    assert caught.value.status == 200
    assert client.metrics.bad_responses[A.id] == 1


async def test_a_bad_body_is_not_retried_and_is_handed_over(sim: Simulator) -> None:
    """A bad 200 body is asked for once (the same request gives the same body), and BadResponse
    carries the body as received, for the caller to quarantine."""
    sim.faults.set(A.id, bad_response="html_200")
    async with ApiClient(sim_config(sim)) as client:
        with no_wait(), pytest.raises(BadResponse) as caught:
            await client.fetch_day(tenant_config(A), DAY)
    assert sim.stats.usage_requests[A.id] == 1
    assert caught.value.body is not None
    assert caught.value.body.lstrip().startswith(b"<")


# --- no transport exception escapes -------------------------------------------------------------


async def test_connection_refused_is_a_transport_error() -> None:
    """A closed port gives TransportError (not an aiohttp or OS exception)."""
    port = closed_port()
    config = api_config(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/oauth/token")
    tenant = TenantConfig(id="acme", api_key="zak_test_acme")
    async with ApiClient(config) as client:
        with pytest.raises(TransportError) as caught:
            await client.fetch_day(tenant, DAY, retry=False)
        with no_wait(), pytest.raises(TransportError):
            await client.fetch_day(tenant, DAY)
    assert type(caught.value) is TransportError
    assert caught.value.__cause__ is None
    assert client.metrics.requests[("acme", "transport_error")] == 4


async def test_token_endpoint_unreachable_is_a_transport_error() -> None:
    """A token endpoint nobody listens on fails the fetch with TransportError for that tenant."""
    port = closed_port()
    config = api_config(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/oauth/token")
    async with ApiClient(config) as client:
        with pytest.raises(TransportError, match="token request failed") as caught:
            await client.fetch_day(tenant_config(A), DAY, retry=False)
    assert caught.value.tenant == A.id


async def test_server_closing_the_connection_is_a_transport_error() -> None:
    """A server that accepts and hangs up without answering gives TransportError."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = api_config(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/oauth/token")
    try:
        async with ApiClient(config) as client:
            with pytest.raises(TransportError):
                await client.fetch_day(TenantConfig(id="acme", api_key="zak_x"), DAY, retry=False)
    finally:
        server.close()
        await server.wait_closed()


async def test_slow_response_is_an_api_timeout(sim: Simulator) -> None:
    """A usage response slower than api.timeout becomes ApiTimeout."""
    sim.faults.set(A.id, latency=0.6)
    config = sim_config(sim, timeout=dt.timedelta(seconds=0.2))
    async with ApiClient(config) as client:
        await client.fetch_day(tenant_config(B), DAY)
        with pytest.raises(ApiTimeout, match=r"within 0\.2s"):
            await client.fetch_day(tenant_config(A), DAY, retry=False)
    assert client.metrics.requests[(A.id, "timeout")] == 1


async def test_only_api_errors_leave_fetch_day(sim: Simulator) -> None:
    """Across every fault, fetch_day raises nothing but ApiError subclasses."""
    sim.faults.set(A.id, failure_rate=0.5)
    sim.faults.set(B.id, bad_response="malformed_json")
    sim.faults.set(C.id, rate_limit=50, rate_limit_burst=2, retry_after_value="garbage")
    tenants = [tenant_config(t) for t in SIM_TENANTS]
    async with ApiClient(sim_config(sim, timeout=dt.timedelta(seconds=2))) as client:
        with no_wait():
            outcomes = await asyncio.gather(
                *(
                    client.fetch_day(t, DAY - dt.timedelta(days=i))
                    for t in tenants
                    for i in range(10)
                ),
                return_exceptions=True,
            )
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors
    assert all(isinstance(e, ApiError) for e in errors)


async def test_client_must_be_opened(sim: Simulator) -> None:
    """Using the client outside 'async with' is a programming error, said plainly."""
    client = ApiClient(sim_config(sim))
    with pytest.raises(RuntimeError, match="async with"):
        await client.fetch_day(TenantConfig(id="acme", api_key="zak_x"), DAY, retry=False)


async def test_tenant_rate_limit_override_paces_requests(sim: Simulator) -> None:
    """A tenant rate of 10/s, burst 1, spaces its 4 requests about 0.1 s apart."""
    tenant = tenant_config(A, rate_limit=RateLimitConfig(per_second=10, burst=1))
    async with ApiClient(sim_config(sim)) as client:
        await client.fetch_day(tenant, DAY)  # token fetched, bucket empty
        started = time.monotonic()
        await asyncio.gather(*(client.fetch_day(tenant, DAY) for _ in range(4)))
        elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.0
    assert client.metrics.rate_limit_wait_seconds[A.id] >= 0.5  # 0.1 + 0.2 + 0.3 + 0.4 minus slack


async def test_a_big_backfill_does_not_starve_small_tenants() -> None:
    """With 4 global slots, 49 tenants' 2 days each are served long before a 90-day backfill."""
    tenants = demo_tenants(50)
    big, small = tenants[0], tenants[1:]
    settings = SimulatorSettings(tenants=tenants, today=TODAY, latency=0.005)
    async with running_simulator(settings) as server:
        async with ApiClient(sim_config(server, max_concurrency=4)) as client:
            configs = {t.id: tenant_config(t) for t in tenants}
            await asyncio.gather(*(client.fetch_day(c, TODAY) for c in configs.values()))
            server.stats.reset()
            jobs = [
                client.fetch_day(configs[big.id], DAY - dt.timedelta(days=i)) for i in range(90)
            ]
            jobs += [
                client.fetch_day(configs[t.id], DAY - dt.timedelta(days=i))
                for t in small
                for i in range(2)
            ]
            await asyncio.gather(*jobs)
        order = [record.tenant for record in server.stats.order()]
    assert len(order) == 90 + 49 * 2
    last_small = max(i for i, tenant in enumerate(order) if tenant != big.id)
    # Round-robin: every small tenant gets its turn before the big one gets its third slot or so;
    # a FIFO queue would put every small request behind all 90 of the big tenant's.
    assert last_small < 2 * 50 + 8
    assert server.stats.max_in_flight <= 4


async def test_pacing_at_the_apis_own_limit_earns_no_429() -> None:
    """Paced at exactly the API's limit, with requests queueing for scarce slots, no request is
    answered 429: a request granted but still queued holds its token until it is answered."""
    tenants = demo_tenants(6)
    settings = SimulatorSettings(tenants=tenants, today=TODAY, latency=0.02, rate_limit=10)
    limit = RateLimitConfig(per_second=10, burst=10)
    async with running_simulator(settings) as server:
        async with ApiClient(sim_config(server, max_concurrency=3, rate_limit=limit)) as client:
            jobs = [
                client.fetch_day(tenant_config(t), DAY - dt.timedelta(days=i))
                for t in tenants
                for i in range(20)
            ]
            await asyncio.gather(*jobs)
        assert server.stats.responses[429] == 0
        assert server.stats.responses[200] == 6 * 20


async def test_no_429_when_a_tenants_first_requests_reach_the_api_late() -> None:
    """Paced at exactly the API's limit (5/s, burst 5), a tenant whose first requests open new
    connections that reach the API 0.3 s late, while the next ones reuse warm connections and
    arrive at once, is never answered 429."""
    tenant = demo_tenants(1)[0]
    settings = SimulatorSettings(tenants=[tenant], today=TODAY, latency=0.02, rate_limit=5)
    limit = RateLimitConfig(per_second=5, burst=5)
    async with (
        running_simulator(settings) as server,
        SlowConnectRelay(server.base_url, delay=0.3) as relay,
    ):
        # Tokens come straight from the simulator; usage requests go through the slow relay.
        config = api_config(relay.base_url, server.token_url, max_concurrency=5, rate_limit=limit)
        async with ApiClient(config) as client:
            with no_wait():
                await asyncio.gather(
                    *(
                        client.fetch_day(tenant_config(tenant), DAY - dt.timedelta(days=i))
                        for i in range(12)
                    )
                )
        assert server.stats.responses[200] == 12
        assert server.stats.responses[429] == 0
        assert relay.connections == 5  # five fresh connections, then only warm ones


# --- what the server says, and what it must not make us repeat ----------------------------------


@pytest.mark.parametrize(
    ("mode", "error"), [("429", RateLimited), ("500", ServerError), ("403", RequestRejected)]
)
async def test_error_messages_come_from_either_envelope_without_the_credential(
    mode: str, error: type[ApiError]
) -> None:
    """A 429/5xx/4xx message is read from ``error.message`` or ``message`` so the log says why,
    and the access token it echoes is masked."""
    tenant = TenantConfig(id="acme", client_id=mode, client_secret="echo-client-secret")
    async with EchoingApi({mode: mode}) as api:
        config = api_config(api.base_url, api.token_url)
        async with ApiClient(config) as client:
            with pytest.raises(error) as caught:
                await client.fetch_day(tenant, DAY, retry=False)
    assert "not allowed: Authorization=Bearer ***" in caught.value.reason
    assert api.issued
    assert api.issued[0] not in caught.value.reason


async def test_a_body_over_the_cap_is_a_bad_response(sim: Simulator) -> None:
    """A body larger than the per-body cap fails that day as BadResponse, naming the cap."""
    async with ApiClient(sim_config(sim), max_body=200) as client:
        with pytest.raises(BadResponse, match="larger than 200 bytes"):
            await client.fetch_day(tenant_config(A), DAY, retry=False)


async def test_a_redirect_is_not_followed_and_names_its_target_scrubbed() -> None:
    """A 3xx is a RequestRejected naming the Location, with the API key it carries masked."""
    key = "zak_test_redirected_key"

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://elsewhere.invalid/usage?key={key}")

    app = web.Application()
    app.router.add_get("/api/v1/data/usage", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with ApiClient(api_config(base, base + "/oauth/token")) as client:
            with pytest.raises(RequestRejected) as caught:
                await client.fetch_day(TenantConfig(id="acme", api_key=key), DAY, retry=False)
    finally:
        await runner.cleanup()
    assert caught.value.status == 302
    assert "redirect to http://elsewhere.invalid/usage?key=***" in caught.value.reason
