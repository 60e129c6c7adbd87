"""Prometheus metrics, labelled by tenant and sink only (nothing that could hold a secret).

A tiny in-process registry instead of prometheus_client: the collector needs counters, gauges and
one histogram, rendered in the text exposition format; keeping it here means no global registry
state shared between tests and no extra dependency. Every metric is documented in
docs/operations.md; a test checks that each name registered here appears there.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

PREFIX = "zencoder_collector_"
LabelKey = tuple[tuple[str, str], ...]

_DEFAULT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(key: LabelKey, extra: Iterable[tuple[str, str]] = ()) -> str:
    pairs = [*key, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass
class Metric:
    """One metric family: a counter or a gauge with labelled samples."""

    name: str
    kind: str
    help: str
    samples: dict[LabelKey, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.samples[key] = self.samples.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self.samples[key] = float(value)

    def remove(self, **labels: str) -> None:
        """Forget one label set (a tenant removed by a reload)."""
        with self._lock:
            self.samples.pop(tuple(sorted(labels.items())), None)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            items = sorted(self.samples.items())
        lines.extend(f"{self.name}{_labels(k)} {_number(v)}" for k, v in items)
        return lines


@dataclass
class Histogram:
    """A histogram without labels (latency over all tenants; per-tenant sums are counters)."""

    name: str
    help: str
    buckets: tuple[float, ...] = _DEFAULT_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, n in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {n}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_number(self.total)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class Metrics:
    """Every metric the collector exports; one instance per process."""

    def __init__(self) -> None:
        def counter(name: str, help_: str) -> Metric:
            return Metric(PREFIX + name, "counter", help_)

        def gauge(name: str, help_: str) -> Metric:
            return Metric(PREFIX + name, "gauge", help_)

        self.fetches = counter("fetches_total", "Tenant-days fetched successfully.")
        self.fetch_errors = counter(
            "fetch_errors_total", "Tenant-day fetches that failed after retries."
        )
        self.fetch_seconds = counter("fetch_seconds_total", "Seconds spent fetching, per tenant.")
        self.fetch_latency = Histogram(
            PREFIX + "fetch_duration_seconds", "Latency of one tenant-day fetch, retries included."
        )
        self.token_refreshes = counter("token_refreshes_total", "OAuth token requests.")
        self.rate_limit_wait = counter(
            "rate_limit_wait_seconds_total", "Seconds requests waited for the tenant's rate budget."
        )
        self.fetch_retries = counter(
            "fetch_retries_total", "Retried API requests (5xx, 429, timeouts, network errors)."
        )
        self.last_success = gauge(
            "last_success_timestamp_seconds",
            "Unix time of the tenant's last fully successful cycle.",
        )
        self.last_fetch = gauge(
            "last_fetch_timestamp_seconds", "Unix time of the tenant's last successful day fetch."
        )
        self.next_run = gauge(
            "next_run_timestamp_seconds", "Unix time the tenant's next cycle is scheduled for."
        )
        self.days_complete = gauge(
            "days_complete", "Days stored for the tenant (fetched at least once)."
        )
        self.days_failed = gauge(
            "days_failed", "Days whose last fetch failed and that wait for the next cycle."
        )
        self.days_quarantined = gauge(
            "days_quarantined",
            "Days whose last 200 body failed validation (body kept; see status and reprocess).",
        )
        self.tenant_auth_failed = gauge(
            "tenant_auth_failed", "1 while the tenant is parked as auth_failed."
        )
        self.usage_active_users = gauge(
            "usage_active_users",
            "Active users on the tenant's latest collected day (API: daily.active_users).",
        )
        self.usage_messages = gauge(
            "usage_messages",
            "Agent messages on the tenant's latest collected day (API: daily.messages).",
        )
        self.sink_delivered = counter("sink_delivered_total", "Tenant-days delivered to the sink.")
        self.sink_failures = counter("sink_failures_total", "Failed delivery attempts of the sink.")
        self.sink_backlog = gauge("sink_backlog", "Tenant-days waiting for delivery to the sink.")
        self.sink_dead_letters = gauge(
            "sink_dead_letters", "Tenant-days dead-lettered for the sink."
        )
        self.sink_lag = gauge(
            "sink_lag_seconds", "Age of the oldest undelivered tenant-day of the sink."
        )
        self.reloads = counter("config_reloads_total", "Config reloads (SIGHUP) applied.")
        self.reload_failures = counter(
            "config_reload_failures_total", "Config reloads rejected (the old config kept running)."
        )
        self.asyncio_tasks = gauge("asyncio_tasks", "asyncio tasks alive in the daemon's loop.")
        self.resident_memory = gauge(
            "process_resident_memory_bytes", "Resident memory (RSS) of the daemon process."
        )
        self.open_fds = gauge("process_open_fds", "Open file descriptors of the daemon process.")
        self.up = gauge("up", "1 while the daemon runs.")

    def families(self) -> list[Metric | Histogram]:
        return [v for v in vars(self).values() if isinstance(v, Metric | Histogram)]

    def names(self) -> list[str]:
        return [m.name for m in self.families()]

    def render(self) -> str:
        lines: list[str] = []
        for family in self.families():
            lines.extend(family.render())
        return "\n".join(lines) + "\n"

    def forget_tenant(self, tenant: str) -> None:
        for family in self.families():
            if isinstance(family, Metric):
                family.remove(tenant=tenant)


def process_stats() -> tuple[int | None, int | None]:
    """Resident memory in bytes and open file descriptors of this process (Linux ``/proc``;
    None where the platform does not tell)."""
    rss: int | None = None
    fds: int | None = None
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = None
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    return rss, fds
