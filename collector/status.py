"""``zencoder-collector status`` and ``GET /status``: one snapshot, two renderings.

The snapshot comes from the state store (days complete, failed, quarantined with their reasons,
aged out of the API's window uncollected, last success and error, backlog, dead letters, lag),
completed by what only a running daemon knows (next run, last cycle, parking).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from collector.config import AppConfig
from collector.planner import oldest_servable
from collector.report import render_table
from collector.store import Store
from collector.store.leases import ReplicaRow
from collector.store.schema import SinkState, TenantState

TenantCondition = Literal["ok", "failing", "auth_failed", "pending"]


@dataclass(frozen=True, slots=True)
class CycleSummary:
    """A tenant's last cycle, as a running daemon remembers it."""

    planned: int
    fetched: int
    changed: int
    failed: int
    error: str | None
    skipped: str | None
    seconds: float
    finished_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["finished_at"] = self.finished_at.isoformat()
        return out


@dataclass(frozen=True, slots=True)
class TenantReport:
    """One tenant in ``status``: what the store holds (with what only a running daemon knows
    applied: its next run, its credentials' pause), its condition and its last cycle."""

    stored: TenantState
    state: TenantCondition
    last_cycle: CycleSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.stored.to_dict()
        if self.last_cycle is not None:
            out["last_cycle"] = self.last_cycle.to_dict()
        out["state"] = self.state
        return out


@dataclass(frozen=True, slots=True)
class UnregisteredSink:
    """A configured sink the state store does not know yet (no run since it was added; the run
    that registers it queues the stored history for it)."""

    sink: str
    backlog: int
    dead_letters: int = 0
    lag_seconds: float = 0.0
    last_success_at: dt.datetime | None = None
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class StateStoreStatus:
    """The ``state_store`` object of ``/status``: is the state store failing, since when, why."""

    state: Literal["ok", "failing"]
    error: str | None
    since: dt.datetime | None
    errors: int

    def to_dict(self) -> dict[str, Any]:
        since = self.since.isoformat() if self.since else None
        return {"state": self.state, "error": self.error, "since": since, "errors": self.errors}


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """The ``daemon`` object of ``/status``: the process itself."""

    state: Literal["running", "stopping"]
    running_cycles: list[str]
    asyncio_tasks: int
    sink_lanes: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Status:
    """Everything ``status`` and ``/status`` show, typed until :meth:`to_dict` (the JSON edge)."""

    generated_at: dt.datetime
    history_start: dt.date
    tenants: list[TenantReport]
    sinks: list[SinkState | UnregisteredSink]
    replicas: list[ReplicaRow] | None = None
    state_store: StateStoreStatus | None = None
    daemon: DaemonStatus | None = None

    def tenant(self, tenant_id: str) -> TenantReport:
        """The report of one tenant; KeyError if it is not in the snapshot."""
        for report in self.tenants:
            if report.stored.tenant == tenant_id:
                return report
        raise KeyError(tenant_id)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "generated_at": self.generated_at.isoformat(),
            "tenants": [t.to_dict() for t in self.tenants],
            "sinks": [s.to_dict() for s in self.sinks],
            "history_start": self.history_start.isoformat(),
        }
        if self.replicas is not None:
            out["replicas"] = [replica.to_dict() for replica in self.replicas]
        if self.state_store is not None:
            out["state_store"] = self.state_store.to_dict()
        if self.daemon is not None:
            out["daemon"] = self.daemon.to_dict()
        return out


@dataclass(frozen=True, slots=True)
class Starting:
    """``/status`` before the daemon has opened its runtime."""

    tenants: list[TenantReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"state": "starting", "tenants": [], "sinks": []}


