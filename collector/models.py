"""The API payload as typed structs, and the normalized records every sink receives.

Both are `msgspec <https://jcristharif.com/msgspec/>`_ ``Struct`` types, frozen (immutable and
hashable) and untracked by the garbage collector (they cannot form cycles). That choice is about
cost: on the hot path every tenant-day is decoded, validated and turned into some thirty records,
and building them as msgspec structs is about ten times cheaper than pydantic models and frozen
dataclasses were (docs/performance.md). Records behave like frozen dataclasses for a reader:
attribute access, ``==``, ``hash``, ``repr``; use :func:`msgspec.structs.asdict` and
:func:`msgspec.structs.replace` where you would use the :mod:`dataclasses` helpers.

The payload structs follow what the documentation allows and are strict where a wrong value
would be stored:

- unknown fields are ignored (the API has added fields before, e.g. lines of code);
- every date field (``day``, ``period.start``/``end``, ``last_active``) is typed "ISO 8601" by
  the documentation: a date (``2026-11-30``) or a date-time (``2026-11-30T14:03:11Z``, with an
  offset, fractional seconds) is accepted. ``last_active`` keeps the instant, in UTC
  (:class:`LastActive`); a day field names a day, so it keeps the date as written;
- a count is a non-negative JSON integer that every sink can store (at most 2^63 - 1, the
  largest SQL ``BIGINT``/int64): not a float, a string or a boolean;
- nesting too deep to read, or any other body msgspec cannot decode, is a bad response.

Any defect rejects the whole response as :class:`~collector.errors.BadResponse` naming the
field path (``data.users[3].messages``), never the value (user rows hold emails), and nothing
from it is stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec

from collector.errors import BadResponse

INT64_MAX: Final = 2**63 - 1
"""The largest count accepted: what a signed 64-bit column (SQL ``BIGINT``) holds."""

Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Name = Annotated[str, msgspec.Meta(min_length=1)]

_NOT_ISO = "expected an ISO 8601 date or date-time"


class ApiDate(dt.date):
    """The calendar date a day field names, from ``2026-11-30`` or a date-time on that date.

    A date-time's date is taken as written (``2026-11-30T00:00:00+02:00`` names 2026-11-30):
    the offset says in which zone the API counts the day it names, not another day. It is a
    :class:`datetime.date` in every respect (it compares and hashes as one).
    """

    __slots__ = ()


class LastActive:
    """``users[].last_active``: the UTC ``day`` of the user's last activity, and the instant
    ``at`` (aware, UTC) when the API sent a date-time rather than a bare date.

    A date-time without an offset is read as UTC, the zone of every date the API serves.
    Immutable, like the structs holding it: one parsed value is shared by every body that has
    the same text.
    """

    __slots__ = ("at", "day")
    day: dt.date
    at: dt.datetime | None

    def __init__(self, day: dt.date, at: dt.datetime | None) -> None:
        object.__setattr__(self, "day", day)
        object.__setattr__(self, "at", at)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"LastActive is immutable (cannot set {name})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LastActive):
            return NotImplemented
        return (self.day, self.at) == (other.day, other.at)

    def __hash__(self) -> int:
        return hash((self.day, self.at))

    def __repr__(self) -> str:
        return f"LastActive(day={self.day!r}, at={self.at!r})"

    def isoformat(self) -> str:
        """The instant when known, else the date: what the API meant, in UTC."""
        return self.at.isoformat() if self.at is not None else self.day.isoformat()


# The same few date texts recur in every body (each user's last_active is the day asked for, or
# a recent one): parse each text once. Bounded: cleared when full, as entries are cheap to redo.
_CACHE_LIMIT: Final = 4096
_api_dates: dict[str, ApiDate] = {}
_last_actives: dict[str, LastActive] = {}


def _iso_moment(text: str) -> dt.date | dt.datetime:
    """A date for a bare ISO 8601 date, else a datetime; ValueError if it is neither."""
    if len(text) > 10:
        try:
            return dt.datetime.fromisoformat(text)
        except ValueError:
            pass
    else:
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(_NOT_ISO)


def _api_date(text: str) -> ApiDate:
    value = _iso_moment(text)
    day = ApiDate(value.year, value.month, value.day)
    if len(_api_dates) >= _CACHE_LIMIT:
        _api_dates.clear()
    _api_dates[text] = day
    return day


def _last_active(text: str) -> LastActive:
    value = _iso_moment(text)
    if isinstance(value, dt.datetime):
        at = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        found = LastActive(at.date(), at)
    else:
        found = LastActive(value, None)
    if len(_last_actives) >= _CACHE_LIMIT:
        _last_actives.clear()
    _last_actives[text] = found
    return found


def _decode_hook(type_: type, value: Any) -> Any:
    """Build the date types above from JSON strings; msgspec adds the field path to errors."""
    if type(value) is not str:
        raise TypeError(f"Expected `str`, got `{type(value).__name__}`")
    if type_ is ApiDate:
        return _api_dates.get(value) or _api_date(value)
    if type_ is LastActive:
        return _last_actives.get(value) or _last_active(value)
    raise NotImplementedError


class _Payload(msgspec.Struct, frozen=True, gc=False):
    """A part of the API's answer; unknown fields are ignored.

    Every subclass repeats ``frozen=True, gc=False``: msgspec inherits them, but mypy's
    dataclass_transform reading does not.
    """


class Period(_Payload, frozen=True, gc=False):
    start: ApiDate
    end: ApiDate
    days: Count


class Summary(_Payload, frozen=True, gc=False):
    total_active_users: Count
    total_messages: Count


class UserUsage(_Payload, frozen=True, gc=False):
    email: Name
    messages: Count
    last_active: LastActive | None = None
    ides: tuple[Name, ...] = ()
    languages: tuple[Name, ...] = ()


class IdeUsage(_Payload, frozen=True, gc=False):
    ide_name: Name
    engaged_users: Count


class LanguageUsage(_Payload, frozen=True, gc=False):
    language_name: Name
    engaged_users: Count


class DailyUsage(_Payload, frozen=True, gc=False):
    day: ApiDate
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


_DECODER = msgspec.json.Decoder(UsageResponse, dec_hook=_decode_hook)


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
        if problem.startswith("Invalid enum value"):
            problem = "not one of the documented values"  # msgspec's text quotes the value
        raise BadResponse(
            f"response does not match the documented schema (at {location}: {problem})",
            tenant=tenant,
            status=200,
        ) from None
    except msgspec.DecodeError as exc:
        raise BadResponse(
            f"HTTP 200 with a body that is not valid JSON ({exc})", tenant=tenant, status=200
        ) from None
    except RecursionError:
        # msgspec gives up on deep nesting (even inside an ignored field) this way.
        raise BadResponse(
            "HTTP 200 with JSON nested too deeply to read", tenant=tenant, status=200
        ) from None


# --- the stored state of a tenant-day ----------------------------------------------------------
# Shared by the store (which records it) and the planner (which decides from it), so neither
# imports the other.

DayStatus = Literal["missing", "fetched", "final", "failed", "quarantined"]
"""missing: never stored; fetched: stored while still settling; final: stored after it settled;
failed: the last fetch failed (an earlier good payload, if any, is kept); quarantined: the last
answer was a 200 whose body failed validation (the body is stored apart, an earlier good payload
is kept)."""


@dataclass(frozen=True, slots=True)
class DayState:
    """What the store knows about one tenant-day, as far as planning is concerned."""

    status: DayStatus
    final: bool = False
    attempts: int = 0
    content_hash: str | None = None


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
    """Row of ``usage_user_daily``; ``user`` is the email, or its pseudonym under a PII policy.

    ``last_active`` is the UTC date of the user's last activity; ``last_active_at`` the instant
    (aware, UTC) when the API sent a date-time, else None. It comes last, as in every sink's
    columns, where it was added after the others.
    """

    tenant: str
    day: dt.date
    user: str
    messages: int
    last_active: dt.date | None
    ides: tuple[str, ...]
    languages: tuple[str, ...]
    last_active_at: dt.datetime | None = None


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


def body_digest(body: bytes) -> str:
    """A tenant-day's content hash: the SHA-256 (hex) of its 200 body as received.

    The body is what the state store keeps, so its hash is computed with no second encoding. A
    re-fetch that returned the same figures in another order counts as changed and is delivered
    once more, which idempotent sinks absorb.
    """
    return hashlib.sha256(body).hexdigest()


def tenant_day_from_body(
    tenant: str, day: dt.date, body: bytes, *, fetched_at: dt.datetime, final: bool
) -> TenantDay:
    """A 200 body of a ``day=`` request, validated and normalized, with its content hash: what
    the pipeline makes of a fetched body (the client parses it, :func:`normalize` builds the
    records, :func:`body_digest` hashes it), ``reprocess`` of a kept one, and the testing kit of
    the bodies it builds. :class:`BadResponse` if the body is not the documented payload."""
    response = parse_usage(body, tenant=tenant)
    return normalize(
        tenant, day, response, fetched_at=fetched_at, final=final, digest=body_digest(body)
    )


def normalize(
    tenant: str,
    day: dt.date,
    response: UsageResponse,
    *,
    fetched_at: dt.datetime,
    final: bool,
    digest: str,
) -> TenantDay:
    """Turn a ``day=`` response into one :class:`TenantDay`; ``digest`` is its body's
    :func:`body_digest`.

    A day with no activity may come back with an empty ``daily`` list: that is a valid day with
    zero users, not an error. A ``period`` or a ``daily`` entry for another date is a bad
    response, even when ``daily`` is empty (another day's users would be stored as this day's).
    Records are built positionally: this runs once per tenant-day and keyword calls cost a third
    more.
    """
    data = response.data
    _check_period(tenant, day, data.period)
    daily_entries = data.daily
    if len(daily_entries) > 1 or any(d.day != day for d in daily_entries):
        index = next((i for i, d in enumerate(daily_entries) if d.day != day), 1)
        raise BadResponse(
            f"asked for day {day.isoformat()} but the response covers "
            f"{sorted({d.day.isoformat() for d in daily_entries})} (at data.daily[{index}].day)",
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
            UserDayRecord(tenant, day, u.email, u.messages, None, u.ides, u.languages)
            if (seen := u.last_active) is None
            else UserDayRecord(
                tenant, day, u.email, u.messages, seen.day, u.ides, u.languages, seen.at
            )
            for u in data.users
        ]
    )
    _reject_duplicates(tenant, day, "ide_name", [i.ide_name for i in ides])
    _reject_duplicates(tenant, day, "language_name", [x.language_name for x in languages])
    _reject_duplicates(tenant, day, "users[].email", [u.user for u in users], show=False)
    return TenantDay(tenant, day, fetched_at, final, daily, ides, languages, users, digest)


def _check_period(tenant: str, day: dt.date, period: Period) -> None:
    """The period of a ``day=`` answer must be that day.

    It starts on the day asked for and ends on it, or on the next day: the documentation's 7-day
    example runs from start to start + 7 days, so an exclusive end is as plausible as an
    inclusive one.
    """
    if period.start == day and 0 <= (period.end - period.start).days <= 1:
        return
    raise BadResponse(
        f"asked for day {day.isoformat()} but the response's period runs from "
        f"{period.start.isoformat()} to {period.end.isoformat()} (at data.period)",
        tenant=tenant,
        status=200,
    )


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
