"""The config models: documented defaults, durations, listen/state values, tenant overrides."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tests.config_helpers import TENANT, WebhookTestConfig, load, problems, write

# --- defaults and values ------------------------------------------------------------------------


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    """A file with one tenant gets every documented default."""
    cfg = load(write(tmp_path, TENANT))
    assert cfg.api.base_url == "https://api.zencoder.ai"
    assert cfg.api.token_url == "https://fe.zencoder.ai/oauth/token"
    assert cfg.api.timeout == dt.timedelta(seconds=30)
    assert cfg.api.max_concurrency == 64
    assert (cfg.api.rate_limit.per_second, cfg.api.rate_limit.burst) == (2.0, 5)
    assert cfg.api.global_rate_limit is None
    assert cfg.api.retry.max_attempts == 5
    assert cfg.api.retry.max_time == dt.timedelta(seconds=60)
    assert cfg.api.retry.backoff_initial == dt.timedelta(seconds=0.5)
    assert cfg.api.retry.backoff_max == dt.timedelta(seconds=30)
    assert (cfg.collection.lookback_days, cfg.collection.settle_days) == (30, 2)
    assert cfg.collection.schedule.every == dt.timedelta(hours=1)
    assert cfg.collection.schedule.cron is None
    assert cfg.collection.schedule.jitter == dt.timedelta(minutes=5)
    assert cfg.state.url == "sqlite:///data/state.db"
    assert cfg.state.payload_retention_days is None
    assert cfg.server.listen == "127.0.0.1:9464"
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 9464)
    assert cfg.sinks == {}
    [tenant] = cfg.tenants
    assert (tenant.id, tenant.name, tenant.auth_mode, tenant.enabled) == (
        "acme",
        "acme",
        "api_key",
        True,
    )


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1d", 86400),
        ("1h30m", 5400),
        ("45", 45),
        (45, 45),
        (1.5, 1.5),
    ],
)
def test_durations_accept_units_and_seconds(
    tmp_path: Path, written: object, seconds: float
) -> None:
    """Durations are written with ms/s/m/h/d units or as a number of seconds."""
    path = write(tmp_path, f"api: {{timeout: {written}}}\n{TENANT}")
    assert load(path).api.timeout == dt.timedelta(seconds=seconds)


def test_sink_timedelta_fields_accept_config_durations(tmp_path: Path) -> None:
    """A sink's plain timedelta fields take "30s"-style durations like the rest of the file."""
    path = write(
        tmp_path,
        """\
        sinks:
          hook: {type: webhook, url: "https://h.example", secret: s3cret, request_timeout: 2m,
                 timeout: 90s}
        """,
    )
    hook = load(path).sinks["hook"]
    assert isinstance(hook, WebhookTestConfig)
    assert (hook.request_timeout, hook.timeout) == (
        dt.timedelta(minutes=2),
        dt.timedelta(seconds=90),
    )


def test_server_listen_null_disables_and_ipv6_parses(tmp_path: Path) -> None:
    """server.listen null disables the ops server; [::]:PORT gives host :: and the port."""
    assert load(write(tmp_path, f"server: {{listen: null}}\n{TENANT}")).server.listen is None
    ipv6 = load(write(tmp_path, f"server: {{listen: '[::]:9000'}}\n{TENANT}")).server
    assert (ipv6.host, ipv6.port) == ("::", 9000)


def test_state_password_goes_into_the_connection_url_and_is_a_secret(tmp_path: Path) -> None:
    """state.password is put into the connection URL; a password inline in the URL is a secret
    value too (redacted from every log line)."""
    (tmp_path / "pg").write_text("p@ss/word\n")
    path = write(
        tmp_path,
        f"""\
        state:
          url: postgresql+psycopg://collector@db:5432/zc
          password_file: {tmp_path / "pg"}
        """,
        TENANT,
    )
    state = load(path).state
    assert state.connection_url() == "postgresql+psycopg://collector:p%40ss%2Fword@db:5432/zc"
    assert "p@ss/word" in state.secret_values()
    inline = load(write(tmp_path, f"state: {{url: 'postgresql://u:hunter22@db/zc'}}\n{TENANT}"))
    assert "hunter22" in inline.secret_values()


# --- tenants and effective values ---------------------------------------------------------------


