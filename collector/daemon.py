"""The long-lived daemon: per-tenant schedules, signals, config reload, ops server.

Lifecycle:

- every tenant has its own schedule (``every`` or ``cron``, plus a random jitter so a thousand
  tenants do not fire in the same second); a tenant never runs two cycles at once;
- the deliverer drains every sink's outbox continuously, independent of the fetch schedule;
- SIGTERM/SIGINT: stop starting cycles, let in-flight work finish within the grace period
  (whatever was fetched is already committed; an interrupted day is simply planned again on the
  next start), stop the deliverer, close sinks, exit 0;
- SIGHUP: reload the config. An invalid file is rejected with its problems logged and the old
  config kept. Otherwise added tenants are scheduled, removed ones stop (their in-flight cycle is
  cancelled), tenants with changed credentials lose their cached token, and a change to the sinks
  restarts the deliverer with the new sink set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from collector.app import Plugins, Runtime, build_deliverer, load, open_runtime
from collector.config import AppConfig, TenantConfig
from collector.errors import CollectorError, ConfigError
from collector.metrics import Metrics
from collector.pipeline import CycleResult
from collector.plugin_manager import configure_plugins
from collector.server import make_app, serving
from collector.status import status_snapshot

log = structlog.get_logger("collector.daemon")

DEFAULT_GRACE = 20.0


def next_run_after(
    config: AppConfig, tenant: TenantConfig, after: dt.datetime, rng: random.Random
) -> dt.datetime:
    """When the tenant's next cycle starts: its interval or cron time, plus a random jitter."""
    schedule = config.tenant_schedule(tenant)
    jitter = rng.uniform(0, schedule.jitter.total_seconds()) if schedule.jitter else 0.0
    if schedule.cron:
        from croniter import croniter

        base: dt.datetime = croniter(schedule.cron, after).get_next(dt.datetime)
    else:
        assert schedule.every is not None
        base = after + schedule.every
    return base + dt.timedelta(seconds=jitter)


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
        self.running: dict[str, asyncio.Task[None]] = {}
        self.last_results: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._reload_requested = False
        self._runtime: Runtime | None = None
        self._deliver_task: asyncio.Task[None] | None = None

    # -- signals ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stop requested: finishing in-flight work", grace_seconds=self.grace)
        self._stopping.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # -- main loop --------------------------------------------------------------------------------

    def _tenants(self, config: AppConfig) -> list[TenantConfig]:
        return [
            t
            for t in config.tenants
            if t.enabled and (self.tenant_filter is None or t.id in self.tenant_filter)
        ]

    def _schedule_new(self, config: AppConfig) -> None:
        now = dt.datetime.now(dt.UTC)
        for tenant in self._tenants(config):
            if tenant.id not in self.next_run:
                jitter = config.tenant_schedule(tenant).jitter.total_seconds()
                self.next_run[tenant.id] = now + dt.timedelta(seconds=self.rng.uniform(0, jitter))

    async def run(self) -> int:
        config = load(self.config_path, self.plugins)
        self.install_signal_handlers()
        async with open_runtime(config, self.plugins, metrics=self.metrics) as runtime:
            self._runtime = runtime
            self._start_deliverer()
            self.metrics.up.set(1)
            log.info("daemon started", tenants=len(self._tenants(config)), sinks=list(config.sinks))
            if config.server.listen:
                app = make_app(self.metrics, self.status, self.ready, self.refresh_metrics)
                async with serving(app, config.server.listen) as where:
                    log.info("ops server listening", listen=where)
                    await self._loop()
            else:
                await self._loop()
            await self._shutdown()
        log.info("daemon stopped")
        return 0

    def _start_deliverer(self) -> None:
        runtime = self._runtime
        assert runtime is not None
        if runtime.deliverer is not None:
            self._deliver_task = asyncio.create_task(
                runtime.deliverer.run_forever(), name="deliverer"
            )

    async def _loop(self) -> None:
        runtime = self._runtime
        assert runtime is not None
        self._schedule_new(runtime.config)
        while not self._stopping.is_set():
            if self._reload_requested:
                self._reload_requested = False
                await self._reload()
            now = dt.datetime.now(dt.UTC)
            for tenant in self._tenants(runtime.config):
                due = self.next_run.get(tenant.id)
                if due is not None and due <= now and tenant.id not in self.running:
                    self.running[tenant.id] = asyncio.create_task(
                        self._cycle(tenant), name=f"cycle:{tenant.id}"
                    )
            upcoming = [t for k, t in self.next_run.items() if k not in self.running]
            timeout = 5.0
            if upcoming:
                timeout = max(0.01, min(timeout, (min(upcoming) - now).total_seconds()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _cycle(self, tenant: TenantConfig) -> None:
        runtime = self._runtime
        assert runtime is not None and runtime.collector is not None
        started = dt.datetime.now(dt.UTC)
        try:
            result = await runtime.collector.run_cycle([tenant])
            self._record(result)
        except Exception:
            log.exception("cycle crashed", tenant=tenant.id)
        finally:
            self.running.pop(tenant.id, None)
            if tenant.id in self.next_run:
                self.next_run[tenant.id] = next_run_after(runtime.config, tenant, started, self.rng)
            self._wake.set()

    def _record(self, result: CycleResult) -> None:
        for tenant_id, r in result.tenants.items():
            self.last_results[tenant_id] = {
                "planned": r.planned,
                "fetched": r.fetched,
                "changed": r.changed,
                "failed": r.failed,
                "error": r.error,
                "skipped": r.skipped,
                "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            }
            if r.ok:
                self.metrics.last_success.set(time.time(), tenant=tenant_id)

    # -- reload -----------------------------------------------------------------------------------

    async def _reload(self) -> None:
        runtime = self._runtime
        assert runtime is not None and runtime.collector is not None
        try:
            new = load(self.config_path, self.plugins)
        except ConfigError as exc:
            log.error(
                "config reload rejected; keeping the running config",
                problems=[str(p) for p in exc.problems],
            )
            return
        try:
            configure_plugins(self.plugins.pm, new)
        except CollectorError as exc:
            log.error(
                "config reload rejected by a plugin; keeping the running config", error=str(exc)
            )
            return
        old = runtime.config
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
            task = self.running.pop(tenant_id, None)
            if task is not None:
                task.cancel()
            self.metrics.forget_tenant(tenant_id)
            runtime.client.forget_tenant(tenant_id)
        for tenant_id in changed:
            runtime.client.forget_token(tenant_id)
        runtime.config = new
        runtime.collector.config = new
        self._schedule_new(new)
        sinks_changed = old.sinks != new.sinks or _routes(old) != _routes(new)
        if sinks_changed:
            await self._restart_deliverer(new)
        log.info(
            "config reloaded",
            added=added,
            removed=removed,
            credentials_changed=changed,
            sinks_restarted=sinks_changed,
        )

    async def _restart_deliverer(self, config: AppConfig) -> None:
        runtime = self._runtime
        assert runtime is not None and runtime.collector is not None
        if runtime.deliverer is not None:
            await runtime.deliverer.stop(grace=self.grace)
        if self._deliver_task is not None:
            await asyncio.gather(self._deliver_task, return_exceptions=True)
        runtime.sinks, runtime.deliverer = build_deliverer(config, self.plugins, runtime.store)
        runtime.collector.deliverer = runtime.deliverer
        self._start_deliverer()

    # -- shutdown ---------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        runtime = self._runtime
        assert runtime is not None
        deadline = time.monotonic() + self.grace
        if self.running:
            _, pending = await asyncio.wait(list(self.running.values()), timeout=self.grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("grace period over: cancelled in-flight cycles", tenants=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        if runtime.deliverer is not None:
            await runtime.deliverer.stop(grace=max(1.0, deadline - time.monotonic()))
        if self._deliver_task is not None:
            await asyncio.gather(self._deliver_task, return_exceptions=True)
        self.metrics.up.set(0)

    # -- ops endpoints ----------------------------------------------------------------------------

    async def ready(self) -> str | None:
        runtime = self._runtime
        if runtime is None:
            return "starting"
        try:
            await runtime.store.ping()
        except Exception as exc:
            return f"state store unreachable: {type(exc).__name__}"
        return None

    async def status(self) -> dict[str, Any]:
        runtime = self._runtime
        assert runtime is not None
        return await status_snapshot(
            runtime.config,
            runtime.store,
            next_run=self.next_run,
            last_results=self.last_results,
            parked={t.id: runtime.client.parked_until(t) for t in runtime.config.tenants},
        )

    async def refresh_metrics(self) -> None:
        runtime = self._runtime
        assert runtime is not None
        client = runtime.client.metrics
        for tenant_id, seconds in dict(client.rate_limit_wait_seconds).items():
            self.metrics.rate_limit_wait.set(seconds, tenant=tenant_id)
        for tenant_id, count in dict(client.token_refreshes).items():
            self.metrics.token_refreshes.set(count, tenant=tenant_id)
        if runtime.deliverer is not None:
            for name, stats in runtime.deliverer.stats().items():
                self.metrics.sink_delivered.set(stats.delivered, sink=name)
                self.metrics.sink_failures.set(stats.failed, sink=name)
        snapshot = await self.status()
        for tenant in snapshot["tenants"]:
            self.metrics.days_complete.set(tenant["days_complete"], tenant=tenant["tenant"])
            self.metrics.tenant_auth_failed.set(
                1 if tenant.get("auth_failed_until") else 0, tenant=tenant["tenant"]
            )
        for sink in snapshot["sinks"]:
            self.metrics.sink_backlog.set(sink["backlog"], sink=sink["sink"])
            self.metrics.sink_dead_letters.set(sink["dead_letters"], sink=sink["sink"])
            self.metrics.sink_lag.set(sink.get("lag_seconds") or 0.0, sink=sink["sink"])


def _routes(config: AppConfig) -> dict[str, list[str]]:
    return {t.id: sorted(config.tenant_sinks(t)) for t in config.tenants}


async def run_daemon(
    config_path: str | Path, plugins: Plugins, *, tenants: list[str] | None = None
) -> int:
    """Entry point of ``zencoder-collector run``."""
    return await Daemon(config_path, plugins, tenant_filter=tenants).run()
