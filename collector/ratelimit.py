"""Request pacing: a token bucket per tenant, an optional global bucket, a fair concurrency cap.

Every usage request passes three gates, in this order:

1. **the tenant's token bucket** (``per_second`` tokens per second, up to ``burst`` saved up), so
   no tenant exceeds its own API budget; a 429/503 ``Retry-After`` :meth:`RateLimiter.pause`\\ s
   that tenant's bucket, and only that one;
2. **the global token bucket**, if one is configured (a budget for the whole process);
3. **the global concurrency cap** (``max_concurrency`` requests in flight across all tenants),
   served round-robin by tenant: when slots are scarce, a tenant with 90 queued requests gets
   one slot, then the next waiting tenant gets one, and so on, so a big backfill cannot make
   small tenants wait behind all of its requests.

The order matters for isolation: a request waits for its own tenant's budget *before* it
competes for shared resources, so a throttled or paused tenant never holds a global slot while it
waits. Once it has a slot, two checks guard the moment of sending, because the API's bucket
counts arrivals, not our grants: a Retry-After that came in while the request queued sends it
back to wait for the pause, and a second bucket per tenant paces the sends themselves (requests
granted apart but released together by the cap would otherwise arrive as a burst; that wait is
short and only follows such a bunch). That send pace starts its refill ``SEND_JITTER_MARGIN``
late, once per tenant, because the first requests on new connections arrive later after being
sent than the ones that follow.

Waiting is FIFO within a bucket and never polls: one waiter at a time sleeps for exactly the time
until the next token, the others queue on an ``asyncio.Lock`` (which wakes in FIFO order). The
clock and the sleep function are injectable, so tests can run the limiter on virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


SEND_JITTER_MARGIN = 0.05
"""Seconds by which the send pace of a tenant trails its bucket, once, at the start.

The API's bucket counts arrivals. A tenant's first requests open new connections and arrive
later after being sent than the ones that follow on warm connections, so a client that paces
exactly at the limit sees its first refilled token arrive early and earns a 429 (and a whole
second of Retry-After). Starting the refill this much later absorbs that jitter; it costs
50 ms once per tenant, not per request."""


class RateSettings(Protocol):
    """The shape of ``RateLimitConfig``."""

    @property
    def per_second(self) -> float: ...
    @property
    def burst(self) -> int: ...


@dataclass(frozen=True)
class Rate:
    """A token bucket's refill rate (tokens per second) and capacity."""

    per_second: float
    burst: int = 1

    def __post_init__(self) -> None:
        if not self.per_second > 0:
            raise ValueError("per_second must be positive")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")

    @classmethod
    def of(cls, settings: RateSettings) -> Rate:
        """Copy a ``RateLimitConfig`` (or anything shaped like one)."""
        return settings if isinstance(settings, Rate) else cls(settings.per_second, settings.burst)


