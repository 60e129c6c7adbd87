"""Token buckets, charging on answer, Retry-After pauses and the fair concurrency cap, on a virtual
clock."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator

import pytest

from collector.config import RateLimitConfig
from collector.ratelimit import (
    FairSemaphore,
    InFlightBucket,
    Rate,
    RateLimiter,
    TokenBucket,
)


@contextlib.asynccontextmanager
async def slot(
    limiter: RateLimiter, tenant: str, rate: RateLimitConfig | None = None
) -> AsyncIterator[float]:
    """Hold permission for one request as the client does (acquire, then release in finally);
    yields the seconds spent waiting."""
    waited = await limiter.acquire(tenant, rate)
    try:
        yield waited
    finally:
        limiter.release(tenant)


class VirtualClock:
    """A clock plus sleep that only move when the test says so; counts every sleep started."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    async def run_until(self, deadline: float) -> None:
        """Advance to ``deadline``, waking sleepers in time order and letting tasks run."""
        while True:
            await settle()
            if not self._sleepers or self._sleepers[0][0] > deadline:
                break
            wake, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            if not future.done():
                future.set_result(None)
        self.now = max(self.now, deadline)
        await settle()


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def acquire_all(
    bucket: TokenBucket, count: int, clock: VirtualClock
) -> tuple[list[tuple[int, float]], list[asyncio.Task[None]]]:
    """Start ``count`` acquirers in order; returns (index, completion time) records and tasks."""
    done: list[tuple[int, float]] = []

    async def one(index: int) -> None:
        await bucket.acquire()
        done.append((index, clock.now))

    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(one(index)))
        await asyncio.sleep(0)  # arrival order = index order
    return done, tasks


async def test_burst_then_steady_rate_in_fifo_order() -> None:
    """Rate 2/s, burst 3: three go at once, then one every 0.5 s, served in arrival order."""
    clock = VirtualClock()
    bucket = TokenBucket(Rate(2.0, 3), clock=clock, sleep=clock.sleep)
    done, _ = await acquire_all(bucket, 7, clock)
    await clock.run_until(10)
    assert [index for index, _ in done] == list(range(7))
    assert [t for _, t in done] == pytest.approx([0, 0, 0, 0.5, 1.0, 1.5, 2.0])


async def test_waiting_never_polls() -> None:
    """Waiting for four tokens costs four sleeps in total, however many callers queue."""
    clock = VirtualClock()
    bucket = TokenBucket(Rate(1.0, 1), clock=clock, sleep=clock.sleep)
    done, _ = await acquire_all(bucket, 5, clock)
    await clock.run_until(100)
    assert len(done) == 5
    assert clock.sleeps == 4


async def test_pause_holds_tokens_then_restarts_with_one() -> None:
    """A pause hands out nothing until it ends, then one token, then the normal rate resumes."""
    clock = VirtualClock()
    bucket = TokenBucket(Rate(4.0, 4), clock=clock, sleep=clock.sleep)
    bucket.pause(10)
    assert bucket.paused_for() == 10
    done, _ = await acquire_all(bucket, 3, clock)
    await clock.run_until(9.9)
    assert done == []
    await clock.run_until(20)
    assert [t for _, t in done] == pytest.approx([10.0, 10.25, 10.5])
    assert bucket.paused_for() == 0


async def test_longest_pause_wins() -> None:
    """A shorter pause requested during a longer one does not shorten it."""
    clock = VirtualClock()
    bucket = TokenBucket(Rate(1.0, 1), clock=clock, sleep=clock.sleep)
    bucket.pause(10)
    clock.now = 2
    bucket.pause(3)
    assert bucket.paused_for() == 8
    bucket.pause(20)
    assert bucket.paused_for() == 20


async def test_pause_during_a_wait_is_respected() -> None:
    """A pause that starts while a caller sleeps for its token delays that caller too."""
    clock = VirtualClock()
    bucket = TokenBucket(Rate(1.0, 1), clock=clock, sleep=clock.sleep)
    done, _ = await acquire_all(bucket, 2, clock)
    await clock.run_until(0.5)
    bucket.pause(5)  # at t=0.5: nothing before t=5.5
    await clock.run_until(30)
    assert [t for _, t in done] == pytest.approx([0.0, 5.5])


async def test_rate_change_applies_to_the_existing_bucket() -> None:
    """Passing a different rate (a config reload) changes the tenant's existing bucket."""
    clock = VirtualClock()
    limiter = RateLimiter(Rate(1.0, 1), max_concurrency=4, clock=clock, sleep=clock.sleep)
    first = limiter.bucket("acme")
    assert first.rate == Rate(1.0, 1)
    assert limiter.bucket("acme", RateLimitConfig(per_second=5, burst=2)) is first
    assert first.rate == Rate(5.0, 2)
    assert limiter.bucket("acme").rate == Rate(5.0, 2)  # no rate given: keep the override


