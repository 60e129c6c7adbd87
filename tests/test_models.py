"""API payload validation and normalization into tenant-day records."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from collector.errors import BadResponse
from collector.models import body_digest, parse_usage, tenant_day_from_body

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


def _day(body: dict[str, Any], *, fetched_at: dt.datetime, final: bool) -> Any:
    """The tenant-day the pipeline derives from this body (acme, DAY)."""
    return tenant_day_from_body(
        "acme", DAY, json.dumps(body).encode(), fetched_at=fetched_at, final=final
    )


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
    td = _day(_payload(), fetched_at=FETCHED, final=True)
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
    td = _day(body, fetched_at=FETCHED, final=False)
    assert (td.daily.active_users, td.daily.messages, td.users) == (0, 0, ())


def test_a_response_for_another_day_is_rejected() -> None:
    """A daily entry for a date other than the one asked for is a bad response."""
    body = _payload()
    body["data"]["daily"][0]["day"] = "2026-03-05"
    with pytest.raises(BadResponse, match="asked for day 2026-03-04"):
        _day(body, fetched_at=FETCHED, final=False)


def test_duplicate_keys_are_rejected_without_echoing_emails() -> None:
    """A payload listing one IDE or one user twice is rejected; the message names no email."""
    body = _payload()
    body["data"]["daily"][0]["ides"].append({"ide_name": "VS Code", "engaged_users": 3})
    with pytest.raises(BadResponse, match="ide_name 'VS Code' more than once"):
        _day(body, fetched_at=FETCHED, final=False)
    body = _payload()
    body["data"]["users"].append(dict(body["data"]["users"][0]))
    with pytest.raises(BadResponse) as caught:
        _day(body, fetched_at=FETCHED, final=False)
    assert "@" not in str(caught.value)


def test_content_hash_is_the_bodys_digest_whatever_the_fetch_time() -> None:
    """A day's content hash is the SHA-256 of its body: the same body gives the same hash
    whenever it was fetched, changed figures give another."""
    body = _payload()
    first = _day(body, fetched_at=FETCHED, final=False)
    later = _day(body, fetched_at=FETCHED + dt.timedelta(hours=5), final=True)
    assert first.content_hash == later.content_hash == body_digest(json.dumps(body).encode())
    changed = _payload()
    changed["data"]["daily"][0]["messages"] = 8
    other = _day(changed, fetched_at=FETCHED, final=False)
    assert other.content_hash != first.content_hash


@pytest.mark.parametrize(
    "moment",
    ["2026-03-04T00:00:00Z", "2026-03-04T09:15:00.123456789+02:00", "2026-03-04T23:59:59-05:00"],
)
def test_day_fields_accept_iso_date_times_and_keep_the_date_as_written(moment: str) -> None:
    """``day`` and ``period.start``/``end`` given as date-times (Z, offsets, fractions) name the
    date they are written with."""
    body = _payload(period={"start": moment, "end": moment, "days": 1})
    body["data"]["daily"][0]["day"] = moment
    td = _day(body, fetched_at=FETCHED, final=True)
    assert (td.day, td.daily.messages) == (DAY, 7)


def test_last_active_date_time_is_stored_as_the_utc_date_and_the_utc_instant() -> None:
    """A ``last_active`` date-time becomes its UTC date plus the full UTC timestamp; a bare date
    has no timestamp, and a date-time without offset is read as UTC."""
    body = _payload()
    users = body["data"]["users"]
    users[0]["last_active"] = "2026-03-05T01:30:00.5+02:00"  # 2026-03-04 23:30:00.5 UTC
    users.append({"email": "c@example.ai", "messages": 1, "last_active": "2026-03-04T08:00:00"})
    td = _day(body, fetched_at=FETCHED, final=True)
    by_user = {u.user: (u.last_active, u.last_active_at) for u in td.users}
    assert by_user == {
        "a@example.ai": (DAY, dt.datetime(2026, 3, 4, 23, 30, 0, 500000, tzinfo=dt.UTC)),
        "b@example.ai": (DAY, None),
        "c@example.ai": (DAY, dt.datetime(2026, 3, 4, 8, 0, tzinfo=dt.UTC)),
    }


@pytest.mark.parametrize("count", [2**63, 2**64, 10**30])
def test_counts_beyond_int64_name_the_field_path_not_the_value(count: int) -> None:
    """A count no sink can store is a bad response naming where it is, never the number."""
    body = _payload()
    body["data"]["users"][1]["messages"] = count
    with pytest.raises(BadResponse) as caught:
        _parse(body)
    assert "data.users[1].messages" in str(caught.value)
    assert str(count) not in str(caught.value)


def test_the_largest_int64_count_is_accepted() -> None:
    """2^63 - 1 fits every sink, so it is a valid count."""
    body = _payload()
    body["data"]["daily"][0]["messages"] = 2**63 - 1
    assert _parse(body).data.daily[0].messages == 2**63 - 1


def test_a_malformed_date_names_its_path_without_its_value() -> None:
    """A date field that is not ISO 8601 is rejected at its path; the text is not echoed."""
    body = _payload()
    body["data"]["users"][0]["last_active"] = "last tuesday, said ann@example.ai"
    with pytest.raises(BadResponse) as caught:
        _parse(body)
    assert "data.users[0].last_active" in str(caught.value)
    assert "tuesday" not in str(caught.value)


def test_an_unexpected_status_value_is_not_echoed() -> None:
    """msgspec quotes a wrong enum value; the reason keeps only where it is."""
    body = _payload()
    body["status"] = "secret-ish-text"
    with pytest.raises(BadResponse, match="at status") as caught:
        _parse(body)
    assert "secret-ish-text" not in str(caught.value)


def test_deep_nesting_is_a_bad_response_not_a_crash() -> None:
    """JSON nested 5,000 levels deep, even in an ignored field, fails the day with a reason."""
    body = json.dumps(_payload())[:-1] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(BadResponse, match="nested too deeply"):
        parse_usage(body)


@pytest.mark.parametrize("daily", ["empty", "other day"])
def test_a_period_for_another_day_is_rejected_even_without_daily(daily: str) -> None:
    """Another day's period is a bad response, with or without ``daily`` entries."""
    other = {"start": "2026-03-03", "end": "2026-03-03", "days": 1}
    body = _payload(period=other)
    if daily == "empty":
        body["data"]["daily"] = []
    else:
        body["data"]["daily"][0]["day"] = "2026-03-03"
    with pytest.raises(BadResponse, match=r"asked for day 2026-03-04 .*at data\.period"):
        _day(body, fetched_at=FETCHED, final=False)


def test_a_period_ending_the_next_day_is_the_day_asked_for() -> None:
    """An exclusive period end (start + 1 day), as in the documented 7-day example, is accepted."""
    body = _payload(period={"start": "2026-03-04", "end": "2026-03-05", "days": 1})
    td = _day(body, fetched_at=FETCHED, final=False)
    assert td.daily.messages == 7
