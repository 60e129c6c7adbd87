"""The config loader: defaults, interpolation, secret files, and one located message per problem."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import textwrap
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from collector.config import (
    AppConfig,
    GenericSinkConfig,
    TenantConfig,
    json_schema,
    load_config,
    summarize,
)
from collector.errors import ConfigError
from collector.log import redact
from collector.simulator import demo_tenants
from collector.sink import Sink, SinkConfig

REPO = Path(__file__).resolve().parent.parent


class SqliteTestConfig(SinkConfig):
    """A stand-in sqlite sink config: a path is required."""

    type: Literal["sqlite"] = "sqlite"
    path: str


class CsvTestConfig(SinkConfig):
    """A stand-in csv sink config."""

    type: Literal["csv"] = "csv"
    path: str


class WebhookTestConfig(SinkConfig):
    """A stand-in webhook sink config with a secret and a timedelta field."""

    type: Literal["webhook"] = "webhook"
    url: str
    secret: SecretStr
    request_timeout: dt.timedelta = dt.timedelta(seconds=10)


SINK_TYPES: dict[str, type[SinkConfig]] = {
    "sqlite": SqliteTestConfig,
    "csv": CsvTestConfig,
    "webhook": WebhookTestConfig,
}

TENANT = "tenants:\n  - {id: acme, api_key: zak_acme_key}\n"


def write(tmp_path: Path, *parts: str, name: str = "collector.yaml") -> Path:
    """Write the dedented parts one after another as the config file."""
    path = tmp_path / name
    path.write_text("".join(textwrap.dedent(part) for part in parts))
    return path


def load(path: Path, env: dict[str, str] | None = None, sink_types: Any = SINK_TYPES) -> AppConfig:
    return load_config(path, environ=env or {}, sink_types=sink_types)


def problems(
    path: Path, env: dict[str, str] | None = None, sink_types: Any = SINK_TYPES
) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, env, sink_types)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return [str(p) for p in caught.value.problems]


def real_sink_types() -> dict[str, type[SinkConfig]]:
    """The first-party sinks' own Config models, found on their Sink classes."""
    found: dict[str, type[SinkConfig]] = {}
    for module_name in ("sqlite", "csv", "s3", "webhook"):
        module = importlib.import_module(f"collector_sinks.{module_name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Sink) and value.type_name:
                found[value.type_name] = value.Config
    return found


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


def test_state_password_goes_into_url_but_never_into_redacted_url(tmp_path: Path) -> None:
    """state.password is put into the connection URL only; redacted_url hides inline passwords."""
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
    assert state.redacted_url == "postgresql+psycopg://collector@db:5432/zc"
    inline = load(write(tmp_path, f"state: {{url: 'postgresql://u:hunter22@db/zc'}}\n{TENANT}"))
    assert inline.state.redacted_url == "postgresql://u:***@db/zc"
    assert "hunter22" in inline.secret_values()


# --- interpolation ------------------------------------------------------------------------------


def test_interpolation_forms(tmp_path: Path) -> None:
    """${VAR}, ${VAR:-default}, $$ and a lone $ behave as documented, in any string."""
    path = write(
        tmp_path,
        """\
        api:
          base_url: http://${HOST}:${PORT:-8080}/
          max_concurrency: ${CONCURRENCY}
        tenants:
          - id: ${TENANT_ID:-fallback}
            name: "costs $$5 and $HOME stays"
            client_id: pre-${EMPTY:-dflt}-post
            client_secret: ${SECRET}
        """,
    )
    cfg = load(path, {"HOST": "sim.local", "CONCURRENCY": "12", "EMPTY": "", "SECRET": "x$y"})
    assert cfg.api.base_url == "http://sim.local:8080"
    assert cfg.api.max_concurrency == 12
    tenant = cfg.tenants[0]
    assert (tenant.id, tenant.name) == ("fallback", "costs $5 and $HOME stays")
    assert tenant.client_id == "pre-dflt-post"
    assert tenant.client_secret is not None
    assert tenant.client_secret.get_secret_value() == "x$y"


def test_missing_env_var_is_named_with_its_line(tmp_path: Path) -> None:
    """An unset ${VAR} is an error naming the variable at the line that uses it."""
    path = write(
        tmp_path,
        """\
        tenants:
          - id: acme
            client_id: ${ACME_CLIENT_ID}
            client_secret: fixed
        """,
    )
    assert problems(path) == [
        f"{path}:3: tenants[0].client_id: environment variable ACME_CLIENT_ID is not set"
    ]


def test_required_var_shows_its_message(tmp_path: Path) -> None:
    """${VAR:?message} unset or empty fails with the message written in the file."""
    path = write(
        tmp_path,
        """\
        tenants:
          - id: globex
            api_key: ${GLOBEX_KEY:?ask ops for the Globex key}
        """,
    )
    expected = [
        f"{path}:3: tenants[0].api_key: environment variable GLOBEX_KEY is not set: "
        "ask ops for the Globex key"
    ]
    assert problems(path) == expected
    assert problems(path, {"GLOBEX_KEY": ""}) == expected


def test_malformed_reference_is_reported(tmp_path: Path) -> None:
    """A '${' without '}' or with a bad name is reported, with the '$$' hint."""
    path = write(tmp_path, "api:\n  base_url: http://x/${oops\n  token_url: http://${1BAD}/t\n")
    assert problems(path) == [
        f"{path}:2: api.base_url: unterminated '${{' (write '$$' for a literal dollar sign)",
        f"{path}:3: api.token_url: invalid reference '${{1BAD}}': "
        "expected ${NAME}, ${NAME:-default} or ${NAME:?message}",
    ]


# --- secret files -------------------------------------------------------------------------------


def test_secret_files_are_read_without_one_trailing_newline(tmp_path: Path) -> None:
    """<key>_file reads the value from a file, dropping exactly one trailing newline."""
    (tmp_path / "secret").write_text("s3cr3t-from-file\n")
    (tmp_path / "key").write_text("zak_two_lines\n\n")
    (tmp_path / "hook").write_text("whook-secret")
    path = write(
        tmp_path,
        f"""\
        sinks:
          hook: {{type: webhook, url: "https://h.example", secret_file: {tmp_path / "hook"}}}
        tenants:
          - {{id: a, client_id: cid, client_secret_file: {tmp_path / "secret"}}}
          - {{id: b, api_key_file: {tmp_path / "key"}}}
        """,
    )
    cfg = load(path)
    first, second = cfg.tenants
    assert first.client_secret is not None
    assert second.api_key is not None
    assert first.client_secret.get_secret_value() == "s3cr3t-from-file"
    assert first.client_secret_file == str(tmp_path / "secret")
    assert second.api_key.get_secret_value() == "zak_two_lines\n"
    hook = cfg.sinks["hook"]
    assert isinstance(hook, WebhookTestConfig)
    assert hook.secret.get_secret_value() == "whook-secret"


def test_unreadable_secret_file_names_path_and_reason(tmp_path: Path) -> None:
    """A secret file that cannot be read is reported with its path and the OS reason only."""
    missing = tmp_path / "nope"
    path = write(
        tmp_path,
        f"""\
        tenants:
          - id: acme
            client_id: cid
            client_secret_file: {missing}
          - id: globex
            api_key_file: {tmp_path}
        """,
    )
    assert problems(path) == [
        f"{path}:4: tenants[0].client_secret_file: cannot read secret file {missing}: "
        "No such file or directory",
        f"{path}:6: tenants[1].api_key_file: cannot read secret file {tmp_path}: Is a directory",
    ]


def test_empty_secret_file_is_an_error(tmp_path: Path) -> None:
    """An empty secret file is a mistake, reported as such."""
    (tmp_path / "empty").write_text("\n")
    path = write(tmp_path, f"tenants:\n  - id: a\n    api_key_file: {tmp_path / 'empty'}\n")
    assert problems(path) == [
        f"{path}:3: tenants[0].api_key_file: secret file {tmp_path / 'empty'} is empty"
    ]


def test_secret_and_secret_file_together_is_an_error(tmp_path: Path) -> None:
    """Giving both client_secret and client_secret_file is an error at the _file key."""
    (tmp_path / "s").write_text("x")
    path = write(
        tmp_path,
        f"""\
        tenants:
          - id: acme
            client_id: cid
            client_secret: inline
            client_secret_file: {tmp_path / "s"}
        """,
    )
    assert problems(path) == [
        f"{path}:5: tenants[0].client_secret_file: give either client_secret or "
        "client_secret_file, not both"
    ]


def test_reload_secrets_notices_a_rotated_file(tmp_path: Path) -> None:
    """reload_secrets re-reads secret files, says whether anything changed, survives a gap."""
    secret = tmp_path / "acme"
    secret.write_text("first-secret\n")
    path = write(
        tmp_path, f"tenants:\n  - {{id: acme, client_id: c, client_secret_file: {secret}}}\n"
    )
    tenant = load(path).tenants[0]
    before = tenant.credentials_fingerprint
    assert tenant.reload_secrets() is False
    secret.write_text("second-secret\n")
    assert tenant.reload_secrets() is True
    assert tenant.client_secret is not None
    assert tenant.client_secret.get_secret_value() == "second-secret"
    assert tenant.credentials_fingerprint != before
    assert redact("token for second-secret") == "token for ***"  # the new secret is hidden in logs
    assert tenant.reload_secrets() is False
    secret.unlink()  # mid-rotation: the previous value stays
    assert tenant.reload_secrets() is False
    assert tenant.client_secret.get_secret_value() == "second-secret"


def test_secrets_never_show_in_repr_str_or_dumps(tmp_path: Path) -> None:
    """SecretStr keeps secrets out of repr, str, model_dump_json and error messages."""
    (tmp_path / "hook").write_text("hook-canary-7f3a")
    path = write(
        tmp_path,
        f"""\
        sinks:
          hook: {{type: webhook, url: "https://h.example", secret_file: {tmp_path / "hook"}}}
        tenants:
          - {{id: a, client_id: cid, client_secret: oauth-canary-91be}}
          - {{id: b, api_key: zak_canary_55d1}}
        """,
    )
    cfg = load(path)
    canaries = ["hook-canary-7f3a", "oauth-canary-91be", "zak_canary_55d1"]
    rendered = [repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.model_dump())]
    rendered += [repr(t) for t in cfg.tenants]
    for text in rendered:
        for canary in canaries:
            assert canary not in text
    assert sorted(cfg.secret_values()) == sorted(canaries)
    broken = path.read_text() + "  - {id: c, api_key: zak_canary_55d1, client_id: x}\n"
    errors = "\n".join(problems(write(tmp_path, broken)))
    assert "tenants[2]" in errors
    assert all(canary not in errors for canary in canaries)


