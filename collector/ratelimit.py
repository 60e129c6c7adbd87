"""Request pacing: a token bucket per tenant, an optional global bucket, a fair concurrency cap.

Every usage request passes three gates, in this order:

1. **the tenant's bucket** (``per_second`` tokens per second, up to ``burst`` saved up), so no
   tenant exceeds its own API budget; a 429/503 ``Retry-After`` :meth:`RateLimiter.pause`\\ s
   that tenant's bucket, and only that one;
2. **the global token bucket**, if one is configured (a budget for the whole process);
3. **the global concurrency cap** (``max_concurrency`` requests in flight across all tenants),
   served round-robin by tenant: when slots are scarce, a tenant with 90 queued requests gets
   one slot, then the next waiting tenant gets one, and so on, so a big backfill cannot make
   small tenants wait behind all of its requests.

The order matters for isolation: a request waits for its own tenant's budget *before* it
competes for shared resources, so a throttled or paused tenant never holds a global slot while it
waits. A Retry-After that came in while a request queued for a slot sends it back to wait for the
pause.

**The tenant's bucket is charged when the answer comes back, not when the request is granted**
(:class:`InFlightBucket`). The API's bucket counts *arrivals*, and we never see an arrival: a
request reaches the API at some moment between its grant and its answer, later after the grant
when it queued for a slot or opened a new connection (a tenant's first requests, on a loaded
machine, reached the API 100-150 ms after the grant while the ones that followed on warm
connections took a few ms). So the bucket takes each request's token at the latest moment the
API can have counted it, its answer, and counts the requests granted but not yet answered as if
they arrived now. The API's token bucket (``rate``, ``burst``, full before the first arrival) can
only hold more than ours: whatever the delays, a tenant paced at exactly the API's documented
limit is never answered 429. What it costs: the refill starts one response time later once per
tenant, and a tenant never has more than ``burst`` requests in flight (with ``burst: 1``, one at
a time).

Waiting is FIFO within a bucket and never polls: one waiter at a time sleeps for exactly the time
until the next token (or, when only an answer can free one, until an answer comes), the others
queue on an ``asyncio.Lock`` (which wakes in FIFO order). The clock and the sleep function are
injectable, so tests can run the limiter on virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


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

    _in_flight = 0
    """Requests granted but not yet charged; always 0 here (see :class:`InFlightBucket`)."""

    def __init__(
        self,
        rate: Rate,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._rate = rate
        self._tokens = float(rate.burst)  # starts full
        self._updated = clock()
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
        """Seconds until a token would be available to a caller arriving now (ignores the queue).

        ``inf`` when no wait is long enough: only an answer to a request in flight can free a
        token (:class:`InFlightBucket` with ``burst`` requests in flight).
        """
        now = self._clock()
        self._refill(now)
        needed = 1.0 + self._in_flight - self._tokens
        if needed <= 0:
            shortfall = 0.0
        elif 1 + self._in_flight > self._rate.burst:
            return float("inf")
        else:
            shortfall = needed / self._rate.per_second
        return max(0.0, self._paused_until - now) + shortfall

    def _take(self) -> None:
        self._tokens -= 1.0

    async def _wait(self, seconds: float) -> None:
        await self._sleep(seconds)

    async def acquire(self) -> float:
        """Take one token, waiting (FIFO) until one is available; returns the seconds waited."""
        started = self._clock()
        if not self._lock.locked():
            # Nobody queued: take a token without the lock (every request passes here).
            self._refill(started)
            if self._tokens - self._in_flight >= 1.0 and started >= self._paused_until:
                self._take()
                return 0.0
        async with self._lock:
            while True:
                wait = self.delay()
                if wait <= 0:
                    self._take()
                    return self._clock() - started
                # Only the lock holder waits; a pause, rate change or answer that comes
                # meanwhile is seen on the next turn of the loop.
                await self._wait(wait)


class InFlightBucket(TokenBucket):
    """A tenant's token bucket that charges each request when its answer comes back.

    :meth:`acquire` grants a request while the tokens exceed the requests already in flight
    (granted, not yet answered: counted as if they reached the API now), and takes no token;
    :meth:`answered` takes it once the request's answer (or its failure) came back, the latest
    moment the API can have counted it. :meth:`withdraw` gives back a grant whose request was
    never sent. Every grant is paired with exactly one of the two.
    """

    def __init__(
        self,
        rate: Rate,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        super().__init__(rate, clock=clock, sleep=sleep)
        self._in_flight = 0
        self._answer: asyncio.Future[None] | None = None

    @property
    def in_flight(self) -> int:
        """Requests granted and not yet answered or withdrawn."""
        return self._in_flight

    def set_rate(self, rate: Rate) -> None:
        """Change the rate (config reload); a larger burst may let a waiting request go."""
        super().set_rate(rate)
        self._wake()

    def _take(self) -> None:
        self._in_flight += 1

    async def _wait(self, seconds: float) -> None:
        if seconds != float("inf"):
            await self._sleep(seconds)
            return
        answer = self._answer = asyncio.get_running_loop().create_future()
        try:
            await answer
        finally:
            self._answer = None

    def _wake(self) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(None)

    def answered(self) -> None:
        """A granted request's answer came back, or it failed after it may have been sent.

        Its token is taken now. During a pause nothing is taken: the pause restarts the bucket
        from one token when it ends, which stands for whatever the API counted before.
        """
        now = self._clock()
        self._refill(now)
        if now >= self._paused_until:
            self._tokens -= 1.0
        self._in_flight = max(0, self._in_flight - 1)
        self._wake()

    def withdraw(self) -> None:
        """A granted request was never sent (cancelled, or sent back by a pause): no token."""
        self._in_flight = max(0, self._in_flight - 1)
        self._wake()


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
        self._buckets: dict[str, InFlightBucket] = {}
        self._global = (
            TokenBucket(Rate.of(global_rate), clock=clock, sleep=sleep)
            if global_rate is not None
            else None
        )
        self.concurrency = FairSemaphore(max_concurrency)

    def bucket(self, tenant: str, rate: RateSettings | None = None) -> InFlightBucket:
        """The tenant's bucket, created on first use; ``rate`` (if given) updates its rate."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            wanted = Rate.of(rate) if rate is not None else self._default
            bucket = self._buckets[tenant] = InFlightBucket(
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

    def release(self, tenant: str) -> None:
        """The request :meth:`acquire` allowed is over (answered or failed): give back its
        concurrency slot and charge the tenant's bucket now."""
        self.concurrency.release()
        bucket = self._buckets.get(tenant)
        if bucket is not None:
            bucket.answered()

    async def acquire(self, tenant: str, rate: RateSettings | None = None) -> float:
        """Wait for permission to send one request; returns the seconds waited.

        Pair every successful call with :meth:`release` once the request is over (in a
        ``finally``; the client does not use a context manager, which would cost a few
        microseconds on every request).
        """
        started = self._clock()
        bucket = self.bucket(tenant, rate)
        while True:
            await bucket.acquire()
            try:
                if self._global is not None:
                    await self._global.acquire()
                await self.concurrency.acquire(tenant)
            except BaseException:
                bucket.withdraw()
                raise
            if bucket.paused_for() <= 0:
                return self._clock() - started
            # A Retry-After arrived while this request queued for a slot: never send into it.
            self.concurrency.release()
            bucket.withdraw()
