"""The simulator's fault knobs on the usage and token endpoints."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from collector.errors import BadResponse
from collector.models import tenant_day_from_body
from collector.simulator import OMIT, Simulator, running_simulator
from tests.simulator_helpers import (
    API_KEY_1,
    CREDS_1,
    T1,
    T2,
    TODAY,
    fetch_token,
    get_usage,
    make_settings,
)

BODY_FAILED = '{"status":"error","message":"Failed to fetch data"}'
BODY_TOO_MANY = '{"status":"error","message":"Too many requests"}'


# --- fault knobs: usage endpoint ------------------------------------------------------------------


async def test_failure_knobs_give_the_documented_500(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """down, fail_next and failure_rate=1 answer 500 Failed to fetch data; clearing restores 200."""
    sim.faults.set(T1, down=True)
    assert (await get_usage(http, sim, "day=2025-09-30"))[:3] == (
        500,
        "application/json",
        BODY_FAILED.encode(),
    )
    sim.faults.set(T1, down=None)
    sim.faults.set(T1, fail_next=2)
    statuses = [(await get_usage(http, sim, "day=2025-09-30"))[0] for _ in range(3)]
    assert statuses == [500, 500, 200]
    sim.faults.set(None, failure_rate=1.0)
    assert (await get_usage(http, sim, "day=2025-09-30"))[0] == 500
    sim.faults.set(T1, failure_rate=0.0)  # a tenant value overrides everyone's
    assert (await get_usage(http, sim, "day=2025-09-30"))[0] == 200


async def test_failure_rate_is_a_seeded_share(http: aiohttp.ClientSession) -> None:
    """failure_rate=0.3 fails roughly 30% of requests, in the same pattern for the same seed."""
    patterns = []
    for _ in range(2):
        async with running_simulator(make_settings(failure_rate=0.3)) as sim:
            patterns.append([(await get_usage(http, sim, "day=2025-09-30"))[0] for _ in range(200)])
    assert patterns[0] == patterns[1]
    assert 40 <= patterns[0].count(500) <= 80


async def test_rate_limit_answers_429_with_retry_after_seconds(http: aiohttp.ClientSession) -> None:
    """Over the tenant's rate the answer is 429 with Retry-After in seconds; other tenants pass."""
    async with running_simulator(make_settings(rate_limit=2.0)) as sim:
        statuses = [(await get_usage(http, sim, "day=2025-09-30"))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        status, content_type, body, response = await get_usage(http, sim, "day=2025-09-30")
        assert (status, content_type, body.decode()) == (429, "application/json", BODY_TOO_MANY)
        assert response.headers["Retry-After"] == "1"
        other = {"zencoder-api-key": "zak_test_tenant-02"}
        assert (await get_usage(http, sim, "day=2025-09-30", other))[0] == 200
        await asyncio.sleep(0.55)
        assert (await get_usage(http, sim, "day=2025-09-30"))[0] == 200


async def test_retry_after_can_be_an_http_date(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """With retry_after_format=http-date the 429 carries an RFC 7231 date a few seconds ahead."""
    sim.faults.set(T1, rate_limit=0.2, rate_limit_burst=1, retry_after_format="http-date")
    await get_usage(http, sim, "day=2025-09-30")
    status, _, _, response = await get_usage(http, sim, "day=2025-09-30")
    assert status == 429
    when = email.utils.parsedate_to_datetime(response.headers["Retry-After"])
    ahead = (when - dt.datetime.now(dt.UTC)).total_seconds()
    assert response.headers["Retry-After"].endswith(" GMT")
    assert 4 <= ahead <= 7


@pytest.mark.parametrize("value", ["soon", "86400", "-3"])
async def test_retry_after_value_can_be_garbage_or_absurd(
    sim: Simulator, http: aiohttp.ClientSession, value: str
) -> None:
    """retry_after_value replaces the header verbatim on throttled answers."""
    sim.faults.set(T1, throttle_next=1, retry_after_value=value)
    status, _, _, response = await get_usage(http, sim, "day=2025-09-30")
    assert (status, response.headers["Retry-After"]) == (429, value)
    assert (await get_usage(http, sim, "day=2025-09-30"))[0] == 200


async def test_unavailable_mode_answers_503_with_retry_after(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """unavailable_next gives one 503 with Retry-After; an empty retry_after_value drops it."""
    sim.faults.set(T1, unavailable_next=1, retry_after_seconds=3)
    status, _, body, response = await get_usage(http, sim, "day=2025-09-30")
    assert (status, response.headers["Retry-After"]) == (503, "3")
    assert json.loads(body) == {"status": "error", "message": "Service unavailable"}
    assert (await get_usage(http, sim, "day=2025-09-30"))[0] == 200
    sim.faults.set(T1, unavailable=True, retry_after_value="")
    status, _, _, response = await get_usage(http, sim, "day=2025-09-30")
    assert status == 503
    assert "Retry-After" not in response.headers


async def test_latency_applies_per_tenant(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """A tenant's latency slows its own answers, not another tenant's, and both are in flight."""
    sim.faults.set(T1, latency=0.4)
    sim.faults.set(T2, latency=0.05)

    async def timed(headers: dict[str, str]) -> float:
        started = time.monotonic()
        await get_usage(http, sim, "day=2025-09-30", headers)
        return time.monotonic() - started

    slow, fast = await asyncio.gather(
        timed({"zencoder-api-key": API_KEY_1}), timed({"zencoder-api-key": "zak_test_tenant-02"})
    )
    assert slow >= 0.4
    assert 0.05 <= fast < 0.3
    assert sim.stats.max_in_flight == 2
    assert sim.stats.max_in_flight_by_tenant == Counter({T1: 1, T2: 1})


def _bad_body_parses(body: bytes, day: dt.date) -> None:
    tenant_day_from_body(T1, day, body, fetched_at=dt.datetime.now(dt.UTC), final=True)


@pytest.mark.parametrize(
    "mode",
    [
        "malformed_json",
        "missing_fields",
        "wrong_types",
        "negative_numbers",
        "wrong_day",
        "empty_body",
    ],
)
async def test_bad_response_modes_are_rejected_by_the_payload_model(
    sim: Simulator, http: aiohttp.ClientSession, mode: str
) -> None:
    """Each bad-response mode is a 200 that the collector's payload checks reject."""
    day = TODAY - dt.timedelta(days=1)
    _, _, good, _ = await get_usage(http, sim, f"day={day}")
    _bad_body_parses(good, day)
    sim.faults.set(T1, bad_response=mode)
    status, _, body, _ = await get_usage(http, sim, f"day={day}")
    assert status == 200
    assert body != good
    with pytest.raises(BadResponse):
        _bad_body_parses(body, day)


async def test_bad_response_modes_have_the_named_defect(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """html_200 is HTML, malformed_json cut JSON, wrong_types strings, negative_numbers negative."""
    day = f"day={TODAY - dt.timedelta(days=1)}"
    sim.faults.set(T1, bad_response="html_200")
    status, content_type, body, _ = await get_usage(http, sim, day)
    assert (status, content_type) == (200, "text/html")
    assert body.startswith(b"<!DOCTYPE html>")
    sim.faults.set(T1, bad_response="malformed_json")
    with pytest.raises(json.JSONDecodeError):
        json.loads((await get_usage(http, sim, day))[2])
    sim.faults.set(T1, bad_response="wrong_types")
    data = json.loads((await get_usage(http, sim, day))[2])["data"]
    assert isinstance(data["summary"]["total_messages"], str)
    sim.faults.set(T1, bad_response="negative_numbers")
    data = json.loads((await get_usage(http, sim, day))[2])["data"]
    assert data["summary"]["total_messages"] < 0
    sim.faults.set(T1, bad_response="missing_fields")
    assert "summary" not in json.loads((await get_usage(http, sim, day))[2])["data"]
    with pytest.raises(ValueError, match="unknown bad_response"):
        sim.faults.set(T1, bad_response="nonsense")


async def test_variant_knob_serves_the_variant_to_that_tenant_only(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """``variant`` reshapes one tenant's good answers over the socket (here gzip on the wire and
    a 502 HTML page); other tenants keep the plain answer, and unknown names are refused."""
    day = f"day={TODAY - dt.timedelta(days=1)}"
    _, _, plain, _ = await get_usage(http, sim, day)
    sim.faults.set(T1, variant="gzip")
    status, _, body, response = await get_usage(http, sim, day)
    assert (status, response.headers["Content-Encoding"], body) == (200, "gzip", plain)
    sim.faults.set(T1, variant="html_502")
    status, content_type, body, _ = await get_usage(http, sim, day)
    assert (status, content_type) == (502, "text/html")
    assert b"502 Bad Gateway" in body
    sim.faults.set(T1, variant="datetime_last_active")
    users = json.loads((await get_usage(http, sim, day))[2])["data"]["users"]
    assert all(u["last_active"].endswith("Z") for u in users)
    other = await get_usage(http, sim, day, headers={"zencoder-api-key": "zak_test_tenant-02"})
    assert all("T" not in u["last_active"] for u in json.loads(other[2])["data"]["users"])
    with pytest.raises(ValueError, match="unknown API variant"):
        sim.faults.set(T1, variant="nonsense")


# --- fault knobs: token endpoint ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["3600", 0, -5, 10**12, None, 3600.5])
async def test_expires_in_override_is_sent_verbatim(
    sim: Simulator, http: aiohttp.ClientSession, value: Any
) -> None:
    """The expires_in knob sends any JSON value verbatim without changing the real lifetime."""
    sim.faults.set_token("tenant-01-client", expires_in=value)
    status, body = await fetch_token(http, sim)
    assert status == 200
    assert body["expires_in"] == value
    assert type(body["expires_in"]) is type(value)
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    assert (await get_usage(http, sim, "", bearer))[0] == 200


async def test_expires_in_can_be_absent(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """expires_in=OMIT leaves the field out, for this client only."""
    sim.faults.set_token("tenant-01-client", expires_in=OMIT)
    _, body = await fetch_token(http, sim)
    assert "expires_in" not in body
    assert body["access_token"]
    creds_2 = {**CREDS_1, "client_id": "tenant-02-client", "client_secret": "tenant-02-secret"}
    assert (await fetch_token(http, sim, **creds_2))[1]["expires_in"] == 86400


async def test_token_delay_slows_only_that_client(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """token delay holds one client's answer while another client's token comes at once."""
    sim.faults.set_token("tenant-01-client", delay=0.4)
    started = time.monotonic()
    slow = asyncio.create_task(fetch_token(http, sim))
    creds_2 = {**CREDS_1, "client_id": "tenant-02-client", "client_secret": "tenant-02-secret"}
    assert (await fetch_token(http, sim, **creds_2))[0] == 200
    assert time.monotonic() - started < 0.3
    assert (await slow)[0] == 200
    assert time.monotonic() - started >= 0.4


async def test_token_fail_and_lockout(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """token fail gives 500 until cleared, fail_next N times, locked_out a 400 with its message."""
    sim.faults.set_token("tenant-01-client", fail=True)
    assert await fetch_token(http, sim) == (500, {"errors": ["Internal server error"]})
    sim.faults.set_token("tenant-01-client", fail=None, fail_next=1)
    assert [(await fetch_token(http, sim))[0] for _ in range(2)] == [500, 200]
    sim.faults.set_token(None, locked_out=True)
    assert await fetch_token(http, sim) == (400, {"errors": ["User is locked out"]})
    with pytest.raises(TypeError):
        sim.faults.set_token(None, bogus=1)


async def test_token_lifetime_knob_shortens_real_lifetime(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """The lifetime knob makes new tokens expire early even though expires_in says a day."""
    sim.faults.set_token("tenant-01-client", lifetime=0.2)
    _, body = await fetch_token(http, sim)
    assert body["expires_in"] == 86400
    await asyncio.sleep(0.25)
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {body['access_token']}"}))[
        0
    ] == 401