def test_tenant_overrides_and_effective_values(tmp_path: Path) -> None:
    """Per-tenant overrides win; unspecified keys fall back to the global defaults."""
    path = write(
        tmp_path,
        """\
        api: {rate_limit: {per_second: 4, burst: 8}}
        collection: {lookback_days: 20, settle_days: 3, schedule: {every: 30m, jitter: 1m}}
        sinks:
          warehouse: {type: sqlite, path: x.db}
          sheets: {type: csv, path: out}
        tenants:
          - {id: plain, api_key: k1}
          - id: custom
            api_key: k2
            rate_limit: {per_second: 1}
            lookback_days: 2
            schedule: {cron: "0 * * * *"}
            sinks: [sheets]
          - {id: short, api_key: k3, lookback_days: 1, schedule: {jitter: 0}}
        """,
    )
    cfg = load(path)
    plain, custom, short = cfg.tenants
    assert cfg.tenant_rate_limit(plain).model_dump() == {"per_second": 4.0, "burst": 8}
    assert cfg.tenant_rate_limit(custom).model_dump() == {"per_second": 1.0, "burst": 8}
    assert (cfg.tenant_lookback(plain), cfg.tenant_lookback(custom)) == (20, 2)
    assert (cfg.tenant_settle(plain), cfg.tenant_settle(custom), cfg.tenant_settle(short)) == (
        3,
        2,
        1,
    )
    custom_schedule = cfg.tenant_schedule(custom)
    assert (custom_schedule.every, custom_schedule.cron) == (None, "0 * * * *")
    assert custom_schedule.jitter == dt.timedelta(minutes=1)
    short_schedule = cfg.tenant_schedule(short)
    assert (short_schedule.every, short_schedule.jitter) == (
        dt.timedelta(minutes=30),
        dt.timedelta(0),
    )
    assert cfg.tenant_schedule(plain) == cfg.collection.schedule
    assert cfg.tenant_sinks(plain) == ["warehouse", "sheets"]
    assert cfg.tenant_sinks(custom) == ["sheets"]
    assert cfg.tenant("custom") is custom


def test_credentials_fingerprint_follows_credentials(tmp_path: Path) -> None:
    """Equal credentials give equal fingerprints; any change gives a different one."""
    path = write(
        tmp_path,
        """\
        tenants:
          - {id: a, client_id: c, client_secret: s}
          - {id: b, client_id: c, client_secret: s}
          - {id: c, client_id: c, client_secret: t}
          - {id: d, client_id: d, client_secret: s}
        """,
    )
    a, b, c, d = (t.credentials_fingerprint for t in load(path).tenants)
    assert a == b
    assert len({a, c, d}) == 3
    assert "s" not in {a, c, d}


def test_raw_pii_pseudonymize_needs_a_key(tmp_path: Path) -> None:
    """state.raw_pii: pseudonymize without pii_key is a problem at the state section; with a
    pii_key_file the key is read from the file and treated as a secret."""
    path = write(tmp_path, "state: {raw_pii: pseudonymize}\n", TENANT)
    assert problems(path) == [
        f"{path}:1: state: raw_pii: pseudonymize needs a non-empty pii_key (or pii_key_file)"
    ]
    key = tmp_path / "state-key"
    key.write_text("state-pii-key\n")
    path = write(tmp_path, f"state: {{raw_pii: pseudonymize, pii_key_file: {key}}}\n", TENANT)
    config = load(path)
    assert config.state.raw_pii == "pseudonymize"
    assert "state-pii-key" in config.secret_values()
    assert "state-pii-key" not in repr(config)


async def test_a_partial_rate_limit_override_inherits_the_other_keys(tmp_path: Path) -> None:
    """A tenant giving only per_second keeps api.rate_limit's burst, where the client reads it."""
    from collector.ratelimit import Rate, TokenBucket

    cfg = load(
        write(
            tmp_path,
            """\
            api: {rate_limit: {per_second: 4, burst: 8}}
            tenants:
              - {id: slow, api_key: k1, rate_limit: {per_second: 1}}
              - {id: wide, api_key: k2, rate_limit: {burst: 2}}
            """,
        )
    )
    slow, wide = cfg.tenants
    assert slow.rate_limit is not None
    assert wide.rate_limit is not None
    assert (slow.rate_limit.per_second, slow.rate_limit.burst) == (1.0, 8)
    assert (wide.rate_limit.per_second, wide.rate_limit.burst) == (4.0, 2)
    # The bucket built from what the API client reads (tenant.rate_limit) holds the api's burst:
    # with the clock standing still, 8 requests pass at once and the 9th waits a second.
    bucket = TokenBucket(Rate.of(slow.rate_limit), clock=lambda: 100.0)
    assert [await bucket.acquire() for _ in range(8)] == [0.0] * 8
    assert bucket.delay() == 1.0


def test_history_days_defaults_to_the_api_window_and_is_bounded(tmp_path: Path) -> None:
    """api.history_days is 90 unless set; zero is refused with its path."""
    assert load(write(tmp_path, TENANT)).api.history_days == 90
    assert load(write(tmp_path, "api: {history_days: 30}\n", TENANT)).api.history_days == 30
    found = problems(write(tmp_path, "api: {history_days: 0}\n", TENANT))
    assert len(found) == 1
    assert "api.history_days" in found[0]