def test_secret_values_cover_every_secret_field(tmp_path: Path) -> None:
    """secret_values lists tenant secrets, sink secrets (pii_key too) and the state password."""
    path = write(
        tmp_path,
        """\
        state: {url: "postgresql://zc@db/zc", password: pg-canary}
        sinks:
          w: {type: sqlite, path: x.db, pii: pseudonymize, pii_key: pii-canary}
          hook: {type: webhook, url: "https://h.example", secret: hook-canary}
        tenants:
          - {id: a, client_id: not-a-secret, client_secret: oauth-canary}
          - {id: b, api_key: key-canary}
        """,
    )
    assert sorted(load(path).secret_values()) == sorted(
        ["pg-canary", "pii-canary", "hook-canary", "oauth-canary", "key-canary"]
    )


# --- located problems ---------------------------------------------------------------------------


def test_malformed_yaml_gives_the_parser_line(tmp_path: Path) -> None:
    """Broken YAML is one problem at the line the parser stopped."""
    path = write(tmp_path, "api:\n  timeout: 30s\n  base_url: [unclosed\ncollection: {}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}:4: <root>: invalid YAML: ")


def test_unreadable_config_file(tmp_path: Path) -> None:
    """A config file that does not exist is reported without a line."""
    missing = tmp_path / "absent.yaml"
    assert problems(missing) == [
        f"{missing}:?: <root>: cannot read the file: No such file or directory"
    ]


