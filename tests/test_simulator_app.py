"""The simulator's HTTP endpoints: documented token answers, usage parameter checks, auth."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest

from collector.simulator import Simulator, running_simulator
from tests.simulator_helpers import CREDS_1, T1, fetch_token, get_usage, make_settings

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

BODY_BOTH = (
    '{"status":"error","message":"Only one parameter is expected. '
    "Provide either 'day' or 'period', not both\"}"
)
BODY_PERIOD = (
    '{"status":"error","message":"Invalid period parameter. Period has to be one of 7d, 30d, 90d"}'
)
BODY_DAY = '{"status":"error","message":"Invalid day parameter. Day must be in YYYY-MM-DD format"}'
BODY_UNAUTHORIZED = '{"status":"error","message":"Unauthorized"}'


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
