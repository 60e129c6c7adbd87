"""Engine, transactions, locking and error translation of the state store.

Durability (SQLite): WAL journal with ``synchronous=NORMAL`` by default. A commit survives a crash
or ``kill -9`` of the process (the WAL is in the OS page cache and is replayed on the next open);
only a power loss or kernel crash can roll back the last few commits, and even then the database
stays consistent and nothing is lost for good: a rolled-back day is missing again, so the planner
fetches it again, and a rolled-back delivery mark only means an idempotent redelivery.
``synchronous=FULL`` (``?synchronous=full`` in the URL) adds an fsync per commit for those who
want that last window closed too, at the price of a disk flush per batch.

Writers: one at a time per process (an :class:`anyio.Lock`, SQLite only), each transaction
opened with ``BEGIN IMMEDIATE`` so a read-then-write cannot be overtaken by another process
(``replay`` next to a running daemon); ``busy_timeout`` is 5 s. Readers never wait for writers
(WAL). PostgreSQL needs no lock: row locks (``SELECT ... FOR UPDATE``, keys in sorted order) and
``INSERT ... ON CONFLICT`` do the same job, and also between replicas. Every write takes the
outbox position row, so a transaction left open by a process that stopped running (frozen,
suspended, cut off) would stall every other writer: PostgreSQL ends a session whose transaction
sits idle longer than ``idle_transaction_timeout`` (``idle_in_transaction_session_timeout``),
which releases its locks.

Errors: every SQLAlchemy/driver exception becomes :class:`~collector.errors.StoreError` with the
driver's first message line; SQL parameters are hidden from messages (payloads hold emails), and
the URL is only ever shown with its password masked. A file that is not a database or is corrupt
raises :class:`~collector.store.lock.StoreUnusable` (retrying cannot help). Every failure and the
first success after one are recorded in :class:`StoreHealth` (``store.health``): at most one
error log every :data:`HEALTH_LOG_INTERVAL` seconds, ``/readyz`` and the metrics read it, and a
write that succeeds again ends the outage.

Files (SQLite): the database, its ``-wal``/``-shm`` files and its directory are created owner-only
(``files.shared_group`` adds the group), see :mod:`collector.files`; an exclusive opener (``run``,
``backfill``) holds the lock of :mod:`collector.store.lock`."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import anyio
import structlog
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from collector.concurrency import run_sync
from collector.errors import StoreError
from collector.files import create_private_file, ensure_private_dir
from collector.models import DayStatus, TenantDay
from collector.pii import PayloadPolicy, StoredPayload
from collector.store.fencing import (
    FENCE_SETTING,
    fencing_error,
    install_fencing,
    prepare_migration,
)
from collector.store.hot import HotStatements
from collector.store.lock import StateLock, StoreUnusable, refuse_truncated
from collector.store.schema import (
    SCHEMA_VERSION,
    SEQ_KEY,
    SINKS_GENERATION_KEY,
    metadata,
    schema_version,
    store_meta,
    upsert,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")
Key = tuple[str, dt.date]
Routes = Mapping[str, Collection[str] | None]
Registered = dict[str, frozenset[str] | None]

_CHUNK = 400  # keys per IN (...) list, far below every backend's bound-parameter limit
_TEXT_MAX = 1000
_SQLITE_SYNC = {"normal": "NORMAL", "full": "FULL", "extra": "EXTRA"}
_SQLITE_CACHE_KIB = 1024  # page cache per connection
IDLE_TRANSACTION_TIMEOUT = dt.timedelta(seconds=30)
"""How long a PostgreSQL transaction of ours may sit idle before the server ends its session.

Ours are idle only between two statements (milliseconds); one idle for this long belongs to a
process that no longer runs, and holds locks every writer needs."""
_STATUSES: frozenset[str] = frozenset({"missing", "fetched", "final", "failed"})
# SQLite result codes (the primary code, the low byte) that no retry can cure: not a database,
# or a corrupt one.
_SQLITE_NOTADB = 26
_SQLITE_CORRUPT = 11
HEALTH_LOG_INTERVAL = 60.0
"""Seconds between two error logs of state store failures."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def chunks(values: Sequence[T]) -> list[Sequence[T]]:
    return [values[i : i + _CHUNK] for i in range(0, len(values), _CHUNK)]


