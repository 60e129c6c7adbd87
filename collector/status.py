"""``zencoder-collector status`` and ``GET /status``: one snapshot, two renderings.

The snapshot comes from the state store (days complete, failed, quarantined with their reasons,
aged out of the API's window uncollected, last success and error, backlog, dead letters, lag),
completed by what only a running daemon knows (next run, last cycle, parking).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from collector.config import AppConfig
from collector.planner import oldest_servable
from collector.report import render_table
from collector.store import Store


async def status_snapshot(
    config: AppConfig,
    store: Store,
    *,
    next_run: Mapping[str, dt.datetime] | None = None,
    last_results: Mapping[str, Any] | None = None,
    parked: Mapping[str, dt.datetime | None] | None = None,
    today: dt.date | None = None,
) -> dict[str, Any]:
    """The JSON-able status of every configured tenant and sink."""
    today = today or dt.datetime.now(dt.UTC).date()
    history_start = oldest_servable(today, config.api.history_days)
    snapshot = (
        await store.status_snapshot([t.id for t in config.tenants], history_start=history_start)
    ).to_dict()
    snapshot["history_start"] = history_start.isoformat()
    configured = set(config.sinks)
    snapshot["sinks"] = [s for s in snapshot["sinks"] if s["sink"] in configured]
    known = {s["sink"] for s in snapshot["sinks"]}
    for name in sorted(configured - known):
        backlog = await store.backlog(name)
        snapshot["sinks"].append(
            {
                "sink": name,
                "backlog": backlog,
                "dead_letters": 0,
                "lag_seconds": 0.0,
                "last_success_at": None,
                "last_error": None,
            }
        )
    for tenant in snapshot["tenants"]:
        tenant_id = tenant["tenant"]
        if next_run and tenant_id in next_run:
            tenant["next_run_at"] = next_run[tenant_id].isoformat()
        if last_results and tenant_id in last_results:
            tenant["last_cycle"] = last_results[tenant_id]
        if parked and parked.get(tenant_id) is not None:
            until = parked[tenant_id]
            assert until is not None
            tenant["auth_failed_until"] = until.isoformat()
        tenant["state"] = _tenant_state(tenant)
    return snapshot


def _tenant_state(tenant: Mapping[str, Any]) -> str:
    if tenant.get("auth_failed_until"):
        return "auth_failed"
    if tenant.get("last_error") and (
        not tenant.get("last_success_at")
        or str(tenant.get("last_error_at") or "") > str(tenant.get("last_success_at") or "")
    ):
        return "failing"
    if tenant.get("last_success_at"):
        return "ok"
    return "pending"


def render_status(snapshot: Mapping[str, Any]) -> str:
    """Two aligned tables: tenants, then sinks."""
    tenants = [
        [
            t["tenant"],
            t["state"],
            t["days_complete"],
            t.get("days_failed", 0),
            t.get("days_quarantined", 0),
            t.get("days_aged_out", 0),
            t.get("last_day") or "-",
            _short(t.get("last_success_at")),
            _short(t.get("next_run_at")),
            (t.get("last_error") or "")[:60],
        ]
        for t in snapshot["tenants"]
    ]
    sinks = [
        [
            s["sink"],
            s["backlog"],
            s["dead_letters"],
            f"{float(s.get('lag_seconds') or 0):.0f}s",
            _short(s.get("last_success_at")),
            (s.get("last_error") or "")[:60],
        ]
        for s in snapshot["sinks"]
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
    )


def _day_notes(snapshot: Mapping[str, Any]) -> str:
    """Quarantined days with their reasons, and days lost to the API's window, per tenant."""
    lines: list[str] = []
    for t in snapshot["tenants"]:
        for q in t.get("quarantined") or []:
            lines.append(f"{t['tenant']} {q['day']} quarantined: {q['reason']}")
        if t.get("aged_out"):
            lines.append(
                f"{t['tenant']}: {t['days_aged_out']} day(s) aged out of the API's window "
                f"uncollected: {', '.join(t['aged_out'])}"
            )
    if not lines:
        return ""
    start = snapshot.get("history_start")
    if start:
        lines.insert(0, f"The API serves days from {start} on (api.history_days).")
    return "\n\n" + "\n".join(lines)


def _short(value: Any) -> str:
    if not value:
        return "-"
    return str(value)[:19].replace("T", " ")
