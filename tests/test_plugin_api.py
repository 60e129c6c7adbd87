"""collector.plugin: the public plugin API is complete, documented and what our sinks use."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import collector.plugin

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_is_documented_in_the_plugin_guide() -> None:
    """Each name collector.plugin exports is in the plugin guide's import table, and vice versa."""
    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = guide.split("## What a plugin may import", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section)) - {
        "collector",
        "plugin",
        "testing",
    }
    documented = {
        name for name in documented if hasattr(collector.plugin, name) or name[0].isupper()
    }
    assert documented == set(collector.plugin.__all__)


def test_import_contracts_hold() -> None:
    """lint-imports keeps every layer contract of pyproject.toml."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(linter), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:]
