"""The simulated Zencoder API over real sockets: documented bodies, consistent data, fault knobs."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from collector.errors import BadResponse
from collector.models import normalize, parse_usage
from collector.simulator import (
    OMIT,
    SimTenant,
    Simulator,
    SimulatorSettings,
    demo_tenants,
    load_tenants_file,
    running_simulator,
)

TODAY = dt.date(2025, 10, 1)  # a Wednesday
T1 = "tenant-01"
T2 = "tenant-02"
API_KEY_1 = "zak_test_tenant-01"
CREDS_1 = {
    "client_id": "tenant-01-client",
    "client_secret": "tenant-01-secret",
    "grant_type": "client_credentials",
}
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

BODY_BOTH = (
    '{"status":"error","message":"Only one parameter is expected. '
    "Provide either 'day' or 'period', not both\"}"
)
BODY_PERIOD = (
    '{"status":"error","message":"Invalid period parameter. Period has to be one of 7d, 30d, 90d"}'
)
BODY_DAY = '{"status":"error","message":"Invalid day parameter. Day must be in YYYY-MM-DD format"}'
BODY_FAILED = '{"status":"error","message":"Failed to fetch data"}'
BODY_UNAUTHORIZED = '{"status":"error","message":"Unauthorized"}'
BODY_TOO_MANY = '{"status":"error","message":"Too many requests"}'


def make_settings(**overrides: Any) -> SimulatorSettings:
    values: dict[str, Any] = {"tenants": demo_tenants(3), "today": TODAY, "seed": 7}
    values.update(overrides)
    return SimulatorSettings(**values)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(make_settings()) as simulator:
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_usage(
    http: aiohttp.ClientSession,
    sim: Simulator,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes, aiohttp.ClientResponse]:
    url = sim.usage_url + (f"?{query}" if query else "")
    async with http.get(
        url, headers={"zencoder-api-key": API_KEY_1} if headers is None else headers
    ) as r:
        return r.status, r.content_type, await r.read(), r


async def day_json(http: aiohttp.ClientSession, sim: Simulator, tenant: str, day: dt.date) -> Any:
    headers = {"zencoder-api-key": f"zak_test_{tenant}"}
    status, _, body, _ = await get_usage(http, sim, f"day={day.isoformat()}", headers)
    assert status == 200
    return json.loads(body)["data"]


async def fetch_token(http: aiohttp.ClientSession, sim: Simulator, **body: Any) -> tuple[int, Any]:
    async with http.post(sim.token_url, json=body or CREDS_1) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


# --- token endpoint -------------------------------------------------------------------------------


async def test_token_success_has_the_documented_fields(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A good request gets Bearer, id_token == access_token, a UUID refresh_token, expires_in."""
    status, body = await fetch_token(http, sim)
    assert status == 200
    assert set(body) == {"token_type", "access_token", "id_token", "refresh_token", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["access_token"].startswith("eyJ")
    assert body["id_token"] == body["access_token"]
    assert UUID_RE.fullmatch(body["refresh_token"])
    assert body["expires_in"] == 86400
    assert sim.stats.token_requests["tenant-01-client"] == 1


async def test_token_accepts_a_form_encoded_body(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A form-encoded token request is accepted like the JSON one."""
    async with http.post(sim.token_url, data=CREDS_1) as r:
        assert r.status == 200
        assert (await r.json())["token_type"] == "Bearer"


async def test_token_invalid_json_gets_the_er_00006_body(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A body that is not JSON gets 400 with the observed ER-00006 body verbatim."""
    headers = {"Content-Type": "application/json"}
    async with http.post(sim.token_url, data=b"{client_id:", headers=headers) as r:
        assert r.status == 400
        assert r.content_type == "application/json"
        assert await r.text() == '{"errors":["Invalid input json"],"errorCode":"ER-00006"}'


@pytest.mark.parametrize(
    "body",
    [
        {**CREDS_1, "client_secret": "wrong"},
        {**CREDS_1, "client_id": "nobody"},
        {**CREDS_1, "grant_type": "password"},
        {"client_id": "tenant-01-client", "grant_type": "client_credentials"},
        {"client_secret": "tenant-01-secret", "grant_type": "client_credentials"},
        {"client_id": "tenant-01-client", "client_secret": "tenant-01-secret"},
        {**CREDS_1, "client_secret": 12345},
    ],
    ids=[
        "bad-secret",
        "unknown-client",
        "wrong-grant",
        "no-secret",
        "no-id",
        "no-grant",
        "int-secret",
    ],
)
async def test_token_rejects_bad_credentials_with_401(
    sim: Simulator, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    """Bad credentials, a wrong grant_type or a missing field give 401 Invalid authentication."""
    async with http.post(sim.token_url, json=body) as r:
        assert r.status == 401
        assert await r.text() == '{"errors":["Invalid authentication"]}'
    assert sim.stats.tokens_issued.total() == 0


# --- usage endpoint: parameters -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("period=7d&day=2025-09-30", BODY_BOTH),
        ("period=&day=", BODY_BOTH),
        ("day=garbage&period=1y", BODY_BOTH),
        ("period=7D", BODY_PERIOD),
        ("period=", BODY_PERIOD),
        ("period=1d", BODY_PERIOD),
        ("period=%207d", BODY_PERIOD),
        ("day=2025-02-30", BODY_DAY),
        ("day=2025-1-5", BODY_DAY),
        ("day=", BODY_DAY),
        ("day=20250105", BODY_DAY),
        ("day=2025/01/05", BODY_DAY),
        ("day=2025-01-05T00:00:00", BODY_DAY),
    ],
)
async def test_invalid_parameters_get_the_documented_400(
    sim: Simulator, http: aiohttp.ClientSession, query: str, expected: str
) -> None:
    """Each invalid parameter combination gets its documented 400, both-present checked first."""
    status, content_type, body, _ = await get_usage(http, sim, query)
    assert (status, content_type, body.decode()) == (400, "application/json", expected)


async def test_no_parameter_means_period_7d(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """Without period or day the answer is the 7d period, and unknown parameters are ignored."""
    _, _, plain, _ = await get_usage(http, sim, "")
    _, _, seven, _ = await get_usage(http, sim, "period=7d&page=2")
    assert json.loads(plain) == json.loads(seven)
    period = json.loads(plain)["data"]["period"]
    assert period == {"start": "2025-09-24", "end": "2025-10-01", "days": 7}


# --- usage endpoint: auth -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic dGVuYW50OnNlY3JldA=="},
        {"zencoder-api-key": "zak_test_nobody"},
    ],
    ids=["none", "unknown-bearer", "basic", "unknown-key"],
)
async def test_missing_or_unknown_credentials_get_401(
    sim: Simulator, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """Missing or unknown credentials get 401 Unauthorized in the usage envelope."""
    status, content_type, body, _ = await get_usage(http, sim, "day=2025-09-30", headers)
    assert (status, content_type, body.decode()) == (401, "application/json", BODY_UNAUTHORIZED)
    assert sim.stats.responses[401] == 1
    assert sim.stats.usage_requests.total() == 0


async def test_bearer_and_api_key_see_the_same_data(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A Bearer token and the tenant's zencoder-api-key give the same 200 body."""
    _, token = await fetch_token(http, sim)
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    s1, _, by_token, _ = await get_usage(http, sim, "day=2025-09-30", bearer)
    s2, _, by_key, _ = await get_usage(http, sim, "day=2025-09-30")
    assert (s1, s2) == (200, 200)
    assert by_token == by_key
    assert sim.stats.usage_requests[T1] == 2


async def test_tokens_expire_after_their_lifetime(http: aiohttp.ClientSession) -> None:
    """A token is accepted within token_lifetime and refused with 401 after it."""
    async with running_simulator(make_settings(token_lifetime=1)) as sim:
        status, token = await fetch_token(http, sim)
        assert token["expires_in"] == 1
        bearer = {"Authorization": f"Bearer {token['access_token']}"}
        assert (await get_usage(http, sim, "day=2025-09-30", bearer))[0] == 200
        await asyncio.sleep(1.05)
        status, _, body, _ = await get_usage(http, sim, "day=2025-09-30", bearer)
        assert (status, body.decode()) == (401, BODY_UNAUTHORIZED)


async def test_revoked_tokens_get_401_but_new_ones_work(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """revoke_tokens invalidates the tenant's issued tokens only; a new token works again."""
    _, old = await fetch_token(http, sim)
    creds_2 = {**CREDS_1, "client_id": "tenant-02-client", "client_secret": "tenant-02-secret"}
    _, other = await fetch_token(http, sim, **creds_2)
    sim.faults.revoke_tokens(T1)
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {old['access_token']}"}))[
        0
    ] == 401
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {other['access_token']}"}))[
        0
    ] == 200
    _, new = await fetch_token(http, sim)
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {new['access_token']}"}))[
        0
    ] == 200


