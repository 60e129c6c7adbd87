"""Per-sink delivery from the store's outbox: own task, own retries, own timeout, own dead-letter.

Each sink instance is a *lane*: one task (in the deliverer's task group) that drains that sink's
queue (:meth:`collector.store.Store.pending`) in passes. A pass walks the queue from its start in
batches of ``batch_size``; every batch gets the sink's PII policy, one ``write`` under the sink's
``timeout``, and on success is acknowledged (:meth:`~collector.store.Store.mark_delivered`). A
pass that found less than a full batch is followed by a short pause (:data:`LINGER`), so days
stored one commit after another go out in full batches rather than one small write each. Lanes
share nothing but the store, so a slow, failing or hanging sink never delays another sink, and the
fetcher never waits for any of them (it only calls :meth:`Deliverer.notify_new_data`).

Failures, decided by the exception's class:

- :class:`~collector.errors.SinkPermanentError`: a one-day batch is dead-lettered at once; a larger
  batch is retried day by day, so only the poison day is dead-lettered and the rest arrive.
- :class:`~collector.errors.SinkTransientError`, a timeout, or any other exception: a larger batch
  is also split into single days (to find a poison day); each failed day waits its own backoff
  (full jitter, doubling per failure, or the sink's ``retry_after``) while later days go on, and
  after ``max_attempts`` failures it is dead-lettered and the sink carries on with the rest.
- A failing ``open()`` (a locked file, a refused connection) counts as a failed attempt of the
  sink (``sink_failures_total``) and is recorded as its last error for ``status``; the lane
  tries to open it again after a backoff.
- An exception outside the sink contract (not a SinkError, not a timeout) is a bug in the sink:
  handled as transient, and its traceback logged at debug level.
- A sink *outage* is not the data's fault: when three writes in a row fail, the pass stops and the
  lane backs off as a whole (growing to ``backoff_max``). A failed attempt is only counted against
  a day (towards ``max_attempts``) when the same pass also delivered something, i.e. the sink was
  demonstrably working; so a webhook that is down for a day loses nothing to the dead-letter, and
  everything arrives when it is back. A pass in which every write failed also paces the lane
  (same backoff, but new data may end the wait early).

Order: days go out in queue order (the order their current versions were stored, see
:mod:`collector.store.outbox`); a day waiting for its retry is skipped by later passes until its
time comes, so it never holds back the days behind it.

``COLLECTOR_TESTING_NO_WAIT=1`` (or :func:`collector.retry.no_wait`) makes every backoff zero; a
lane in an outage still pauses 50 ms between passes so a test does not spin.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import anyio
import structlog

from collector.concurrency import first_of
from collector.errors import SinkError, SinkPermanentError, SinkTransientError, StoreError
from collector.models import TenantDay
from collector.pii import apply_sink_policy
from collector.plugin_manager import Notifier
from collector.retry import waits_disabled
from collector.sink import Sink, SinkConfig
from collector.store import Store
from collector.store.fencing import StaleLease

log = structlog.get_logger(__name__)


Key = tuple[str, dt.date]

OUTAGE_AFTER = 3
"""Consecutive failed writes after which a pass stops and the whole lane backs off."""

LINGER = 0.25
"""Seconds a lane waits after a pass that wrote less than a full batch, before the next pass.

