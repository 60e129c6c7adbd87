"""One collection cycle: planner -> fetcher -> store -> deliverer (DESIGN.md section 2).

The fetch side is built for fairness and isolation:

- each tenant gets its own task with a small number of in-flight requests (``per_tenant_inflight``),
  so a 90-day backfill cannot flood the client's global FIFO concurrency queue ahead of tenants
  that need two days; the client's per-tenant token bucket paces each tenant;
- every tenant task catches everything: one tenant's failure (bad credentials, a crash in its data)
  is recorded for that tenant and never cancels another tenant's work;
- raw first: a 200 whose body fails validation quarantines its day with the body as received
  (:mod:`collector.store.quarantine`), committed before the failure is counted or logged; a good
  body is committed with the records derived from it, in one transaction;
- only days the API still serves (``api.history_days``) are ever asked for, even when the caller
  (``backfill``) names older ones;
- fetched days go through one writer task that commits them to the store in batches (one
  transaction per batch is what keeps the CPU cost per tenant-day low), and only after the commit
  are the deliverer and the notification hooks told;
- a day holds a slot of a bounded number of fetched-but-uncommitted days (:func:`uncommitted_days`)
  from before its request until its commit, so memory does not grow with the tenant count.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

from collector import planner
from collector.auth import secret_values
from collector.errors import ApiError, AuthError, BadResponse, CollectorError, StoreError
from collector.models import TenantDay, normalize
from collector.plugin_manager import Notifier
from collector.store.fencing import StaleLease

if TYPE_CHECKING:
    from collector.client import ApiClient
    from collector.config import AppConfig, TenantConfig
    from collector.deliverer import Deliverer
    from collector.metrics import Metrics
    from collector.store import Store

log = structlog.get_logger(__name__)

HANDED_OVER = "tenant handed to another replica (lease lost); nothing more written"
"""A replica's tenant cycle whose write the store refused for a stale fencing token."""

_WRITER_BATCH = 256
_WRITER_LINGER = 0.05


def uncommitted_days(max_concurrency: int) -> int:
    """How many tenant-days may be fetched (or in flight) and not yet committed, all tenants
    together.

    Each tenant's workers wait for their day's commit before the next request, so without a bound
    a 1,000-tenant backfill held up to 2,000 fetched days (body and records, about 20 KB each)
    while the store writer caught up: some 10-20 MiB of the peak RSS. Two writer batches keep the
    writer busy while the next batch is fetched, and 4x the HTTP concurrency leaves room for
    requests waiting on their tenant's rate limit.
    """
    return max(2 * _WRITER_BATCH, 4 * max_concurrency)


def utc_today() -> dt.date:
    """Today in UTC, the API's assumed timezone."""
    return dt.datetime.now(dt.UTC).date()


@dataclass
class TenantResult:
    """What one cycle did for one tenant; the per-tenant summary line."""

    tenant: str
    planned: int = 0
    fetched: int = 0
    changed: int = 0
    failed: int = 0
    quarantined: int = 0  # of the failed days, those whose 200 body failed validation
    error: str | None = None
    skipped: str | None = None  # credentials parked, or handed to another replica (HANDED_OVER)
    seconds: float = 0.0
    last_failure: str | None = None  # reason of the last failed day, retryable ones included

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and self.skipped is None


@dataclass
class CycleResult:
    """The outcome of one cycle over every tenant."""

    tenants: dict[str, TenantResult] = field(default_factory=dict)
    started_at: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.tenants.values())

    @property
    def fetched(self) -> int:
        return sum(r.fetched for r in self.tenants.values())


Payload = str
"""The response body as received (the state store keeps it as is)."""


