"""The long-lived daemon: per-tenant schedules, signals, config reload, ops server.

Lifecycle:

- the config is loaded first (an invalid file exits with code 2 before anything starts); then the
  ops server starts, so ``/healthz`` answers at once and ``/readyz`` says 503 until the state
  store is open (an unreachable database is retried with backoff, not fatal; a state file that is
  corrupt, truncated to zero bytes or locked by another collector is: the daemon exits 1 with the
  same message as ``run --once``; so does a database found corrupt while running, after the
  usual graceful stop);
- a state store that fails while running (a full disk) is one rate-limited error log (see
  :class:`~collector.store.base.StoreHealth`), ``/readyz`` 503 with the reason, ``/status`` and the
  ``state_store_*`` metrics; the next write that succeeds ends it, and the days missed are
  planned again by the next cycles;
- every tenant has its own schedule (``every`` or ``cron``, plus a random jitter so a thousand
  tenants do not fire in the same second); a tenant never runs two cycles at once; the next run
  of each tenant is written to the state store, so ``zencoder-collector status`` shows it;
- the deliverer drains every sink's outbox continuously, independent of the fetch schedule;
- SIGTERM/SIGINT: stop starting cycles, let in-flight cycles and sink writes finish within the
  grace period (whatever was fetched is already committed; an interrupted day is simply planned
  again on the next start, an unacknowledged write is delivered again), close the sinks, exit 0.
  A second signal ends the grace period at once;
- SIGHUP: reload the config. An invalid file is rejected with its problems logged and the old
  config kept. Otherwise added tenants are scheduled, removed ones stop (their in-flight cycle is
  cancelled), tenants with changed credentials lose their cached token, and a change to the sinks
  or their routes restarts the deliverer with the new sink set. ``api``, ``state``, ``server``,
  ``runtime`` and ``files`` changes need a restart (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from collector.app import Plugins, Runtime, build_deliverer, load, open_runtime, sink_routes
from collector.concurrency import first_of
from collector.config import AppConfig, TenantConfig
from collector.deliverer import Deliverer, SinkStats
from collector.errors import CollectorError, ConfigError, StoreError
from collector.metrics import Metrics
from collector.pipeline import CycleResult
from collector.plugin_manager import configure_plugins
from collector.replicas import Replica
from collector.retry import waits_disabled
from collector.server import make_app, serving
from collector.sink import Sink
from collector.status import (
    CycleSummary,
    DaemonStatus,
    Starting,
    StateStoreStatus,
    Status,
    TenantReport,
    status_snapshot,
)
from collector.store import StoreUnusable
from collector.store.leases import Holdings

log = structlog.get_logger(__name__)

DEFAULT_GRACE = 20.0
GRACE_ENV = "ZENCODER_COLLECTOR_SHUTDOWN_GRACE"
"""Seconds in-flight work may take after SIGTERM (default 20, below Kubernetes' 30)."""

_IDLE_WAKE = 5.0
_STORE_RETRY_MAX = 30.0
_CLEAR_NEXT_RUN_BUDGET = 2.0


def next_run_after(
    config: AppConfig, tenant: TenantConfig, after: dt.datetime, rng: random.Random
) -> dt.datetime:
    """When the tenant's next cycle starts: its interval or next cron time, plus a random jitter.

    ``after`` is when the previous cycle started, so an hourly schedule does not drift by the
    cycle's own duration. Cron expressions are evaluated in ``after``'s timezone (UTC).
    """
    schedule = config.tenant_schedule(tenant)
    jitter = schedule.jitter.total_seconds()
    offset = dt.timedelta(seconds=rng.uniform(0, jitter) if jitter > 0 else 0.0)
    if schedule.cron:
        from croniter import croniter

        base: dt.datetime = croniter(schedule.cron, after).get_next(dt.datetime)
    else:
        assert schedule.every is not None  # the config guarantees every or cron
        base = after + schedule.every
    return base + offset


def schedule_seconds(config: AppConfig, tenant: TenantConfig) -> float:
    """The longest gap between two of the tenant's cycles: its interval (for cron, the gap after
    the next run) plus the full jitter; alerts call a tenant stale after two of these."""
    schedule = config.tenant_schedule(tenant)
    if schedule.cron:
        from croniter import croniter

        runs = croniter(schedule.cron, dt.datetime.now(dt.UTC))
        first: dt.datetime = runs.get_next(dt.datetime)
        gap = runs.get_next(dt.datetime) - first
    else:
        assert schedule.every is not None  # the config guarantees every or cron
        gap = schedule.every
    return (gap + schedule.jitter).total_seconds()


def grace_from_env(environ: dict[str, str] | None = None) -> float:
    """The shutdown grace period from ``ZENCODER_COLLECTOR_SHUTDOWN_GRACE`` (seconds)."""
    raw = (environ if environ is not None else dict(os.environ)).get(GRACE_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACE
    try:
        value = float(raw)
    except ValueError:
        log.warning("ignoring a shutdown grace that is not a number", value=raw)
        return DEFAULT_GRACE
    return max(0.0, value)


class Daemon:
    """Runs cycles on schedule until told to stop; reloads on SIGHUP."""

    def __init__(
        self,
        config_path: str | Path,
        plugins: Plugins,
        *,
        tenant_filter: list[str] | None = None,
        grace: float = DEFAULT_GRACE,
    ) -> None:
        self.config_path = config_path
        self.plugins = plugins
        self.tenant_filter = set(tenant_filter) if tenant_filter else None
        self.grace = grace
        self.metrics = Metrics()
        self.rng = random.Random()  # noqa: S311 - schedule jitter, not security relevant
        self.next_run: dict[str, dt.datetime] = {}
        # Each running cycle's cancel scope: a removed tenant's cycle is cancelled through it.
        self.running: dict[str, anyio.CancelScope] = {}
        self.last_results: dict[str, CycleSummary] = {}
        # anyio events cannot be cleared: "clear" is a new event (see _sleep).
        self._wake = anyio.Event()
        self._cycle_ended = anyio.Event()
        self._stopping = anyio.Event()
        self._hurry = anyio.Event()
        self._reload_requested = False
        self._runtime: Runtime | None = None
        self._work: TaskGroup | None = None  # the cycles and the deliverer
        self._deliverer_done: anyio.Event | None = None
        # Sink counters of deliverers replaced by a reload, so the exported counters never drop.
        self._retired_sink_stats: dict[str, tuple[int, int]] = {}
        # state.replicas: this process's membership; None: it collects every tenant.
        self.replica: Replica | None = None

    # -- signals ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: stop gracefully. Second call: end the grace period now."""
        if self._stopping.is_set():
            if not self._hurry.is_set():
                log.warning("second stop signal: cancelling in-flight work now")
            self._hurry.set()
        else:
            log.info("stop requested: finishing in-flight work", grace_seconds=self.grace)
        self._stopping.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    async def _handle_signals(self, *, task_status: TaskStatus[None]) -> None:
        """SIGTERM/SIGINT stop (the second one ends the grace period), SIGHUP reloads; the
        receiver is installed before the daemon starts anything, and removed when it ends."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.request_reload()
                else:
                    self.request_stop()

    async def _serve_ops(self, listen: str, *, task_status: TaskStatus[None]) -> None:
        """The ops server, from start-up until the daemon has stopped (then it is cancelled)."""
        app = make_app(self.metrics, self.status, self.ready, self.refresh_metrics)
        async with serving(app, listen) as where:
            log.info("ops server listening", listen=where)
            task_status.started()
            await anyio.sleep_forever()

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when woken (a signal, a finished cycle)."""
        self._wake = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._wake.wait()

    # -- main -------------------------------------------------------------------------------------

    def _configured(self, config: AppConfig) -> list[TenantConfig]:
        return [
            t
            for t in config.tenants
            if t.enabled and (self.tenant_filter is None or t.id in self.tenant_filter)
        ]

    def _tenants(self, config: AppConfig) -> list[TenantConfig]:
        """The tenants this process collects: the configured ones, or as a replica those of
        them it holds a lease of."""
        configured = self._configured(config)
        replica = self.replica
        return configured if replica is None else [t for t in configured if replica.holds(t.id)]

    async def _join_replicas(self, runtime: Runtime, work: TaskGroup) -> None:
        """state.replicas: the first heartbeat (this replica's share), then one every third of
        the lease, in the work task group."""
        ttl = runtime.config.state.lease_ttl.total_seconds()
        replica = self.replica = Replica(runtime.store, ttl, self.metrics)
        await replica.beat(self._leased_tenant_ids(), self._leases_changed)
        work.start_soon(replica.run, self._leased_tenant_ids, self._leases_changed)
        held = len(self._tenants(runtime.config))
        log.info("replica registered", replica=replica.id, tenants=held)

    def _leased_tenant_ids(self) -> list[str]:
        runtime = self._runtime
        return [] if runtime is None else [t.id for t in self._configured(runtime.config)]

    async def _leases_changed(self, holdings: Holdings) -> None:
        """Tenants lost or released: cancel their cycles, drop their schedules; gained: run now,
        and deliver their outboxes now."""
        for tenant_id in holdings.lost | holdings.released:
            self.next_run.pop(tenant_id, None)
            scope = self.running.get(tenant_id)
            if scope is not None:
                scope.cancel()
        if self._runtime is not None:
            await self._schedule_new(self._runtime.config)
            deliverer = self._runtime.deliverer
            if holdings.gained and deliverer is not None:
                # Their outboxes are ours now: what the previous holder left undelivered goes
                # out at once, not at the lanes' next poll.
                deliverer.notify_new_data()
        self._wake.set()

    async def run(self, config: AppConfig | None = None) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code (0). ``config``: the file at
        ``config_path`` already loaded by the caller (it is loaded here otherwise)."""
        config = config or load(self.config_path, self.plugins)
        # Task groups (docs/architecture.md, "Concurrency"): `background` holds the signal
        # receiver and the ops server for the daemon's whole life; `work` (in _collect) holds
        # the cycles and the deliverer, and ends with the shielded shutdown.
        runtime: Runtime | None = None
        error: Exception | None = None
        async with anyio.create_task_group() as background:
            await background.start(self._handle_signals, name="signals")
            try:
                if config.server.listen:
                    await background.start(self._serve_ops, config.server.listen, name="ops-server")
                runtime = await self._collect(config)
            except Exception as exc:  # raised below, after the group, unwrapped: the CLI's message
                error = exc
            finally:
                background.cancel_scope.cancel()
        if error is not None:
            raise error
        if runtime is None:
            return 0
        log.info("daemon stopped")
        if runtime.store.health.unusable is not None:
            raise StoreUnusable(runtime.store.health.unusable)  # exit 1, as at start
        return 0

    async def _collect(self, config: AppConfig) -> Runtime | None:
        """Open the runtime, run cycles until stopped, shut down; None if stopped before the
        state store was ever reachable."""
        async with contextlib.AsyncExitStack() as stack:
            runtime = await self._open_runtime(stack, config)
            if runtime is None:
                log.info("daemon stopped before the state store was reachable")
                return None
            self._runtime = runtime
            async with anyio.create_task_group() as work:
                self._work = work
                if config.state.replicas:
                    await self._join_replicas(runtime, work)
                self._start_deliverer()
                self.metrics.up.set(1)
                log.info(
                    "daemon started", tenants=len(self._tenants(config)), sinks=list(config.sinks)
                )
                try:
                    await self._loop()
                finally:
                    # Shielded: even a cancelled daemon lets cycles and sink writes finish within
                    # the grace period; every wait inside is bounded by it.
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()
                        if self.replica is not None:  # after the drain: hand the leases back
                            await self.replica.stop()
        return runtime

    async def _open_runtime(
        self, stack: contextlib.AsyncExitStack, config: AppConfig
    ) -> Runtime | None:
        """Open store, sinks and client; retry while the state database is unreachable."""
        failures = 0
        while not self._stopping.is_set():
            try:
                return await stack.enter_async_context(
                    open_runtime(config, self.plugins, metrics=self.metrics)
                )
            except StoreUnusable as exc:  # waiting cannot repair or unlock it: stop, exit 1
                log.error(  # noqa: TRY400 - the message says it all; a traceback adds noise
                    "state store unusable; stopping", error=str(exc)
                )
                raise
            except StoreError as exc:
                error = str(exc)
            failures += 1
            wait = 0.05 if waits_disabled() else min(_STORE_RETRY_MAX, 0.5 * 2**failures)
            log.error("state store unreachable; retrying", error=error, retry_in=wait)
            await self._sleep(wait)
        return None

    def _start_deliverer(self) -> None:
        runtime = self._runtime
        assert runtime is not None
        assert self._work is not None
        self._deliverer_done = None
        if runtime.deliverer is not None:
            done = self._deliverer_done = anyio.Event()
            self._work.start_soon(self._deliver, runtime.deliverer, done, name="deliverer")

    @staticmethod
    async def _deliver(deliverer: Deliverer, done: anyio.Event) -> None:
        """The deliverer until it is stopped; ``done`` tells when it has."""
        try:
            await deliverer.run_forever()
        except Exception:  # its lanes catch their own failures: this is a bug, not an outage
            log.exception("deliverer crashed")
        finally:
            done.set()

    async def _loop(self) -> None:
        runtime = self._runtime
        assert runtime is not None
        await self._schedule_new(runtime.config)
        while not self._stopping.is_set():
            if runtime.store.health.unusable is not None:
                log.error("state store unusable; stopping", error=runtime.store.health.unusable)
                self.request_stop()
                break
            if self._reload_requested:
                self._reload_requested = False
                await self._reload()
            now = dt.datetime.now(dt.UTC)
            for tenant in self._tenants(runtime.config):
                due = self.next_run.get(tenant.id)
                if due is not None and due <= now and tenant.id not in self.running:
                    assert self._work is not None
                    scope = self.running[tenant.id] = anyio.CancelScope()
                    self._work.start_soon(self._cycle, tenant, scope, name=f"cycle:{tenant.id}")
            upcoming = [t for k, t in self.next_run.items() if k not in self.running]
            timeout = _IDLE_WAKE
            if upcoming:
                timeout = max(0.01, min(timeout, (min(upcoming) - now).total_seconds()))
            await self._sleep(timeout)

    async def _schedule_new(self, config: AppConfig) -> None:
        """Give every tenant without a schedule its first run: now plus its jitter."""
        now = dt.datetime.now(dt.UTC)
        for tenant in self._tenants(config):
            if tenant.id not in self.next_run:
                jitter = config.tenant_schedule(tenant).jitter.total_seconds()
                first = now + dt.timedelta(seconds=self.rng.uniform(0, jitter) if jitter else 0)
                self.next_run[tenant.id] = first
                await self._persist_next_run(tenant.id, first)

    async def _persist_next_run(self, tenant_id: str, at: dt.datetime | None) -> None:
        runtime = self._runtime
        assert runtime is not None
        try:
            await runtime.store.set_tenant_next_run(tenant_id, at)
        except StoreError as exc:  # only informational; the schedule itself lives in memory
            # A failing store has logged the outage itself (rate-limited): no line per tenant.
            report = log.debug if runtime.store.health.failing else log.warning
            report("could not record the next run", tenant=tenant_id, error=str(exc))

    async def _cycle(self, tenant: TenantConfig, scope: anyio.CancelScope) -> None:
        runtime = self._runtime
        assert runtime is not None
        assert runtime.collector is not None
        started = dt.datetime.now(dt.UTC)
        try:
            with scope:  # cancelled by a reload that removes the tenant, or the grace period's end
                try:
                    result = await runtime.collector.run_cycle([tenant])
                    self._record(result)
                except Exception:  # a crashed cycle is logged; the tenant runs again next time
                    log.exception("cycle crashed", tenant=tenant.id)
        finally:
            if self.running.get(tenant.id) is scope:
                del self.running[tenant.id]
            self._cycle_ended.set()
            if tenant.id in self.next_run and not self._stopping.is_set():
                due = next_run_after(runtime.config, tenant, started, self.rng)
                self.next_run[tenant.id] = due
                await self._persist_next_run(tenant.id, due)
            self._wake.set()

    def _record(self, result: CycleResult) -> None:
        for tenant_id, r in result.tenants.items():
            self.last_results[tenant_id] = CycleSummary(
                planned=r.planned,
                fetched=r.fetched,
                changed=r.changed,
                failed=r.failed,
                error=r.error,
                skipped=r.skipped,
                seconds=round(r.seconds, 3),
                finished_at=dt.datetime.now(dt.UTC),
            )
            if r.ok:
                self.metrics.last_success.set(time.time(), tenant=tenant_id)

    # -- reload -----------------------------------------------------------------------------------

    async def _reload(self) -> None:
        runtime = self._runtime
        assert runtime is not None
        assert runtime.collector is not None
        log.info("reloading the config", path=str(self.config_path))
        rejection: dict[str, Any] | None = None
        try:
            new = load(self.config_path, self.plugins)
            configure_plugins(self.plugins.pm, new)
        except ConfigError as exc:
            rejection = {"problems": [str(p) for p in exc.problems]}
        except (OSError, CollectorError) as exc:
            rejection = {"error": f"{type(exc).__name__}: {exc}"}
        old = runtime.config
        sinks_changed = False
        replacement: tuple[dict[str, Sink], Deliverer | None] | None = None
        if rejection is None:
            sinks_changed = old.sinks != new.sinks or sink_routes(old) != sink_routes(new)
            if sinks_changed:
                # Create the new sinks (no I/O yet) before changing anything, so a sink that
                # cannot even be created rejects the whole reload.
                try:
                    replacement = build_deliverer(new, self.plugins, runtime.store)
                except Exception as exc:  # a plugin's constructor may raise anything
                    rejection = {"error": f"a sink could not be created: {type(exc).__name__}"}
        if rejection is not None:
            log.error("config reload rejected; keeping the running config", **rejection)
            self.metrics.reload_failures.inc()
            return
        old_tenants = {t.id: t for t in self._tenants(old)}
        new_tenants = {t.id: t for t in self._tenants(new)}
        removed = sorted(old_tenants.keys() - new_tenants.keys())
        added = sorted(new_tenants.keys() - old_tenants.keys())
        changed = sorted(
            k
            for k in old_tenants.keys() & new_tenants.keys()
            if old_tenants[k].credentials_fingerprint != new_tenants[k].credentials_fingerprint
        )
        for tenant_id in removed:
            self.next_run.pop(tenant_id, None)
            self.last_results.pop(tenant_id, None)
            cycle = self.running.pop(tenant_id, None)
            if cycle is not None:
                cycle.cancel()
            self.metrics.forget_tenant(tenant_id)
            runtime.client.forget_tenant(tenant_id)
            await self._persist_next_run(tenant_id, None)
        for tenant_id in changed:
            runtime.client.forget_token(tenant_id)
        for tenant_id in sorted(old_tenants.keys() & new_tenants.keys()):
            if (
                old.tenant_schedule(old_tenants[tenant_id])
                != new.tenant_schedule(new_tenants[tenant_id])
                and tenant_id not in self.running
            ):
                # A new rhythm applies from now, not after the old (maybe long) interval.
                self.next_run.pop(tenant_id, None)
        for section in ("api", "state", "server", "runtime", "files"):
            if getattr(old, section) != getattr(new, section):
                log.warning(
                    "config section changed; it takes effect after a restart", section=section
                )
        runtime.config = new
        runtime.collector.config = new
        await self._schedule_new(new)
        if replacement is not None:
            await self._replace_deliverer(*replacement)
        self.metrics.reloads.inc()
        log.info(
            "config reloaded",
            added=added,
            removed=removed,
            credentials_changed=changed,
            sinks_restarted=sinks_changed,
        )

    async def _replace_deliverer(self, sinks: dict[str, Sink], deliverer: Deliverer | None) -> None:
        """Stop the running deliverer (writes in flight may finish), close its sinks, start the
        new one; the new one registers its sinks (a new sink gets the stored history)."""
        runtime = self._runtime
        assert runtime is not None
        assert runtime.collector is not None
        if runtime.deliverer is not None:
            await runtime.deliverer.stop(grace=self.grace)
        if self._deliverer_done is not None:
            await self._deliverer_done.wait()
        if runtime.deliverer is not None:
            self._retire_stats(runtime.deliverer.stats())
            await runtime.deliverer.aclose()
        runtime.sinks, runtime.deliverer = sinks, deliverer
        runtime.collector.deliverer = deliverer
        if deliverer is None:
            # No sink left: nothing may keep payloads queued for the old ones.
            try:
                await runtime.store.sync_sinks({}, remove_missing=True)
            except StoreError as exc:
                log.warning("could not unregister the removed sinks", error=str(exc))
        self._start_deliverer()

    def _retire_stats(self, stats: dict[str, SinkStats]) -> None:
        for name, s in stats.items():
            delivered, failed = self._retired_sink_stats.get(name, (0, 0))
            self._retired_sink_stats[name] = (delivered + s.delivered, failed + s.failed)

    # -- shutdown ---------------------------------------------------------------------------------

    async def _within(self, deadline: float, wait: Callable[[], Awaitable[object]]) -> bool:
        """Await ``wait()`` until ``deadline`` (anyio's clock) or a second stop signal; True
        when it finished in time."""
        finished = False

        async def waiting() -> None:
            nonlocal finished
            await wait()
            finished = True

        if not self._hurry.is_set():
            with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
                await first_of(waiting, self._hurry.wait)
        return finished

    async def _cycles_ended(self) -> None:
        """Return once no cycle is running."""
        while self.running:
            self._cycle_ended = anyio.Event()
            await self._cycle_ended.wait()

    async def _drain_within(self, deliverer: Deliverer, deadline: float) -> None:
        """Deliver what the last cycles queued, as far as the grace period allows. What does not
        make it stays queued in the state database and goes out after the next start."""
        if self._hurry.is_set() or deadline <= anyio.current_time():
            return

        async def drain() -> None:
            try:
                await deliverer.run_until_drained()
            except Exception as exc:  # what is not delivered stays queued for the next start
                log.warning("final delivery failed", error=f"{type(exc).__name__}: {exc}")

        if not await self._within(deadline, drain):
            log.warning("grace period over: undelivered days stay queued for the next start")

    async def _shutdown(self) -> None:
        """Runs shielded (see _collect); every wait is bounded by the grace period."""
        runtime = self._runtime
        assert runtime is not None
        self._stopping.set()
        self.metrics.up.set(0)
        deadline = anyio.current_time() + self.grace
        if not await self._within(deadline, self._cycles_ended):
            pending = list(self.running.values())
            for cycle in pending:
                cycle.cancel()
            if pending:
                log.warning("grace period over: cancelled in-flight cycles", tenants=len(pending))
                await self._cycles_ended()
        if runtime.deliverer is not None:
            left = 0.0 if self._hurry.is_set() else max(0.5, deadline - anyio.current_time())
            await runtime.deliverer.stop(grace=left)
        if self._deliverer_done is not None:
            await self._deliverer_done.wait()
        if runtime.deliverer is not None:
            await self._drain_within(runtime.deliverer, deadline)
            await runtime.deliverer.aclose()
        # `status` should not promise runs of a stopped daemon; a few seconds at most for that.
        with anyio.move_on_after(_CLEAR_NEXT_RUN_BUDGET):
            for tenant_id in list(self.next_run):
                await self._persist_next_run(tenant_id, None)

    # -- ops endpoints ----------------------------------------------------------------------------

    async def ready(self) -> str | None:
        """None when ready; otherwise why not (for ``/readyz``)."""
        runtime = self._runtime
        if self._stopping.is_set():
            return "stopping"
        if runtime is None:
            return "starting: state store not open yet"
        if self.replica is not None and (problem := self.replica.registration_problem()):
            return problem
        try:
            await runtime.store.ping()
        except Exception as exc:  # any failure means not ready
            health = runtime.store.health
            if health.failing:  # the store's own message: the driver's line, no values or secrets
                return f"state store failing: {health.error}"
            return f"state store unreachable: {type(exc).__name__}"
        return None

    async def status(self) -> Status | Starting:
        """The ``/status`` document: the store's snapshot plus what only the daemon knows."""
        runtime = self._runtime
        if runtime is None:
            return Starting()
        snapshot = await status_snapshot(
            runtime.config,
            runtime.store,
            next_run=self.next_run,
            last_results=self.last_results,
            parked={t.id: runtime.client.parked_until(t) for t in runtime.config.tenants},
        )
        health = runtime.store.health
        tenants = snapshot.tenants
        if health.failing:
            # Nothing can be written while it fails, so the store's own tenant rows cannot say
            # why a tenant is behind: its last cycle, kept here in memory, does.
            tenants = [_failing_with_the_state_store(report) for report in tenants]
        return dataclasses.replace(
            snapshot,
            tenants=tenants,
            state_store=StateStoreStatus(
                state="failing" if health.failing else "ok",
                error=health.error,
                since=health.since,
                errors=health.failures,
            ),
            daemon=DaemonStatus(
                state="stopping" if self._stopping.is_set() else "running",
                running_cycles=sorted(self.running),
                asyncio_tasks=len(asyncio.all_tasks()),
                sink_lanes={name: stats.state for name, stats in self._sink_stats().items()},
            ),
        )

    def _sink_stats(self) -> dict[str, SinkStats]:
        runtime = self._runtime
        if runtime is None or runtime.deliverer is None:
            return {}
        return runtime.deliverer.stats()

    async def refresh_metrics(self) -> None:
        """Bring the gauges and mirrored counters up to date before a scrape."""
        m = self.metrics
        m.asyncio_tasks.set(len(asyncio.all_tasks()))
        runtime = self._runtime
        if runtime is None:
            return
        health = runtime.store.health
        m.state_store_up.set(0 if health.failing else 1)
        m.state_store_errors.set(health.failures)
        m.replica_fenced_writes.set(runtime.store.fenced_writes)
        # The client keeps counting for tenants a reload removed; export configured ones only.
        configured = {t.id for t in self._tenants(runtime.config)}
        m.start_series(tenants=configured, sinks=runtime.config.sinks)
        for tenant in self._tenants(runtime.config):
            m.schedule_interval.set(schedule_seconds(runtime.config, tenant), tenant=tenant.id)
        slots = runtime.client.limiter.concurrency
        m.api_requests_in_flight.set(slots.in_use)
        m.api_requests_queued.set(slots.waiting)
        client = runtime.client.metrics
        token_failures: dict[str, float] = {}
        for (tenant_id, outcome), count in dict(client.token_requests).items():
            if outcome != "ok":
                token_failures[tenant_id] = token_failures.get(tenant_id, 0) + count
        for metric, values in (
            (m.rate_limit_wait, dict(client.rate_limit_wait_seconds)),
            (m.token_refreshes, dict(client.token_refreshes)),
            (m.fetch_retries, dict(client.retries)),
            (m.api_request_seconds, dict(client.request_seconds)),
            (m.api_bad_responses, dict(client.bad_responses)),
            (m.token_request_failures, token_failures),
            (m.retry_wait_seconds, dict(client.retry_wait_seconds)),
            (m.retry_after_clamped, dict(client.retry_after_clamped)),
        ):
            for tenant_id, value in values.items():
                if tenant_id in configured:
                    metric.set(value, tenant=tenant_id)
        for (tenant_id, outcome), count in dict(client.requests).items():
            if tenant_id in configured:
                m.api_requests.set(count, tenant=tenant_id, outcome=outcome)
        stats = self._sink_stats()
        for name in set(stats) | set(self._retired_sink_stats):
            delivered, failed = self._retired_sink_stats.get(name, (0, 0))
            if name in stats:
                delivered += stats[name].delivered
                failed += stats[name].failed
            m.sink_delivered.set(delivered, sink=name)
            m.sink_failures.set(failed, sink=name)
        snapshot = await self.status()
        for report in snapshot.tenants:
            stored = report.stored
            if stored.tenant not in configured:
                continue
            m.days_complete.set(stored.days_complete, tenant=stored.tenant)
            m.days_failed.set(stored.days_failed, tenant=stored.tenant)
            m.days_quarantined.set(stored.days_quarantined, tenant=stored.tenant)
            m.tenant_auth_failed.set(1 if stored.auth_failed_until else 0, tenant=stored.tenant)
            for gauge, moment in (
                (m.last_success, stored.last_success_at),
                (m.last_fetch, stored.last_fetched_at),
                (m.next_run, stored.next_run_at),
            ):
                if moment is not None:
                    gauge.set(_timestamp(moment), tenant=stored.tenant)
        if isinstance(snapshot, Status):
            for sink in snapshot.sinks:
                m.sink_backlog.set(sink.backlog, sink=sink.sink)
                m.sink_dead_letters.set(sink.dead_letters, sink=sink.sink)
                m.sink_lag.set(sink.lag_seconds, sink=sink.sink)


def _timestamp(moment: dt.datetime) -> float:
    """Unix seconds of a datetime (a naive one is UTC, as the state store keeps them)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return float(moment.timestamp())


def _failing_with_the_state_store(report: TenantReport) -> TenantReport:
    """The tenant failing with its last cycle's error when that error is the state store's."""
    error = report.last_cycle.error if report.last_cycle is not None else None
    if error is None or not error.startswith("state store"):
        return report
    stored = dataclasses.replace(report.stored, last_error=error)
    return TenantReport(stored, "failing", report.last_cycle)


async def run_daemon(
    config_path: str | Path,
    plugins: Plugins,
    *,
    tenants: list[str] | None = None,
    config: AppConfig | None = None,
) -> int:
    """Entry point of ``zencoder-collector run``; ``config``: the file already loaded."""
    daemon = Daemon(config_path, plugins, tenant_filter=tenants, grace=grace_from_env())
    return await daemon.run(config)
