"""The planner: which days of the lookback window are fetched, in which order."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from collector.models import DayState
from collector.planner import (
    is_final,
    needs_fetch,
    oldest_servable,
    plan_days,
    split_by_history,
    window,
)

TODAY = dt.date(2025, 3, 15)


def days_back(*offsets: int) -> list[dt.date]:
    return [TODAY - dt.timedelta(days=n) for n in offsets]


def final_state() -> DayState:
    return DayState(status="final", final=True, content_hash="h")


def settled_history(lookback: int, settle: int, today: dt.date = TODAY) -> dict[dt.date, DayState]:
    """What a healthy store holds: every day of the window fetched, final where it should be."""
    states = {}
    for day in window(today, lookback):
        final = is_final(day, today, settle)
        states[day] = DayState(
            status="final" if final else "fetched", final=final, content_hash="h"
        )
    return states


@pytest.mark.parametrize(
    ("age", "settle", "expected"),
    [(0, 2, False), (1, 2, False), (2, 2, False), (3, 2, True), (0, 0, False), (1, 0, True)],
)
def test_is_final_boundaries(age: int, settle: int, expected: bool) -> None:
    """A day is final only once it is older than today and the last settle_days days."""
    assert is_final(TODAY - dt.timedelta(days=age), TODAY, settle) is expected


@pytest.mark.parametrize("lookback", [1, 2, 30, 90])
def test_first_run_plans_the_whole_window_oldest_first(lookback: int) -> None:
    """With nothing stored, every day of the window is planned, oldest first, ending today."""
    plan = plan_days(TODAY, lookback, 2, {})
    assert len(plan) == lookback
    assert plan[0] == TODAY - dt.timedelta(days=lookback - 1)
    assert plan[-1] == TODAY
    assert plan == sorted(plan)


@pytest.mark.parametrize("settle", [0, 1, 2, 5])
def test_settled_history_refetches_only_today_and_the_settle_days(settle: int) -> None:
    """When every final day is stored, only today and the last settle_days days are planned."""
    plan = plan_days(TODAY, 30, settle, settled_history(30, settle))
    assert plan == sorted(days_back(*range(settle + 1)))


def test_gap_after_a_week_down_is_planned() -> None:
    """After the daemon was down for a week, the next plan holds that week plus the settle days."""
    last_run = TODAY - dt.timedelta(days=7)
    states = settled_history(30, 2, today=last_run)
    plan = plan_days(TODAY, 30, 2, states)
    # The days fetched last time while still settling are re-fetched once to record final figures.
    expected = [last_run - dt.timedelta(days=n) for n in (2, 1, 0)] + days_back(*range(6, -1, -1))
    assert plan == expected


def test_failed_days_are_planned_again_with_or_without_an_earlier_payload() -> None:
    """A day whose last fetch failed is retried, even if an earlier good payload is kept."""
    states = settled_history(30, 2)
    old_failure, failed_refetch = days_back(20, 10)
    states[old_failure] = DayState(status="failed", attempts=3)
    states[failed_refetch] = DayState(status="failed", final=True, attempts=1, content_hash="h")
    plan = plan_days(TODAY, 30, 2, states)
    assert plan == [old_failure, failed_refetch, *days_back(2, 1, 0)]


def test_quarantined_days_are_planned_again_with_or_without_an_earlier_payload() -> None:
    """A day whose last body was quarantined is asked for again next cycle, like a failed one."""
    states = settled_history(30, 2)
    new_day, settled_day = days_back(20, 10)
    states[new_day] = DayState(status="quarantined", attempts=1)
    states[settled_day] = DayState(status="quarantined", final=True, content_hash="h")
    assert plan_days(TODAY, 30, 2, states) == [new_day, settled_day, *days_back(2, 1, 0)]


def test_days_older_than_the_api_history_are_never_planned() -> None:
    """With history_days 10, a 30-day lookback plans only the 10 days the API still serves."""
    plan = plan_days(TODAY, 30, 2, {}, history_days=10)
    assert plan == days_back(*range(9, -1, -1))
    assert plan[0] == oldest_servable(TODAY, 10)


def test_split_by_history_separates_servable_days_from_older_ones() -> None:
    """Days before the API's window are set apart; the window's first day is still servable."""
    oldest = oldest_servable(TODAY, 90)
    assert oldest == TODAY - dt.timedelta(days=89)
    span = [oldest - dt.timedelta(days=2), oldest - dt.timedelta(days=1), oldest, TODAY]
    assert split_by_history(span, TODAY, 90) == (span[2:], span[:2])


def test_a_day_stored_while_settling_is_fetched_once_more_after_it_settles() -> None:
    """A non-final stored day that has aged past the settle window is planned until stored final."""
    day = TODAY - dt.timedelta(days=5)
    assert needs_fetch(day, TODAY, 2, DayState(status="fetched", final=False, content_hash="h"))
    assert not needs_fetch(day, TODAY, 2, DayState(status="final", final=True, content_hash="h"))


def test_days_outside_the_window_are_never_planned() -> None:
    """Stored failures older than the lookback window are left alone (backfill handles those)."""
    states = settled_history(10, 2)
    states[TODAY - dt.timedelta(days=40)] = DayState(status="failed", attempts=9)
    assert plan_days(TODAY, 10, 2, states) == days_back(2, 1, 0)


@pytest.mark.parametrize(("lookback", "settle"), [(0, 2), (-1, 2), (5, -1)])
def test_invalid_settings_are_rejected(lookback: int, settle: int) -> None:
    """A lookback below one day or a negative settle window is a programming error."""
    with pytest.raises(ValueError, match="must"):
        plan_days(TODAY, lookback, settle, {})


@pytest.mark.parametrize("seed", range(25))
def test_plan_matches_the_rules_for_random_store_states(seed: int) -> None:
    """For random stored states, the plan is exactly the window days the rules select, in order."""
    rng = random.Random(seed)
    lookback, settle = rng.randint(1, 90), rng.randint(0, 5)
    history = rng.randint(1, 120)
    today = TODAY + dt.timedelta(days=rng.randint(0, 400))
    states: dict[dt.date, DayState] = {}
    for offset in range(-5, lookback + 5):
        day = today - dt.timedelta(days=offset)
        kind = rng.choice(
            ["absent", "fetched", "final", "failed", "failed-with-data", "quarantined"]
        )
        if kind == "fetched":
            states[day] = DayState(status="fetched", final=False, content_hash="h")
        elif kind == "final":
            states[day] = DayState(status="final", final=True, content_hash="h")
        elif kind == "failed":
            states[day] = DayState(status="failed", attempts=rng.randint(1, 5))
        elif kind == "failed-with-data":
            states[day] = DayState(status="failed", final=rng.random() < 0.5, content_hash="h")
        elif kind == "quarantined":
            states[day] = DayState(status="quarantined", final=rng.random() < 0.5)
    plan = plan_days(today, lookback, settle, states, history_days=history)

    first = max(today - dt.timedelta(days=lookback - 1), today - dt.timedelta(days=history - 1))
    assert plan == sorted(set(plan)), "oldest first, no duplicates"
    assert all(first <= day <= today for day in plan), "only days of both windows"
    for day in window(today, lookback):
        state = states.get(day)
        settled = (today - day).days > settle
        must_fetch = day >= first and (
            state is None
            or state.status in ("failed", "quarantined")
            or not settled
            or not state.final
        )
        assert (day in plan) is must_fetch, (day, state)
