"""The API payload as typed structs, and the normalized records every sink receives.

Both are `msgspec <https://jcristharif.com/msgspec/>`_ ``Struct`` types, frozen (immutable and
hashable) and untracked by the garbage collector (they cannot form cycles). That choice is about
cost: on the hot path every tenant-day is decoded, validated and turned into some thirty records,
and building them as msgspec structs is about ten times cheaper than pydantic models and frozen
dataclasses were (docs/performance.md). Records behave like frozen dataclasses for a reader:
attribute access, ``==``, ``hash``, ``repr``; use :func:`msgspec.structs.asdict` and
:func:`msgspec.structs.replace` where you would use the :mod:`dataclasses` helpers.

The payload structs ignore unknown fields (the API has added fields before, e.g. lines of code)
but are strict about the fields they know: a count must be a non-negative JSON integer (not a
float, a string or a boolean) and a date a ``YYYY-MM-DD`` string, otherwise the whole response is
rejected as :class:`~collector.errors.BadResponse` and nothing from it is stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec

from collector.errors import BadResponse

Count = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1)]


class _Payload(msgspec.Struct, frozen=True, gc=False):
    """A part of the API's answer; unknown fields are ignored.

    Every subclass repeats ``frozen=True, gc=False``: msgspec inherits them, but mypy's
    dataclass_transform reading does not.
    """


class Period(_Payload, frozen=True, gc=False):
    start: dt.date
    end: dt.date
    days: Count


class Summary(_Payload, frozen=True, gc=False):
    total_active_users: Count
    total_messages: Count


class UserUsage(_Payload, frozen=True, gc=False):
    email: Name
    messages: Count
    last_active: dt.date | None = None
    ides: tuple[Name, ...] = ()
    languages: tuple[Name, ...] = ()


class IdeUsage(_Payload, frozen=True, gc=False):
    ide_name: Name
    engaged_users: Count


class LanguageUsage(_Payload, frozen=True, gc=False):
    language_name: Name
    engaged_users: Count


class DailyUsage(_Payload, frozen=True, gc=False):
    day: dt.date
    active_users: Count
    messages: Count
    ides: tuple[IdeUsage, ...] = ()
    languages: tuple[LanguageUsage, ...] = ()


class UsageData(_Payload, frozen=True, gc=False):
    period: Period
    summary: Summary
    users: tuple[UserUsage, ...] = ()
    daily: tuple[DailyUsage, ...] = ()


class UsageResponse(_Payload, frozen=True, gc=False):
    status: Literal["success"]
    data: UsageData


_DECODER = msgspec.json.Decoder(UsageResponse)


def parse_usage(body: bytes | str, *, tenant: str | None = None) -> UsageResponse:
    """Validate a raw 200 body; anything off-schema raises :class:`BadResponse` with a reason.

    The reason names the first defect and where it is (``data.summary.total_messages``), never a
    value from the body (user rows hold emails).
    """
    try:
        return _DECODER.decode(body)
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).partition(" - at `")
        location = where.rstrip("`").removeprefix("$").removeprefix(".") or "<body>"
        raise BadResponse(
            f"response does not match the documented schema (at {location}: {problem})",
            tenant=tenant,
            status=200,
        ) from None
    except msgspec.DecodeError as exc:
        raise BadResponse(
            f"HTTP 200 with a body that is not valid JSON ({exc})", tenant=tenant, status=200
        ) from None


def payload_as_builtins(response: UsageResponse) -> dict[str, Any]:
    """The validated response as plain JSON-able Python (dates as ``YYYY-MM-DD``)."""
    built: dict[str, Any] = msgspec.to_builtins(response)
    return built


# --- normalized records -------------------------------------------------------------------------


class _Record(msgspec.Struct, frozen=True, gc=False):
    """A normalized row: immutable, hashable, compared by value."""


class DailyRecord(_Record, frozen=True, gc=False):
    """Row of ``usage_daily``."""

    tenant: str
    day: dt.date
    active_users: int
    messages: int
    fetched_at: dt.datetime
    final: bool


class IdeRecord(_Record, frozen=True, gc=False):
    """Row of ``usage_daily_ide``."""

    tenant: str
    day: dt.date
    ide_name: str
    engaged_users: int


class LanguageRecord(_Record, frozen=True, gc=False):
    """Row of ``usage_daily_language``."""

    tenant: str
    day: dt.date
    language_name: str
    engaged_users: int


class UserDayRecord(_Record, frozen=True, gc=False):
    """Row of ``usage_user_daily``; ``user`` is the email, or its pseudonym under a PII policy."""

    tenant: str
    day: dt.date
    user: str
    messages: int
    last_active: dt.date | None
    ides: tuple[str, ...]
    languages: tuple[str, ...]


class TenantDay(_Record, frozen=True, gc=False):
    """Everything collected for one tenant and one day: the unit of work, storage and delivery.

    ``content_hash`` covers the usage figures only (not ``fetched_at`` or ``final``), so a re-fetch
    that changed nothing has the same hash and is not redelivered.
    """

    tenant: str
    day: dt.date
    fetched_at: dt.datetime
    final: bool
    daily: DailyRecord
    ides: tuple[IdeRecord, ...] = ()
    languages: tuple[LanguageRecord, ...] = ()
    users: tuple[UserDayRecord, ...] = ()
    content_hash: str = ""

    def with_users(self, users: Sequence[UserDayRecord]) -> TenantDay:
        """A copy with other user rows (used by PII policies)."""
        return msgspec.structs.replace(self, users=tuple(users))


Batch = Sequence[TenantDay]
"""What a sink's ``write`` receives: tenant-days, each complete, in delivery order."""


