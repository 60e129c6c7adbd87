"""Replicas on one PostgreSQL state: registration, tenant leases and fencing (schema version 2).

Several collector processes may share one PostgreSQL state store; PostgreSQL itself coordinates
them, with no consensus of our own and no other broker (docs/architecture.md, "Replicas").

- ``replica``: one row per process (id, host, pid, start, last heartbeat, expiry). A replica is
  *live* while its expiry lies ahead.
- ``tenant_lease``: one row per tenant: the replica holding it, until when, and the **fencing
  token**, which grows by one each time the lease changes hands and never goes back.

One :meth:`LeasesStore.heartbeat` (a single transaction, every few seconds) registers or renews
the replica, renews its leases, and moves it towards its fair share, ``ceil(tenants / live
replicas)``: above it, it releases the excess (a replica joined); below it, it claims free or
expired leases with ``SELECT ... FOR UPDATE SKIP LOCKED``, so replicas claiming at the same moment
take disjoint tenants without waiting for each other. Every time is PostgreSQL's ``now()``, so
replica clocks may disagree.

Fencing: a replica's writes carry the tokens it holds (the ``collector.fence`` setting of the
transaction, set by :class:`~collector.store.base.StoreBase` from :attr:`fence`), and a trigger on
``tenant_day``, ``delivery`` and ``tenant_status`` rejects a row whose tenant's lease has another
holder or token. The trigger reads the lease ``FOR SHARE``, so a takeover (an ``UPDATE`` of the
lease) waits for a write in flight and every later write sees the new token: a replica that was
paused past its expiry cannot write a day, an outbox entry or a delivery mark. Sessions without
the setting (a single process, the CLI's short commands, ``state migrate``) are not fenced.

SQLite has the tables too (one schema for both), but leases are refused there: SQLite is one
process, guarded by its lock file.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import socket
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, delete, func, or_, select, text, update

from collector.store.base import StoreBase
from collector.store.fencing import LeasesUnsupported, fence_document, replica, tenant_lease
from collector.store.schema import dialect_insert

FORGET_AFTER = 10
"""A replica row expired for this many lease durations is deleted (it shows in status till then)."""


# --- values ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """Who a replica is: a stable id for its lifetime, where it runs."""

    id: str
    host: str
    pid: int
    started_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Holdings:
    """One heartbeat's outcome: the leases held now (tenant -> token), what changed, the fair
    share the replica aimed at and how many replicas were live."""

    tokens: dict[str, int]
    gained: frozenset[str] = frozenset()
    lost: frozenset[str] = frozenset()
    released: frozenset[str] = frozenset()
    fair_share: int = 0
    live_replicas: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    """A registered replica as ``status`` shows it, with the tenants it holds."""

    id: str
    host: str
    pid: int
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    expires_at: dt.datetime
    live: bool
    tenants: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at.isoformat(),
            "heartbeat_at": self.heartbeat_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "live": self.live,
            "tenants": self.tenants,
        }


# --- the store part -------------------------------------------------------------------------------


class LeasesStore(StoreBase):
    """Replica registration and tenant leases; part of :class:`~collector.store.Store`."""

    def _require_postgresql(self) -> None:
        if self.dialect != "postgresql":
            raise LeasesUnsupported(
                "replicas need a PostgreSQL state store (state.url postgresql+psycopg://...); "
                "SQLite is one process at a time"
            )

    async def heartbeat(
        self,
        me: ReplicaInfo,
        tenants: Collection[str],
        held: Mapping[str, int],
        *,
        ttl: dt.timedelta,
    ) -> Holdings:
        """Register or renew ``me``, renew the leases of ``held`` (tenant -> token) that are
        still ours, and move towards the fair share of ``tenants``; one transaction."""
        self._require_postgresql()
        wanted = sorted(set(tenants))

        def beat(conn: Connection) -> Holdings:
            return _heartbeat(conn, me, wanted, dict(held), ttl)

        return await self._write(beat)

    async def leave(self, replica_id: str) -> None:
        """Give every lease back at once and unregister (a clean shutdown): the others claim
        the tenants at their next heartbeat instead of after the expiry."""
        self._require_postgresql()

        def bye(conn: Connection) -> None:
            conn.execute(
                update(tenant_lease)
                .where(tenant_lease.c.replica == replica_id)
                .values(replica=None, expires_at=func.now())
            )
            conn.execute(delete(replica).where(replica.c.id == replica_id))

        await self._write(bye)

    async def replicas(self) -> list[ReplicaRow]:
        """Every registered replica with the tenants it holds (``status``); [] on SQLite."""
        if self.dialect != "postgresql":
            return []
        return await self._read(_replica_rows)


_ENSURE_LEASE_ROWS = text(
    "INSERT INTO tenant_lease (tenant, token) SELECT t, 0 FROM unnest(CAST(:tenants AS text[])) "
    "AS t ON CONFLICT (tenant) DO NOTHING"
)
"""A lease row, free, for every configured tenant that has none yet."""


def _heartbeat(
    conn: Connection, me: ReplicaInfo, tenants: list[str], held: dict[str, int], ttl: dt.timedelta
) -> Holdings:
    now = func.now()
    expiry = func.now() + ttl
    register = dialect_insert(conn, replica).values(
        id=me.id,
        host=me.host,
        pid=me.pid,
        started_at=me.started_at,
        heartbeat_at=now,
        expires_at=expiry,
    )
    conn.execute(
        register.on_conflict_do_update(
            index_elements=["id"], set_={"heartbeat_at": now, "expires_at": expiry}
        )
    )
    if tenants:
        # One statement for every tenant (not one per tenant: this runs at every heartbeat).
        conn.execute(_ENSURE_LEASE_ROWS, {"tenants": tenants})
    # Leases of tenants no longer configured go back.
    unconfigured = conn.execute(
        update(tenant_lease)
        .where(tenant_lease.c.replica == me.id, tenant_lease.c.tenant.not_in(tenants))
        .values(replica=None, expires_at=now)
        .returning(tenant_lease.c.tenant)
    ).scalars()
    dropped = list(unconfigured)
    renewed = conn.execute(
        update(tenant_lease)
        .where(tenant_lease.c.replica == me.id)
        .values(expires_at=expiry)
        .returning(tenant_lease.c.tenant, tenant_lease.c.token)
    )
    current = {row.tenant: row.token for row in renewed}
    live = int(
        conn.execute(
            select(func.count()).select_from(replica).where(replica.c.expires_at > now)
        ).scalar_one()
    )
    fair = math.ceil(len(tenants) / max(live, 1))
    released: list[str] = []
    if len(current) > fair:
        released = sorted(current)[fair:]
        conn.execute(
            update(tenant_lease)
            .where(tenant_lease.c.replica == me.id, tenant_lease.c.tenant.in_(released))
            .values(replica=None, expires_at=now)
        )
        for tenant in released:
            del current[tenant]
    gained: dict[str, int] = {}
    if len(current) < fair and tenants:
        free = conn.execute(
            select(tenant_lease.c.tenant)
            .where(
                tenant_lease.c.tenant.in_(tenants),
                or_(tenant_lease.c.replica.is_(None), tenant_lease.c.expires_at <= now),
            )
            .order_by(tenant_lease.c.tenant)
            .limit(fair - len(current))
            .with_for_update(skip_locked=True)
        ).scalars()
        claim = list(free)
        if claim:
            taken = conn.execute(
                update(tenant_lease)
                .where(tenant_lease.c.tenant.in_(claim))
                .values(
                    replica=me.id,
                    token=tenant_lease.c.token + 1,
                    acquired_at=now,
                    expires_at=expiry,
                )
                .returning(tenant_lease.c.tenant, tenant_lease.c.token)
            )
            gained = {row.tenant: row.token for row in taken}
            current.update(gained)
    conn.execute(delete(replica).where(replica.c.expires_at < func.now() - ttl * FORGET_AFTER))
    released.extend(dropped)  # given back, not lost
    lost = {t for t, token in held.items() if current.get(t) != token and t not in released}
    return Holdings(
        tokens=current,
        gained=frozenset(t for t in gained if held.get(t) != gained[t]),
        lost=frozenset(lost),
        released=frozenset(released),
        fair_share=fair,
        live_replicas=live,
    )


def _replica_rows(conn: Connection) -> list[ReplicaRow]:
    now = conn.execute(select(func.now())).scalar_one()
    holdings: dict[str, list[str]] = {}
    for row in conn.execute(
        select(tenant_lease.c.replica, tenant_lease.c.tenant)
        .where(and_(tenant_lease.c.replica.is_not(None), tenant_lease.c.expires_at > now))
        .order_by(tenant_lease.c.tenant)
    ):
        holdings.setdefault(row.replica, []).append(row.tenant)
    return [
        ReplicaRow(
            id=row.id,
            host=row.host,
            pid=row.pid,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            expires_at=row.expires_at,
            live=row.expires_at > now,
            tenants=holdings.get(row.id, []),
        )
        for row in conn.execute(select(replica).order_by(replica.c.started_at, replica.c.id))
    ]


# --- one replica ----------------------------------------------------------------------------------


def this_replica(now: dt.datetime | None = None) -> ReplicaInfo:
    """An identity for this process: host, pid and a random suffix (a restarted process with
    the same pid, or a container that always is pid 1, is still a new replica)."""
    host = socket.gethostname()
    pid = os.getpid()
    return ReplicaInfo(
        id=f"{host}-{pid}-{uuid.uuid4().hex[:8]}",
        host=host,
        pid=pid,
        started_at=now or dt.datetime.now(dt.UTC),
    )


class ReplicaLeases:
    """One replica's view of its leases: :meth:`beat` every heartbeat, :meth:`leave` at the end.

    Keeps the tokens it holds and puts them on ``store.fence``, so every write the store makes
    for this replica is fenced by them.
    """

    def __init__(self, store: LeasesStore, me: ReplicaInfo, *, ttl: dt.timedelta) -> None:
        self.store = store
        self.me = me
        self.ttl = ttl
        self.tokens: dict[str, int] = {}
        store.fence = fence_document(me.id, self.tokens)
        store.lease_scope = frozenset()

    @property
    def tenants(self) -> frozenset[str]:
        """The tenants this replica holds a lease of (as of its last heartbeat)."""
        return frozenset(self.tokens)

    async def beat(self, tenants: Collection[str]) -> Holdings:
        """One heartbeat: renew, rebalance, claim; the store's fence follows the outcome."""
        holdings = await self.store.heartbeat(self.me, tenants, self.tokens, ttl=self.ttl)
        self.tokens = dict(holdings.tokens)
        self.store.fence = fence_document(self.me.id, self.tokens)
        self.store.lease_scope = frozenset(self.tokens)
        return holdings

    async def leave(self) -> None:
        """Hand every lease back and unregister; writes are fenced off from here on."""
        self.tokens = {}
        self.store.fence = fence_document(self.me.id, self.tokens)
        self.store.lease_scope = frozenset()
        await self.store.leave(self.me.id)
