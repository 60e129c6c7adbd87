"""The tables replicas coordinate through, and fencing: the part of :mod:`.leases` that
:mod:`.base` needs to create the schema and run write transactions (so no import cycle).

See :mod:`collector.store.leases` for how they are used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from sqlalchemy import BigInteger, Column, Connection, Integer, String, Table, text
from sqlalchemy.exc import SQLAlchemyError

from collector.errors import StoreError
from collector.store.schema import Tenant, UtcDateTime, metadata

FENCE_SETTING = "collector.fence"
FENCE_SQLSTATE = "ZCF01"
"""The SQLSTATE the fencing trigger raises: :func:`fencing_error` recognises it."""

MIGRATION_LOCK = 0x5A43_0001
"""Advisory lock key that serializes schema migrations of replicas starting together."""

replica = Table(
    "replica",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
)

tenant_lease = Table(
    "tenant_lease",
    metadata,
    Column("tenant", Tenant, primary_key=True),
    Column("replica", String(200)),  # NULL: free
    Column("token", BigInteger, nullable=False, default=0),  # fencing token, +1 per acquisition
    Column("acquired_at", UtcDateTime),
    Column("expires_at", UtcDateTime),
    info={"coordination": True},  # no tenant data: `tenant export`/`purge` leave it alone
)

FENCED_TABLES = ("tenant_day", "delivery", "tenant_status")

# Spells out FENCE_SETTING and FENCE_SQLSTATE (tests check they agree).
_FENCE_FUNCTION = """CREATE OR REPLACE FUNCTION collector_check_fence() RETURNS trigger AS $$
DECLARE
    fence jsonb := nullif(current_setting('collector.fence', true), '')::jsonb;
    held RECORD;
BEGIN
    IF fence IS NULL THEN
        RETURN NEW;
    END IF;
    SELECT replica, token INTO held FROM tenant_lease WHERE tenant = NEW.tenant FOR SHARE;
    IF held.replica IS DISTINCT FROM fence ->> 'replica'
       OR held.token IS DISTINCT FROM (fence -> 'tokens' ->> NEW.tenant)::bigint THEN
        RAISE EXCEPTION 'stale fencing token: replica % holds no current lease of tenant % '
            '(its token %, the lease''s %)', fence ->> 'replica', NEW.tenant,
            coalesce(fence -> 'tokens' ->> NEW.tenant, 'none'), coalesce(held.token::text, 'none')
            USING ERRCODE = 'ZCF01';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql
"""


class StaleLease(StoreError):
    """A write carried a fencing token that is no longer the lease's: another replica holds
    that tenant now. Nothing of the transaction was written."""


class LeasesUnsupported(StoreError):
    """Leases need PostgreSQL."""


def fencing_error(exc: SQLAlchemyError, message: str) -> StoreError | None:
    """:class:`StaleLease` when ``exc`` is the fencing trigger's refusal, else None."""
    if getattr(getattr(exc, "orig", None), "sqlstate", None) == FENCE_SQLSTATE:
        return StaleLease(message)
    return None


def prepare_migration(conn: Connection) -> None:
    """Before the schema is checked: one migrating replica at a time (PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def install_fencing(conn: Connection) -> None:
    """The fencing trigger on every fenced table (PostgreSQL; idempotent). The lease tables
    themselves are created with the others by ``create_all``."""
    if conn.dialect.name != "postgresql":
        return
    conn.execute(text(_FENCE_FUNCTION))  # text(): the % of RAISE are escaped for the driver
    for table in FENCED_TABLES:
        conn.exec_driver_sql(
            f"CREATE OR REPLACE TRIGGER {table}_fence BEFORE INSERT OR UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION collector_check_fence()"
        )


def fence_document(replica_id: str, tokens: Mapping[str, int]) -> str:
    """The ``collector.fence`` setting: who writes, and the token of each lease it holds."""
    return json.dumps({"replica": replica_id, "tokens": dict(tokens)}, separators=(",", ":"))
