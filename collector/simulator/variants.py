"""API variants: answers that follow the documentation but not our simulator's habits.

The Zencoder documentation types every date "ISO 8601", promises nothing about extra fields and
says nothing of gateways in front of the API. A real server may therefore send date-times with
offsets and fractions, lines-of-code fields, an HTML error page from a proxy or a gzip body. Each
variant here turns the simulator's good ``day=`` answer into one of those, so tests (and
``zencoder-collector simulate`` users, via a tenant's ``variant``) can check the collector
against them. ``tests/api_variants/`` holds one file per variant with the outcome expected.

Every transformation is deterministic: the same good body and day give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

HTML_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>{title}</title></head>"
    "<body><h1>{title}</h1><p>The server could not answer. Try again later.</p></body></html>"
)
DEEP_NESTING: Final = 5000
"""How deep the ``deep_nesting`` variant nests an ignored field (past msgspec's limit)."""


@dataclass(frozen=True, slots=True)
class VariantAnswer:
    """What the usage endpoint sends for a variant: status, body, content type and encoding."""

    status: int
    body: bytes
    content_type: str = "application/json"
    content_encoding: str | None = None


Data = dict[str, Any]


def _date_times_in_day_fields(data: Data, day: dt.date) -> None:
    midnight = f"{day.isoformat()}T00:00:00Z"
    data["period"]["start"] = data["period"]["end"] = midnight
    for entry in data["daily"]:
        entry["day"] = midnight


def _date_times_in_last_active(data: Data, day: dt.date) -> None:
    # A different time of day for each user, all within the day asked for (UTC).
    for index, user in enumerate(data["users"]):
        seconds = (index * 7919) % 86400
        clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        user["last_active"] = f"{day.isoformat()}T{clock}Z"


def _offsets_and_fractions(data: Data, day: dt.date) -> None:
    # Day fields: local midnight in a zone east of UTC, with milliseconds: still the day named.
    local = f"{day.isoformat()}T00:00:00.000+02:00"
    data["period"]["start"] = data["period"]["end"] = local
    for entry in data["daily"]:
        entry["day"] = local
    # last_active: India time with nanoseconds; before 05:30 local it is the previous UTC day.
    for index, user in enumerate(data["users"]):
        hour = (index * 5) % 24
        user["last_active"] = f"{day.isoformat()}T{hour:02d}:15:30.123456789+05:30"


def _unknown_fields(data: Data, day: dt.date) -> None:
    # Lines of code, as the changelog announced without documenting names, and other novelties.
    data["loc"] = {"generated": 120_000, "accepted": 81_500, "acceptance_rate": 0.679}
    data["summary"]["total_loc_generated"] = 120_000
    data["summary"]["total_loc_accepted"] = 81_500
    data["summary"]["note"] = None
    data["next_page"] = None
    data["huge_ignored_number"] = 10**30
    data["tiny_ignored_number"] = 1e-300
    for index, user in enumerate(data["users"]):
        user["lines_of_code"] = {"generated": 100 + index, "accepted": 50 + index}
        user["role"] = "member"
        user["teams"] = [{"id": index, "name": "platform"}]
    for entry in data["daily"]:
        entry["loc_generated"] = 120_000
        entry["loc_accepted"] = 81_500
        for ide in entry["ides"]:
            ide["loc_accepted"] = 1000
        for language in entry["languages"]:
            language["share"] = 0.5


def _idle(data: Data, day: dt.date) -> None:
    data["users"] = []
    data["daily"] = []
    data["summary"] = {"total_active_users": 0, "total_messages": 0}


def _users_without_daily(data: Data, day: dt.date) -> None:
    data["daily"] = []


def _other_day(data: Data, day: dt.date) -> None:
    before = (day - dt.timedelta(days=1)).isoformat()
    data["period"] = {"start": before, "end": before, "days": 1}
    for entry in data["daily"]:
        entry["day"] = before


def _other_day_empty_daily(data: Data, day: dt.date) -> None:
    _other_day(data, day)
    data["daily"] = []


def _count_2_64(data: Data, day: dt.date) -> None:
    data["summary"]["total_messages"] = 2**64


def _count_10_30(data: Data, day: dt.date) -> None:
    if not data["users"]:  # an idle day: one user, so that the count has a place to be
        data["users"].append({"email": "ann@example.ai", "messages": 1, "last_active": None})
    data["users"][0]["messages"] = 10**30


_TRANSFORMS: Final[dict[str, Callable[[Data, dt.date], None]]] = {
    "datetime_day_fields": _date_times_in_day_fields,
    "datetime_last_active": _date_times_in_last_active,
    "offsets_and_fractions": _offsets_and_fractions,
    "unknown_fields": _unknown_fields,
    "idle_day": _idle,
    "users_without_daily": _users_without_daily,
    "other_day": _other_day,
    "other_day_empty_daily": _other_day_empty_daily,
    "count_2_64": _count_2_64,
    "count_10_30": _count_10_30,
}

VARIANTS: Final[tuple[str, ...]] = (
    "plain",
    *_TRANSFORMS,
    "pretty_printed",
    "deep_nesting",
    "html_200",
    "html_502",
    "error_envelope_200",
    "gzip",
)
"""Every variant name; ``plain`` is the good answer unchanged (large orgs use it)."""


def variant_answer(name: str, good: bytes, day: dt.date) -> VariantAnswer:
    """The answer of variant ``name`` made from the good ``day=`` body ``good``."""
    if name == "plain":
        return VariantAnswer(200, good)
    if name == "pretty_printed":
        # Indented JSON, as some frameworks send by default: twice the bytes of compact JSON.
        return VariantAnswer(200, json.dumps(json.loads(good), indent=2).encode())
    if name == "gzip":
        return VariantAnswer(200, gzip.compress(good, mtime=0), content_encoding="gzip")
    if name == "html_200":
        return VariantAnswer(200, HTML_PAGE.format(title="Welcome").encode(), "text/html")
    if name == "html_502":
        return VariantAnswer(502, HTML_PAGE.format(title="502 Bad Gateway").encode(), "text/html")
    if name == "error_envelope_200":
        return VariantAnswer(200, b'{"status":"error","message":"Failed to fetch data"}')
    if name == "deep_nesting":
        nested = b"[" * DEEP_NESTING + b"]" * DEEP_NESTING
        return VariantAnswer(200, good[:-1] + b',"extra":' + nested + b"}")
    transform = _TRANSFORMS.get(name)
    if transform is None:
        raise ValueError(f"unknown API variant {name!r}; known: {', '.join(VARIANTS)}")
    payload = json.loads(good)
    transform(payload["data"], day)
    return VariantAnswer(200, json.dumps(payload, separators=(",", ":")).encode())