async def status_snapshot(
    config: AppConfig,
    store: Store,
    *,
    next_run: Mapping[str, dt.datetime] | None = None,
    last_results: Mapping[str, CycleSummary] | None = None,
    parked: Mapping[str, dt.datetime | None] | None = None,
    today: dt.date | None = None,
) -> Status:
    """The status of every configured tenant and sink."""
    today = today or dt.datetime.now(dt.UTC).date()
    history_start = oldest_servable(today, config.api.history_days)
    stored = await store.status_snapshot(
        [t.id for t in config.tenants], history_start=history_start
    )
    replicas = await store.replicas() if config.state.replicas else None
    configured = set(config.sinks)
    sinks: list[SinkState | UnregisteredSink] = [s for s in stored.sinks if s.sink in configured]
    known = {s.sink for s in sinks}
    for name in sorted(configured - known):
        sinks.append(UnregisteredSink(sink=name, backlog=await store.backlog(name)))
    tenants: list[TenantReport] = []
    for tenant in stored.tenants:
        tenant_id = tenant.tenant
        if next_run and tenant_id in next_run:
            tenant = dataclasses.replace(tenant, next_run_at=next_run[tenant_id])
        if parked and parked.get(tenant_id) is not None:
            tenant = dataclasses.replace(tenant, auth_failed_until=parked[tenant_id])
        last_cycle = last_results.get(tenant_id) if last_results else None
        tenants.append(TenantReport(tenant, tenant_condition(tenant), last_cycle))
    return Status(
        generated_at=stored.generated_at,
        history_start=history_start,
        tenants=tenants,
        sinks=sinks,
        replicas=replicas,
    )


def tenant_condition(tenant: TenantState) -> TenantCondition:
    """ok, failing (its last error is newer than its last success), auth_failed or pending."""
    if tenant.auth_failed_until is not None:
        return "auth_failed"
    if tenant.last_error and (
        tenant.last_success_at is None
        or (tenant.last_error_at is not None and tenant.last_error_at > tenant.last_success_at)
    ):
        return "failing"
    if tenant.last_success_at is not None:
        return "ok"
    return "pending"


def render_status(snapshot: Status) -> str:
    """Two aligned tables: tenants, then sinks."""
    tenants = [
        [
            t.stored.tenant,
            t.state,
            t.stored.days_complete,
            t.stored.days_failed,
            t.stored.days_quarantined,
            t.stored.days_aged_out,
            t.stored.last_day.isoformat() if t.stored.last_day else "-",
            _short(t.stored.last_success_at),
            _short(t.stored.next_run_at),
            (t.stored.last_error or "")[:60],
        ]
        for t in snapshot.tenants
    ]
    sinks = [
        [
            s.sink,
            s.backlog,
            s.dead_letters,
            f"{s.lag_seconds:.0f}s",
            _short(s.last_success_at),
            (s.last_error or "")[:60],
        ]
        for s in snapshot.sinks
    ]
    return (
        render_table(
            [
                "tenant",
                "state",
                "days",
                "failed",
                "quarantined",
                "aged out",
                "last day",
                "last success",
                "next run",
                "last error",
            ],
            tenants,
        )
        + "\n\n"
        + render_table(
            ["sink", "backlog", "dead letters", "lag", "last success", "last error"], sinks
        )
        + _day_notes(snapshot)
        + _replica_table(snapshot.replicas)
    )


def _replica_table(replicas: Sequence[ReplicaRow] | None) -> str:
    """state.replicas: each replica, its last heartbeat and how many tenants it holds."""
    if replicas is None:
        return ""
    rows = [
        [
            r.id,
            "live" if r.live else "expired",
            _short(r.heartbeat_at),
            len(r.tenants),
            ", ".join(r.tenants[:5]) + (" ..." if len(r.tenants) > 5 else ""),
        ]
        for r in replicas
    ]
    return "\n\n" + render_table(["replica", "state", "heartbeat", "tenants", "holds"], rows)


def _day_notes(snapshot: Status) -> str:
    """Quarantined days with their reasons, and days lost to the API's window, per tenant."""
    lines: list[str] = []
    for report in snapshot.tenants:
        t = report.stored
        for q in t.quarantined:
            lines.append(f"{t.tenant} {q.day.isoformat()} quarantined: {q.reason}")
        if t.aged_out:
            lines.append(
                f"{t.tenant}: {t.days_aged_out} day(s) aged out of the API's window "
                f"uncollected: {', '.join(t.aged_out)}"
            )
    if not lines:
        return ""
    lines.insert(
        0, f"The API serves days from {snapshot.history_start.isoformat()} on (api.history_days)."
    )
    return "\n\n" + "\n".join(lines)


def _short(value: dt.datetime | None) -> str:
    """A moment to the second, without the zone (the table's times are UTC)."""
    if value is None:
        return "-"
    return value.isoformat()[:19].replace("T", " ")