class _StoreWriter:
    """Commits fetched tenant-days in batches; one writer so SQLite never sees two at once."""

    def __init__(
        self, store: Store, on_committed: Callable[[Sequence[TenantDay], list[bool]], None]
    ) -> None:
        self._store = store
        self._on_committed = on_committed
        self._queue: asyncio.Queue[tuple[TenantDay, Payload, asyncio.Future[bool]]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def submit(self, item: TenantDay, data: Payload) -> bool:
        """Queue one tenant-day and wait until it is durably committed; returns ``changed``."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, data, future))
        return await future

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = time.monotonic() + _WRITER_LINGER
            while len(batch) < _WRITER_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                    except TimeoutError:
                        break
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[tuple[TenantDay, Payload, asyncio.Future[bool]]]) -> None:
        try:
            changed = await self._store.record_fetched([(item, data) for item, data, _ in batch])
        except StaleLease as exc:
            by_tenant: dict[str, list[tuple[TenantDay, Payload, asyncio.Future[bool]]]] = {}
            for entry in batch:
                by_tenant.setdefault(entry[0].tenant, []).append(entry)
            if len(by_tenant) == 1:
                self._fail(batch, exc)
                return
            # A replica's lost tenant (store.leases) must not fail the days of those it holds.
            for group in by_tenant.values():
                await self._commit(group)
            return
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._on_committed([item for item, _, _ in batch], changed)
        for (_, _, future), flag in zip(batch, changed, strict=True):
            if not future.done():
                future.set_result(flag)

    @staticmethod
    def _fail(batch: list[tuple[TenantDay, Payload, asyncio.Future[bool]]], exc: Exception) -> None:
        for _, _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def aclose(self) -> None:
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Collector:
    """Runs collection cycles for a set of tenants against one client, store and deliverer."""

    def __init__(
        self,
        config: AppConfig,
        client: ApiClient,
        store: Store,
        deliverer: Deliverer | None = None,
        *,
        notifier: Notifier | None = None,
        today: Callable[[], dt.date] = utc_today,
        per_tenant_inflight: int = 2,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.store = store
        self.deliverer = deliverer
        self.notifier = notifier or Notifier()
        self.today = today
        self.per_tenant_inflight = per_tenant_inflight
        self.metrics = metrics
        self._last_prune: float | None = None
        self._writer = _StoreWriter(store, self._committed)
        self._uncommitted = asyncio.Semaphore(uncommitted_days(config.api.max_concurrency))

    def _committed(self, items: Sequence[TenantDay], changed: list[bool]) -> None:
        if self.deliverer is not None and any(changed):
            self.deliverer.notify_new_data()
        if self.metrics is not None:
            latest: dict[str, TenantDay] = {}
            for item in items:
                if item.tenant not in latest or item.day >= latest[item.tenant].day:
                    latest[item.tenant] = item
            for tenant, item in latest.items():
                self.metrics.usage_active_users.set(item.daily.active_users, tenant=tenant)
                self.metrics.usage_messages.set(item.daily.messages, tenant=tenant)
        for item, flag in zip(items, changed, strict=True):
            self.notifier.tenant_day_collected(tenant=item.tenant, day=item.day, changed=flag)

    async def __aenter__(self) -> Collector:
        self._writer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._writer.aclose()

    async def run_cycle(
        self,
        tenants: Iterable[TenantConfig] | None = None,
        *,
        days: Callable[[TenantConfig], Sequence[dt.date]] | None = None,
    ) -> CycleResult:
        """Fetch every planned day of every tenant concurrently; returns when all are settled.

        ``days`` overrides the planner (used by ``backfill`` for an explicit date range).
        """
        selected = [t for t in (tenants or self.config.tenants) if t.enabled]
        result = CycleResult(started_at=time.time())
        started = time.monotonic()
        for tenant in selected:
            result.tenants[tenant.id] = TenantResult(tenant=tenant.id)
        # One task per tenant in one task group; each catches its own failure (_tenant_task),
        # so a crash in one tenant never cancels the others. Cancelling the cycle (the daemon's
        # grace period, a removed tenant) cancels them all.
        async with anyio.create_task_group() as group:
            for tenant in selected:
                group.start_soon(
                    self._tenant_task,
                    tenant,
                    result.tenants[tenant.id],
                    days,
                    name=f"tenant:{tenant.id}",
                )
        result.seconds = time.monotonic() - started
        await self._prune_if_due()
        return result

    async def _prune_if_due(self) -> None:
        """At most once an hour: drop the kept bodies of days no longer quarantined, and apply
        ``state.payload_retention_days``."""
        days = self.config.state.payload_retention_days
        now = time.monotonic()
        if self._last_prune is not None and now - self._last_prune < 3600:
            return
        self._last_prune = now
        await self.store.drop_recovered_quarantine()
        if days is None:
            return
        pruned = await self.store.prune_payloads(days, today=self.today())
        if pruned:
            log.info("pruned raw payloads past retention", days=pruned, retention_days=days)

    async def _plan(self, tenant: TenantConfig, today: dt.date) -> list[dt.date]:
        states = await self.store.days_state(tenant.id)
        return planner.plan_days(
            today,
            self.config.tenant_lookback(tenant),
            self.config.tenant_settle(tenant),
            states,
            self.config.api.history_days,
        )

    async def _tenant_task(
        self,
        tenant: TenantConfig,
        summary: TenantResult,
        days: Callable[[TenantConfig], Sequence[dt.date]] | None,
    ) -> None:
        try:
            await self._run_tenant(tenant, summary, days)
        except Exception as raised:
            # The workers' failures, as they raised them (their task group wraps them): a failing
            # store stops every worker of the tenant at once.
            leaves = _leaves(raised)
            fenced = next((e for e in leaves if isinstance(e, StaleLease)), None)
            if fenced is not None:
                # Not a store failure: the database is fine and refused this replica's write
                # because another replica holds the tenant now (counted by the store in
                # replica_fenced_writes_total). The new holder collects it; nothing to retry.
                summary.skipped = HANDED_OVER
                log.info(
                    "tenant handed to another replica; its cycle ends here",
                    tenant=tenant.id,
                    refused=str(fenced),
                )
                return
            exc = next((e for e in leaves if isinstance(e, StoreError)), leaves[0])
            if isinstance(exc, StoreError):  # the store logs its outages itself, rate-limited
                summary.error = f"state store failing: {exc}"
                log.debug("tenant stopped by the state store", tenant=tenant.id, error=str(exc))
            else:
                summary.error = f"internal error: {type(exc).__name__}"
                log.exception("tenant task crashed", tenant=tenant.id, exc_info=exc)

    async def _run_tenant(
        self,
        tenant: TenantConfig,
        summary: TenantResult,
        days: Callable[[TenantConfig], Sequence[dt.date]] | None,
    ) -> None:
        started = time.monotonic()
        with structlog.contextvars.bound_contextvars(tenant=tenant.id):
            parked_until = self.client.parked_until(tenant)
            if parked_until is not None:
                summary.skipped = f"auth_failed: parked until {parked_until.isoformat()}"
                self._notify_done(tenant.id, summary, summary.skipped)
                return
            today = self.today()
            if days is None:
                wanted = await self._plan(tenant, today)
            else:
                # The caller's list (`backfill`) is cut to the API's window: an older day would
                # come back as an empty answer and be stored as zeros. The caller reports them.
                wanted, _ = planner.split_by_history(
                    days(tenant), today, self.config.api.history_days
                )
            summary.planned = len(wanted)
            self.notifier.tenant_cycle_started(tenant=tenant.id, planned=len(wanted))
            queue: asyncio.Queue[dt.date] = asyncio.Queue()
            for day in wanted:
                queue.put_nowait(day)
            async with anyio.create_task_group() as workers:
                for _ in range(min(self.per_tenant_inflight, len(wanted))):
                    workers.start_soon(self._tenant_worker, tenant, queue, summary, today)
            summary.seconds = time.monotonic() - started
            if summary.error is not None:
                self.notifier.tenant_failed(tenant=tenant.id, error=summary.error)
                await self.store.set_tenant_error(
                    tenant.id, summary.error, auth_failed_until=self.client.parked_until(tenant)
                )
            elif summary.failed == 0:
                await self.store.set_tenant_success(tenant.id)
            else:
                # Only transient failures: the days are planned again next cycle, but `status`
                # must still say why this tenant is behind.
                await self.store.set_tenant_error(
                    tenant.id,
                    f"{summary.failed} of {summary.planned} day(s) failed, retried next cycle; "
                    f"last: {summary.last_failure or 'see the log'}",
                )
            self._notify_done(tenant.id, summary, summary.error)
            # A cycle with failures is worth a look: warning, so it shows at the default level.
            (log.info if summary.ok else log.warning)(
                "tenant cycle done",
                planned=summary.planned,
                fetched=summary.fetched,
                changed=summary.changed,
                failed=summary.failed,
                error=summary.error,
                seconds=round(summary.seconds, 3),
            )

    async def _tenant_worker(
        self,
        tenant: TenantConfig,
        queue: asyncio.Queue[dt.date],
        summary: TenantResult,
        today: dt.date,
    ) -> None:
        settle = self.config.tenant_settle(tenant)
        while not queue.empty():
            day = queue.get_nowait()
            started = time.monotonic()
            try:
                final = planner.is_final(day, today, settle)
                item, payload = await self._fetch(tenant, day, final=final)
            except ApiError as exc:
                self._observe(tenant.id, started, ok=False)
                if isinstance(exc, BadResponse) and exc.body is not None:
                    # Raw first: the body is committed before the failure is counted or logged.
                    body = self._without_credentials(tenant, exc.body)
                    await self.store.record_quarantined(tenant.id, day, exc.reason, body)
                    summary.quarantined += 1
                    self._handle_failure(exc, tenant, queue, summary)
                    log.warning("day quarantined", day=day.isoformat(), reason=exc.reason)
                    self._notify_day_failed(tenant.id, day, exc.reason)
                    continue
                if not self._handle_failure(exc, tenant, queue, summary):
                    return
                await self.store.record_failed(tenant.id, day, exc.reason)
                log.warning("day failed", day=day.isoformat(), reason=exc.reason)
                self._notify_day_failed(tenant.id, day, exc.reason)
                continue
            except CollectorError as exc:
                self._observe(tenant.id, started, ok=False)
                summary.failed += 1
                reason = f"{type(exc).__name__}: {exc}"
                await self.store.record_failed(tenant.id, day, reason)
                self._notify_day_failed(tenant.id, day, reason)
                continue
            self._observe(tenant.id, started, ok=True)
            changed = await self._commit(item, payload)
            summary.fetched += 1
            summary.changed += int(changed)

    def _notify_day_failed(self, tenant: str, day: dt.date, error: str) -> None:
        self.notifier.tenant_day_failed(tenant=tenant, day=day, error=error)

    def _notify_done(self, tenant: str, summary: TenantResult, error: str | None) -> None:
        self.notifier.tenant_cycle_done(
            tenant=tenant, fetched=summary.fetched, failed=summary.failed, error=error
        )

    async def _fetch(
        self, tenant: TenantConfig, day: dt.date, *, final: bool
    ) -> tuple[TenantDay, str]:
        """Take a slot of :func:`uncommitted_days`, then fetch and normalize one day; the slot is
        given back when the fetch fails or by :meth:`_commit`."""
        await self._uncommitted.acquire()
        try:
            return await self._fetch_day(tenant, day, final=final)
        except BaseException:
            self._uncommitted.release()
            raise

    async def _commit(self, item: TenantDay, payload: Payload) -> bool:
        """Commit a day :meth:`_fetch` returned (the caller has not awaited since), then give
        back its slot; returns ``changed``."""
        try:
            return await self._writer.submit(item, payload)
        finally:
            self._uncommitted.release()

    async def _fetch_day(
        self, tenant: TenantConfig, day: dt.date, *, final: bool
    ) -> tuple[TenantDay, str]:
        """Fetch and normalize one day. Only the records and the body leave this frame: the
        validated response model is dropped here, not held while the commit is awaited (with a
        thousand tenants in flight, those models were most of the memory)."""
        fetched = await self.client.fetch_day(tenant, day)
        try:
            item = normalize(
                tenant.id,
                day,
                fetched.response,
                fetched_at=dt.datetime.now(dt.UTC),
                final=final,
                digest=fetched.digest,
            )
        except BadResponse as exc:
            exc.body = fetched.payload.encode()  # quarantined with the body, like the client's
            raise
        return item, fetched.payload

    def _without_credentials(self, tenant: TenantConfig, body: bytes) -> bytes:
        """The body to keep, with every credential this request sent replaced by ``***``.

        An API (or a proxy) that answers 200 with an error page echoing the request would
        otherwise put the tenant's API key or token into the state store. Usage data never
        contains them, so the replacement loses nothing ``reprocess`` could use.
        """
        sent = secret_values(tenant)
        token = self.client.token_cache.get(tenant.id)
        if token is not None:
            sent.append(token.access_token)
        for secret in sent:
            for form in {secret, json.dumps(secret)[1:-1]}:
                body = body.replace(form.encode(), b"***")
        return body

    def _observe(self, tenant: str, started: float, *, ok: bool) -> None:
        if self.metrics is None:
            return
        elapsed = time.monotonic() - started
        self.metrics.fetch_latency.observe(elapsed)
        self.metrics.fetch_seconds.inc(elapsed, tenant=tenant)
        (self.metrics.fetches if ok else self.metrics.fetch_errors).inc(tenant=tenant)

    @staticmethod
    def _handle_failure(
        exc: ApiError, tenant: TenantConfig, queue: asyncio.Queue[dt.date], summary: TenantResult
    ) -> bool:
        """Count a failed day; returns False when the whole tenant must stop (bad credentials)."""
        summary.last_failure = exc.reason
        if isinstance(exc, AuthError):
            # The credentials are bad for every day: stop this tenant, keep the others going.
            summary.error = exc.reason
            summary.failed += 1 + queue.qsize()
            while not queue.empty():
                queue.get_nowait()
            return False
        summary.failed += 1
        if summary.error is None and not exc.retryable:
            summary.error = exc.reason
        return True


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``'s (nested) exception groups, or ``exc`` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
