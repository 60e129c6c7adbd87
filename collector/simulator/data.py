"""Deterministic, realistic usage figures: the same (seed, tenant, day) always gives the same day.

Each tenant is an organization of 8..60 people (from a hash of its id, or ``SimTenant.users``).
Every person has a fixed profile: how often they use Zencoder, how chatty they are, their IDEs and
languages. A day is drawn from a ``random.Random`` seeded by a hash of (seed, tenant, day,
revision), never from the global generator, so days can be generated in any order, by any number
of simulator instances, and still agree. Weekends see far fewer active users.

Generated days are kept in bounded LRU caches (compact activity tuples, serialized ``day=``
bodies), so a repeated ``day=`` request costs a dictionary lookup.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

IDES: tuple[tuple[str, float], ...] = (
    ("VS Code", 0.42),
    ("IntelliJ IDEA", 0.18),
    ("PyCharm", 0.12),
    ("WebStorm", 0.08),
    ("IntelliJ CE", 0.06),
    ("GoLand", 0.05),
    ("Rider", 0.04),
    ("Android Studio", 0.03),
    ("Cursor", 0.02),
)

LANGUAGES: tuple[tuple[str, float], ...] = (
    ("TypeScript", 0.20),
    ("JavaScript", 0.16),
    ("Python", 0.18),
    ("Java", 0.12),
    ("Go", 0.06),
    ("Kotlin", 0.05),
    ("C#", 0.05),
    ("SQL", 0.05),
    ("Rust", 0.03),
    ("HTML", 0.04),
    ("CSS", 0.03),
    ("Ruby", 0.02),
    ("PHP", 0.02),
    ("C++", 0.02),
)

# IDEs that pull a person towards their home languages, so profiles look like real people.
IDE_LANGUAGES: dict[str, tuple[str, ...]] = {
    "PyCharm": ("Python", "SQL"),
    "WebStorm": ("TypeScript", "JavaScript", "CSS", "HTML"),
    "IntelliJ IDEA": ("Java", "Kotlin", "SQL"),
    "IntelliJ CE": ("Java", "Kotlin"),
    "GoLand": ("Go", "SQL"),
    "Rider": ("C#", "SQL"),
    "Android Studio": ("Kotlin", "Java"),
}

FIRST_NAMES = (
    "alex", "maria", "joe", "li", "sam", "fatima", "noah", "emma", "ivan", "chen", "olga", "raj",
    "sofia", "lucas", "mia", "omar", "anna", "ben", "chloe", "david", "elena", "felix", "grace",
    "hugo", "isla", "jonas", "kai", "lea", "marco", "nina", "oscar", "paula", "quinn", "rosa",
)  # fmt: skip
LAST_NAMES = (
    "doe", "smith", "garcia", "nguyen", "kowalski", "muller", "rossi", "tanaka", "silva", "khan",
    "novak", "haddad", "larsen", "dubois", "ivanova", "okafor", "park", "schmidt", "costa", "berg",
)  # fmt: skip

WEEKEND_FACTOR = 0.12
MIN_USERS, MAX_USERS = 8, 60

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A small bounded mapping that forgets the least recently used entry."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(0, maxsize)
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        if self.maxsize == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class Person:
    """A fixed profile: weekday activity chance, chattiness, IDEs and languages by preference."""

    email: str
    activity: float
    mean_messages: float
    ides: tuple[str, ...]
    languages: tuple[str, ...]


# One active user on one day: (person index, messages, ides used, languages used).
UserDay = tuple[int, int, tuple[str, ...], tuple[str, ...]]


def stable_int(*parts: object) -> int:
    """A 64-bit integer from a hash of the parts (stable across processes, unlike ``hash``)."""
    text = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def org_size(seed: int, tenant_id: str) -> int:
    """The default number of people in a tenant's organization."""
    return MIN_USERS + stable_int(seed, "org", tenant_id) % (MAX_USERS - MIN_USERS + 1)


