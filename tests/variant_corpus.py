"""The corpus of API variants (tests/api_variants/*.yaml): loading and checking outcomes.

Each file names a simulator variant (:data:`collector.simulator.VARIANTS`), the size of the
organization, a day, and what the collector must make of it: ``accepted`` (with the day's totals,
the number of user rows and, for small organizations, every user row), ``bad_response`` (with the
field ``path`` the reason names, or a ``reason`` pattern, and optionally a ``hidden`` text that
must not appear in it) or ``server_error`` (an HTTP ``status`` the client retries, then fails).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from collector.models import TenantDay

CORPUS = Path(__file__).parent / "api_variants"


@dataclass(frozen=True)
class Variant:
    """One corpus file."""

    name: str
    description: str
    variant: str
    users: int
    day: dt.date
    expect: dict[str, Any]

    @property
    def outcome(self) -> str:
        return str(self.expect["outcome"])

    def check_accepted(self, td: TenantDay) -> None:
        """``td`` holds exactly the expected totals and user rows."""
        assert [td.daily.active_users, td.daily.messages] == self.expect["daily"], self.name
        assert len(td.users) == self.expect["user_rows"], self.name
        if "users" in self.expect:
            rows = [
                [
                    u.user,
                    u.messages,
                    u.last_active.isoformat() if u.last_active else None,
                    u.last_active_at.isoformat() if u.last_active_at else None,
                ]
                for u in td.users
            ]
            assert rows == self.expect["users"], self.name

    def check_reason(self, reason: str) -> None:
        """A rejection's reason names the expected path (or matches the pattern) and hides the
        value it must not repeat."""
        if "path" in self.expect:
            assert f"at {self.expect['path']}" in reason, (self.name, reason)
        if "reason" in self.expect:
            assert re.search(self.expect["reason"], reason), (self.name, reason)
        if "hidden" in self.expect:
            assert self.expect["hidden"] not in reason, (self.name, reason)


def load(path: Path) -> Variant:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Variant(
        name=path.stem,
        description=raw["description"],
        variant=raw["variant"],
        users=raw["users"],
        day=dt.date.fromisoformat(raw["day"]),
        expect=raw["expect"],
    )


def corpus() -> list[Variant]:
    """Every variant of the corpus, by file name."""
    return [load(path) for path in sorted(CORPUS.glob("*.yaml"))]