def test_unknown_key_is_reported_at_its_line_with_a_suggestion(tmp_path: Path) -> None:
    """An unknown key is reported at its own line, with the closest known key or the list."""
    path = write(
        tmp_path,
        """\
        api:
          timeout: 30s
          bogus: 1
        collection:
          lookback_day: 30
        """,
        TENANT,
    )
    assert problems(path) == [
        f"{path}:3: api.bogus: unknown key; expected one of: base_url, token_url, timeout, "
        "max_concurrency, rate_limit, global_rate_limit, retry",
        f"{path}:5: collection.lookback_day: unknown key; did you mean 'lookback_days'?",
    ]


def test_wrong_type_and_bad_values(tmp_path: Path) -> None:
    """Wrong types and out-of-range values name the path at the value's line."""
    path = write(
        tmp_path,
        """\
        api:
          max_concurrency: lots
          timeout: soon
          rate_limit: {per_second: 0}
          base_url: ftp://x
        collection:
          lookback_days: 120
        server: {listen: "localhost"}
        """,
        TENANT,
    )
    assert problems(path) == [
        f"{path}:2: api.max_concurrency: expected a whole number",
        f"{path}:3: api.timeout: invalid duration 'soon': use e.g. 500ms, 30s, 5m, 1h, 1d, 1h30m",
        f"{path}:4: api.rate_limit.per_second: Input should be greater than 0",
        f"{path}:5: api.base_url: expected an http:// or https:// URL",
        f"{path}:7: collection.lookback_days: Input should be less than or equal to 90",
        f"{path}:8: server.listen: expected HOST:PORT, e.g. 127.0.0.1:9464 or [::]:9464, or null",
    ]


