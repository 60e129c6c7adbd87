"""API payload validation and normalization into tenant-day records."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from collector.errors import BadResponse
from collector.models import content_hash, normalize, parse_usage

DAY = dt.date(2026, 3, 4)
FETCHED = dt.datetime(2026, 3, 5, 12, 0, tzinfo=dt.UTC)


def _payload(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "period": {"start": "2026-03-04", "end": "2026-03-04", "days": 1},
        "summary": {"total_active_users": 2, "total_messages": 7},
        "users": [
            {
                "email": "a@example.ai",
                "messages": 5,
                "last_active": "2026-03-04",
                "ides": ["VS Code"],
                "languages": ["Python", "SQL"],
            },
            {
                "email": "b@example.ai",
                "messages": 2,
                "last_active": "2026-03-04",
                "ides": ["PyCharm"],
                "languages": ["Python"],
            },
        ],
        "daily": [
            {
                "day": "2026-03-04",
                "active_users": 2,
                "messages": 7,
                "ides": [
                    {"ide_name": "VS Code", "engaged_users": 1},
                    {"ide_name": "PyCharm", "engaged_users": 1},
                ],
                "languages": [{"language_name": "Python", "engaged_users": 2}],
            },
        ],
    }
    data.update(changes)
    return {"status": "success", "data": data}


def _parse(body: dict[str, Any]) -> Any:
    return parse_usage(json.dumps(body))


def test_unknown_fields_are_ignored() -> None:
    """Fields the API adds later (e.g. lines of code) do not break parsing."""
    body = _payload()
    body["data"]["loc_accepted"] = 1200
    body["data"]["daily"][0]["loc_generated"] = 3000
    assert _parse(body).data.summary.total_messages == 7


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("summary", "total_messages"), -1),
        (("summary", "total_messages"), "7"),
        (("summary", "total_active_users"), 2.5),
        (("period", "start"), "2026-3-4"),
        (("period", "days"), None),
    ],
)
def test_wrong_types_and_negative_numbers_are_bad_responses(
    path: tuple[str, str], value: Any
) -> None:
    """A count that is negative, a string or a float, or a malformed date rejects the response."""
    body = _payload()
    body["data"][path[0]][path[1]] = value
    with pytest.raises(BadResponse, match="does not match the documented schema"):
        _parse(body)


def test_html_and_error_envelopes_are_bad_responses() -> None:
    """An HTML page or an error envelope with status 200 is not usage data."""
    for body in ("<html>maintenance</html>", '{"status": "error", "message": "x"}', ""):
        with pytest.raises(BadResponse):
            parse_usage(body)


def test_normalize_builds_the_four_tables() -> None:
    """One day response becomes daily, IDE, language and user rows keyed by tenant and day."""
    td = normalize("acme", DAY, _parse(_payload()), fetched_at=FETCHED, final=True)
    assert (td.daily.active_users, td.daily.messages, td.daily.final) == (2, 7, True)
    assert {(r.ide_name, r.engaged_users) for r in td.ides} == {("VS Code", 1), ("PyCharm", 1)}
    assert [(r.language_name, r.engaged_users) for r in td.languages] == [("Python", 2)]
    assert [(u.user, u.messages, u.languages) for u in td.users] == [
        ("a@example.ai", 5, ("Python", "SQL")),
        ("b@example.ai", 2, ("Python",)),
    ]
    assert {r.tenant for r in (*td.ides, *td.languages, *td.users)} == {"acme"}


def test_an_idle_day_is_a_valid_day_with_zeros() -> None:
    """A day with no activity (empty daily and users) is stored as zeros, not as an error."""
    body = _payload(users=[], daily=[], summary={"total_active_users": 0, "total_messages": 0})
    td = normalize("acme", DAY, _parse(body), fetched_at=FETCHED, final=False)
    assert (td.daily.active_users, td.daily.messages, td.users) == (0, 0, ())


def test_a_response_for_another_day_is_rejected() -> None:
    """A daily entry for a date other than the one asked for is a bad response."""
    body = _payload()
    body["data"]["daily"][0]["day"] = "2026-03-05"
    with pytest.raises(BadResponse, match="asked for day 2026-03-04"):
        normalize("acme", DAY, _parse(body), fetched_at=FETCHED, final=False)


def test_duplicate_keys_are_rejected_without_echoing_emails() -> None:
    """A payload listing one IDE or one user twice is rejected; the message names no email."""
    body = _payload()
    body["data"]["daily"][0]["ides"].append({"ide_name": "VS Code", "engaged_users": 3})
    with pytest.raises(BadResponse, match="ide_name 'VS Code' more than once"):
        normalize("acme", DAY, _parse(body), fetched_at=FETCHED, final=False)
    body = _payload()
    body["data"]["users"].append(dict(body["data"]["users"][0]))
    with pytest.raises(BadResponse) as caught:
        normalize("acme", DAY, _parse(body), fetched_at=FETCHED, final=False)
    assert "@" not in str(caught.value)


def test_content_hash_ignores_key_order_and_fetch_time() -> None:
    """The same figures give the same hash whatever the key order or when they were fetched;
    changed figures give another."""
    first = normalize("acme", DAY, _parse(_payload()), fetched_at=FETCHED, final=False)
    later = normalize(
        "acme", DAY, _parse(_payload()), fetched_at=FETCHED + dt.timedelta(hours=5), final=True
    )
    assert first.content_hash == later.content_hash
    data = _payload()["data"]
    reordered = dict(reversed(list(data.items())))
    assert content_hash(data) == content_hash(reordered)
    changed = _payload()
    changed["data"]["daily"][0]["messages"] = 8
    other = normalize("acme", DAY, _parse(changed), fetched_at=FETCHED, final=False)
    assert other.content_hash != first.content_hash
