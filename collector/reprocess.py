"""``zencoder-collector reprocess``: re-derive days from the stored 200 bodies, without the API.

Raw first keeps the body of every 200 answer: the payload of every stored day, and the rejected
body of every quarantined day (:mod:`collector.store.quarantine`). After an upgrade whose parser
reads what an earlier one rejected (a date-time where a date was expected, a field the API
renamed), ``reprocess`` runs the current parser over those bodies:

- a quarantined day whose body now validates is stored like a fetched day (its version is the
  body's hash, as for any fetch) and queued for every sink routed to its tenant: what changed is
  delivered through the outbox, exactly as after a fetch;
- a quarantined day still rejected stays quarantined, with the current parser's reason;
- a stored day is only checked: its records are derived from the same body at every delivery
  (``replay`` redelivers them); one the current parser cannot read is reported.

Nothing here talks to the API, so it also recovers days the API no longer serves.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from collector.errors import BadResponse
from collector.models import TenantDay, tenant_day_from_body
from collector.planner import is_final
from collector.store import Store, StoredBody

Key = tuple[str, dt.date]


@dataclass
class ReprocessResult:
    """What ``reprocess`` found, by tenant-day."""

    recovered: list[Key] = field(default_factory=list)
    delivered_changes: int = 0  # recovered days whose version changed (queued for the sinks)
    still_quarantined: list[tuple[Key, str]] = field(default_factory=list)
    checked: int = 0  # stored days the current parser still reads
    unreadable: list[tuple[Key, str]] = field(default_factory=list)

    def summary(self) -> str:
        """Lines for the terminal: counts, then each day that needs attention."""
        lines = [
            f"recovered {len(self.recovered)} quarantined day(s) "
            f"({self.delivered_changes} queued for delivery); "
            f"{len(self.still_quarantined)} still quarantined; "
            f"{self.checked} stored day(s) read fine; {len(self.unreadable)} unreadable",
        ]
        lines += [f"  {t} {d} still quarantined: {why}" for (t, d), why in self.still_quarantined]
        lines += [f"  {t} {d} stored body unreadable: {why}" for (t, d), why in self.unreadable]
        return "\n".join(lines)


def rederive(stored: StoredBody, *, final: bool) -> tuple[TenantDay, str]:
    """The day's records and its body as text, by the current parser; :class:`BadResponse` if
    it rejects the body (the reason names the field path, never a value)."""
    try:
        text = stored.body.decode()
    except UnicodeDecodeError:
        raise BadResponse(
            "HTTP 200 with a body that is not UTF-8", tenant=stored.tenant, status=200
        ) from None
    item = tenant_day_from_body(
        stored.tenant, stored.day, stored.body, fetched_at=stored.received_at, final=final
    )
    return item, text


async def reprocess_stored(
    store: Store,
    tenants: Collection[str],
    settle_days: Callable[[str], int],
    *,
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> ReprocessResult:
    """Re-derive the stored bodies of ``tenants`` in ``[since, until]`` with the current parser.

    ``settle_days`` gives each tenant's settle window: a recovered day is final only if it had
    already settled when its body was received (a body from a settling day may be outdated).
    """
    result = ReprocessResult()
    for tenant in sorted(tenants):
        after: dt.date | None = None
        while page := await store.stored_bodies(tenant, since, until, after=after):
            after = page[-1].day
            await _reprocess_page(store, page, settle_days(tenant), result)
    return result


async def _reprocess_page(
    store: Store, page: list[StoredBody], settle_days: int, result: ReprocessResult
) -> None:
    recovered: list[tuple[TenantDay, str]] = []
    for stored in page:
        key = (stored.tenant, stored.day)
        final = stored.final
        if stored.quarantined:
            final = is_final(stored.day, stored.received_at.date(), settle_days)
        try:
            item, text = rederive(stored, final=final)
        except BadResponse as exc:
            if stored.quarantined:
                result.still_quarantined.append((key, exc.reason))
                await store.still_quarantined(stored.tenant, stored.day, exc.reason)
            else:
                result.unreadable.append((key, exc.reason))
            continue
        if stored.quarantined:
            recovered.append((item, text))
            result.recovered.append(key)
        else:
            result.checked += 1
    if recovered:
        changed = await store.recover(recovered)
        result.delivered_changes += sum(changed)