async def test_tenant_pause_does_not_touch_other_tenants() -> None:
    """A Retry-After pause on one tenant leaves another tenant's requests unaffected."""
    clock = VirtualClock()
    limiter = RateLimiter(
        RateLimitConfig(per_second=10, burst=1),
        max_concurrency=10,
        clock=clock,
        sleep=clock.sleep,
    )
    limiter.pause("slowpoke", 60)
    finished: dict[str, float] = {}

    async def request(tenant: str) -> None:
        async with slot(limiter, tenant):
            finished[tenant] = clock.now

    tasks = [asyncio.create_task(request("slowpoke")), asyncio.create_task(request("other"))]
    await clock.run_until(1)
    assert finished == {"other": 0.0}
    assert limiter.paused_for("slowpoke") == 59
    assert limiter.paused_for("other") == 0
    await clock.run_until(61)
    assert finished["slowpoke"] == pytest.approx(60.0)
    await asyncio.gather(*tasks)


async def test_global_bucket_is_shared_by_all_tenants() -> None:
    """With a global rate of 1/s, requests of different tenants together go once a second."""
    clock = VirtualClock()
    limiter = RateLimiter(
        RateLimitConfig(per_second=100, burst=100),
        global_rate=RateLimitConfig(per_second=1, burst=1),
        max_concurrency=10,
        clock=clock,
        sleep=clock.sleep,
    )
    times: list[float] = []

    async def request(tenant: str) -> None:
        async with slot(limiter, tenant) as waited:
            times.append(waited)

    tasks = [asyncio.create_task(request(t)) for t in ("a", "b", "c")]
    await clock.run_until(10)
    await asyncio.gather(*tasks)
    assert sorted(times) == pytest.approx([0.0, 1.0, 2.0])


async def test_slot_reports_the_time_waited() -> None:
    """slot() yields how long the caller waited for its token, on the injected clock."""
    clock = VirtualClock()
    limiter = RateLimiter(Rate(2.0, 1), max_concurrency=1, clock=clock, sleep=clock.sleep)
    waited: list[float] = []

    async def request() -> None:
        async with slot(limiter, "acme") as seconds:
            waited.append(seconds)

    tasks = [asyncio.create_task(request()) for _ in range(3)]
    await clock.run_until(5)
    await asyncio.gather(*tasks)
    assert waited == pytest.approx([0.0, 0.5, 1.0])


async def test_requests_that_queued_for_a_slot_leave_at_the_bucket_pace() -> None:
    """Requests of a tenant that wait for busy slots are not sent in a bunch when the slots free
    up: a request granted but not yet answered holds its token, so the sends keep the pace."""
    clock = VirtualClock()
    limiter = RateLimiter(Rate(1000.0, 1000), max_concurrency=3, clock=clock, sleep=clock.sleep)
    small = Rate(10.0, 1)
    sent: list[float] = []

    async def hog() -> None:
        async with slot(limiter, "big"):
            await clock.sleep(1.0)

    async def request() -> None:
        async with slot(limiter, "small", small):
            sent.append(clock.now)

    hogs = [asyncio.create_task(hog()) for _ in range(3)]
    await settle()
    requests = [asyncio.create_task(request()) for _ in range(3)]
    await clock.run_until(5)
    await asyncio.gather(*hogs, *requests)
    assert sent == pytest.approx([1.0, 1.1, 1.2])


async def test_a_pause_that_arrives_while_queued_for_a_slot_is_respected() -> None:
    """A request that got its token, then waited for a slot while a Retry-After paused its
    tenant, is not sent until the pause is over."""
    clock = VirtualClock()
    limiter = RateLimiter(Rate(1000.0, 1000), max_concurrency=1, clock=clock, sleep=clock.sleep)
    sent: list[float] = []

    async def hog() -> None:
        async with slot(limiter, "big"):
            await clock.sleep(1.0)

    async def request() -> None:
        async with slot(limiter, "paused"):
            sent.append(clock.now)

    hogging = asyncio.create_task(hog())
    await settle()
    waiting = asyncio.create_task(request())
    await settle()
    limiter.pause("paused", 10)
    await clock.run_until(20)
    await asyncio.gather(hogging, waiting)
    assert sent == [pytest.approx(10.0)]


async def test_a_token_refills_from_the_answer_not_the_grant() -> None:
    """At 1/s, burst 1, a request answered 3 s after its grant lets the next one go at 4 s, one
    refill after the latest moment the API can have counted it (not at 1 s)."""
    clock = VirtualClock()
    limiter = RateLimiter(Rate(1.0, 1), max_concurrency=4, clock=clock, sleep=clock.sleep)
    sent: list[float] = []

    async def request(seconds_in_flight: float) -> None:
        async with slot(limiter, "acme"):
            sent.append(clock.now)
            await clock.sleep(seconds_in_flight)

    tasks = [asyncio.create_task(request(3.0)), asyncio.create_task(request(0.0))]
    await clock.run_until(10)
    await asyncio.gather(*tasks)
    assert sent == pytest.approx([0.0, 4.0])