def canonical_json(data: Mapping[str, Any]) -> str:
    """A payload's ``data`` object as compact JSON with sorted keys."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(data: Mapping[str, Any] | str) -> str:
    """A stable hash of a payload's ``data`` object (key order and whitespace do not matter).

    Pass the :func:`canonical_json` text when it is already at hand, to encode only once.
    """
    canonical = data if isinstance(data, str) else canonical_json(data)
    return hashlib.sha256(canonical.encode()).hexdigest()


def normalize(
    tenant: str,
    day: dt.date,
    response: UsageResponse,
    *,
    fetched_at: dt.datetime,
    final: bool,
    digest: str | None = None,
) -> TenantDay:
    """Turn a ``day=`` response into one :class:`TenantDay`.

    A day with no activity may come back with an empty ``daily`` list: that is a valid day with
    zero users, not an error. A ``daily`` entry for another date is a bad response. Records are
    built positionally: this runs once per tenant-day and keyword calls cost a third more.
    """
    data = response.data
    daily_entries = data.daily
    if len(daily_entries) > 1 or any(d.day != day for d in daily_entries):
        raise BadResponse(
            f"asked for day {day.isoformat()} but the response covers "
            f"{sorted({d.day.isoformat() for d in daily_entries})}",
            tenant=tenant,
            status=200,
        )
    if daily_entries:
        entry = daily_entries[0]
        daily = DailyRecord(tenant, day, entry.active_users, entry.messages, fetched_at, final)
        ides = tuple([IdeRecord(tenant, day, i.ide_name, i.engaged_users) for i in entry.ides])
        languages = tuple(
            [LanguageRecord(tenant, day, x.language_name, x.engaged_users) for x in entry.languages]
        )
    else:
        daily = DailyRecord(tenant, day, 0, 0, fetched_at, final)
        ides = languages = ()
    users = tuple(
        [
            UserDayRecord(tenant, day, u.email, u.messages, u.last_active, u.ides, u.languages)
            for u in data.users
        ]
    )
    _reject_duplicates(tenant, day, "ide_name", [i.ide_name for i in ides])
    _reject_duplicates(tenant, day, "language_name", [x.language_name for x in languages])
    _reject_duplicates(tenant, day, "users[].email", [u.user for u in users], show=False)
    if digest is None:
        digest = content_hash(payload_as_builtins(response)["data"])
    return TenantDay(tenant, day, fetched_at, final, daily, ides, languages, users, digest)


def _reject_duplicates(
    tenant: str, day: dt.date, field_name: str, names: list[str], *, show: bool = True
) -> None:
    """Two rows with one key would make every sink's upsert ambiguous: reject the whole day.

    ``show=False`` keeps the value out of the message (emails are personal data).
    """
    if len(set(names)) == len(names):
        return
    repeated = [name for name, n in Counter(names).items() if n > 1]
    what = f" {repeated[0]!r}" if show else ""
    raise BadResponse(
        f"day {day.isoformat()} lists {field_name}{what} more than once",
        tenant=tenant,
        status=200,
    )
