"""Prometheus metrics, labelled by tenant and sink only (nothing that could hold a secret).

Everything is registered on one :class:`prometheus_client.CollectorRegistry` per
:class:`Metrics` instance (never the library's global registry, so tests and a reloaded daemon
do not share state) and rendered by prometheus_client in the text exposition format. Besides
the collector's own families the registry carries the standard ``process_*`` metrics
(:class:`prometheus_client.ProcessCollector`) and ``zencoder_collector_build_info``.

Most families are :class:`Metric` objects rather than prometheus_client's ``Counter`` and
``Gauge``: several counters mirror a count kept elsewhere (the API client's retries, a sink
lane's deliveries) and are *set* at scrape time, and a tenant removed by a reload must vanish from
every family at once; a custom collector is prometheus_client's documented way to export such
values. Every metric is documented in docs/operations.md; a test checks the two agree.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric as MetricFamily

from collector import __version__

PREFIX = "zencoder_collector_"
LabelKey = tuple[tuple[str, str], ...]

API_OUTCOMES = (
    "ok",
    "unauthorized",
    "rate_limited",
    "server_error",
    "rejected",
    "timeout",
    "transport_error",
)
"""The outcomes the API client counts requests by (collector.client.ClientMetrics.requests)."""

_DEFAULT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metric:
    """One counter or gauge family whose labelled samples the collector sets or adds to.

    ``labels`` declares the label names every sample carries: ``()`` for none, ``("tenant",)`` or
    ``("sink",)``; a sample with other label names is a bug and raises ``ValueError``. A counter
    with declared labels is exported at 0 from the start (for no labels: at once; per tenant or
    sink: once :meth:`Metrics.start_series` names them), so ``increase()`` sees its first event.
    ``labels=None`` leaves the names free and exports nothing until a sample exists.
    """

    def __init__(
        self, name: str, kind: str, help: str, labels: tuple[str, ...] | None = None
    ) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"metric {name}: kind must be counter or gauge, not {kind!r}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name}: the name must end in _total")
        self.name = name
        self.kind = kind
        self.help = help
        self.labels = labels
        self.samples: dict[LabelKey, float] = {}
        self._lock = threading.Lock()
        if kind == "counter" and labels == ():
            self.samples[()] = 0.0

    def _key(self, labels: dict[str, str]) -> LabelKey:
        if self.labels is not None and set(labels) != set(self.labels):
            raise ValueError(
                f"metric {self.name}: labels {sorted(labels)} given, {list(self.labels)} declared"
            )
        return tuple(sorted(labels.items()))

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to the sample of these labels (a counter never goes down)."""
        if self.kind == "counter" and amount < 0:
            raise ValueError(f"counter {self.name}: cannot decrease by {amount}")
        key = self._key(labels)
        with self._lock:
            self.samples[key] = self.samples.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        """Replace the sample of these labels (for a counter: mirror a count kept elsewhere)."""
        key = self._key(labels)
        with self._lock:
            self.samples[key] = float(value)

    def remove(self, **labels: str) -> None:
        """Forget every sample carrying these label values (a tenant removed by a reload loses
        its samples of every outcome too)."""
        wanted = set(labels.items())
        with self._lock:
            for key in [k for k in self.samples if wanted <= set(k)]:
                del self.samples[key]

    def ensure(self, **labels: str) -> None:
        """Export the sample of these labels at 0 unless it already has a value."""
        key = self._key(labels)
        with self._lock:
            self.samples.setdefault(key, 0.0)

    def describe(self) -> list[MetricFamily]:
        """The family without samples (lets the registry reject a duplicate name)."""
        return [MetricFamily(self._family_name(), self.help, self.kind)]

    def collect(self) -> list[MetricFamily]:
        """The family and its current samples, for prometheus_client's exposition."""
        family = MetricFamily(self._family_name(), self.help, self.kind)
        with self._lock:
            items = sorted(self.samples.items())
        for key, value in items:
            family.add_sample(self.name, dict(key), value)
        return [family]

    def _family_name(self) -> str:
        # prometheus_client names a counter family without _total and adds it to the samples.
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