def _weighted(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([name for name, _ in table], weights=[w for _, w in table])[0]


def make_people(seed: int, tenant_id: str, size: int) -> tuple[Person, ...]:
    """The organization's people, with unique emails on a domain derived from the tenant id."""
    rng = random.Random(stable_int(seed, "people", tenant_id))
    domain = "".join(c if c.isalnum() else "-" for c in tenant_id.lower()).strip("-") or "org"
    seen: set[str] = set()
    people = []
    for _ in range(size):
        local = f"{rng.choice(FIRST_NAMES)}.{rng.choice(LAST_NAMES)}"
        candidate, n = local, 1
        while candidate in seen:
            n += 1
            candidate = f"{local}{n}"
        seen.add(candidate)
        ides = [_weighted(rng, IDES)]
        if rng.random() < 0.3:
            second = _weighted(rng, IDES)
            if second not in ides:
                ides.append(second)
        home = IDE_LANGUAGES.get(ides[0], ())
        languages: list[str] = []
        if home:
            languages.append(rng.choice(home))
        for _ in range(rng.randint(1, 3)):
            lang = rng.choice(home) if home and rng.random() < 0.5 else _weighted(rng, LANGUAGES)
            if lang not in languages:
                languages.append(lang)
        # A few dormant people: members who rarely touch the assistant.
        activity = 0.03 if rng.random() < 0.1 else 0.25 + 0.7 * rng.betavariate(2.0, 2.0)
        people.append(
            Person(
                email=f"{candidate}@{domain}.example",
                activity=activity,
                mean_messages=rng.lognormvariate(2.2, 0.6),
                ides=tuple(ides),
                languages=tuple(languages),
            )
        )
    return tuple(people)


def draw_day(
    seed: int, tenant_id: str, people: tuple[Person, ...], day: dt.date, revision: int
) -> list[UserDay]:
    """The active users of one day (no date checks: the caller decides whether the day has data).

    This is the simulator's hot path (one call per fresh ``day=`` request), hence the local names.
    """
    rand = random.Random(stable_int(seed, "day", tenant_id, day.toordinal(), revision)).random
    factor = WEEKEND_FACTOR if day.weekday() >= 5 else 1.0
    # A day-wide mood (releases, holidays) so consecutive weekdays are not identical in shape.
    factor *= 0.75 + 0.5 * rand()
    log = math.log
    active: list[UserDay] = []
    for index, person in enumerate(people):
        if rand() >= person.activity * factor:
            continue
        # Exponentially distributed around the person's mean: most days light, a few heavy.
        messages = 1 + int(-person.mean_messages * log(1.0 - rand()))
        ides, languages = person.ides, person.languages
        # The first preference is always used; each other one only on some days.
        if len(ides) > 1:
            ides = ides[:1] + tuple([x for x in ides[1:] if rand() < 0.3])
        if len(languages) > 1:
            languages = languages[:1] + tuple([x for x in languages[1:] if rand() < 0.6])
        active.append((index, messages, ides, languages))
    return active


def _engagement(counts: dict[str, int], key: str) -> list[dict[str, Any]]:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [{key: name, "engaged_users": n} for name, n in ordered]


def daily_entry(day: dt.date, active: list[UserDay]) -> dict[str, Any]:
    """The ``daily[]`` element of one day with activity."""
    ide_users: dict[str, int] = {}
    language_users: dict[str, int] = {}
    for _, _, ides, languages in active:
        for ide in ides:
            ide_users[ide] = ide_users.get(ide, 0) + 1
        for lang in languages:
            language_users[lang] = language_users.get(lang, 0) + 1
    return {
        "day": day.isoformat(),
        "active_users": len(active),
        "messages": sum(a[1] for a in active),
        "ides": _engagement(ide_users, "ide_name"),
        "languages": _engagement(language_users, "language_name"),
    }


def _ordered_union(preferred: tuple[str, ...], used: set[str]) -> list[str]:
    return [name for name in preferred if name in used]


def usage_data(
    people: tuple[Person, ...],
    start: dt.date,
    end: dt.date,
    days: int,
    activity: list[tuple[dt.date, list[UserDay]]],
) -> dict[str, Any]:
    """The response's ``data`` object over the given (date, active users) pairs, dates ascending."""
    totals: dict[int, list[Any]] = {}  # person index -> [messages, last day, ides, languages]
    daily = []
    total_messages = 0
    for day, active in activity:
        if not active:
            continue
        entry = daily_entry(day, active)
        daily.append(entry)
        total_messages += entry["messages"]
        for index, messages, ides, languages in active:
            acc = totals.get(index)
            if acc is None:
                totals[index] = [messages, day, set(ides), set(languages)]
            else:
                acc[0] += messages
                acc[1] = day
                acc[2].update(ides)
                acc[3].update(languages)
    users = []
    for index, (messages, last, ides, languages) in totals.items():
        person = people[index]
        users.append(
            {
                "email": person.email,
                "messages": messages,
                "last_active": last.isoformat(),
                "ides": _ordered_union(person.ides, ides),
                "languages": _ordered_union(person.languages, languages),
            }
        )
    users.sort(key=lambda u: (-u["messages"], u["email"]))
    return {
        "period": {"start": start.isoformat(), "end": end.isoformat(), "days": days},
        "summary": {"total_active_users": len(users), "total_messages": total_messages},
        "users": users,
        "daily": daily,
    }


def single_day_data(
    people: tuple[Person, ...], day: dt.date, active: list[UserDay]
) -> dict[str, Any]:
    """``usage_data`` for one day, without the aggregation a window needs (the hot path)."""
    iso = day.isoformat()
    users: list[dict[str, Any]] = [
        {
            "email": people[index].email,
            "messages": messages,
            "last_active": iso,
            "ides": list(ides),
            "languages": list(languages),
        }
        for index, messages, ides, languages in active
    ]
    users.sort(key=lambda u: (-u["messages"], u["email"]))
    total = sum(a[1] for a in active)
    return {
        "period": {"start": iso, "end": iso, "days": 1},
        "summary": {"total_active_users": len(users), "total_messages": total},
        "users": users,
        "daily": [daily_entry(day, active)] if active else [],
    }


def success_body(data: dict[str, Any]) -> bytes:
    """The 200 envelope, compact (msgspec: a fifth of the stdlib encoder's CPU, which matters
    because the simulator shares the machine with the clients it serves in the benchmark)."""
    return msgspec.json.encode({"status": "success", "data": data})


class UsageGenerator:
    """Generates and caches per-tenant people and per-day activity for one seed."""

    def __init__(self, seed: int, *, cache_size: int = 8192) -> None:
        self.seed = seed
        self._people: dict[tuple[str, int], tuple[Person, ...]] = {}
        self._activity: LRU[tuple[str, int, int, int], list[UserDay]] = LRU(cache_size * 4)
        self._bodies: LRU[tuple[str, int, int, int], bytes] = LRU(cache_size)

    def people(self, tenant_id: str, users: int | None) -> tuple[Person, ...]:
        size = org_size(self.seed, tenant_id) if users is None else users
        key = (tenant_id, size)
        found = self._people.get(key)
        if found is None:
            found = self._people[key] = make_people(self.seed, tenant_id, size)
        return found

    def activity(
        self, tenant_id: str, users: int | None, day: dt.date, revision: int
    ) -> list[UserDay]:
        people = self.people(tenant_id, users)
        key = (tenant_id, len(people), day.toordinal(), revision)
        found = self._activity.get(key)
        if found is None:
            found = draw_day(self.seed, tenant_id, people, day, revision)
            self._activity.put(key, found)
        return found

    def day_data(
        self, tenant_id: str, users: int | None, day: dt.date, revision: int, has_data: bool
    ) -> dict[str, Any]:
        """The ``data`` object of a ``day=`` response."""
        people = self.people(tenant_id, users)
        active = self.activity(tenant_id, users, day, revision) if has_data else []
        return single_day_data(people, day, active)

    def day_body(
        self, tenant_id: str, users: int | None, day: dt.date, revision: int, has_data: bool
    ) -> bytes:
        """The serialized 200 body of a ``day=`` response (cached)."""
        if not has_data:
            return success_body(single_day_data((), day, []))
        key = (tenant_id, users if users is not None else -1, day.toordinal(), revision)
        body = self._bodies.get(key)
        if body is None:
            body = success_body(self.day_data(tenant_id, users, day, revision, True))
            self._bodies.put(key, body)
        return body

    def period_data(
        self,
        tenant_id: str,
        users: int | None,
        start: dt.date,
        end: dt.date,
        days: int,
        dates_with_data: list[tuple[dt.date, int]],
    ) -> dict[str, Any]:
        """The ``data`` object of a window; ``dates_with_data`` pairs dates with their revision."""
        people = self.people(tenant_id, users)
        activity = [(d, self.activity(tenant_id, users, d, rev)) for d, rev in dates_with_data]
        return usage_data(people, start, end, days, activity)