def short(text: str) -> str:
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 1] + "…"


def as_status(value: str) -> DayStatus:
    return value if value in _STATUSES else "failed"  # type: ignore[return-value]


def describe(exc: SQLAlchemyError) -> str:
    # The driver's own message, first line only: never SQL parameters (payloads hold emails).
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"state database error ({type(exc).__name__}): {first[:300]}"


def is_unusable(exc: BaseException) -> bool:
    """Whether a driver error says the database file itself is broken (not a database, corrupt)."""
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (_SQLITE_NOTADB, _SQLITE_CORRUPT)


def store_error(exc: SQLAlchemyError, prefix: str = "") -> StoreError:
    """The :class:`StoreError` (or :class:`StoreUnusable`) for a driver error."""
    kind = StoreUnusable if is_unusable(exc) else StoreError
    return kind(prefix + describe(exc))


class StoreHealth:
    """Whether the state store's last operation failed, since when and why; thread-safe.

    Every failed operation is counted (``failures``), but an error is logged at most once per
    :data:`HEALTH_LOG_INTERVAL` seconds, whatever the reason and even across a quick recovery
    (a nearly full disk may let small writes through between failing ones), so a full disk under
    a thousand tenants is one error line a minute, not one traceback per tenant. The recovery is
    logged when it ends an outage whose error was logged.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0
        self.error: str | None = None
        self.since: dt.datetime | None = None
        self._logged_at: float | None = None
        self._outage_logged = False
        self._suppressed = 0
        self.unusable: str | None = None
        """Set when the database turned out corrupt while in use: no retry can cure that."""

    @property
    def failing(self) -> bool:
        """True from a failed operation until the next one that succeeds."""
        return self.error is not None

    def failed(self, error: str) -> None:
        with self._lock:
            self.failures += 1
            now = self._clock()
            if self.error is None:
                self.since = dt.datetime.now(dt.UTC)
            self.error = error
            if self._logged_at is not None and now - self._logged_at < HEALTH_LOG_INTERVAL:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._logged_at = self._suppressed, 0, now
            self._outage_logged = True
            since = self.since
        log.error(
            "state store failing: nothing new is stored until it recovers",
            error=error,
            since=since.isoformat() if since else None,
            similar_errors_not_logged=suppressed,
        )

    def succeeded(self) -> None:
        if self.error is None:  # the common case, without taking the lock
            return
        with self._lock:
            error, since, logged = self.error, self.since, self._outage_logged
            self.error = self.since = None
            self._outage_logged = False
        if logged:
            log.warning(
                "state store recovered",
                error_was=error,
                since=since.isoformat() if since else None,
            )


def keys_in(conn: Connection, tenant: Any, day: Any, keys: Sequence[Key]) -> ColumnElement[bool]:
    """``(tenant, day) IN keys``, or on SQLite a superset of it: the caller drops extra rows.

    SQLite answers a row-value ``IN`` list by scanning the whole table (every stored day, on
    every batch); ``tenant IN (...) AND day IN (...)`` is a primary-key search per pair instead.
    PostgreSQL gets the exact condition, so ``FOR UPDATE`` locks no other rows.
    """
    if conn.dialect.name != "sqlite":
        return tuple_(tenant, day).in_(keys)
    tenants = sorted({k[0] for k in keys})
    days = sorted({k[1] for k in keys})
    if len(tenants) * len(days) <= 8 * len(keys):
        return and_(tenant.in_(tenants), day.in_(days))
    # Scattered keys: the cross product would be mostly misses, so one search per tenant.
    by_tenant: dict[str, list[dt.date]] = {}
    for key_tenant, key_day in keys:
        by_tenant.setdefault(key_tenant, []).append(key_day)
    return or_(*(and_(tenant == name, day.in_(wanted)) for name, wanted in by_tenant.items()))


class StoreBase:
    """Engine, transactions and locking shared by every part of :class:`~collector.store.Store`."""

    def __init__(
        self, engine: Engine, *, display_url: str, clock: Callable[[], dt.datetime] = _utcnow
    ) -> None:
        self._engine = engine
        self._display_url = display_url
        self.health = StoreHealth()
        # state.raw_pii: applied to every fetched day before it is stored (None: kept as is).
        self.payload_policy: PayloadPolicy | None = None
        # The same policy for bodies kept unparsed (quarantined days): emails found by shape.
        self.body_policy: Callable[[bytes], bytes] | None = None
        self._state_lock: StateLock | None = None
        # A replica's fencing tokens (collector.store.fencing), put on every write; None: the
        # process is not a replica and is not fenced.
        self.fence: str | None = None
        # Write transactions the fencing trigger refused (the metric replica_fenced_writes_total).
        self.fenced_writes = 0
        self._fenced_lock = threading.Lock()
        # The tenants whose outboxes a replica's deliverer reads; None: every tenant.
        self.lease_scope: frozenset[str] | None = None
        self._now = clock
        # SQLite has one writer at a time: queueing ours here keeps them off busy_timeout.
        self._write_lock = anyio.Lock() if engine.dialect.name == "sqlite" else None
        self._closed = threading.Event()
        # Hot statements, compiled once: the dialect is fixed per store (see .hot).
        self._hot_statements: HotStatements | None = None

    def _hot(self, conn: Connection) -> HotStatements:
        """The store's hot statements, compiled for its dialect on first use."""
        hot = self._hot_statements
        if hot is None:
            hot = self._hot_statements = HotStatements(conn.dialect)
        return hot

    def __repr__(self) -> str:
        return f"Store({self._display_url})"

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        synchronous: str | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        exclusive: bool = False,
        shared_group: bool = False,
        idle_transaction_timeout: dt.timedelta = IDLE_TRANSACTION_TIMEOUT,
    ) -> Self:
        """Connect, create (or check the version of) the schema, and return a ready store.

        ``url``: ``sqlite:///relative/state.db``, ``sqlite:////absolute/state.db`` or
        ``postgresql+psycopg://user:password@host:5432/db``. For SQLite, ``synchronous`` is
        ``normal`` (default) or ``full``; the URL may also say ``?synchronous=full``.
        ``exclusive`` (SQLite): hold the state's lock file until :meth:`aclose`, refusing to open
        while another collector holds it. ``shared_group``: files and directories created are
        group-readable (``files.shared_group``). ``idle_transaction_timeout`` (PostgreSQL): the
        server ends a session of this store whose transaction sits idle longer.
        """
        # Abandoned when cancelled (a stop while a database does not answer the connect): the
        # thread ends with the driver's own timeout.
        return await run_sync(
            cls._open_sync,
            url,
            synchronous,
            clock,
            exclusive,
            shared_group,
            idle_transaction_timeout,
            abandon_on_cancel=True,
        )

    @classmethod
    def _open_sync(
        cls,
        url: str,
        synchronous: str | None,
        clock: Callable[[], dt.datetime],
        exclusive: bool,
        shared_group: bool,
        idle_transaction_timeout: dt.timedelta,
    ) -> Self:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise StoreError("state.url is not a database URL") from None
        display = parsed.render_as_string(hide_password=True)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise StoreError(f"state.url: unsupported database {backend!r} (sqlite, postgresql)")
        state_lock: StateLock | None = None
        try:
            if backend == "sqlite":
                engine, state_lock = cls._sqlite_engine(
                    parsed, synchronous, exclusive=exclusive, shared_group=shared_group
                )
            else:
                engine = cls._postgresql_engine(parsed, idle_transaction_timeout)
            store = cls(engine, display_url=display, clock=clock)
            store._state_lock = state_lock
            store._migrate()
            if state_lock is not None:
                state_lock.record(initialized=True)
        except SQLAlchemyError as exc:
            cls._release(state_lock)
            raise store_error(exc, f"{display}: ") from exc
        except OSError as exc:
            cls._release(state_lock)
            raise StoreError(f"state database {display}: {exc.strerror or exc}") from exc
        except ModuleNotFoundError as exc:
            cls._release(state_lock)
            raise StoreError(f"state.url needs the {exc.name!r} driver") from None
        except BaseException:
            cls._release(state_lock)
            raise
        return store

    @staticmethod
    def _release(state_lock: StateLock | None) -> None:
        if state_lock is not None:
            state_lock.release()

    @staticmethod
    def _postgresql_engine(url: URL, idle_transaction_timeout: dt.timedelta) -> Engine:
        engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
        idle_ms = max(1, round(idle_transaction_timeout.total_seconds() * 1000))

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Set for the session, outside any transaction (a SET inside one would be undone
            # by the rollback that ends it). Not in the URL's options: the user may set those.
            dbapi_connection.autocommit = True
            try:
                dbapi_connection.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
            finally:
                dbapi_connection.autocommit = False

        return engine

    @staticmethod
    def _sqlite_engine(
        url: URL, synchronous: str | None, *, exclusive: bool, shared_group: bool
    ) -> tuple[Engine, StateLock | None]:
        query = dict(url.query)
        mode = str(query.pop("synchronous", None) or synchronous or "normal").lower()
        if mode not in _SQLITE_SYNC:
            raise StoreError(f"state.url: synchronous must be one of {', '.join(_SQLITE_SYNC)}")
        url = url.set(query=query)
        if not url.database or url.database == ":memory:":
            raise StoreError("state.url: SQLite needs a file path, e.g. sqlite:///data/state.db")
        database = Path(url.database).expanduser()
        ensure_private_dir(database.parent, shared_group)
        state_lock = StateLock.acquire(database, shared_group=shared_group) if exclusive else None
        try:
            refuse_truncated(database)
            # Created here with the private mode before SQLite opens it: SQLite gives the -wal
            # and -shm files the database file's mode, whatever the umask.
            create_private_file(database, shared_group)
        except BaseException:
            if state_lock is not None:
                state_lock.release()
            raise
        engine = create_engine(
            url,
            hide_parameters=True,
            connect_args={"timeout": 5.0},
            # The most recently used connection first: the hot path runs on one or two of the
            # pooled connections, whose page caches and prepared statements stay warm, while
            # the others (opened when many tenants plan at once) keep little.
            pool_use_lifo=True,
        )
        pragma_sync = _SQLITE_SYNC[mode]

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # The driver must not emit BEGIN itself: we do (below), choosing the lock mode.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={pragma_sync}")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.execute("PRAGMA foreign_keys=ON")
            # Each pooled connection keeps its own page cache (SQLite's default: 2 MB). The hot
            # pages are the newest rows and their indexes; the OS cache serves the rest, so 1 MB
            # each costs no measurable CPU and keeps several connections' caches off the heap.
            cursor.execute(f"PRAGMA cache_size=-{_SQLITE_CACHE_KIB}")
            # Statement journals and sort trees in memory, not spilled to files under /var/tmp.
            cursor.execute("PRAGMA temp_store=MEMORY")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front, so a read-then-write transaction cannot be
            # overtaken by another process (e.g. `replay` from the CLI next to a running daemon).
            immediate = conn.get_execution_options().get("collector_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine, state_lock

    def _migrate(self) -> None:
        with self._engine.connect() as conn:
            conn.execution_options(collector_write=True)
            with conn.begin():
                prepare_migration(conn)
                metadata.create_all(conn, checkfirst=True)
                found = conn.execute(select(func.max(schema_version.c.version))).scalar()
                if found is not None and found > SCHEMA_VERSION:
                    raise StoreError(
                        f"the state database has schema version {found}, newer than this "
                        f"collector supports ({SCHEMA_VERSION}): upgrade the collector"
                    )
                if found is None or found < SCHEMA_VERSION:
                    # Version 2 (replica leases): create_all added the lease tables; the
                    # fencing trigger is installed here. A later version adds its steps after.
                    install_fencing(conn)
                    conn.execute(
                        schema_version.insert().values(
                            version=SCHEMA_VERSION, applied_at=self._now()
                        )
                    )
                conn.execute(
                    upsert(conn, store_meta, ["key"]),
                    [{"key": SEQ_KEY, "value": 0}, {"key": SINKS_GENERATION_KEY, "value": 0}],
                )

    def _run(
        self,
        fn: Callable[[Connection], T],
        write: bool,
        fenced: bool = True,
        one_statement: bool = False,
    ) -> T:
        if self._closed.is_set():
            raise StoreError("the state store is closed")
        try:
            with self._engine.connect() as conn:
                if write:
                    conn.execution_options(collector_write=True)
                elif one_statement and conn.dialect.name == "postgresql":
                    # A single SELECT is consistent on its own: without a transaction it is one
                    # statement for the server instead of three (BEGIN, it, COMMIT).
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                with conn.begin():
                    fence = self.fence
                    if write and fenced and fence is not None:
                        conn.execute(
                            text("SELECT set_config(:name, :fence, true)"),
                            {"name": FENCE_SETTING, "fence": fence},
                        )
                    result = fn(conn)
        except SQLAlchemyError as exc:
            stale = fencing_error(exc, describe(exc))
            if stale is not None:  # the database is fine: this replica lost the tenant's lease
                with self._fenced_lock:
                    self.fenced_writes += 1
                raise stale from exc
            error = store_error(exc)
            self.health.failed(str(error))
            if isinstance(error, StoreUnusable):
                self.health.unusable = str(error)
            raise error from exc
        if write:  # a read succeeds on a full disk too: only a write proves recovery
            self.health.succeeded()
        return result

    async def _read(self, fn: Callable[[Connection], T], *, one_statement: bool = False) -> T:
        """Run ``fn`` in a read transaction; ``one_statement``: ``fn`` runs a single statement,
        which then needs no transaction (PostgreSQL)."""
        # A cancelled read is abandoned: its thread only reads, and the caller moves on at once.
        return await run_sync(self._run, fn, False, True, one_statement, abandon_on_cancel=True)

    async def _write(self, fn: Callable[[Connection], T], *, fenced: bool = True) -> T:
        """Run ``fn`` in a write transaction; ``fenced=False`` only for writes that are no
        tenant's work (registering sinks), which a replica makes for every tenant."""
        lock = self._write_lock or contextlib.nullcontext()
        async with lock:
            # A cancelled write waits for its transaction to end (a few milliseconds): the write
            # lock must not pass to the next writer while this one still holds SQLite's lock.
            return await run_sync(self._run, fn, True, fenced)

    def private(
        self, items: Sequence[tuple[TenantDay, StoredPayload]]
    ) -> Sequence[tuple[TenantDay, StoredPayload]]:
        """``items`` as :attr:`payload_policy` lets them be stored (``state.raw_pii``)."""
        policy = self.payload_policy
        return items if policy is None else [policy(td, data) for td, data in items]

    async def ping(self) -> None:
        """Raise :class:`StoreError` unless the database answers (for ``/readyz``).

        While :attr:`health` says the store is failing, the ping is a small write (the
        ``health_probe`` row of ``store_meta``), since a full disk still answers reads: a
        successful probe ends the outage, so readiness returns when space does.
        """
        if not self.health.failing:
            await self._read(lambda conn: conn.execute(select(1)).scalar(), one_statement=True)
            return
        stamp = int(self._now().timestamp())
        await self._write(
            lambda conn: conn.execute(
                upsert(conn, store_meta, ["key"], columns=["value"]),
                [{"key": "health_probe", "value": stamp}],
            )
        )

    async def aclose(self) -> None:
        """Close the pooled connections and give up the lock; the store cannot be used
        afterwards."""
        if not self._closed.is_set():
            self._closed.set()
            await run_sync(self._engine.dispose)
            if self._state_lock is not None:
                self._state_lock.release()