class TokenBucket:
    """An async token bucket; :meth:`acquire` takes one token, waiting FIFO when there is none."""

    def __init__(
        self,
        rate: Rate,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        accrue_after: float = 0.0,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rate = rate
        self._tokens = float(rate.burst)
        # Starts full; ``accrue_after`` delays the first refill (see ``SEND_JITTER_MARGIN``).
        self._updated = clock() + accrue_after
        self._paused_until = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> Rate:
        """The current rate and burst."""
        return self._rate

    def set_rate(self, rate: Rate) -> None:
        """Change the rate (config reload); saved-up tokens are kept up to the new burst."""
        if rate != self._rate:
            self._refill(self._clock())
            self._rate = rate
            self._tokens = min(self._tokens, float(rate.burst))

    def _refill(self, now: float) -> None:
        # ``_tokens`` is exact at time ``_updated``; during a pause ``_updated`` lies in the
        # future (the pause's end), so nothing accrues until then.
        if now > self._updated:
            self._tokens = min(
                float(self._rate.burst),
                self._tokens + (now - self._updated) * self._rate.per_second,
            )
            self._updated = now

    def pause(self, seconds: float) -> None:
        """Hand out no token for ``seconds`` from now (a Retry-After); the longest pause wins.

        The bucket restarts with a single token, not a saved-up burst, so the first request after
        a pause probes the API instead of a burst hitting it at once.
        """
        now = self._clock()
        until = now + max(0.0, seconds)
        if until <= self._paused_until:
            return
        self._refill(now)
        self._paused_until = until
        self._tokens = 1.0
        self._updated = until

    def paused_for(self) -> float:
        """Seconds left in the current pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    def delay(self) -> float:
        """Seconds until a token would be available to a caller arriving now (ignores the queue)."""
        now = self._clock()
        self._refill(now)
        shortfall = max(0.0, 1.0 - self._tokens) / self._rate.per_second
        return max(0.0, self._paused_until - now) + shortfall

    async def acquire(self) -> float:
        """Take one token, waiting (FIFO) until one is available; returns the seconds waited."""
        started = self._clock()
        if not self._lock.locked():
            # Nobody queued: take a token without the lock (every request passes here twice).
            self._refill(started)
            if self._tokens >= 1.0 and started >= self._paused_until:
                self._tokens -= 1.0
                return 0.0
        async with self._lock:
            while True:
                wait = self.delay()
                if wait <= 0:
                    self._tokens -= 1.0
                    return self._clock() - started
                # Only the lock holder sleeps; a pause or rate change made meanwhile is seen on
                # the next turn of the loop.
                await self._sleep(wait)


class FairSemaphore:
    """A counting semaphore whose waiters are served round-robin by key, FIFO within a key."""

    def __init__(self, value: int) -> None:
        if value < 1:
            raise ValueError("a semaphore needs at least one slot")
        self._free = value
        self._capacity = value
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def in_use(self) -> int:
        """Slots currently held."""
        return self._capacity - self._free

    @property
    def waiting(self) -> int:
        """Callers queued for a slot."""
        return sum(len(q) for q in self._queues.values())

    async def acquire(self, key: str) -> None:
        """Take a slot for ``key``, queueing behind other waiters of the same key."""
        if self._free > 0 and not self._queues:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self.release()
            else:
                self._discard(key, future)
            raise

    def _discard(self, key: str, future: asyncio.Future[None]) -> None:
        queue = self._queues.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(future)
        if not queue:
            del self._queues[key]

    def release(self) -> None:
        """Give a slot back; it goes to the next key in rotation that has a waiter."""
        while self._queues:
            key, queue = next(iter(self._queues.items()))
            future = queue.popleft()
            if queue:
                self._queues.move_to_end(key)
            else:
                del self._queues[key]
            if not future.done():
                future.set_result(None)
                return
        self._free = min(self._free + 1, self._capacity)


class RateLimiter:
    """Per-tenant buckets, an optional global bucket and a fair global concurrency cap."""

    def __init__(
        self,
        default_rate: RateSettings,
        *,
        max_concurrency: int,
        global_rate: RateSettings | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._default = Rate.of(default_rate)
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[str, TokenBucket] = {}
        self._sent: dict[str, TokenBucket] = {}
        self._global = (
            TokenBucket(Rate.of(global_rate), clock=clock, sleep=sleep)
            if global_rate is not None
            else None
        )
        self.concurrency = FairSemaphore(max_concurrency)

    def bucket(self, tenant: str, rate: RateSettings | None = None) -> TokenBucket:
        """The tenant's bucket, created on first use; ``rate`` (if given) updates its rate."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            wanted = Rate.of(rate) if rate is not None else self._default
            bucket = self._buckets[tenant] = TokenBucket(
                wanted, clock=self._clock, sleep=self._sleep
            )
        elif rate is not None:
            bucket.set_rate(Rate.of(rate))
        return bucket

    def pause(self, tenant: str, seconds: float) -> None:
        """Stop handing ``tenant`` tokens for ``seconds`` (a Retry-After); other tenants go on."""
        bucket = self._buckets.get(tenant) or self.bucket(tenant)
        bucket.pause(seconds)

    def paused_for(self, tenant: str) -> float:
        """Seconds left in the tenant's current pause (0 when not paused)."""
        bucket = self._buckets.get(tenant)
        return bucket.paused_for() if bucket is not None else 0.0

    def forget(self, tenant: str) -> None:
        """Drop a removed tenant's bucket."""
        self._buckets.pop(tenant, None)
        self._sent.pop(tenant, None)

    def _sent_bucket(self, tenant: str, rate: Rate) -> TokenBucket:
        sent = self._sent.get(tenant)
        if sent is None:
            sent = self._sent[tenant] = TokenBucket(
                rate, clock=self._clock, sleep=self._sleep, accrue_after=SEND_JITTER_MARGIN
            )
        else:
            sent.set_rate(rate)
        return sent

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str, rate: RateSettings | None = None) -> AsyncIterator[float]:
        """Hold permission for one request; yields the seconds spent waiting for it."""
        waited = await self.acquire(tenant, rate)
        try:
            yield waited
        finally:
            self.release()

    def release(self) -> None:
        """Give back the concurrency slot taken by :meth:`acquire`."""
        self.concurrency.release()

    async def acquire(self, tenant: str, rate: RateSettings | None = None) -> float:
        """Wait for permission to send one request; returns the seconds waited.

        Pair every successful call with :meth:`release` (or use :meth:`slot`).
        """
        started = self._clock()
        bucket = self.bucket(tenant, rate)
        while True:
            await bucket.acquire()
            if self._global is not None:
                await self._global.acquire()
            await self.concurrency.acquire(tenant)
            if bucket.paused_for() <= 0:
                break
            # A Retry-After arrived while this request queued for a slot: never send into it.
            self.concurrency.release()
        try:
            # Tokens are granted at the pace of the bucket, but requests that then queued for a
            # slot can leave together, and the API counts arrivals: the burst that follows a
            # congested moment is what earns 429s. A second bucket paces the sends themselves;
            # it only waits (briefly, holding the slot) right after such a bunch.
            await self._sent_bucket(tenant, bucket.rate).acquire()
        except BaseException:
            self.concurrency.release()
            raise
        return self._clock() - started
