"""The state database: every fetched tenant-day, durably, and each sink's outbox over them.

SQLite (the default: one file in WAL mode) or PostgreSQL (``postgresql+psycopg://``), through a
synchronous SQLAlchemy engine driven in worker threads (:func:`collector.concurrency.run_sync`,
``runtime.worker_threads`` of them), so the event loop never waits on the disk.
docs/architecture.md ("State store and outbox") describes it for operators; in short:

- ``tenant_day``: per tenant and day, the status, attempts, content hash and the raw API ``data``
  object, plus a *version*: the content hash, suffixed ``:final`` once the day is final, so a day
  that settles without changing is still delivered once more, now with ``final = true``.
- ``delivery``: per sink, tenant and day, the version that sink has, its failed attempts and
  dead-letter, and while a newer version waits for it, the queue position ``queued_seq``. A
  sink's outbox is its rows with a ``queued_seq``, read in that order through an index, so the
  next batch costs the same with ten stored days as with ten million.
- :meth:`Store.record_fetched` commits the payload and queues the new version for every sink routed
  to the tenant in one transaction: a sink never sees a day that is not stored, and never misses a
  stored change. :meth:`Store.sync_sinks` registers the sinks and their routes and queues the
  stored history for a new sink or a newly routed tenant.

The parts: :mod:`.schema` (tables and returned values), :mod:`.base` (engine, transactions,
errors), :mod:`.days` (fetched days, retention), :mod:`.quarantine` (200 bodies that failed
validation, kept for ``reprocess``), :mod:`.outbox` (sinks and delivery),
:mod:`.pending` (reading a sink's queue, the cache of new days), :mod:`.status` (tenant
outcomes, the ``status`` snapshot), :mod:`.leases` (replicas, tenant leases, fencing), and
:mod:`.hot` with :mod:`.prepared` (the statements every tenant-day goes through, compiled once
and run many rows at a time).
"""

from __future__ import annotations

from collector.models import DayState, DayStatus
from collector.store.base import IDLE_TRANSACTION_TIMEOUT
from collector.store.leases import LeasesStore
from collector.store.lock import StoreUnusable
from collector.store.quarantine import QuarantineStore
from collector.store.schema import (
    DeadLetter,
    PendingBatch,
    QuarantinedDay,
    SinkState,
    StatusSnapshot,
    StoredBody,
    TenantState,
    TenantStatus,
)
from collector.store.status import StatusStore

__all__ = [
    "IDLE_TRANSACTION_TIMEOUT",
    "DayState",
    "DayStatus",
    "DeadLetter",
    "PendingBatch",
    "QuarantinedDay",
    "SinkState",
    "StatusSnapshot",
    "Store",
    "StoreUnusable",
    "StoredBody",
    "TenantState",
    "TenantStatus",
]


class Store(QuarantineStore, StatusStore, LeasesStore):
    """Async facade over the state database: ``store = await Store.open(url)``, then
    ``await store.aclose()`` at the end. Every method raises only
    :class:`~collector.errors.StoreError` for database failures."""