async def test_requests_in_flight_count_against_the_burst() -> None:
    """With burst 3, three requests in flight keep a fourth waiting however long they take, and
    the first answer lets it go one refill later."""
    clock = VirtualClock()
    bucket = InFlightBucket(Rate(10.0, 3), clock=clock, sleep=clock.sleep)
    for _ in range(3):
        await bucket.acquire()
    assert bucket.in_flight == 3
    done, _ = await acquire_all(bucket, 1, clock)
    await clock.run_until(60)
    assert done == []
    bucket.answered()
    await clock.run_until(120)
    assert [t for _, t in done] == pytest.approx([60.1])
    assert clock.sleeps == 1  # waiting for an answer is not polling


async def test_a_request_that_never_left_takes_no_token() -> None:
    """A grant cancelled while it waited for a slot is withdrawn: the tenant's next request is
    granted at once, as if the cancelled one had never been asked for."""
    clock = VirtualClock()
    limiter = RateLimiter(Rate(1.0, 1), max_concurrency=1, clock=clock, sleep=clock.sleep)
    await limiter.concurrency.acquire("hog")
    queued = asyncio.create_task(limiter.acquire("acme"))
    await settle()
    assert limiter.bucket("acme").in_flight == 1
    queued.cancel()
    await settle()
    assert limiter.bucket("acme").in_flight == 0
    limiter.concurrency.release()  # the hog leaves; the slot is free again
    assert await limiter.acquire("acme") == 0.0
    limiter.release("acme")


async def test_answers_during_a_pause_take_no_token() -> None:
    """Answers that come back during a Retry-After pause are not charged again after it: the
    bucket restarts from one token when the pause ends, then keeps its rate."""
    clock = VirtualClock()
    bucket = InFlightBucket(Rate(4.0, 4), clock=clock, sleep=clock.sleep)
    for _ in range(3):
        await bucket.acquire()
    bucket.pause(10)
    clock.now = 2
    for _ in range(3):
        bucket.answered()
    done, _ = await acquire_all(bucket, 2, clock)
    await clock.run_until(20)
    assert [t for _, t in done] == pytest.approx([10.0, 10.25])


async def test_concurrency_cap_holds() -> None:
    """No more than max_concurrency requests are inside slot() at the same time."""
    limiter = RateLimiter(Rate(1000.0, 1000), max_concurrency=3)
    inside = 0
    peak = 0
    release = asyncio.Event()

    async def request(tenant: str) -> None:
        nonlocal inside, peak
        async with slot(limiter, tenant):
            inside += 1
            peak = max(peak, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(request(f"t{i % 4}")) for i in range(12)]
    await settle()
    assert inside == 3
    assert limiter.concurrency.waiting == 9
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 3
    assert limiter.concurrency.in_use == 0


async def test_fair_semaphore_serves_tenants_round_robin() -> None:
    """A tenant with many queued requests does not make a small tenant wait behind all of them."""
    semaphore = FairSemaphore(1)
    order: list[str] = []

    async def request(tenant: str) -> None:
        await semaphore.acquire(tenant)
        order.append(tenant)
        await asyncio.sleep(0)
        semaphore.release()

    tasks = [asyncio.create_task(request("big")) for _ in range(10)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(request(name)) for name in ("small-1", "small-2")]
    await asyncio.gather(*tasks)
    assert len(order) == 12
    assert order.index("small-1") <= 3
    assert order.index("small-2") <= 4


async def test_fair_semaphore_is_fifo_within_a_tenant() -> None:
    """Requests of one tenant get their slots in arrival order."""
    semaphore = FairSemaphore(1)
    order: list[int] = []

    async def request(index: int) -> None:
        await semaphore.acquire("acme")
        order.append(index)
        await asyncio.sleep(0)
        semaphore.release()

    tasks = []
    for index in range(6):
        tasks.append(asyncio.create_task(request(index)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == list(range(6))


async def test_cancelled_waiter_leaks_no_slot() -> None:
    """Cancelling queued or just-granted waiters leaves every slot available again."""
    semaphore = FairSemaphore(1)
    await semaphore.acquire("holder")
    queued = asyncio.create_task(semaphore.acquire("a"))
    granted = asyncio.create_task(semaphore.acquire("b"))
    await settle()
    queued.cancel()
    await settle()
    semaphore.release()  # hands the slot to "b" ...
    granted.cancel()  # ... which is cancelled before it runs: the slot must come back
    await settle()
    assert semaphore.in_use == 0
    assert semaphore.waiting == 0
    await asyncio.wait_for(semaphore.acquire("c"), timeout=1)


def test_rates_must_be_positive() -> None:
    """A zero rate or a burst below one is refused."""
    with pytest.raises(ValueError, match="per_second"):
        Rate(0)
    with pytest.raises(ValueError, match="burst"):
        Rate(1, 0)
    with pytest.raises(ValueError, match="slot"):
        FairSemaphore(0)
