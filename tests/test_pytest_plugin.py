"""collector.pytest_plugin: loaded by pytest through pytest11, thin, and its fixtures work."""

from __future__ import annotations

import json

import pytest

import collector.pytest_plugin
from collector.simulator import Simulator
from tests.e2e import run_python


def test_plugin_is_registered_through_pytest11(pytestconfig: pytest.Config) -> None:
    """pytest loads collector.pytest_plugin as the plugin named collector via its entry point."""
    assert pytestconfig.pluginmanager.get_plugin("collector") is collector.pytest_plugin


def test_loading_the_plugin_imports_no_other_collector_module() -> None:
    """Importing the plugin (what pytest does in every project with the collector installed)
    loads neither the testing kit nor the simulator, store or sinks."""
    result = run_python(
        "import json, sys; import collector.pytest_plugin; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('collector'))))"
    )
    assert json.loads(result.stdout) == ["collector", "collector.pytest_plugin"]


async def test_simulator_fixture_serves_the_default_three_tenants(simulator: Simulator) -> None:
    """The ``simulator`` fixture runs a simulator with the three demo tenants of
    ``simulator_settings``."""
    assert simulator.base_url.startswith("http://127.0.0.1:")
    assert [t.id for t in simulator.settings.tenants] == ["tenant-01", "tenant-02", "tenant-03"]
