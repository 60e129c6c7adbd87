"""What the simulator saw: request counters, concurrency high-water marks and an ordered log."""

from __future__ import annotations

from collections import Counter, deque
from typing import NamedTuple


class RequestRecord(NamedTuple):
    """One usage request: arrival (monotonic), tenant (None if unauthenticated), param, status.

    ``param`` is the ``day`` value, the ``period`` value (``"7d"`` when neither was sent), or the
    raw query string when both were sent.
    """

    time: float
    tenant: str | None
    param: str
    status: int


class SimStats:
    """Counters tests read; ``log_enabled = False`` stops the request log (counters continue)."""

    def __init__(self, log_size: int = 200_000) -> None:
        self.log_size = log_size
        self.log_enabled = True
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.token_requests: Counter[str] = Counter()  # by client_id ("" if none was sent)
        self.token_responses: Counter[int] = Counter()  # by HTTP status
        self.tokens_issued: Counter[str] = Counter()  # by tenant id
        self.usage_requests: Counter[str] = Counter()  # by tenant id, authenticated requests only
        self.responses: Counter[int] = Counter()  # usage endpoint, by HTTP status
        self.log: deque[RequestRecord] = deque(maxlen=self.log_size)
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_by_tenant: Counter[str] = Counter()
        self.max_in_flight_by_tenant: Counter[str] = Counter()

    def enter(self, tenant: str | None) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if tenant is not None:
            n = self.in_flight_by_tenant[tenant] = self.in_flight_by_tenant[tenant] + 1
            if n > self.max_in_flight_by_tenant[tenant]:
                self.max_in_flight_by_tenant[tenant] = n

    def leave(self, tenant: str | None) -> None:
        self.in_flight -= 1
        if tenant is not None:
            self.in_flight_by_tenant[tenant] -= 1

    def record(self, time: float, tenant: str | None, param: str, status: int) -> None:
        self.responses[status] += 1
        if self.log_enabled:
            self.log.append(RequestRecord(time, tenant, param, status))

    def order(self, tenant: str | None = None) -> list[RequestRecord]:
        """The logged requests in arrival order, optionally of one tenant."""
        return [r for r in self.log if tenant is None or r.tenant == tenant]
