"""Assembles the runtime from a config file: plugins, config, store, sinks, deliverer, client.

Everything a command needs is built here once, in one order, so ``run``, ``run --once``,
``backfill``, ``replay`` and the daemon share the same wiring and the same clean shutdown.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from collector.client import ApiClient
from collector.concurrency import set_worker_threads
from collector.config import AppConfig, load_config
from collector.deliverer import Deliverer
from collector.log import register_secrets
from collector.pii import raw_body_policy, raw_payload_policy
from collector.pipeline import Collector, utc_today
from collector.plugin_manager import (
    CollectorPluginManager,
    Notifier,
    SinkRegistry,
    configure_plugins,
    make_plugin_manager,
)
from collector.sink import Sink, SinkHost
from collector.store import IDLE_TRANSACTION_TIMEOUT, Store

if TYPE_CHECKING:
    # Only the daemon, which serves /metrics, builds them: prometheus_client (about 0.05 s of
    # imports) stays out of run --once, backfill and the other commands.
    from collector.metrics import Metrics

log = structlog.get_logger(__name__)


@dataclass
class Plugins:
    """The plugin manager, the sink types it registered and the notifier of its hooks."""

    pm: CollectorPluginManager
    registry: SinkRegistry
    notifier: Notifier = field(init=False)

    def __post_init__(self) -> None:
        self.notifier = Notifier(self.pm)


def load_plugins() -> Plugins:
    """Build the plugin manager (entry points of ``collector.sinks``) and the sink registry."""
    pm = make_plugin_manager()
    return Plugins(pm=pm, registry=SinkRegistry.from_plugin_manager(pm))


def load(path: str | Path, plugins: Plugins, environ: Mapping[str, str] | None = None) -> AppConfig:
    """Load and validate the config with every installed sink type's own model."""
    config = load_config(path, environ=environ, sink_types=plugins.registry.config_types())
    register_secrets(config.secret_values())
    for warning in config.warnings:
        log.warning("config warning", problem=str(warning))
    return config


def sink_routes(config: AppConfig) -> dict[str, set[str] | None]:
    """For each sink instance, the tenants routed to it (None: every tenant)."""
    routes: dict[str, set[str] | None] = {}
    for sink_name in config.sinks:
        routed = {t.id for t in config.tenants if sink_name in config.tenant_sinks(t)}
        everyone = {t.id for t in config.tenants}
        routes[sink_name] = None if routed == everyone else routed
    return routes


@dataclass
class Runtime:
    """Every long-lived object of one process, opened and closed together."""

    config: AppConfig
    plugins: Plugins
    store: Store
    client: ApiClient
    sinks: dict[str, Sink] = field(default_factory=dict)
    deliverer: Deliverer | None = None
    collector: Collector | None = None


def build_deliverer(
    config: AppConfig,
    plugins: Plugins,
    store: Store,
    *,
    only_sinks: set[str] | None = None,
) -> tuple[dict[str, Sink], Deliverer | None]:
    """Create the configured sink instances (no I/O yet) and the deliverer that drains them."""
    sinks: dict[str, Sink] = {}
    host = SinkHost(shared_group=config.files.shared_group)
    for name, sink_config in config.sinks.items():
        if only_sinks is None or name in only_sinks:
            sinks[name] = plugins.registry.create(name, sink_config, host)
    if not sinks:
        return sinks, None
    routes = sink_routes(config)
    deliverer = Deliverer(
        store,
        sinks,
        {name: config.sinks[name] for name in sinks},
        {name: routes[name] for name in sinks},
        notifier=plugins.notifier,
        # Only a full sink set may unregister sinks that left the config (``replay`` opens one).
        complete_routes=only_sinks is None,
    )
    return sinks, deliverer


@contextlib.asynccontextmanager
async def open_runtime(
    config: AppConfig,
    plugins: Plugins,
    *,
    with_sinks: bool = True,
    only_sinks: set[str] | None = None,
    exclusive: bool | None = None,
    today: Callable[[], dt.date] = utc_today,
    metrics: Metrics | None = None,
) -> AsyncIterator[Runtime]:
    """Open the store, create the sinks and the client; close all of them on exit.

    ``exclusive``: hold the state's single-collector lock; by default only the commands that
    collect do (run, backfill): ``replay`` (``only_sinks``) and ``reprocess`` call no API and
    are meant to run next to them.
    """
    configure_plugins(plugins.pm, config)
    set_worker_threads(config.runtime.worker_threads)  # before the store's first thread call
    idle = IDLE_TRANSACTION_TIMEOUT
    if config.state.replicas:
        # A replica frozen inside a transaction keeps its locks (lease rows, the outbox
        # position) no longer than its leases would last.
        idle = min(idle, config.state.lease_ttl)
    store = await Store.open(
        config.state.connection_url(),
        exclusive=(only_sinks is None) if exclusive is None else exclusive,
        shared_group=config.files.shared_group,
        idle_transaction_timeout=idle,
    )
    pii_key = config.state.pii_key
    key = pii_key.get_secret_value().encode() if pii_key else None
    store.payload_policy = raw_payload_policy(config.state.raw_pii, key)
    store.body_policy = raw_body_policy(config.state.raw_pii, key)
    runtime: Runtime | None = None
    try:
        sinks: dict[str, Sink] = {}
        deliverer: Deliverer | None = None
        if with_sinks:
            sinks, deliverer = build_deliverer(config, plugins, store, only_sinks=only_sinks)
            if deliverer is None and only_sinks is None:
                # No sink configured any more: nothing may keep payloads queued for old sinks.
                await store.sync_sinks({}, remove_missing=True)
        async with ApiClient(config.api) as client:
            runtime = Runtime(config, plugins, store, client, sinks, deliverer)
            async with Collector(
                config,
                client,
                store,
                deliverer,
                notifier=plugins.notifier,
                today=today,
                metrics=metrics,
            ) as collector:
                runtime.collector = collector
                yield runtime
    finally:
        # The daemon may have swapped the deliverer on reload: close whichever is current.
        current = runtime.deliverer if runtime is not None else None
        try:
            if current is not None:
                await current.aclose()
        finally:
            await store.aclose()