def test_missing_required_key_points_at_the_parent_mapping(tmp_path: Path) -> None:
    """A missing required key is reported at the line of the mapping that lacks it."""
    path = write(
        tmp_path,
        """\
        sinks:
          warehouse:
            type: sqlite
        tenants:
          - name: Nameless
            api_key: zak_x
        """,
    )
    assert problems(path) == [
        f"{path}:2: sinks.warehouse.path: missing required key",
        f"{path}:5: tenants[0].id: missing required key",
    ]


def test_duplicate_tenant_id(tmp_path: Path) -> None:
    """A tenant id used twice is reported at the second use, naming the first line."""
    path = write(
        tmp_path,
        """\
        tenants:
          - {id: acme, api_key: zak_1}
          - {id: globex, api_key: zak_2}
          - {id: acme, api_key: zak_3}
        """,
    )
    assert problems(path) == [
        f"{path}:4: tenants[2].id: duplicate tenant id 'acme' (first at line 2)"
    ]


@pytest.mark.parametrize(
    ("credentials", "message"),
    [
        ("", "no credentials: give client_id + client_secret (OAuth) or api_key"),
        (
            "client_id: c, client_secret: s, api_key: k",
            "give either api_key or client_id + client_secret, not both",
        ),
        ("client_id: c", "client_id needs client_secret"),
        ("client_secret: s", "client_secret needs client_id"),
        ("api_key: ''", "no credentials: give client_id + client_secret (OAuth) or api_key"),
    ],
)
def test_bad_auth_combination_is_reported_at_the_tenant(
    tmp_path: Path, credentials: str, message: str
) -> None:
    """Exactly one auth mode per tenant; anything else is an error at the tenant's line."""
    path = write(tmp_path, f"collection: {{}}\ntenants:\n  - {{id: acme, {credentials}}}\n")
    assert problems(path) == [f"{path}:3: tenants[0]: {message}"]


