"""What a usage report holds, independent of where it was read from and how it is rendered.

Counts keep the meaning of docs/data-model.md: ``distinct_users`` comes from the per-user-day
rows (a distinct count cannot be summed from days), daily figures from ``usage_daily``, and the
IDE and language mixes are shares of *engaged user-days* (one user active in VS Code on three days
counts three), the only IDE and language figure that exists for every PII policy.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from collector.errors import CollectorError

LAST_WEEK_DAYS = 7
"""Seat hygiene's "not seen in the window's last week": the last seven days of the window."""

SeatStatus = Literal["stale", "quiet"]
"""``stale``: last active more than ``stale_days`` days before the window's end; ``quiet``: seen
in the window but not in its last week (and not stale)."""


class ReportError(CollectorError):
    """The report cannot be made: no readable sink, unreadable files, an unreachable database."""


@dataclass(frozen=True)
class Window:
    """The days ``since`` .. ``until``, both included."""

    since: dt.date
    until: dt.date

    def __post_init__(self) -> None:
        if self.since > self.until:
            raise ReportError(f"the window starts ({self.since}) after it ends ({self.until})")

    @classmethod
    def last(cls, days: int, until: dt.date) -> Window:
        """The ``days`` days ending with ``until``."""
        if days < 1:
            raise ReportError(f"--days must be at least 1, not {days}")
        return cls(until - dt.timedelta(days=days - 1), until)

    @property
    def days(self) -> int:
        return (self.until - self.since).days + 1

    @property
    def last_week_start(self) -> dt.date:
        """First day of the window's last week (the window's start if it is shorter)."""
        return max(self.since, self.until - dt.timedelta(days=LAST_WEEK_DAYS - 1))

    def dates(self) -> list[dt.date]:
        return [self.since + dt.timedelta(days=i) for i in range(self.days)]


@dataclass(frozen=True)
class DayFigures:
    """One tenant's (or the portfolio's) totals of one day, from ``usage_daily``."""

    day: dt.date
    active_users: int
    messages: int


@dataclass
class TenantUsage:
    """One tenant over the window."""

    tenant: str
    """The configured display ``name`` (the id when the config gives none or is not known)."""
    tenant_id: str
    days: int
    """Days of the window with a stored ``usage_daily`` row."""
    messages: int
    distinct_users: int | None
    """Distinct users active in the window; None when the source holds no per-user rows for a
    tenant that had activity (a sink with ``pii: drop``)."""
    avg_daily_active: float
    peak_daily_active: int
    top_ide: str | None
    top_language: str | None
    stale_users: int | None = None
    quiet_users: int | None = None
    daily: list[DayFigures] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class SeatRow:
    """A user whose licence looks unused (see :data:`SeatStatus`)."""

    tenant: str
    tenant_id: str
    user: str
    """As the source holds it: an email, or a pseudonym under ``pii: pseudonymize``."""
    last_active: dt.date
    idle_days: int
    window_messages: int
    status: SeatStatus


@dataclass(frozen=True)
class Portfolio:
    """Every tenant of the report together."""

    tenants: int
    messages: int
    distinct_users: int | None
    """The sum of the tenants' distinct users (a person in two organizations holds two seats);
    None when no tenant has per-user rows."""
    avg_daily_active: float
    peak_daily_active: int
    daily: list[DayFigures]


@dataclass
class UsageReport:
    """Everything any rendering shows."""

    window: Window
    stale_days: int
    source: str
    """Where the data came from, for people (a sink name and type, or a redacted URL or path)."""
    pii: str | None
    """The source sink's PII policy when known (``keep``, ``pseudonymize``, ``drop``)."""
    tenants: list[TenantUsage]
    portfolio: Portfolio
    ides: list[tuple[str, int]]
    """IDE name and engaged user-days over the window, every tenant together, largest first."""
    languages: list[tuple[str, int]]
    seats: list[SeatRow]
    has_user_rows: bool
    """False when the source holds no per-user rows at all: seat hygiene cannot be computed."""
    generated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


NO_USER_ROWS = (
    "seat hygiene needs per-user rows, and this source holds none "
    "(a sink with pii: drop keeps only daily totals)"
)


def title(report: UsageReport) -> str:
    w = report.window
    return f"Zencoder usage {w.since.isoformat()} .. {w.until.isoformat()} ({w.days} days)"


def seat_rule(report: UsageReport) -> str:
    return (
        f"stale: last active more than {report.stale_days} days before "
        f"{report.window.until.isoformat()}; quiet: seen in the window but not since "
        f"{report.window.last_week_start.isoformat()}"
    )


def seat_totals(report: UsageReport) -> list[int | None]:
    """[stale, quiet] users over every tenant; None when there are no per-user rows."""
    if not report.has_user_rows:
        return [None, None]
    return [
        sum(1 for s in report.seats if s.status == "stale"),
        sum(1 for s in report.seats if s.status == "quiet"),
    ]