class Metrics:
    """Every metric the collector exports, on a registry of its own; one instance per process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry

        def counter(name: str, help_: str, labels: tuple[str, ...] | None = None) -> Metric:
            metric = Metric(PREFIX + name, "counter", help_, labels)
            registry.register(metric)
            return metric

        def gauge(name: str, help_: str, labels: tuple[str, ...] | None = None) -> Metric:
            metric = Metric(PREFIX + name, "gauge", help_, labels)
            registry.register(metric)
            return metric

        tenant, sink, none = ("tenant",), ("sink",), ()
        self.fetches = counter("fetches_total", "Tenant-days fetched successfully.", tenant)
        self.fetch_errors = counter(
            "fetch_errors_total", "Tenant-day fetches that failed after retries.", tenant
        )
        self.fetch_seconds = counter(
            "fetch_seconds_total", "Seconds spent fetching, per tenant.", tenant
        )
        self.fetch_latency = Histogram(
            PREFIX + "fetch_duration_seconds",
            "Latency of one tenant-day fetch, retries included.",
            buckets=_DEFAULT_BUCKETS,
            registry=registry,
        )
        self.token_refreshes = counter("token_refreshes_total", "OAuth token requests.", tenant)
        self.rate_limit_wait = counter(
            "rate_limit_wait_seconds_total",
            "Seconds requests waited for the tenant's rate budget.",
            tenant,
        )
        self.fetch_retries = counter(
            "fetch_retries_total",
            "Retried API requests (5xx, 429, timeouts, network errors).",
            tenant,
        )
        self.api_request_seconds = counter(
            "api_request_seconds_total",
            "Seconds usage API requests took, sending to the end of the body (no waits).",
            tenant,
        )
        self.api_bad_responses = counter(
            "api_bad_responses_total",
            "200 answers whose body failed validation (each quarantined its day).",
            tenant,
        )
        self.token_request_failures = counter(
            "token_request_failures_total",
            "Token requests that got no token (credentials rejected, endpoint failing).",
            tenant,
        )
        self.retry_wait_seconds = counter(
            "fetch_retry_wait_seconds_total",
            "Seconds waited before retrying API requests (backoff or Retry-After).",
            tenant,
        )
        self.retry_after_clamped = counter(
            "retry_after_clamped_total",
            "Retry-After values over the 15-minute cap, clamped to it.",
            tenant,
        )
        self.api_requests = counter(
            "api_requests_total",
            "Usage API requests by outcome: ok, unauthorized, rate_limited (429/503), "
            "server_error, rejected, timeout, transport_error.",
            ("tenant", "outcome"),
        )
        self.last_success = gauge(
            "last_success_timestamp_seconds",
            "Unix time of the tenant's last fully successful cycle.",
            tenant,
        )
        self.last_fetch = gauge(
            "last_fetch_timestamp_seconds",
            "Unix time of the tenant's last successful day fetch.",
            tenant,
        )
        self.next_run = gauge(
            "next_run_timestamp_seconds",
            "Unix time the tenant's next cycle is scheduled for.",
            tenant,
        )
        self.schedule_interval = gauge(
            "schedule_interval_seconds",
            "Longest gap between two of the tenant's cycles (interval plus jitter).",
            tenant,
        )
        self.days_complete = gauge(
            "days_complete", "Days stored for the tenant (fetched at least once).", tenant
        )
        self.days_failed = gauge(
            "days_failed", "Days whose last fetch failed and that wait for the next cycle.", tenant
        )
        self.days_quarantined = gauge(
            "days_quarantined",
            "Days whose last 200 body failed validation (body kept; see status and reprocess).",
            tenant,
        )
        self.tenant_auth_failed = gauge(
            "tenant_auth_failed", "1 while the tenant is parked as auth_failed.", tenant
        )
        self.usage_active_users = gauge(
            "usage_active_users",
            "Active users on the tenant's latest collected day (API: daily.active_users).",
            tenant,
        )
        self.usage_messages = gauge(
            "usage_messages",
            "Agent messages on the tenant's latest collected day (API: daily.messages).",
            tenant,
        )
        self.sink_delivered = counter(
            "sink_delivered_total", "Tenant-days delivered to the sink.", sink
        )
        self.sink_failures = counter(
            "sink_failures_total", "Failed delivery attempts of the sink.", sink
        )
        self.sink_backlog = gauge(
            "sink_backlog", "Tenant-days waiting for delivery to the sink.", sink
        )
        self.sink_dead_letters = gauge(
            "sink_dead_letters", "Tenant-days dead-lettered for the sink.", sink
        )
        self.sink_lag = gauge(
            "sink_lag_seconds", "Age of the oldest undelivered tenant-day of the sink.", sink
        )
        self.reloads = counter("config_reloads_total", "Config reloads (SIGHUP) applied.", none)
        self.reload_failures = counter(
            "config_reload_failures_total",
            "Config reloads rejected (the old config kept running).",
            none,
        )
        self.asyncio_tasks = gauge(
            "asyncio_tasks", "asyncio tasks alive in the daemon's loop.", none
        )
        self.api_requests_in_flight = gauge(
            "api_requests_in_flight",
            "API requests holding one of the api.max_concurrency slots.",
            none,
        )
        self.api_requests_queued = gauge(
            "api_requests_queued",
            "API requests allowed by their tenant's rate limit, waiting for a concurrency slot.",
            none,
        )
        self.state_store_up = gauge(
            "state_store_up", "0 while the state store fails (e.g. a full disk), else 1.", none
        )
        self.state_store_errors = counter(
            "state_store_errors_total", "Failed state store operations (reads and writes).", none
        )
        self.bad_requests = counter(
            "ops_bad_requests_total", "Malformed requests the ops server rejected.", none
        )
        # state.replicas: this process's leases (collector.replicas).
        self.replica_leases_held = gauge(
            "replica_leases_held", "Tenants this replica holds a lease of.", none
        )
        self.replica_leases_gained = counter(
            "replica_leases_gained_total", "Leases this replica claimed.", none
        )
        self.replica_lease_losses = counter(
            "replica_lease_losses_total",
            "Leases this replica lost to another (it did not renew in time).",
            none,
        )
        self.replica_handovers = counter(
            "replica_handovers_total",
            "Leases this replica handed over: released to rebalance, or at a clean stop.",
            none,
        )
        self.replica_fenced_writes = counter(
            "replica_fenced_writes_total",
            "Write transactions the state store refused for a stale fencing token.",
            none,
        )
        self.up = gauge("up", "1 while the daemon runs.", none)
        self.build_info = Info(
            PREFIX + "build", "Version of the collector and of Python.", registry=registry
        )
        self.build_info.info({"version": __version__, "python_version": platform.python_version()})
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=registry)

    def families(self) -> list[Metric]:
        """The collector's own counters and gauges (not the histogram, info or process_*)."""
        return [v for v in vars(self).values() if isinstance(v, Metric)]

    def render(self) -> str:
        """Every registered metric in the Prometheus text exposition format (0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")

    def start_series(self, *, tenants: Iterable[str] = (), sinks: Iterable[str] = ()) -> None:
        """Export every per-tenant and per-sink counter at 0 for these tenants and sinks (the API
        requests: each outcome), so a first fetch error, 429 or failed delivery is an increase
        that alerts and rate() see, not a new series."""
        tenant_ids, sink_names = list(tenants), list(sinks)
        for family in self.families():
            if family.kind != "counter":
                continue
            if family.labels == ("tenant",):
                for tenant_id in tenant_ids:
                    family.ensure(tenant=tenant_id)
            elif family.labels == ("sink",):
                for sink_name in sink_names:
                    family.ensure(sink=sink_name)
            elif family.labels == ("tenant", "outcome"):
                for tenant_id in tenant_ids:
                    for outcome in API_OUTCOMES:
                        family.ensure(tenant=tenant_id, outcome=outcome)

    def forget_tenant(self, tenant: str) -> None:
        for family in self.families():
            family.remove(tenant=tenant)