def test_invalid_tenant_id(tmp_path: Path) -> None:
    """Tenant ids are restricted to what is safe in tables, paths and metric labels."""
    path = write(tmp_path, "tenants:\n  - {id: 'acme corp', api_key: k}\n")
    assert problems(path) == [
        f"{path}:2: tenants[0].id: invalid tenant id 'acme corp': 1-64 letters, digits, '_', "
        "'.', '-', starting with a letter or digit"
    ]


def test_route_to_unknown_sink(tmp_path: Path) -> None:
    """A tenant routed to a sink that is not configured is reported at the list item."""
    path = write(
        tmp_path,
        """\
        sinks:
          warehouse: {type: sqlite, path: x.db}
        tenants:
          - id: acme
            api_key: k
            sinks: [warehouse, lake, warehose]
        """,
    )
    assert problems(path) == [
        f"{path}:6: tenants[0].sinks[1]: unknown sink 'lake'; configured sinks: warehouse",
        f"{path}:6: tenants[0].sinks[2]: unknown sink 'warehose'; did you mean 'warehouse'?",
    ]


def test_unknown_sink_type_lists_installed_types(tmp_path: Path) -> None:
    """A sink type no plugin provides is reported with the installed types."""
    path = write(tmp_path, f"sinks:\n  lake:\n    type: s3\n    bucket: b\n{TENANT}")
    assert problems(path) == [
        f"{path}:3: sinks.lake.type: unknown sink type 's3'; installed: csv, sqlite, webhook"
    ]


def test_sink_keys_are_checked_by_the_sink_type(tmp_path: Path) -> None:
    """Each sink is validated by its own type's model, base keys included."""
    path = write(
        tmp_path,
        """\
        sinks:
          warehouse: {type: sqlite, path: x.db, paht: t}
          hook:
            type: webhook
            url: "https://h.example"
            secret: s
            batch_size: 0
        """,
    )
    assert problems(path) == [
        f"{path}:2: sinks.warehouse.paht: unknown key; did you mean 'path'?",
        f"{path}:7: sinks.hook.batch_size: Input should be greater than or equal to 1",
    ]


def test_anchors_merge_keys_and_x_keys(tmp_path: Path) -> None:
    """Top-level x-* keys hold anchors; merged keys are defaults the tenant's own keys override."""
    path = write(
        tmp_path,
        """\
        x-oauth: &oauth
          client_id: shared-client
          rate_limit: {per_second: 1}
        tenants:
          - <<: *oauth
            id: a
            client_secret: s1
            rate_limit: {per_second: 3}
          - {<<: *oauth, id: b, client_secret: s2}
        """,
    )
    a, b = load(path).tenants
    assert (a.client_id, b.client_id) == ("shared-client", "shared-client")
    assert a.rate_limit is not None
    assert b.rate_limit is not None
    assert (a.rate_limit.per_second, b.rate_limit.per_second) == (3.0, 1.0)


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    """A key written twice in one mapping is an error, not a silent override."""
    path = write(tmp_path, f"api:\n  timeout: 1s\n  timeout: 2s\n{TENANT}")
    assert problems(path) == [f"{path}:3: api.timeout: duplicate key (first at line 2)"]


def test_schedule_rules(tmp_path: Path) -> None:
    """Schedules take every or cron (not both), a valid cron, and settle_days within lookback."""
    path = write(
        tmp_path,
        """\
        collection:
          lookback_days: 5
          settle_days: 6
          schedule: {every: 1h, cron: "5 * * * *"}
        tenants:
          - id: a
            api_key: k
            schedule: {cron: "every minute"}
        """,
    )
    assert problems(path) == [
        f"{path}:3: collection.settle_days: settle_days (6) cannot exceed lookback_days (5)",
        f"{path}:4: collection.schedule: give either every or cron, not both",
        f"{path}:8: tenants[0].schedule.cron: invalid cron expression 'every minute'",
    ]


