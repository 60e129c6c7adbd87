"""What the distribution ships: package data (the demo config, py.typed), the LICENSE, the
pytest11 entry point, in the wheel and in the editable install contributors use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata, resources
from pathlib import Path

import pytest

from tests.e2e import REPO, count_rows

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from this checkout (hatchling, from the dev dependencies, no network)."""
    out = tmp_path_factory.mktemp("wheel")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("zencoder_collector-*.whl")
    return zipfile.ZipFile(built)


def _is_editable() -> bool:
    direct_url = metadata.distribution("zencoder-collector").read_text("direct_url.json")
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


def test_wheel_ships_package_data_license_and_the_thin_pytest_plugin(
    wheel: zipfile.ZipFile,
) -> None:
    """The wheel holds the demo config and py.typed inside the package, the LICENSE, and a
    pytest11 entry point naming collector.pytest_plugin."""
    names = set(wheel.namelist())
    shipped = {"collector/_data/demo.yaml", "collector/py.typed", "collector/pytest_plugin.py"}
    assert shipped <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(entry_points).decode()
    assert "[pytest11]\ncollector = collector.pytest_plugin" in text
    demo = wheel.read("collector/_data/demo.yaml").decode()
    assert demo == (REPO / "collector" / "_data" / "demo.yaml").read_text(encoding="utf-8")


def test_installed_package_has_the_demo_config_and_py_typed() -> None:
    """The running install (editable in the dev venv) finds both files as package resources."""
    package = resources.files("collector")
    assert (package / "_data" / "demo.yaml").is_file()
    assert (package / "py.typed").is_file()


def test_repository_demo_yaml_is_the_package_data() -> None:
    """config/demo.yaml, which the docs link to, is the same file the package ships."""
    linked = (REPO / "config" / "demo.yaml").resolve()
    assert linked == (REPO / "collector" / "_data" / "demo.yaml").resolve()


def test_demo_runs_from_an_editable_install_outside_the_repository(tmp_path: Path) -> None:
    """`zencoder-collector demo`, started from a directory with no config/ in it, reads its
    config from the package and collects 30 days for five tenants."""
    if not _is_editable():
        pytest.skip("the collector is not installed editable here (scripts/test.sh does that)")
    command = Path(sys.executable).parent / "zencoder-collector"
    result = subprocess.run(
        [str(command), "demo", "--output", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLLECTOR_TESTING_NO_WAIT": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5/5 tenants ok" in result.stdout
    assert count_rows(tmp_path / "out" / "usage.db")["usage_daily"] == 5 * 30


def test_license_is_the_apache_2_text_pyproject_names() -> None:
    """pyproject declares Apache-2.0 and LICENSE holds that licence's full text."""
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_pytest11_entry_point_names_the_thin_fixture_module() -> None:
    """The installed entry point loads collector.pytest_plugin, not the whole testing kit."""
    (entry,) = metadata.entry_points(group="pytest11", name="collector")
    assert entry.value == "collector.pytest_plugin"
