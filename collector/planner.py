"""Which days to fetch for one tenant: a pure function of today, the settings and the stored state.

The planner does no I/O, so the daemon, ``run --once`` and ``backfill`` share one definition of
"what is missing" and the tests can check it exhaustively. A day is planned when it lies in the
lookback window ``[today - lookback_days + 1, today]``, and in the API's window
``[today - history_days + 1, today]`` (older days are not served: asking would only store an
empty answer as if it were the truth), and

- nothing is stored for it yet (first run = backfill; after an outage = gap healing), or
- its last fetch failed (a failed re-fetch keeps the earlier good payload, but is retried), or
- its last answer was quarantined (a 200 body that failed validation: the body is kept for
  ``reprocess``, and the day is asked for again while the API still serves it), or
- it is not final: it is today or one of the last ``settle_days`` days (usage still changes), or
  it was stored while it was still settling and has not been fetched once since it became final.

The plan is **oldest first**. The oldest days are the ones closest to falling out of the API's
90-day window, so after a long outage they are the ones that must not wait behind the others; it
is also the order sinks receive a backfill in. Fairness across tenants is the fetcher's job (each
tenant works through its own plan concurrently with the others), not the planner's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

from collector.models import DayState

DEFAULT_HISTORY_DAYS = 90
"""How many days the API serves, today included (``api.history_days``)."""


def is_final(day: dt.date, today: dt.date, settle_days: int) -> bool:
    """True when ``day`` is older than today and the last ``settle_days`` days (no more changes)."""
    return (today - day).days > settle_days


def window(today: dt.date, lookback_days: int) -> list[dt.date]:
    """The lookback window, oldest first: ``lookback_days`` days ending with today."""
    if lookback_days < 1:
        raise ValueError("lookback_days must be at least 1")
    first = today - dt.timedelta(days=lookback_days - 1)
    return [first + dt.timedelta(days=offset) for offset in range(lookback_days)]


def oldest_servable(today: dt.date, history_days: int = DEFAULT_HISTORY_DAYS) -> dt.date:
    """The oldest day the API still serves: ``history_days`` days ending with today."""
    if history_days < 1:
        raise ValueError("history_days must be at least 1")
    return today - dt.timedelta(days=history_days - 1)


def split_by_history(
    days: Iterable[dt.date], today: dt.date, history_days: int = DEFAULT_HISTORY_DAYS
) -> tuple[list[dt.date], list[dt.date]]:
    """``days`` split into those the API still serves and those older than its window."""
    oldest = oldest_servable(today, history_days)
    servable: list[dt.date] = []
    too_old: list[dt.date] = []
    for day in days:
        (servable if day >= oldest else too_old).append(day)
    return servable, too_old


def needs_fetch(day: dt.date, today: dt.date, settle_days: int, state: DayState | None) -> bool:
    """Whether one day of the window has to be fetched (see the module docstring for the rules)."""
    if state is None or state.status in ("missing", "failed", "quarantined"):
        return True
    if not is_final(day, today, settle_days):
        return True
    # Stored while it was still settling: one more fetch records its final figures.
    return not state.final


def plan_days(
    today: dt.date,
    lookback_days: int,
    settle_days: int,
    states: Mapping[dt.date, DayState],
    history_days: int = DEFAULT_HISTORY_DAYS,
) -> list[dt.date]:
    """The days of the lookback window that the API still serves to fetch this cycle, oldest
    first."""
    if settle_days < 0:
        raise ValueError("settle_days must not be negative")
    oldest = oldest_servable(today, history_days)
    return [
        day
        for day in window(today, lookback_days)
        if day >= oldest and needs_fetch(day, today, settle_days, states.get(day))
    ]
