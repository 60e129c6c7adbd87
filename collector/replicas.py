"""The daemon's side of ``state.replicas: true``: heartbeats, and what a change of leases means.

The store part (registration, leases, fencing) is :mod:`collector.store.leases`; this module runs
it for a daemon: one heartbeat before the first cycle (so the replica starts with its share), then
one every third of ``state.lease_ttl``. After each, the daemon is told which tenants it gained
(scheduled at once) and which it lost or released (their cycles cancelled, their schedules
dropped). The deliverer follows: each sink's lane reads only the outbox of tenants held
(``store.lease_scope``). At a clean stop every lease is handed back, so the other replicas take
the tenants at their next heartbeat instead of after the expiry.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable, Collection

import anyio
import structlog

from collector.errors import StoreError
from collector.metrics import Metrics
from collector.store import Store
from collector.store.leases import Holdings, ReplicaLeases, this_replica

log = structlog.get_logger(__name__)

OnChange = Callable[[Holdings], Awaitable[None]]


class Replica:
    """One daemon's membership: :meth:`beat`, then :meth:`run` in a task group; :meth:`stop`."""

    def __init__(self, store: Store, ttl_seconds: float, metrics: Metrics) -> None:
        self.leases = ReplicaLeases(store, this_replica(), ttl=dt.timedelta(seconds=ttl_seconds))
        self.ttl = ttl_seconds
        self.interval = ttl_seconds / 3
        self.metrics = metrics
        self._scope = anyio.CancelScope()  # the heartbeat loop's
        self._registered_at: float | None = None  # monotonic time of the last good heartbeat

    def registration_problem(self) -> str | None:
        """Why this replica has no valid registration (for ``/readyz``), or None."""
        if self._registered_at is None:
            return "replica not registered yet"
        silent = time.monotonic() - self._registered_at
        if silent >= self.ttl:
            return f"replica registration expired: no heartbeat for {silent:.0f}s"
        return None

    @property
    def id(self) -> str:
        return self.leases.me.id

    def holds(self, tenant: str) -> bool:
        return tenant in self.leases.tokens

    async def beat(self, tenants: Collection[str], on_change: OnChange) -> None:
        """One heartbeat; ``on_change`` hears of every gain and loss. A failing store is
        logged and tried again at the next beat (the leases expire if it stays down)."""
        try:
            holdings = await self.leases.beat(tenants)
        except StoreError as exc:
            log.warning("replica heartbeat failed", replica=self.id, error=str(exc))
            return
        self._registered_at = time.monotonic()
        self.metrics.replica_leases_held.set(len(holdings.tokens))
        self.metrics.replica_leases_gained.inc(len(holdings.gained))
        self.metrics.replica_lease_losses.inc(len(holdings.lost))
        self.metrics.replica_handovers.inc(len(holdings.released))
        if holdings.gained or holdings.lost or holdings.released:
            log.info(
                "tenant leases changed",
                replica=self.id,
                held=len(holdings.tokens),
                gained=sorted(holdings.gained),
                lost=sorted(holdings.lost),
                released=sorted(holdings.released),
                live_replicas=holdings.live_replicas,
            )
            await on_change(holdings)

    async def run(self, tenants: Callable[[], Collection[str]], on_change: OnChange) -> None:
        """Beat every :attr:`interval` seconds until :meth:`stop` (run it in a task group)."""
        with self._scope:
            while True:
                await anyio.sleep(self.interval)
                await self.beat(tenants(), on_change)

    async def stop(self) -> None:
        """Stop beating and hand every lease back."""
        self._scope.cancel()
        handed = len(self.leases.tokens)
        try:
            await self.leases.leave()
            self.metrics.replica_handovers.inc(handed)
            self.metrics.replica_leases_held.set(0)
        except StoreError as exc:  # the leases expire on their own
            log.warning("could not hand the leases back", replica=self.id, error=str(exc))
