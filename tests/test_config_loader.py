"""The config loader: one located message per problem, schema, summary and the shipped files."""

from __future__ import annotations

import datetime as dt
import importlib
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from collector.config import GenericSinkConfig, TenantConfig, json_schema, summarize
from collector.simulator import demo_tenants
from collector.sink import Sink, SinkConfig
from tests.config_helpers import TENANT, load, problems, write

REPO = Path(__file__).resolve().parent.parent


def real_sink_types() -> dict[str, type[SinkConfig]]:
    """The first-party sinks' own Config models, found on their Sink classes."""
    found: dict[str, type[SinkConfig]] = {}
    for module_name in ("sqlite", "csv", "s3", "webhook"):
        module = importlib.import_module(f"collector_sinks.{module_name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Sink) and value.type_name:
                found[value.type_name] = value.Config
    return found


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
        "max_concurrency, rate_limit, global_rate_limit, retry, history_days",
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


@pytest.mark.parametrize("tenant_id", ["acme corp", "acme.", "nul", "con.txt", "LPT1", "-acme"])
def test_invalid_tenant_id(tmp_path: Path, tenant_id: str) -> None:
    """Tenant ids follow one rule every first-party sink accepts: no trailing dot, no spaces,
    no device names a file system reserves."""
    path = write(tmp_path, f"tenants:\n  - {{id: '{tenant_id}', api_key: k}}\n")
    assert problems(path) == [
        f"{path}:2: tenants[0].id: invalid tenant id {tenant_id!r}: 1-64 letters, digits, '_', "
        "'.', '-', starting with a letter or digit, not ending with '.', not a device name "
        "(con, nul, com1, ...)"
    ]


def test_tenant_ids_that_differ_only_in_case_are_one_id(tmp_path: Path) -> None:
    """ "Acme" after "acme" is refused: both would be one csv directory on macOS or Windows."""
    path = write(tmp_path, "tenants:\n  - {id: acme, api_key: a}\n  - {id: Acme, api_key: b}\n")
    assert problems(path) == [
        f"{path}:3: tenants[1].id: tenant id 'Acme' differs only in case from 'acme' (line 2); "
        "ids name directories, which some file systems do not tell apart by case"
    ]


def test_every_valid_tenant_id_is_a_csv_directory_and_an_s3_partition(tmp_path: Path) -> None:
    """Ids the config accepts are accepted by the csv sink's path rule and kept whole by S3."""
    from collector_sinks.csv import safe_segment
    from collector_sinks.s3 import partition_value

    ids = ["acme", "a", "acme.corp", "acme-2_b", "nullable", "console", "com10", "x" * 64]
    tenants = "".join(f"  - {{id: '{i}', api_key: k{n}}}\n" for n, i in enumerate(ids))
    config = load(write(tmp_path, "tenants:\n", tenants))
    for tenant in config.tenants:
        assert safe_segment(tenant.id) == tenant.id
        assert partition_value(tenant.id) == tenant.id


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


def test_unknown_sink_type_is_reported_with_every_other_problem(tmp_path: Path) -> None:
    """A sink whose plugin is missing still has its common keys checked, beside the problems
    of the rest of the file, so installing the plugin reveals nothing new."""
    path = write(
        tmp_path,
        """\
        sinks:
          lake: {type: bigquery, batch_size: -3}
        tenants:
          - {id: acme., api_key: k}
        """,
    )
    assert problems(path) == [
        f"{path}:2: sinks.lake.type: unknown sink type 'bigquery'; installed: csv, sqlite, webhook",
        f"{path}:2: sinks.lake.batch_size: Input should be greater than or equal to 1",
        f"{path}:4: tenants[0].id: invalid tenant id 'acme.': 1-64 letters, digits, '_', '.', "
        "'-', starting with a letter or digit, not ending with '.', not a device name "
        "(con, nul, com1, ...)",
    ]


def test_a_disabled_tenant_needs_no_secrets(tmp_path: Path) -> None:
    """An idle tenant may lack credentials, unset variables and missing secret files alike."""
    path = write(
        tmp_path,
        f"""\
        tenants:
          - {{id: acme, api_key: k}}
          - {{id: waiting, enabled: false}}
          - {{id: revoked, enabled: false, api_key: "${{REVOKED_KEY}}"}}
          - {{id: rotated, enabled: false, client_id: c, client_secret_file: {tmp_path}/gone}}
        """,
    )
    config = load(path)
    assert [t.id for t in config.enabled_tenants] == ["acme"]
    assert [t.api_key for t in config.tenants[1:3]] == [None, None]


def test_a_disabled_tenant_still_gets_mistakes_reported(tmp_path: Path) -> None:
    """Forgiving missing secrets does not hide a credential written twice."""
    path = write(
        tmp_path,
        "tenants:\n  - {id: later, enabled: false, api_key: k, api_key_file: /nowhere}\n",
    )
    assert problems(path) == [
        f"{path}:2: tenants[0].api_key_file: give either api_key or api_key_file, not both"
    ]


def test_an_enabled_tenant_still_needs_its_secrets(tmp_path: Path) -> None:
    """Only ``enabled: false`` forgives missing secrets."""
    path = write(tmp_path, "tenants:\n  - {id: acme, api_key: '${ACME_KEY}'}\n")
    assert problems(path) == [
        f"{path}:2: tenants[0].api_key: environment variable ACME_KEY is not set"
    ]


def test_two_tenants_with_the_same_credentials_get_a_warning(tmp_path: Path) -> None:
    """Shared credentials are a warning naming both tenants, not an error."""
    path = write(
        tmp_path,
        """\
        tenants:
          - {id: acme, client_id: c, client_secret: s}
          - {id: globex, api_key: k}
          - {id: acme-eu, client_id: c, client_secret: s}
          - {id: other, client_id: c, client_secret: different}
        """,
    )
    config = load(path)
    assert [str(w) for w in config.warnings] == [
        f"{path}:4: tenants[2]: tenant 'acme-eu' has the same credentials as tenant 'acme': "
        "both would collect the same organization"
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
    # initech is disabled: its missing secret is not a problem
    assert [p.split(": ", 2)[1] for p in without] == [
        "tenants[0].client_id",
        "tenants[1].api_key",
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
