"""docs/config-reference.md is generated from the config models and kept current."""

from __future__ import annotations

from collector.config.models import AppConfig, TenantConfig
from collector.config_reference import first_party_sink_types, render_reference
from tests.e2e import REPO, run_cli

REFERENCE = REPO / "docs" / "config-reference.md"


def test_reference_in_the_repository_is_current() -> None:
    """The committed reference equals what the models generate; regenerate it with
    `zencoder-collector schema --markdown -o docs/config-reference.md` when a model changes."""
    assert REFERENCE.read_text(encoding="utf-8") == render_reference(), (
        "docs/config-reference.md is stale: run "
        "`zencoder-collector schema --markdown -o docs/config-reference.md`"
    )


def test_reference_lists_every_key_of_every_section() -> None:
    """Each top-level section, each tenant key and each first-party sink type has its entry."""
    text = render_reference()
    for section in AppConfig.model_fields:
        assert f"## `{section}" in text
    for key in TenantConfig.model_fields:
        assert f"| `{key}` |" in text
    for type_name in first_party_sink_types():
        assert type_name in text
    assert "| `listen` | string or null | `127.0.0.1:9464` |" in text


async def test_schema_markdown_prints_the_reference() -> None:
    """`schema --markdown` prints the same text the test above compares with."""
    result = await run_cli("schema", "--markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_reference()
