"""Runtime fault knobs: what tests turn to make the simulated API slow, limited, broken or odd.

Usage-endpoint knobs live in :class:`UsageFaults`, one per tenant plus one for everyone
(``faults.tenant(None)`` or ``faults.everyone``). A knob left at ``None`` inherits: tenant, then
everyone, then :class:`~collector.simulator.settings.SimulatorSettings`. The ``*_next`` counters do
not inherit; each scope's counter is consumed on its own (tenant first).

Token-endpoint knobs live in :class:`TokenFaults`, one per ``client_id`` plus one for every client
(``faults.client(None)`` or ``faults.all_clients``), with the same inheritance.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import random
import time
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

from collector.simulator.data import stable_int
from collector.simulator.variants import VARIANTS

BadResponseMode = Literal[
    "malformed_json",
    "html_200",
    "missing_fields",
    "wrong_types",
    "negative_numbers",
    "wrong_day",
    "empty_body",
]
BAD_RESPONSE_MODES: Final[tuple[str, ...]] = (
    "malformed_json",
    "html_200",
    "missing_fields",
    "wrong_types",
    "negative_numbers",
    "wrong_day",
    "empty_body",
)
RetryAfterFormat = Literal["seconds", "http-date"]


class Sentinel(enum.Enum):
    """Markers for :attr:`TokenFaults.expires_in`: inherit the default, or leave the field out."""

    DEFAULT = "default"
    OMIT = "omit"


DEFAULT: Final = Sentinel.DEFAULT
OMIT: Final = Sentinel.OMIT


@dataclass
class UsageFaults:
    """Knobs of the usage endpoint for one tenant (or everyone). ``None`` means inherit.

    - ``latency``: seconds slept before every usage response (asyncio.sleep).
    - ``failure_rate``: share of requests answered 500 "Failed to fetch data" (seeded dice).
    - ``rate_limit`` / ``rate_limit_burst``: token bucket in requests/s and bucket size
      (burst default: ``ceil(rate)``, at least 1); over it, 429 "Too many requests".
    - ``retry_after_format``: ``"seconds"`` (default) or ``"http-date"`` for 429/503 Retry-After.
    - ``retry_after_value``: a raw Retry-After value sent instead (``"soon"``, ``"86400"``);
      ``""`` leaves the header out.
    - ``retry_after_seconds``: the wait announced by ``throttle_next`` and ``unavailable``
      (default 1).
    - ``down``: every request 500 "Failed to fetch data" until cleared.
    - ``unavailable``: every request 503 "Service unavailable" with Retry-After until cleared.
    - ``forbidden``: every authenticated request 403 "Forbidden" (plan or role too low).
    - ``bad_response``: every 200 carries the named defect (see :data:`BAD_RESPONSE_MODES`).
    - ``variant``: every good ``day=`` answer is served as the named API variant (see
      :data:`~collector.simulator.variants.VARIANTS`; default: the tenant's ``variant``).
    - ``fail_next`` / ``throttle_next`` / ``unavailable_next``: the next N requests get a 500 /
      429 / 503, then normal service resumes (not inherited).
    """

    latency: float | None = None
    failure_rate: float | None = None
    rate_limit: float | None = None
    rate_limit_burst: int | None = None
    retry_after_format: RetryAfterFormat | None = None
    retry_after_value: str | None = None
    retry_after_seconds: float | None = None
    down: bool | None = None
    unavailable: bool | None = None
    forbidden: bool | None = None
    bad_response: BadResponseMode | None = None
    variant: str | None = None
    fail_next: int = 0
    throttle_next: int = 0
    unavailable_next: int = 0

    def __post_init__(self) -> None:
        if self.bad_response is not None and self.bad_response not in BAD_RESPONSE_MODES:
            raise ValueError(f"unknown bad_response mode {self.bad_response!r}")
        if self.variant is not None and self.variant not in VARIANTS:
            raise ValueError(f"unknown API variant {self.variant!r}; known: {', '.join(VARIANTS)}")


@dataclass
class TokenFaults:
    """Knobs of the token endpoint for one client_id (or every client). ``None`` means inherit.

    - ``delay``: seconds slept before answering.
    - ``fail``: every request 500 ``{"errors":["Internal server error"]}``.
    - ``locked_out``: every request 400 ``{"errors":["User is locked out"]}``.
    - ``expires_in``: the announced ``expires_in``: any JSON value, :data:`OMIT` to leave the
      field out, :data:`DEFAULT` to inherit (``token_lifetime``). It changes what the endpoint
      says, not how long the token really lives.
    - ``lifetime``: how long new tokens really live, in seconds (default ``token_lifetime``).
    - ``fail_next``: the next N requests get a 500, then normal service resumes.
    """

    delay: float | None = None
    fail: bool | None = None
    locked_out: bool | None = None
    expires_in: Any = DEFAULT
    lifetime: float | None = None
    fail_next: int = 0


class TokenBucket:
    """Classic token bucket on the monotonic clock; ``take`` returns 0 or the seconds to wait."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else float("inf")


class Faults:
    """Every runtime knob of one simulator, plus token revocation."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.everyone = UsageFaults()
        self.all_clients = TokenFaults()
        self.reject_all_tokens = False
        self._tenants: dict[str, UsageFaults] = {}
        self._clients: dict[str, TokenFaults] = {}
        self._dice: dict[str, random.Random] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.token_generation: dict[str, int] = {}
        self.global_token_generation = 0

    def tenant(self, tenant_id: str | None) -> UsageFaults:
        """The usage knobs of one tenant (created on first use); ``None`` gives ``everyone``."""
        if tenant_id is None:
            return self.everyone
        found = self._tenants.get(tenant_id)
        if found is None:
            found = self._tenants[tenant_id] = UsageFaults()
        return found

    def client(self, client_id: str | None) -> TokenFaults:
        """The token knobs of one client_id (made on first use); ``None`` gives ``all_clients``."""
        if client_id is None:
            return self.all_clients
        found = self._clients.get(client_id)
        if found is None:
            found = self._clients[client_id] = TokenFaults()
        return found

    def set(self, tenant_id: str | None = None, **knobs: Any) -> UsageFaults:
        """Set usage knobs in one call: ``faults.set("tenant-01", latency=0.2, down=True)``."""
        target = self.tenant(tenant_id)
        for name, value in knobs.items():
            if name not in _USAGE_FIELDS:
                raise TypeError(f"unknown usage fault knob {name!r}")
            setattr(target, name, value)
        target.__post_init__()
        return target

    def set_token(self, client_id: str | None = None, **knobs: Any) -> TokenFaults:
        """Set token knobs in one call: ``faults.set_token("tenant-01-client", delay=2)``."""
        target = self.client(client_id)
        for name, value in knobs.items():
            if name not in _TOKEN_FIELDS:
                raise TypeError(f"unknown token fault knob {name!r}")
            setattr(target, name, value)
        return target

    def revoke_tokens(self, tenant_id: str | None = None) -> None:
        """Invalidate every token issued so far to the tenant (``None``: to every tenant)."""
        if tenant_id is None:
            self.global_token_generation += 1
        else:
            self.token_generation[tenant_id] = self.token_generation.get(tenant_id, 0) + 1

    def reset(self) -> None:
        """Clear every knob, bucket and revocation (the dice keep their sequence)."""
        self.everyone = UsageFaults()
        self.all_clients = TokenFaults()
        self.reject_all_tokens = False
        self._tenants.clear()
        self._clients.clear()
        self._buckets.clear()

    # --- resolution used by the app -------------------------------------------------------------

    def usage(self, tenant_id: str, name: str, default: Any) -> Any:
        """The effective value of one usage knob for a tenant."""
        own = self._tenants.get(tenant_id)
        if own is not None:
            value = getattr(own, name)
            if value is not None:
                return value
        value = getattr(self.everyone, name)
        return default if value is None else value

    def token(self, client_id: str, name: str, default: Any) -> Any:
        """The effective value of one token knob for a client_id."""
        inherit = DEFAULT if name == "expires_in" else None
        own = self._clients.get(client_id)
        if own is not None:
            value = getattr(own, name)
            if value is not inherit:
                return value
        value = getattr(self.all_clients, name)
        return default if value is inherit else value

    def consume(self, tenant_id: str, counter: str) -> bool:
        """Use one unit of a ``*_next`` usage counter (tenant scope first); True if one was left."""
        for scope in (self._tenants.get(tenant_id), self.everyone):
            if scope is not None and getattr(scope, counter) > 0:
                setattr(scope, counter, getattr(scope, counter) - 1)
                return True
        return False

    def consume_token(self, client_id: str) -> bool:
        """Use one unit of a token ``fail_next`` counter (client scope first)."""
        for scope in (self._clients.get(client_id), self.all_clients):
            if scope is not None and scope.fail_next > 0:
                scope.fail_next -= 1
                return True
        return False

    def roll_failure(self, tenant_id: str, rate: float) -> bool:
        """Seeded per-tenant dice, so a run's failures do not depend on other tenants' timing."""
        if rate <= 0:
            return False
        dice = self._dice.get(tenant_id)
        if dice is None:
            dice = self._dice[tenant_id] = random.Random(stable_int(self.seed, "dice", tenant_id))
        return dice.random() < rate

    def throttle_wait(self, tenant_id: str, rate: float | None, burst: int | None) -> float:
        """0 if the tenant's bucket admits the request, else seconds until it would."""
        if rate is None:
            return 0.0
        size = burst if burst is not None else max(1, int(-(-rate // 1)))
        bucket = self._buckets.get(tenant_id)
        if bucket is None or bucket.rate != rate or bucket.burst != size:
            bucket = self._buckets[tenant_id] = TokenBucket(rate, size)
        return bucket.take()


_USAGE_FIELDS = frozenset(f.name for f in fields(UsageFaults))
_TOKEN_FIELDS = frozenset(f.name for f in fields(TokenFaults))


def defective_body(mode: str, good: bytes, day: str) -> tuple[bytes, str]:
    """A 200 body with the named defect, made from the good body, and its content type."""
    if mode == "html_200":
        page = "<!DOCTYPE html><html><head><title>Maintenance</title></head>"
        page += "<body><h1>We'll be back soon</h1></body></html>"
        return page.encode(), "text/html"
    if mode == "malformed_json":
        return good[: max(1, len(good) // 2)], "application/json"
    if mode == "empty_body":
        return b"", "application/json"
    payload = json.loads(good)
    data = payload["data"]
    if mode == "missing_fields":
        del data["summary"]
        for entry in data["daily"]:
            del entry["active_users"]
    elif mode == "wrong_types":
        data["summary"]["total_messages"] = str(data["summary"]["total_messages"])
        data["period"]["days"] = str(data["period"]["days"])
        for entry in data["daily"]:
            entry["messages"] = str(entry["messages"])
        for user in data["users"]:
            user["ides"] = ", ".join(user["ides"])
    elif mode == "negative_numbers":
        data["summary"]["total_messages"] = -1 - data["summary"]["total_messages"]
        for entry in data["daily"]:
            entry["messages"] = -entry["messages"]
            entry["active_users"] = -entry["active_users"]
        for user in data["users"]:
            user["messages"] = -user["messages"]
    elif mode == "wrong_day":
        # A day the client did not ask for: the one before the requested day (or period start).
        asked = dt.date.fromisoformat(day or data["period"]["start"])
        shifted = (asked - dt.timedelta(days=1)).isoformat()
        data["period"] = {"start": shifted, "end": shifted, "days": 1}
        entry = {"day": shifted, "active_users": 1, "messages": 1, "ides": [], "languages": []}
        data["daily"] = [*data["daily"], entry]
    else:
        raise ValueError(f"unknown bad_response mode {mode!r}")
    return json.dumps(payload, separators=(",", ":")).encode(), "application/json"