def test_every_problem_is_reported_at_once_in_file_order(tmp_path: Path) -> None:
    """Problems of every kind in one file come back together, sorted by line."""
    path = write(
        tmp_path,
        """\
        api:
          timeout: -5
        sinks:
          lake: {type: s3}
          warehouse: {type: sqlite, path: x.db}
        tenants:
          - id: acme
            client_id: ${NOPE}
            client_secret: s
            sinks: [lake, nowhere]
          - id: acme
            api_key: k
            colour: blue
        """,
    )
    assert problems(path) == [
        f"{path}:2: api.timeout: a duration cannot be negative",
        f"{path}:4: sinks.lake.type: unknown sink type 's3'; installed: csv, sqlite, webhook",
        f"{path}:8: tenants[0].client_id: environment variable NOPE is not set",
        f"{path}:10: tenants[0].sinks[1]: unknown sink 'nowhere'; "
        "configured sinks: lake, warehouse",
        f"{path}:11: tenants[1].id: duplicate tenant id 'acme' (first at line 7)",
        f"{path}:13: tenants[1].colour: unknown key; expected one of: "
        + ", ".join(TenantConfig.model_fields),
    ]


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


# --- without plugins, schema, summary -----------------------------------------------------------


def test_sinks_without_plugins_keep_their_raw_keys(tmp_path: Path) -> None:
    """With sink_types None, base keys are validated and the rest is kept, secrets hidden."""
    path = write(
        tmp_path,
        """\
        sinks:
          lake: {type: s3, bucket: b, aws_secret_access_key: aws-canary, timeout: 5s}
        """,
        TENANT,
    )
    lake = load(path, sink_types=None).sinks["lake"]
    assert isinstance(lake, GenericSinkConfig)
    assert (lake.type, lake.timeout) == ("s3", dt.timedelta(seconds=5))
    assert lake.model_extra is not None
    assert lake.model_extra["bucket"] == "b"
    assert "aws-canary" not in repr(lake)
    assert "aws-canary" in load(path, sink_types=None).secret_values()
    bad = write(tmp_path, f"sinks:\n  lake: {{type: s3, batch_size: many}}\n{TENANT}")
    assert problems(bad, sink_types=None) == [
        f"{bad}:2: sinks.lake.batch_size: expected a whole number"
    ]


