"""Who the simulated API knows (tenants and their credentials) and how it behaves by default."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import yaml

from collector.simulator.variants import VARIANTS

DEMO_CREDENTIALS_RULE = (
    "tenant ids tenant-01..tenant-NN; client_id '<id>-client', client_secret '<id>-secret', "
    "api_key 'zak_test_<id>'"
)


@dataclass(frozen=True)
class SimTenant:
    """One organization the simulator serves, with both kinds of credentials.

    ``users`` is the size of the organization; by default it is derived from the id (8..60).
    ``variant`` serves every ``day=`` answer as that API variant
    (:data:`~collector.simulator.variants.VARIANTS`), e.g. ``datetime_last_active``.
    """

    id: str
    client_id: str
    client_secret: str
    api_key: str | None = None
    users: int | None = None
    variant: str | None = None

    def __repr__(self) -> str:
        # The simulator's own secrets are fake, but a repr is how secrets leak, so keep the habit.
        return (
            f"SimTenant(id={self.id!r}, client_id={self.client_id!r}, users={self.users!r}, "
            f"variant={self.variant!r})"
        )


@dataclass
class SimulatorSettings:
    """Defaults the simulator starts with; runtime changes go through ``Simulator.faults``.

    ``latency`` is seconds added to every usage response, ``failure_rate`` the share of usage
    requests answered 500 "Failed to fetch data", ``rate_limit`` usage requests per second per
    tenant (over it: 429 with Retry-After), ``token_lifetime`` the seconds a token stays valid and
    the ``expires_in`` the token endpoint announces, ``today`` the simulated UTC date (None: the
    real UTC date at each request), ``history_days`` how far back days have data, ``seed`` the
    seed of every generated figure and of the failure dice, ``request_log_size`` how many requests
    ``stats.log`` keeps, ``body_cache_size`` how many serialized ``day=`` bodies stay cached.
    """

    tenants: list[SimTenant]
    latency: float = 0.0
    failure_rate: float = 0.0
    rate_limit: float | None = None
    token_lifetime: int = 86400
    today: dt.date | None = None
    history_days: int = 90
    seed: int = 0
    request_log_size: int = 200_000
    body_cache_size: int = 8192


def demo_tenants(n: int) -> list[SimTenant]:
    """``n`` tenants following the demo credentials rule (``tenant-01``, ``tenant-02``, ...)."""
    tenants = []
    for i in range(1, n + 1):
        tenant_id = f"tenant-{i:02d}"
        tenants.append(
            SimTenant(
                id=tenant_id,
                client_id=f"{tenant_id}-client",
                client_secret=f"{tenant_id}-secret",
                api_key=f"zak_test_{tenant_id}",
            )
        )
    return tenants


def load_tenants_file(path: str | Path) -> list[SimTenant]:
    """Read tenants from YAML: a list (or a ``tenants:`` list) of mappings with an ``id``.

    ``client_id``, ``client_secret`` and ``api_key`` default to the demo rule for that id, so a
    file may list only ids, org sizes (``users``) and API variants (``variant``).
    """
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if isinstance(raw, dict):
        raw = raw.get("tenants")
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of tenants or a 'tenants:' list")  # noqa: TRY004 (bad file content, not a bad argument)
    tenants = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            raise ValueError(f"{path}: tenant #{index + 1} needs a non-empty string 'id'")
        tenant_id = item["id"]
        if tenant_id in seen:
            raise ValueError(f"{path}: tenant id {tenant_id!r} appears twice")
        seen.add(tenant_id)
        users = item.get("users")
        if users is not None and (not isinstance(users, int) or users < 0):
            raise ValueError(
                f"{path}: tenant {tenant_id!r}: 'users' must be a non-negative integer"
            )
        variant = item.get("variant")
        if variant is not None and variant not in VARIANTS:
            raise ValueError(
                f"{path}: tenant {tenant_id!r}: unknown variant {variant!r}; "
                f"known: {', '.join(VARIANTS)}"
            )
        tenants.append(
            SimTenant(
                id=tenant_id,
                client_id=str(item.get("client_id", f"{tenant_id}-client")),
                client_secret=str(item.get("client_secret", f"{tenant_id}-secret")),
                api_key=str(item.get("api_key", f"zak_test_{tenant_id}")),
                users=users,
                variant=variant,
            )
        )
    return tenants