async def test_reject_all_tokens_refuses_even_fresh_tokens(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """With reject_all_tokens every Bearer request is 401 while API keys still work."""
    sim.faults.reject_all_tokens = True
    _, token = await fetch_token(http, sim)
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {token['access_token']}"}))[
        0
    ] == 401
    assert (await get_usage(http, sim, ""))[0] == 200


# --- data -----------------------------------------------------------------------------------------


def check_day_is_consistent(data: dict[str, Any], day: dt.date) -> None:
    users, daily = data["users"], data["daily"]
    assert data["period"] == {"start": day.isoformat(), "end": day.isoformat(), "days": 1}
    assert data["summary"]["total_active_users"] == len(users)
    assert data["summary"]["total_messages"] == sum(u["messages"] for u in users)
    assert [(-u["messages"], u["email"]) for u in users] == sorted(
        (-u["messages"], u["email"]) for u in users
    )
    if not users:
        assert daily == []
        return
    (entry,) = daily
    assert entry["day"] == day.isoformat()
    assert entry["active_users"] == len(users)
    assert entry["messages"] == data["summary"]["total_messages"]
    for user in users:
        assert user["last_active"] == day.isoformat()
        assert user["messages"] > 0
        assert user["ides"]
        assert user["languages"]
        assert all(isinstance(x, str) for x in user["ides"] + user["languages"])
    ide_users = Counter(i for u in users for i in u["ides"])
    lang_users = Counter(lang for u in users for lang in u["languages"])
    assert {i["ide_name"]: i["engaged_users"] for i in entry["ides"]} == ide_users
    assert {x["language_name"]: x["engaged_users"] for x in entry["languages"]} == lang_users


