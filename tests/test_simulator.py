"""The simulated Zencoder API over real sockets: documented bodies, data consistency, fault knobs."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import os
import re
import signal
import subprocess
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
    async with http.get(url, headers={"zencoder-api-key": API_KEY_1} if headers is None else headers) as r:
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


async def test_token_success_has_the_documented_fields(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """A good client_credentials request returns Bearer, id_token == access_token, a UUID refresh_token and expires_in."""
    status, body = await fetch_token(http, sim)
    assert status == 200
    assert set(body) == {"token_type", "access_token", "id_token", "refresh_token", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["access_token"].startswith("eyJ")
    assert body["id_token"] == body["access_token"]
    assert UUID_RE.fullmatch(body["refresh_token"])
    assert body["expires_in"] == 86400
    assert sim.stats.token_requests["tenant-01-client"] == 1


async def test_token_accepts_a_form_encoded_body(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """A form-encoded token request is accepted like the JSON one."""
    async with http.post(sim.token_url, data=CREDS_1) as r:
        assert r.status == 200
        assert (await r.json())["token_type"] == "Bearer"


async def test_token_invalid_json_gets_the_er_00006_body(sim: Simulator, http: aiohttp.ClientSession) -> None:
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
    ids=["bad-secret", "unknown-client", "wrong-grant", "no-secret", "no-id", "no-grant", "int-secret"],
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
    """Each invalid parameter combination gets its documented 400 body, both-present checked first."""
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


async def test_bearer_and_api_key_see_the_same_data(sim: Simulator, http: aiohttp.ClientSession) -> None:
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


async def test_revoked_tokens_get_401_but_new_ones_work(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """revoke_tokens invalidates the tenant's issued tokens only; a new token works again."""
    _, old = await fetch_token(http, sim)
    creds_2 = {**CREDS_1, "client_id": "tenant-02-client", "client_secret": "tenant-02-secret"}
    _, other = await fetch_token(http, sim, **creds_2)
    sim.faults.revoke_tokens(T1)
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {old['access_token']}"}))[0] == 401
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {other['access_token']}"}))[0] == 200
    _, new = await fetch_token(http, sim)
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {new['access_token']}"}))[0] == 200


async def test_reject_all_tokens_refuses_even_fresh_tokens(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """With reject_all_tokens every Bearer request is 401 while API keys still work."""
    sim.faults.reject_all_tokens = True
    _, token = await fetch_token(http, sim)
    assert (await get_usage(http, sim, "", {"Authorization": f"Bearer {token['access_token']}"}))[0] == 401
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
        assert user["last_active"] == day.isoformat() and user["messages"] > 0
        assert user["ides"] and user["languages"]
        assert all(isinstance(x, str) for x in user["ides"] + user["languages"])
    ide_users = Counter(i for u in users for i in u["ides"])
    lang_users = Counter(lang for u in users for lang in u["languages"])
    assert {i["ide_name"]: i["engaged_users"] for i in entry["ides"]} == ide_users
    assert {x["language_name"]: x["engaged_users"] for x in entry["languages"]} == lang_users


async def test_day_responses_are_internally_consistent_and_realistic(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Over 90 days each day= answer adds up, validates, and weekends are much quieter than weekdays."""
    weekday_users, weekend_users = [], []
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
    """SimTenant.users sets the org size: a 200-person org has more than 60 distinct users in 90d."""
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


async def test_future_and_too_old_days_are_empty(sim: Simulator, http: aiohttp.ClientSession) -> None:
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
