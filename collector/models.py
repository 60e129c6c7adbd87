"""The API payload as pydantic models, and the normalized records every sink receives.

The payload models ignore unknown fields (the API has added fields before, e.g. lines of code) but
are strict about the fields they know: a count must be a non-negative JSON integer and a date a
``YYYY-MM-DD`` string, otherwise the whole response is rejected as
:class:`~collector.errors.BadResponse` and nothing from it is stored.

The normalized records are frozen dataclasses (cheap to build, hashable, no validation cost on the
hot path): one :class:`TenantDay` holds everything the four tables need for one tenant and one day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from collector.errors import BadResponse

Count = Annotated[int, Field(strict=True, ge=0)]
Name = Annotated[str, Field(strict=True, min_length=1)]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Period(_Payload):
    start: dt.date
    end: dt.date
    days: Count


class Summary(_Payload):
    total_active_users: Count
    total_messages: Count


class UserUsage(_Payload):
    email: Name
    messages: Count
    last_active: dt.date | None = None
    ides: list[Name] = Field(default_factory=list)
    languages: list[Name] = Field(default_factory=list)


class IdeUsage(_Payload):
    ide_name: Name
    engaged_users: Count


class LanguageUsage(_Payload):
    language_name: Name
    engaged_users: Count


class DailyUsage(_Payload):
    day: dt.date
    active_users: Count
    messages: Count
    ides: list[IdeUsage] = Field(default_factory=list)
    languages: list[LanguageUsage] = Field(default_factory=list)


class UsageData(_Payload):
    period: Period
    summary: Summary
    users: list[UserUsage] = Field(default_factory=list)
    daily: list[DailyUsage] = Field(default_factory=list)


class UsageResponse(_Payload):
    status: Literal["success"]
    data: UsageData


def parse_usage(body: bytes | str, *, tenant: str | None = None) -> UsageResponse:
    """Validate a raw 200 body; anything off-schema raises :class:`BadResponse` with a reason."""
    try:
        return UsageResponse.model_validate_json(body)
    except ValidationError as exc:
        raise _schema_error(exc, tenant) from None


def _schema_error(exc: ValidationError, tenant: str | None) -> BadResponse:
    first = exc.errors(include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "<body>"
    return BadResponse(
        f"response does not match the documented schema ({exc.error_count()} problem(s); "
        f"first at {where}: {first['msg']})",
        tenant=tenant,
        status=200,
    )


# --- normalized records -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DailyRecord:
    """Row of ``usage_daily``."""

    tenant: str
    day: dt.date
    active_users: int
    messages: int
    fetched_at: dt.datetime
    final: bool


@dataclass(frozen=True, slots=True)
class IdeRecord:
    """Row of ``usage_daily_ide``."""

    tenant: str
    day: dt.date
    ide_name: str
    engaged_users: int


@dataclass(frozen=True, slots=True)
class LanguageRecord:
    """Row of ``usage_daily_language``."""

    tenant: str
    day: dt.date
    language_name: str
    engaged_users: int


@dataclass(frozen=True, slots=True)
class UserDayRecord:
    """Row of ``usage_user_daily``; ``user`` is the email, or its pseudonym under a PII policy."""

    tenant: str
    day: dt.date
    user: str
    messages: int
    last_active: dt.date | None
    ides: tuple[str, ...]
    languages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TenantDay:
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
    content_hash: str = field(default="")

    def with_users(self, users: Sequence[UserDayRecord]) -> TenantDay:
        """A copy with other user rows (used by PII policies)."""
        return replace(self, users=tuple(users))


Batch = Sequence[TenantDay]
"""What a sink's ``write`` receives: tenant-days, each complete, in delivery order."""


def canonical_json(data: Mapping[str, Any]) -> str:
    """The payload's ``data`` object as compact JSON with sorted keys: what the store keeps."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(data: Mapping[str, Any] | str) -> str:
    """A stable hash of a payload's ``data`` object (key order and whitespace do not matter).

    Pass the :func:`canonical_json` text when it is already at hand, to encode only once.
    """
    canonical = data if isinstance(data, str) else canonical_json(data)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_usage_object(raw: Any, *, tenant: str | None = None) -> UsageResponse:
    """Validate an already decoded JSON body (see :func:`parse_usage`)."""
    try:
        return UsageResponse.model_validate(raw)
    except ValidationError as exc:
        raise _schema_error(exc, tenant) from None


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
    zero users, not an error. A ``daily`` entry for another date is a bad response.
    """
    data = response.data
    entries = [d for d in data.daily if d.day == day]
    if len(entries) != len(data.daily) or len(entries) > 1:
        raise BadResponse(
            f"asked for day {day.isoformat()} but the response covers "
            f"{sorted({d.day.isoformat() for d in data.daily})}",
            tenant=tenant,
            status=200,
        )
    entry = entries[0] if entries else None
    daily = DailyRecord(
        tenant=tenant,
        day=day,
        active_users=entry.active_users if entry else 0,
        messages=entry.messages if entry else 0,
        fetched_at=fetched_at,
        final=final,
    )
    ides = tuple(
        IdeRecord(tenant, day, i.ide_name, i.engaged_users) for i in (entry.ides if entry else [])
    )
    languages = tuple(
        LanguageRecord(tenant, day, lang.language_name, lang.engaged_users)
        for lang in (entry.languages if entry else [])
    )
    users = tuple(
        UserDayRecord(
            tenant=tenant,
            day=day,
            user=u.email,
            messages=u.messages,
            last_active=u.last_active,
            ides=tuple(u.ides),
            languages=tuple(u.languages),
        )
        for u in data.users
    )
    _reject_duplicates(tenant, day, "ide_name", [i.ide_name for i in ides])
    _reject_duplicates(tenant, day, "language_name", [lang.language_name for lang in languages])
    _reject_duplicates(tenant, day, "users[].email", [u.user for u in users], show=False)
    if digest is None:
        digest = content_hash(data.model_dump(mode="json"))
    return TenantDay(
        tenant=tenant,
        day=day,
        fetched_at=fetched_at,
        final=final,
        daily=daily,
        ides=ides,
        languages=languages,
        users=users,
        content_hash=digest,
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
    if repeated:
        what = f" {repeated[0]!r}" if show else ""
        raise BadResponse(
            f"day {day.isoformat()} lists {field_name}{what} more than once",
            tenant=tenant,
            status=200,
        )