async def test_day_responses_are_internally_consistent_and_realistic(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Over 90 days each day= answer adds up and validates, and weekends are much quieter."""
    weekday_users: list[int] = []
    weekend_users: list[int] = []
    everyone: set[str] = set()
    ides: set[str] = set()
    for offset in range(91):
        day = TODAY - dt.timedelta(days=offset)
        data = await day_json(http, sim, T1, day)
        check_day_is_consistent(data, day)
        normalize(T1, day, parse_usage(json.dumps({"status": "success", "data": data})),
                  fetched_at=dt.datetime.now(dt.UTC), final=True)  # fmt: skip
        (weekend_users if day.weekday() >= 5 else weekday_users).append(len(data["users"]))
        everyone.update(u["email"] for u in data["users"])
        ides.update(i for u in data["users"] for i in u["ides"])
    assert 8 <= len(everyone) <= 60
    assert len(ides) >= 2
    assert sum(weekend_users) / len(weekend_users) < 0.4 * sum(weekday_users) / len(weekday_users)


async def test_org_size_follows_sim_tenant_users(http: aiohttp.ClientSession) -> None:
    """SimTenant.users sets the org size: a 200-person org has over 60 distinct users in 90d."""
    big = SimTenant("big", "big-client", "big-secret", api_key="zak_big", users=200)
    async with running_simulator(make_settings(tenants=[big])) as sim:
        data = sim.period_data("big", "90d")
        assert 60 < data["summary"]["total_active_users"] <= 200


@pytest.mark.parametrize("period", ["7d", "30d"])
async def test_period_equals_the_union_of_its_days(
    sim: Simulator, http: aiohttp.ClientSession, period: str
) -> None:
    """period= totals, daily entries and per-user sums equal those of the matching day= answers."""
    n = int(period[:-1])
    _, _, raw, _ = await get_usage(http, sim, f"period={period}")
    data = json.loads(raw)["data"]
    start = TODAY - dt.timedelta(days=n)
    assert data["period"] == {"start": start.isoformat(), "end": TODAY.isoformat(), "days": n}
    days = [await day_json(http, sim, T1, start + dt.timedelta(days=i)) for i in range(n + 1)]
    assert data["daily"] == [d["daily"][0] for d in days if d["daily"]]
    assert data["summary"]["total_messages"] == sum(d["summary"]["total_messages"] for d in days)
    distinct = {u["email"] for d in days for u in d["users"]}
    assert data["summary"]["total_active_users"] == len(distinct)
    per_user: Counter[str] = Counter()
    last: dict[str, str] = {}
    for d in days:
        for u in d["users"]:
            per_user[u["email"]] += u["messages"]
            last[u["email"]] = max(last.get(u["email"], ""), u["last_active"])
    assert {u["email"]: u["messages"] for u in data["users"]} == per_user
    assert {u["email"]: u["last_active"] for u in data["users"]} == last
    assert data == sim.period_data(T1, period)


async def test_future_and_too_old_days_are_empty(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Days after today or before the 90-day history answer 200 with zeros and empty lists."""
    for day in (TODAY + dt.timedelta(days=1), TODAY - dt.timedelta(days=91), dt.date(2001, 1, 1)):
        data = await day_json(http, sim, T1, day)
        assert data == {
            "period": {"start": day.isoformat(), "end": day.isoformat(), "days": 1},
            "summary": {"total_active_users": 0, "total_messages": 0},
            "users": [],
            "daily": [],
        }
    assert (await day_json(http, sim, T1, TODAY - dt.timedelta(days=90)))["users"]


async def test_data_is_deterministic_across_instances(http: aiohttp.ClientSession) -> None:
    """Two simulators with one seed give identical bodies; another seed gives different figures."""
    days = [TODAY - dt.timedelta(days=i) for i in range(0, 20, 3)]
    bodies = []
    for seed in (7, 7, 8):
        async with running_simulator(make_settings(seed=seed)) as sim:
            bodies.append([await day_json(http, sim, T2, d) for d in reversed(days)])
            assert bodies[-1][-1] == sim.day_data(T2, days[0])
    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


async def test_change_day_alters_only_that_day(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """change_day gives the day new figures while other days keep theirs."""
    day, other = TODAY - dt.timedelta(days=2), TODAY - dt.timedelta(days=3)
    before, before_other = await day_json(http, sim, T1, day), await day_json(http, sim, T1, other)
    sim.change_day(T1, day)
    assert await day_json(http, sim, T1, day) != before
    assert await day_json(http, sim, T1, other) == before_other


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
    response = parse_usage(body, tenant=T1)
    normalize(T1, day, response, fetched_at=dt.datetime.now(dt.UTC), final=True)


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


# --- stats ----------------------------------------------------------------------------------------


async def test_stats_count_and_log_requests_in_order(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Counters by client, tenant and status; the log holds (tenant, param, status) in order."""
    await fetch_token(http, sim)
    await get_usage(http, sim, "day=2025-09-30")
    await get_usage(http, sim, "period=30d", {"zencoder-api-key": "zak_test_tenant-02"})
    await get_usage(http, sim, "period=9d")
    await get_usage(http, sim, "day=2025-09-29", {})
    assert sim.stats.token_requests == Counter({"tenant-01-client": 1})
    assert sim.stats.usage_requests == Counter({T1: 2, T2: 1})
    assert sim.stats.responses == Counter({200: 2, 400: 1, 401: 1})
    log = list(sim.stats.log)
    assert [(r.tenant, r.param, r.status) for r in log] == [
        (T1, "2025-09-30", 200),
        (T2, "30d", 200),
        (T1, "9d", 400),
        (None, "2025-09-29", 401),
    ]
    assert [r.time for r in log] == sorted(r.time for r in log)
    sim.stats.log_enabled = False
    await get_usage(http, sim, "day=2025-09-30")
    assert len(sim.stats.log) == 4
    assert sim.stats.responses[200] == 3


# --- tenants file and command line ----------------------------------------------------------------


def test_tenants_file_fills_in_the_demo_rule(tmp_path: Path) -> None:
    """A tenants file needs only ids; credentials default to the demo rule; duplicates fail."""
    path = tmp_path / "tenants.yaml"
    path.write_text(
        "tenants:\n  - id: acme\n    users: 12\n  - id: globex\n    client_secret: s3\n"
    )
    acme, globex = load_tenants_file(path)
    assert (acme.client_id, acme.client_secret, acme.api_key, acme.users) == (
        "acme-client", "acme-secret", "zak_test_acme", 12,
    )  # fmt: skip
    assert globex.client_secret == "s3"
    assert "s3" not in repr(globex)
    path.write_text("- id: a\n- id: a\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_tenants_file(path)


async def test_simulate_command_serves_and_stops_on_sigterm(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The simulate command prints its URLs, serves the file's tenants, and exits 0 on SIGTERM."""
    path = tmp_path / "tenants.yaml"
    path.write_text("- id: acme\n  api_key: zak_acme\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "collector.simulator", "--port", "0", "--tenants-file", str(path),
        "--today", "2025-10-01", "--rate-limit", "50",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        base_url = first.rsplit(" ", 1)[-1].strip()
        assert base_url.startswith("http://127.0.0.1:")
        url = f"{base_url}/api/v1/data/usage?day=2025-09-30"
        async with http.get(url, headers={"zencoder-api-key": "zak_acme"}) as r:
            assert r.status == 200
            assert (await r.json())["data"]["users"][0]["email"].endswith("@acme.example")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_stats_endpoint_reports_counters_and_cpu(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """GET /_simulator/stats reports request counters and the process's CPU seconds as JSON."""
    await fetch_token(http, sim)
    await get_usage(http, sim, "day=2025-09-30")
    await get_usage(http, sim, "period=1d")
    async with http.get(sim.base_url + "/_simulator/stats") as r:
        body = await r.json()
    assert body["token_requests"] == 1
    assert body["usage_requests"] == 2
    assert body["responses"] == {"200": 1, "400": 1}
    assert body["cpu_seconds"] > 0
