"""The simulated usage data: internally consistent, realistic, deterministic, per-day stable."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from typing import Any

import aiohttp
import pytest

from collector.models import tenant_day_from_body
from collector.simulator import SimTenant, Simulator, running_simulator
from tests.simulator_helpers import T1, T2, TODAY, get_usage, make_settings


async def day_json(http: aiohttp.ClientSession, sim: Simulator, tenant: str, day: dt.date) -> Any:
    headers = {"zencoder-api-key": f"zak_test_{tenant}"}
    status, _, body, _ = await get_usage(http, sim, f"day={day.isoformat()}", headers)
    assert status == 200
    return json.loads(body)["data"]


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
        body = json.dumps({"status": "success", "data": data}).encode()
        tenant_day_from_body(T1, day, body, fetched_at=dt.datetime.now(dt.UTC), final=True)
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
