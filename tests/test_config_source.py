"""The config source: ${VAR} interpolation and <key>_file secrets, kept out of every output."""

from __future__ import annotations

from pathlib import Path

from collector.log import redact
from tests.config_helpers import TENANT, WebhookTestConfig, load, problems, write

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


def test_nested_alias_bomb_is_one_clear_problem(tmp_path: Path) -> None:
    """A few hundred bytes of nested ``x-`` anchors that would expand to a billion values are
    refused before anything is expanded, with the line-less problem saying why."""
    levels = [("a", "[x, x, x, x, x, x, x, x, x]")]
    for name in "bcdefghi":
        previous = levels[-1][0]
        levels.append((name, "[" + ", ".join([f"*{previous}"] * 9) + "]"))
    text = "".join(f"x-{name}: &{name} {value}\n" for name, value in levels) + TENANT
    path = write(tmp_path, text)
    assert len(text) < 600
    assert problems(path) == [
        f"{path}:?: <root>: the file expands to more than 1,000,000 values once its anchors, "
        "aliases (*name) and merge keys (<<) are resolved; reuse fewer nested anchors"
    ]


def test_merge_key_bomb_is_refused_too(tmp_path: Path) -> None:
    """Merge keys that double a mapping at every level count as the expansion they would be."""
    lines = ["x-l0: &l0 {a: 1, b: 2}\n"]
    for level in range(1, 30):
        lines.append(f"x-l{level}: &l{level} {{<<: [*l{level - 1}, *l{level - 1}], k{level}: 1}}\n")
    path = write(tmp_path, "".join(lines), TENANT)
    [problem] = problems(path)
    assert "expands to more than 1,000,000 values" in problem


def test_anchors_used_as_meant_are_fine(tmp_path: Path) -> None:
    """Shared defaults merged into many tenants stay well within the bound."""
    tenants = "".join(f"  - {{<<: *defaults, id: t{n}, api_key: k{n}}}\n" for n in range(2000))
    path = write(tmp_path, "x-defaults: &defaults {lookback_days: 7, settle_days: 1}\n")
    path.write_text(path.read_text() + "tenants:\n" + tenants)
    config = load(path)
    assert len(config.tenants) == 2000
    assert config.tenants[-1].lookback_days == 7


def test_deep_nesting_is_one_clear_problem(tmp_path: Path) -> None:
    """Lists nested hundreds deep are refused with a message, not a RecursionError; the parser
    itself stops at a thousand levels."""
    path = write(tmp_path, "x-deep: " + "[" * 500 + "]" * 500 + "\n", TENANT)
    assert problems(path) == [f"{path}:?: <root>: nested more than 200 levels deep"]
    path = write(tmp_path, "x-deep: " + "[" * 5000 + "]" * 5000 + "\n", TENANT)
    [problem] = problems(path)
    assert "exceeded maximum nesting depth" in problem


def test_a_config_larger_than_the_bound_is_not_read(tmp_path: Path) -> None:
    """A file over 16 MiB is refused by its size, naming the bound."""
    path = tmp_path / "huge.yaml"
    with path.open("w") as handle:
        handle.write(TENANT)
        handle.write("# " + "x" * (16 * 1024 * 1024) + "\n")
    assert problems(path) == [f"{path}:?: <root>: the file is larger than 16 MiB"]
