"""The runtime wiring of :mod:`collector.app`: what a config gives the sinks it creates."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from collector.app import build_deliverer, load, load_plugins
from collector.store import Store
from collector.testing import make_batch


@pytest.mark.parametrize(
    ("shared", "dir_mode", "file_mode"), [(False, 0o700, 0o600), (True, 0o750, 0o640)]
)
async def test_sinks_create_files_with_the_configs_files_mode(
    tmp_path: Path, shared: bool, dir_mode: int, file_mode: int
) -> None:
    """files.shared_group reaches every sink build_deliverer creates: a csv sink's directories
    and files get 0700/0600, or 0750/0640 when shared."""
    config_file = tmp_path / "collector.yaml"
    config_file.write_text(
        f"files: {{shared_group: {str(shared).lower()}}}\n"
        f"sinks:\n  sheets: {{type: csv, path: '{tmp_path / 'csv'}'}}\n",
        encoding="utf-8",
    )
    plugins = load_plugins()
    config = load(config_file, plugins)
    store = await Store.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        sinks, deliverer = build_deliverer(config, plugins, store)
        assert deliverer is not None
        sink = sinks["sheets"]
        assert sink.host.shared_group is shared
        old = os.umask(0o022)
        try:
            await sink.open()
            await sink.write(make_batch(("acme",), 1))
        finally:
            os.umask(old)
    finally:
        await store.aclose()
    root = tmp_path / "csv"
    assert {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")] if p.is_dir()} == {
        dir_mode
    }
    assert {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*.csv")} == {file_mode}
