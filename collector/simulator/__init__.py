"""A fake Zencoder Analytics API for tests, benchmarks and ``zencoder-collector simulate``.

It imitates the Zencoder API notes exactly: ``POST /oauth/token`` (client_credentials, JSON
or form body) and ``GET /api/v1/data/usage`` (``period`` or ``day``; Bearer token or
``zencoder-api-key``), with every documented error body verbatim. Figures are deterministic per
(seed, tenant, day), realistic (8..60 people per org, several IDEs and languages, quiet weekends)
and consistent: a ``period=`` answer equals the union of the matching ``day=`` answers.

::

    async with running_simulator(SimulatorSettings(tenants=demo_tenants(3))) as sim:
        sim.base_url, sim.token_url          # http://127.0.0.1:PORT, .../oauth/token
        sim.day_data("tenant-01", day)       # what a day= request returns
        sim.faults.set("tenant-02", latency=0.2, rate_limit=5)
        sim.stats.usage_requests["tenant-02"]

Fault knobs (``sim.faults``; per tenant with ``faults.tenant(id)`` / ``faults.set(id, ...)``, for
everyone with ``faults.everyone`` / ``faults.set(None, ...)``; ``None`` inherits):

usage endpoint (:class:`UsageFaults`)
    ``latency`` (s), ``failure_rate`` (share of 500 "Failed to fetch data", seeded dice),
    ``rate_limit`` (requests/s per tenant) and ``rate_limit_burst`` (429 "Too many requests" with
    Retry-After), ``retry_after_format`` (``"seconds"`` | ``"http-date"``), ``retry_after_value``
    (raw header value such as ``"soon"`` or ``"86400"``; ``""`` omits the header),
    ``retry_after_seconds`` (announced by ``throttle_next``/``unavailable``), ``down`` (every
    request 500), ``unavailable`` (every request 503 with Retry-After), ``forbidden`` (403),
    ``bad_response`` (a 200 with a defect: ``malformed_json``, ``html_200``, ``missing_fields``,
    ``wrong_types``, ``negative_numbers``, ``wrong_day``, ``empty_body``), ``variant`` (every good
    ``day=`` answer served as an API variant the documentation allows or a gateway causes:
    :data:`VARIANTS`, e.g. ``datetime_last_active``, ``unknown_fields``, ``html_502``, ``gzip``;
    also settable per tenant as ``SimTenant.variant``), and the one-shot counters ``fail_next``,
    ``throttle_next``, ``unavailable_next``.
token endpoint (:class:`TokenFaults`, per client_id: ``faults.client(id)``, ``faults.set_token``)
    ``delay`` (s), ``fail`` (500), ``locked_out`` (400 "User is locked out"), ``expires_in`` (any
    JSON value announced instead of ``token_lifetime``, or :data:`OMIT` to leave it out),
    ``lifetime`` (how long new tokens really live), ``fail_next``.
tokens
    ``faults.revoke_tokens(tenant_id)`` (``None``: everyone) makes every token issued so far 401;
    ``faults.reject_all_tokens = True`` makes every Bearer request 401, even with fresh tokens.
data
    ``sim.change_day(tenant_id, day)`` changes that day's figures from now on (a late correction).

Stats (``sim.stats``, :class:`SimStats`): ``token_requests`` (Counter by client_id),
``token_responses`` and ``responses`` (Counters by status), ``tokens_issued`` and
``usage_requests`` (Counters by tenant id), ``max_in_flight`` and ``max_in_flight_by_tenant``,
and ``log``: a bounded deque of :class:`RequestRecord` (monotonic time, tenant, day-or-period,
status) in arrival order (``stats.log_enabled = False`` turns it off; ``stats.reset()``).
"""

from collector.simulator.app import (
    PERIODS,
    TOKEN_PATH,
    USAGE_PATH,
    Simulator,
    running_simulator,
    serve,
)
from collector.simulator.faults import (
    BAD_RESPONSE_MODES,
    DEFAULT,
    OMIT,
    Faults,
    TokenFaults,
    UsageFaults,
)
from collector.simulator.settings import (
    DEMO_CREDENTIALS_RULE,
    SimTenant,
    SimulatorSettings,
    demo_tenants,
    load_tenants_file,
)
from collector.simulator.stats import RequestRecord, SimStats
from collector.simulator.variants import VARIANTS, VariantAnswer, variant_answer

__all__ = [
    "BAD_RESPONSE_MODES",
    "DEFAULT",
    "DEMO_CREDENTIALS_RULE",
    "OMIT",
    "PERIODS",
    "TOKEN_PATH",
    "USAGE_PATH",
    "VARIANTS",
    "Faults",
    "RequestRecord",
    "SimStats",
    "SimTenant",
    "Simulator",
    "SimulatorSettings",
    "TokenFaults",
    "UsageFaults",
    "VariantAnswer",
    "demo_tenants",
    "load_tenants_file",
    "running_simulator",
    "serve",
    "variant_answer",
]