While fetching goes on, every commit wakes the lanes; without a pause each pass would write the
few days stored during the previous write (a hundred or so in a backfill), and a SQLite sink
pays for every write about as much again as for its rows (each commit rewrites the pages it
touched). Waiting a quarter of a second lets the next write take up to a full batch: 16 writes
instead of 31-38 in the 200-tenant benchmark. A lane that was idle still starts at once on new
data, and :meth:`Deliverer.stop` ends the wait."""

_OUTAGE_PAUSE_FLOOR = 0.05
_ERROR_MAX = 500


def _error_text(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timeout: no answer within {timeout:g}s"
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _ERROR_MAX else text[: _ERROR_MAX - 1] + "…"


@dataclass
class SinkStats:
    """Counters of one sink instance, for ``/metrics`` and logs (a copy; never live)."""

    sink: str
    delivered: int = 0  # tenant-days acknowledged by the sink
    failed: int = 0  # failed deliveries of a tenant-day (every attempt counts)
    dead_lettered: int = 0  # tenant-days given up on
    batches: int = 0  # successful write calls
    backlog: int = 0  # tenant-days waiting, as of the end of the last pass
    state: str = "idle"  # idle | delivering | backing_off | down | stopped
    last_error: str | None = None
    last_error_at: dt.datetime | None = None
    last_success_at: dt.datetime | None = None


@dataclass
class _PassResult:
    attempted: int = 0  # tenant-days written (a day retried alone after its batch failed: once)
    delivered: int = 0
    failed: int = 0
    in_a_row: int = 0  # consecutive failed writes
    outage: bool = False
    retry_after: float | None = None


@dataclass(frozen=True)
class _Held:
    """A failed write of some days: why, and how long the sink asked us to wait."""

    items: list[TenantDay]
    reason: str
    retry_after: float


@dataclass
class _Lane:
    name: str
    sink: Sink
    config: SinkConfig
    stats: SinkStats
    wake: anyio.Event = field(default_factory=anyio.Event)  # "cleared" by a new event
    busy: anyio.Lock = field(default_factory=anyio.Lock)
    opened: bool = False
    outages: int = 0  # consecutive passes that ended in an outage
    failures: dict[Key, int] = field(default_factory=dict)  # per day, since its last success
    retry_at: dict[Key, float] = field(default_factory=dict)  # monotonic time a day may go again
    scope: anyio.CancelScope | None = None  # the lane's task, while it runs
    done: anyio.Event | None = None  # set when that task has ended

    @property
    def timeout(self) -> float:
        return self.config.timeout.total_seconds()


class Deliverer:
    """Drains every sink's outbox in its own task. One instance per process.

    ``sinks`` and ``configs`` are keyed by sink instance name; ``routes`` gives the tenants routed
    to each sink (None or a missing name: every tenant). With ``complete_routes`` the routes are
    the whole config and sinks not in them are unregistered in the store (the daemon and ``run``
    pass it; ``replay`` of one sink must not).
    """

    def __init__(
        self,
        store: Store,
        sinks: Mapping[str, Sink],
        configs: Mapping[str, SinkConfig],
        routes: Mapping[str, Collection[str] | None] | None = None,
        *,
        notifier: Notifier | None = None,
        complete_routes: bool = False,
        poll_interval: float = 30.0,
        linger: float = LINGER,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._routes = {name: (routes or {}).get(name) for name in sinks}
        self._complete_routes = complete_routes
        self._notifier = notifier or Notifier()
        self._poll_interval = poll_interval
        self._linger = linger
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._lanes = {
            name: _Lane(name, sink, configs[name], SinkStats(sink=name))
            for name, sink in sinks.items()
        }
        self._stopping = anyio.Event()  # "cleared" by a new event when a run starts

    # --- public surface ---------------------------------------------------------------------------

    def notify_new_data(self) -> None:
        """New versions were committed: every idle lane starts a pass now."""
        for lane in self._lanes.values():
            lane.wake.set()

    def stats(self) -> dict[str, SinkStats]:
        """A snapshot of every sink's counters."""
        return {name: replace(lane.stats) for name, lane in self._lanes.items()}

    async def run_forever(self) -> None:
        """Deliver until :meth:`stop`: each sink in its own task, woken by new data or a poll."""
        self._stopping = anyio.Event()
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._sync()
                break
            except StoreError as exc:  # the state database may be back in a moment
                failures += 1
                log.warning("sink registration failed; retrying", error=str(exc))
                await self._sleep_unless_stopped(self._jitter(failures) + _OUTAGE_PAUSE_FLOOR)
        try:
            async with anyio.create_task_group() as lanes:
                for lane in self._lanes.values():
                    lane.scope, lane.done = anyio.CancelScope(), anyio.Event()
                    lanes.start_soon(self._lane_task, lane, name=f"sink:{lane.name}")
        finally:
            for lane in self._lanes.values():
                lane.scope = None
                lane.stats.state = "stopped"

    async def _lane_task(self, lane: _Lane) -> None:
        """One lane until :meth:`stop`; its scope lets ``stop`` cancel it alone after the grace."""
        assert lane.scope is not None
        assert lane.done is not None
        try:
            with lane.scope:
                await self._lane_forever(lane)
        except Exception:  # _lane_forever catches its own failures: a bug; other lanes go on
            log.exception("sink lane crashed", sink=lane.name)
        finally:
            lane.done.set()

    async def stop(self, grace: float = 30.0) -> None:
        """Start no new write; let writes in flight finish for ``grace`` seconds, then cancel them.

        A cancelled write was not acknowledged, so that batch is delivered again later
        (at-least-once). The sinks stay open: :meth:`aclose` closes them.
        """
        self._stopping.set()
        self.notify_new_data()
        running = [
            lane
            for lane in self._lanes.values()
            if lane.scope is not None and lane.done is not None and not lane.done.is_set()
        ]

        async def all_ended() -> None:
            for lane in running:
                assert lane.done is not None
                await lane.done.wait()

        with anyio.move_on_after(max(0.0, grace)):
            await all_ended()
        for lane in running:
            if lane.scope is not None:
                lane.scope.cancel()
        await all_ended()

    async def run_until_drained(self, *, failed_passes: int = 1) -> bool:
        """Deliver what is queued now (for ``run --once`` and ``replay``); True when all arrived.

        Returns when every sink's queue is empty, or its remaining days all failed in this run
        (after ``failed_passes`` passes with failures, backoff between them), or :meth:`stop`.
        True means every queue is empty and nothing was dead-lettered during this call.
        """
        self._stopping = anyio.Event()
        await self._sync()
        results: list[bool] = []
        errors: list[Exception] = []

        async def drain(lane: _Lane) -> None:
            try:
                results.append(await self._lane_drain(lane, failed_passes))
            except Exception as exc:  # raised below, unwrapped, once every lane has finished
                errors.append(exc)

        async with anyio.create_task_group() as lanes:
            for lane in self._lanes.values():
                lanes.start_soon(drain, lane, name=f"drain:{lane.name}")
        if errors:
            raise errors[0]
        return all(results)

    async def aclose(self) -> None:
        """Close every sink that was opened (each under its timeout; errors are logged)."""
        for lane in self._lanes.values():
            if not lane.opened:
                continue
            lane.opened = False
            try:
                # Shielded: a sink is closed (files flushed, connections released) even when
                # the caller is being cancelled; the sink's timeout still bounds it.
                with anyio.fail_after(lane.timeout, shield=True):
                    await lane.sink.aclose()
            except Exception as exc:  # closing one sink must not stop the others
                log.warning(
                    "sink close failed", sink=lane.name, error=_error_text(exc, lane.timeout)
                )

    async def __aenter__(self) -> Deliverer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(grace=0)
        await self.aclose()

    # --- lanes ------------------------------------------------------------------------------------

    async def _sync(self) -> None:
        queued = await self._store.sync_sinks(self._routes, remove_missing=self._complete_routes)
        for name, count in queued.items():
            if count:
                log.info("history queued for sink", sink=name, tenant_days=count)

    async def _lane_forever(self, lane: _Lane) -> None:
        while not self._stopping.is_set():
            lane.wake = anyio.Event()
            try:
                if not await self._ensure_open(lane):
                    await self._pause(lane, self._lane_backoff(lane, None), wakeable=False)
                    continue
                result = await self._pass(lane)
            except StoreError as exc:  # the store logs its own outage, once (no traceback each)
                self._record_error(lane, str(exc))
                result = _PassResult(outage=True)
            except Exception as exc:  # a lane never dies; the store may be back soon
                self._record_error(lane, _error_text(exc, lane.timeout))
                log.exception("delivery pass failed", sink=lane.name)
                result = _PassResult(outage=True)
            if result.outage or (result.failed and not result.delivered):
                # Nothing got through: pace the whole lane, so a failing sink is not hammered.
                lane.outages += 1
                if lane.outages == 1:
                    log.warning("sink failing", sink=lane.name, error=lane.stats.last_error)
                lane.stats.state = "down" if result.outage else "backing_off"
                wait = self._lane_backoff(lane, result.retry_after)
                await self._pause(lane, wait, wakeable=not result.outage)
                continue
            if result.delivered:
                if lane.outages:
                    log.info("sink delivering again", sink=lane.name)
                lane.outages = 0
            lane.stats.state = "idle" if not lane.retry_at else "backing_off"
            if 0 < result.delivered < lane.config.batch_size:
                # Data is flowing but the queue ran dry: let it fill for a moment, so the next
                # write is a fuller batch instead of the few days stored meanwhile.
                await self._sleep_unless_stopped(self._linger)
            await self._pause(lane, min(self._poll_interval, self._next_retry(lane)), wakeable=True)

    async def _lane_drain(self, lane: _Lane, failed_passes: int) -> bool:
        failed = 0
        dead_before = lane.stats.dead_lettered
        while not self._stopping.is_set():
            if await self._ensure_open(lane):
                result = await self._pass(lane)
                if not result.failed and not result.outage:
                    if result.attempted == 0:
                        break
                    continue
            failed += 1
            if failed >= failed_passes:
                break
            await self._pause(lane, self._lane_backoff(lane, None), wakeable=False)
        # A replica answers for the tenants it holds (store.lease_scope); the others' holders
        # drain theirs.
        lane.stats.backlog = await self._store.backlog(lane.name, self._store.lease_scope)
        lane.stats.state = "idle"
        return lane.stats.backlog == 0 and lane.stats.dead_lettered == dead_before

    async def _ensure_open(self, lane: _Lane) -> bool:
        if lane.opened:
            return True
        try:
            with anyio.fail_after(lane.timeout):
                await lane.sink.open()
        except Exception as exc:  # an open failure is a transient sink failure
            self._unexpected(lane, exc, "open")
            self._record_error(lane, "open failed: " + _error_text(exc, lane.timeout))
            log.warning("sink open failed", sink=lane.name, error=lane.stats.last_error)
            lane.outages += 1
            lane.stats.state = "down"
            lane.stats.failed += 1  # sink_failures_total: a failed open is a failed attempt
            await self._note_open_failure(lane)
            return False
        lane.opened = True
        return True

    async def _note_open_failure(self, lane: _Lane) -> None:
        """Put the open failure where ``status`` reads it (the store's sink row)."""
        try:
            lane.stats.backlog = await self._store.end_pass(
                lane.name, lane.stats.last_error, attempted=True
            )
        except StoreError as exc:  # the lane retries the open anyway; status catches up then
            log.warning("could not record the sink's open failure", sink=lane.name, error=str(exc))

    async def _pass(self, lane: _Lane) -> _PassResult:
        """One walk over the sink's queue; see the module docstring for the failure rules."""
        async with lane.busy:  # never two writes on one sink instance
            lane.stats.state = "delivering"
            result = _PassResult()
            held: list[_Held] = []  # failures not (yet) counted against their days
            # Days with retry state met on this walk. Only those: a walk behind a long backfill
            # meets every day stored while it runs, and a set of them all grew with the days.
            seen: set[Key] = set()
            cursor: int | None = None
            limit = lane.config.batch_size
            walked = False  # reached the end of the queue
            while not self._stopping.is_set() and not result.outage and not walked:
                # A replica reads only the outboxes of the tenants it holds (store.leases).
                scope = self._store.lease_scope
                page = await self._store.pending(lane.name, scope, limit, after=cursor)
                # A short page is the end of the queue: no second query to find nothing. Days
                # queued meanwhile set `wake`, so the lane makes another pass for them.
                walked = page.read < limit
                if page:
                    cursor = page.cursor
                    now = time.monotonic()
                    ready = [
                        td for td in page if lane.retry_at.get((td.tenant, td.day), 0.0) <= now
                    ]
                    if ready:
                        await self._deliver_page(lane, ready, result, held)
                    if lane.retry_at:  # waiting days of this page, and days that just failed
                        seen.update(
                            key
                            for key in ((td.tenant, td.day) for td in page)
                            if key in lane.retry_at
                        )
            if walked and not result.outage:
                # A complete walk: forget retry state of days that left the queue otherwise.
                for key in set(lane.retry_at) - seen:
                    lane.retry_at.pop(key, None)
                    lane.failures.pop(key, None)
            for failure in held:  # nothing was delivered: an outage, not bad data
                self._uncharged(lane, failure)
            # The outcome for `status` and the backlog, in one round trip to the store.
            lane.stats.backlog = await self._store.end_pass(
                lane.name,
                lane.stats.last_error if result.failed else None,
                attempted=result.attempted > 0,
                # A pass that delivered days and dead-lettered others succeeded too: `status`
                # shows both its last success and its last error.
                delivered=result.delivered > 0,
            )
            return result

    async def _deliver_page(
        self, lane: _Lane, ready: list[TenantDay], result: _PassResult, held: list[_Held]
    ) -> None:
        units: list[list[TenantDay]] = [ready]
        while units and not self._stopping.is_set():
            unit = units.pop(0)
            error = await self._write(lane, unit)
            if error is None:
                result.in_a_row = 0
                result.attempted += len(unit)
                result.delivered += len(unit)
                await self._delivered(lane, unit)
                for failure in held:  # the sink works, so those failures were the days' own
                    await self._charge(lane, failure)
                held.clear()
                continue
            exc, reason = error
            if len(unit) > 1:
                # Find the poison day: the same days again, one write each.
                units = [[td] for td in unit] + units
            else:
                result.attempted += 1
            if isinstance(exc, SinkPermanentError):
                if len(unit) == 1:
                    result.failed += 1
                    await self._charge(lane, _Held(unit, reason, 0.0), permanent=True)
                continue
            wait = (exc.retry_after or 0.0) if isinstance(exc, SinkTransientError) else 0.0
            if wait:
                result.retry_after = max(result.retry_after or 0.0, wait)
            if len(unit) == 1:
                result.failed += 1
                failure = _Held(unit, reason, wait)
                if result.delivered:
                    await self._charge(lane, failure)
                else:
                    held.append(failure)
            result.in_a_row += 1
            if result.in_a_row >= OUTAGE_AFTER:
                result.outage = True
                return

    async def _write(self, lane: _Lane, unit: Sequence[TenantDay]) -> tuple[Exception, str] | None:
        try:
            prepared = apply_sink_policy(unit, lane.config)
            with anyio.fail_after(lane.timeout):
                await lane.sink.write(prepared)
        except Exception as exc:  # any sink exception is a delivery failure
            self._unexpected(lane, exc, "write")
            reason = _error_text(exc, lane.timeout)
            self._record_error(lane, reason)
            return exc, reason
        return None

    def _unexpected(self, lane: _Lane, exc: Exception, call: str) -> None:
        """Log the traceback of an exception outside the sink contract, for the plugin's authors.

        A SinkError or a timeout is the contract working; anything else is a bug in the sink.
        At debug level: the one-line reason still goes to ``status`` and the warning logs, and a
        sink failing on every write must not fill the log with tracebacks.
        """
        if not isinstance(exc, SinkError | TimeoutError):
            log.debug(
                "sink raised an unexpected exception",
                sink=lane.name,
                call=call,
                exc_info=(type(exc), exc, exc.__traceback__),
            )

    async def _delivered(self, lane: _Lane, unit: Sequence[TenantDay]) -> None:
        try:
            await self._store.mark_delivered(lane.name, unit)
        except StaleLease:
            # This replica lost a tenant's lease during the write (state.replicas): its new
            # holder delivers that tenant's days again (the same content), so mark tenant by
            # tenant what is still ours. Not a sink failure: the sink took every day.
            by_tenant: dict[str, list[TenantDay]] = {}
            for td in unit:
                by_tenant.setdefault(td.tenant, []).append(td)
            for days in by_tenant.values():
                try:
                    await self._store.mark_delivered(lane.name, days)
                except StaleLease:
                    continue
        for td in unit:
            lane.failures.pop((td.tenant, td.day), None)
            lane.retry_at.pop((td.tenant, td.day), None)
        lane.stats.delivered += len(unit)
        lane.stats.batches += 1
        lane.stats.last_success_at = dt.datetime.now(dt.UTC)

    async def _charge(self, lane: _Lane, failure: _Held, *, permanent: bool = False) -> None:
        """Count a failed attempt against each day; dead-letter those out of attempts."""
        unit, reason = failure.items, failure.reason
        attempts = 1 if permanent else lane.config.max_attempts
        dead = await self._store.mark_failed(lane.name, unit, reason, attempts)
        dead_keys = {(td.tenant, td.day) for td in dead}
        for td in unit:
            key = (td.tenant, td.day)
            if key in dead_keys:
                lane.failures.pop(key, None)
                lane.retry_at.pop(key, None)
            else:
                self._schedule_retry(lane, key, failure.retry_after)
            self._tell(lane, td, reason, dead_lettered=key in dead_keys)
        lane.stats.failed += len(unit)
        lane.stats.dead_lettered += len(dead)
        if dead:
            log.error(
                "dead-lettered",
                sink=lane.name,
                tenant_days=[f"{td.tenant}/{td.day.isoformat()}" for td in dead],
                error=reason,
            )

    def _uncharged(self, lane: _Lane, failure: _Held) -> None:
        for td in failure.items:
            self._schedule_retry(lane, (td.tenant, td.day), failure.retry_after)
            self._tell(lane, td, failure.reason, dead_lettered=False)
        lane.stats.failed += len(failure.items)

    def _schedule_retry(self, lane: _Lane, key: Key, retry_after: float) -> None:
        count = lane.failures.get(key, 0) + 1
        lane.failures[key] = count
        wait = 0.0 if waits_disabled() else max(self._jitter(count), retry_after)
        lane.retry_at[key] = time.monotonic() + min(wait, self._backoff_max)

    def _tell(self, lane: _Lane, td: TenantDay, reason: str, *, dead_lettered: bool) -> None:
        # The notifier logs and swallows what a plugin raises: delivery goes on.
        self._notifier.sink_delivery_failed(
            sink=lane.name, tenant=td.tenant, day=td.day, error=reason, dead_lettered=dead_lettered
        )

    def _record_error(self, lane: _Lane, reason: str) -> None:
        lane.stats.last_error = reason
        lane.stats.last_error_at = dt.datetime.now(dt.UTC)

    # --- waiting ----------------------------------------------------------------------------------

    def _jitter(self, failures: int) -> float:
        if waits_disabled():
            return 0.0
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** max(0, failures - 1))
        return self._rng.uniform(0.0, ceiling)

    def _lane_backoff(self, lane: _Lane, retry_after: float | None) -> float:
        if waits_disabled():
            return _OUTAGE_PAUSE_FLOOR
        if retry_after is not None:
            return max(_OUTAGE_PAUSE_FLOOR, min(retry_after, self._backoff_max))
        return max(_OUTAGE_PAUSE_FLOOR, self._jitter(max(1, lane.outages)))

    def _next_retry(self, lane: _Lane) -> float:
        if not lane.retry_at:
            return self._poll_interval
        return max(0.0, min(lane.retry_at.values()) - time.monotonic())

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stopping.wait()

    async def _pause(self, lane: _Lane, seconds: float, *, wakeable: bool) -> None:
        """Sleep ``seconds``, ending early on stop (and on new data when ``wakeable``)."""
        with anyio.move_on_after(seconds):
            if wakeable:
                await first_of(self._stopping.wait, lane.wake.wait)
            else:
                await self._stopping.wait()