def test_json_schema_describes_the_file(tmp_path: Path) -> None:
    """The JSON Schema accepts the example file and rejects unknown keys and sink types."""
    schema = json_schema(real_sink_types())
    jsonschema.Draft202012Validator.check_schema(schema)
    mapping = schema["properties"]["sinks"]["additionalProperties"]["discriminator"]["mapping"]
    assert set(mapping) == {"sqlite", "sql", "csv", "s3", "webhook"}
    tenant = schema["$defs"]["TenantConfig"]
    assert tenant["required"] == ["id"]
    assert "client_secret_file" in tenant["properties"]
    assert schema["$defs"]["ApiConfig"]["properties"]["timeout"]["default"] == "30s"
    example = yaml.safe_load((REPO / "config" / "example.yaml").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert [e.message for e in validator.iter_errors(example)] == []
    example["api"]["bogus"] = 1
    example["sinks"]["odd"] = {"type": "carrier-pigeon"}
    assert len(list(validator.iter_errors(example))) == 2
    generic = json_schema()
    assert generic["$defs"]["GenericSinkConfig"]["additionalProperties"] is True
    json.dumps(generic)


def test_summarize_counts_tenants_and_names_sinks(tmp_path: Path) -> None:
    """summarize gives the one-line validate output."""
    path = write(
        tmp_path,
        """\
        sinks:
          warehouse: {type: sqlite, path: x.db}
          sheets: {type: csv, path: out}
        tenants:
          - {id: a, client_id: c, client_secret: s}
          - {id: b, client_id: c, client_secret: s, enabled: false}
          - {id: c, api_key: k}
        """,
    )
    assert summarize(load(path)) == (
        "ok: 3 tenants (2 oauth, 1 api_key, 1 disabled), 2 sinks: warehouse (sqlite), sheets (csv)"
    )
    assert summarize(load(write(tmp_path, TENANT))) == "ok: 1 tenant (0 oauth, 1 api_key), 0 sinks"


# --- shipped files ------------------------------------------------------------------------------


def test_example_yaml_validates_with_real_sinks(tmp_path: Path) -> None:
    """config/example.yaml loads with the first-party sinks once its env vars and files exist."""
    for name in ("acme_client_secret", "initech_client_id", "webhook_secret", "pii_key"):
        (tmp_path / name).write_text(f"{name}-value\n")
    env = {
        "SECRETS_DIR": str(tmp_path),
        "ACME_CLIENT_ID": "acme-client",
        "GLOBEX_API_KEY": "zak_globex",
        "INITECH_CLIENT_SECRET": "initech-secret",
    }
    cfg = load(REPO / "config" / "example.yaml", env, real_sink_types())
    assert [t.id for t in cfg.tenants] == ["acme", "globex", "initech"]
    assert [t.auth_mode for t in cfg.tenants] == ["oauth", "api_key", "oauth"]
    assert cfg.tenants[2].client_id == "initech_client_id-value"
    assert list(cfg.sinks) == ["warehouse", "sheets", "lake", "hook"]
    assert sorted(cfg.secret_values()) == sorted(
        [
            "acme_client_secret-value",
            "zak_globex",
            "initech-secret",
            "webhook_secret-value",
            "pii_key-value",
        ]
    )
    without = problems(
        REPO / "config" / "example.yaml", {"SECRETS_DIR": str(tmp_path)}, real_sink_types()
    )
    assert [p.split(": ", 2)[1] for p in without] == [
        "tenants[0].client_id",
        "tenants[1].api_key",
        "tenants[2].client_secret",
    ]


def test_demo_yaml_matches_the_simulator_demo_tenants() -> None:
    """config/demo.yaml holds the simulator's five demo tenants and points at ZC_DEMO_* URLs."""
    env = {
        "ZC_DEMO_BASE_URL": "http://127.0.0.1:5555",
        "ZC_DEMO_TOKEN_URL": "http://127.0.0.1:5555/oauth/token",
    }
    cfg = load(REPO / "config" / "demo.yaml", env, real_sink_types())
    assert (cfg.api.base_url, cfg.api.token_url) == (
        env["ZC_DEMO_BASE_URL"],
        env["ZC_DEMO_TOKEN_URL"],
    )
    assert cfg.state.url == "sqlite:///demo-output/state.db"
    assert cfg.server.listen is None
    assert cfg.collection.lookback_days == 30
    assert {name: (s.type, str(s.model_dump()["path"])) for name, s in cfg.sinks.items()} == {
        "warehouse": ("sqlite", "demo-output/usage.db"),
        "sheets": ("csv", "demo-output/csv"),
    }
    simulated = demo_tenants(5)
    assert [t.id for t in cfg.tenants] == [s.id for s in simulated]
    for tenant, sim in zip(cfg.tenants[:4], simulated[:4], strict=True):
        assert tenant.auth_mode == "oauth"
        assert tenant.client_id == sim.client_id
        assert tenant.client_secret is not None
        assert tenant.client_secret.get_secret_value() == sim.client_secret
    last = cfg.tenants[4]
    assert last.api_key is not None
    assert last.api_key.get_secret_value() == simulated[4].api_key
    missing = problems(REPO / "config" / "demo.yaml", {}, real_sink_types())
    assert [p.split(": ", 2)[1] for p in missing] == ["api.base_url", "api.token_url"]
