"""Plugin discovery through real entry points, the sink registry, and safe notification calls.

Third-party plugins here are real installed distributions: a ``*.dist-info`` directory with
METADATA and entry_points.txt plus a module, put on sys.path, exactly what pip leaves behind.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from collector.config import load_config
from collector.errors import ConfigError
from collector.hookspecs import hookimpl
from collector.plugin_manager import (
    BrokenPlugin,
    Notifier,
    PluginLoadError,
    SinkRegistry,
    make_plugin_manager,
)
from collector.sink import Sink, SinkHost
from collector.testing import FailingSink, RecordingSink, RecordingSinkConfig, testing_sinks
from collector_sinks.csv import CsvSink, CsvSinkConfig
from collector_sinks.sqlite import SqliteSink, SqlSink

SINK_MODULE = '''
from collector.hookspecs import hookimpl
from collector.sink import Sink, SinkConfig


class {cls}Config(SinkConfig):
    type: str = "{type_name}"
    colour: str = "blue"


class {cls}(Sink):
    """{cls} stores nothing, for tests."""

    type_name = "{type_name}"
    Config = {cls}Config

    async def write(self, batch):
        pass


@hookimpl
def collector_register_sinks():
    return [{cls}]
'''

Installer = Callable[..., None]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Installer:
    """Install distributions into a fresh site directory that is on sys.path for the test."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(
        name: str,
        modules: dict[str, str],
        entry_points: dict[str, str],
        extras: dict[str, list[str]] | None = None,
        version: str = "1.2.3",
    ) -> None:
        dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        for extra, requirements in (extras or {}).items():
            lines.append(f"Provides-Extra: {extra}")
            lines += [f'Requires-Dist: {req}; extra == "{extra}"' for req in requirements]
        (dist_info / "METADATA").write_text("\n".join(lines) + "\n", encoding="utf-8")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (dist_info / "entry_points.txt").write_text(f"[collector.sinks]\n{eps}\n", encoding="utf-8")
        for module, source in modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")

    return make


def unique() -> str:
    """A suffix that keeps module names of different tests apart in sys.modules."""
    return uuid.uuid4().hex[:8]


def test_first_party_sinks_come_through_entry_points() -> None:
    """sqlite, sql and csv are registered from the collector.sinks group with their origin."""
    pm = make_plugin_manager()
    registry = SinkRegistry.from_plugin_manager(pm)
    types = registry.types()
    assert types["sqlite"] is SqliteSink
    assert types["sql"] is SqlSink
    assert types["csv"] is CsvSink
    assert registry.config_types()["csv"] is CsvSinkConfig
    info = {i.type_name: i for i in registry.describe()}["csv"]
    assert (info.plugin, info.distribution) == ("csv", "zencoder-collector")
    assert info.version
    assert "path" in info.config_schema["properties"]
    assert pm.origins["sqlite"].entry_point == "collector_sinks.sqlite"


def test_third_party_plugin_is_loaded_like_first_party(install: Installer) -> None:
    """An installed third-party distribution's sink is registered with its name and version."""
    module = f"acme_sink_{unique()}"
    install(
        "acme-collector-sink",
        {module: SINK_MODULE.format(cls="AcmeSink", type_name="acme")},
        {"acme": module},
    )
    registry = SinkRegistry.from_plugin_manager(make_plugin_manager())
    info = {i.type_name: i for i in registry.describe()}["acme"]
    assert (info.distribution, info.version) == ("acme-collector-sink", "1.2.3")
    assert info.summary == "AcmeSink stores nothing, for tests."
    assert info.config_schema["properties"]["colour"]["default"] == "blue"
    assert "csv" in registry.types()  # first-party sinks are still there


def test_failed_import_is_recorded_with_the_extra_to_install(
    install: Installer, tmp_path: Path
) -> None:
    """A plugin whose dependency is missing is recorded with its extra, not raised."""
    lake, other = f"lake_sink_{unique()}", f"ok_sink_{unique()}"
    install(
        "lake-collector-sink",
        {
            lake: "import notarealpkg_zz_collector  # the optional dependency\n",
            other: SINK_MODULE.format(cls="OkSink", type_name="oksink"),
        },
        {"lake": lake, "oksink": other},
        extras={"lake": ["notarealpkg-zz-collector>=1"], "all": ["notarealpkg-zz-collector", "x"]},
    )
    pm = make_plugin_manager()
    registry = SinkRegistry.from_plugin_manager(pm)
    assert "oksink" in registry.types()
    broken = [b for b in registry.broken() if b.name == "lake"]
    assert broken == [
        BrokenPlugin(
            name="lake",
            distribution="lake-collector-sink",
            version="1.2.3",
            error="ModuleNotFoundError: No module named 'notarealpkg_zz_collector'",
            hint="pip install 'lake-collector-sink[lake]'",
            missing_extra="lake",
        )
    ]
    with pytest.raises(PluginLoadError, match=r"pip install 'lake-collector-sink\[lake\]'"):
        registry.require("lake")
    assert "lake         not installed (pip install 'lake-collector-sink[lake]')" in (
        registry.render()
    )
    listed = {b["name"]: b for b in json.loads(registry.render(as_json=True))["broken"]}
    assert listed["lake"]["status"] == "not installed"


# A fresh interpreter in which aiobotocore cannot be imported, as in a plain install (no [s3]).
WITHOUT_S3_EXTRA = """
import sys
from importlib.abc import MetaPathFinder

class NoAiobotocore(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "aiobotocore":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoAiobotocore())
from collector.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_plain_install_lists_s3_as_not_installed_without_a_warning(tmp_path: Path) -> None:
    """Without the s3 extra, `plugins` lists s3 as not installed with the command that adds it,
    and nothing is logged at the default level; a config that uses s3 still fails, naming it."""
    listing = subprocess.run(
        [sys.executable, "-c", WITHOUT_S3_EXTRA, "plugins"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "s3           not installed (pip install 'zencoder-collector[s3]')" in listing.stdout
    assert "BROKEN" not in listing.stdout
    assert listing.stderr == ""
    config = tmp_path / "c.yaml"
    config.write_text(
        "sinks:\n  lake: {type: s3, bucket: b}\ntenants:\n  - {id: acme, api_key: zak_x}\n",
        encoding="utf-8",
    )
    using = subprocess.run(
        [sys.executable, "-c", WITHOUT_S3_EXTRA, "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert using.returncode == 2
    assert "c.yaml:2: sinks.lake: sink type 's3' is not available" in using.stderr
    assert "pip install 'zencoder-collector[s3]'" in using.stderr


def test_broken_type_is_fatal_only_when_configured(install: Installer, tmp_path: Path) -> None:
    """A config using the broken type fails with the install hint; one that does not, loads."""
    lake = f"lake_sink_{unique()}"
    install(
        "lake-collector-sink",
        {lake: "import notarealpkg_zz_collector\n"},
        {"lake": lake},
        extras={"full": ["notarealpkg_zz_collector"]},
    )
    registry = SinkRegistry.from_plugin_manager(make_plugin_manager())
    with pytest.raises(ValidationError, match="not available"):
        registry.config_types()["lake"].model_validate({"type": "lake"})
    tenants = "tenants:\n  - id: acme\n    api_key: zak_test\n"
    using = tmp_path / "using.yaml"
    using.write_text(f"sinks:\n  dl: {{type: lake, bucket: b}}\n{tenants}", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(using, sink_types=registry.config_types())
    message = str(caught.value)
    assert "using.yaml:2: sinks.dl" in message
    assert "pip install 'lake-collector-sink[full]'" in message
    fine = tmp_path / "fine.yaml"
    fine.write_text(
        f"sinks:\n  db: {{type: sqlite, path: '{tmp_path}/u.db'}}\n{tenants}", encoding="utf-8"
    )
    assert list(load_config(fine, sink_types=registry.config_types()).sinks) == ["db"]


def test_entry_point_to_a_missing_module_suggests_reinstalling(install: Installer) -> None:
    """An entry point naming a module its distribution lacks says to reinstall that distribution."""
    install("halfway-sink", {}, {"halfway": f"halfway_sink_{unique()}.sub"})
    broken = {b.name: b for b in make_plugin_manager().broken}["halfway"]
    assert broken.hint == "pip install --force-reinstall 'halfway-sink'"
    assert broken.error.startswith("ModuleNotFoundError")


def test_import_error_of_another_kind_is_recorded(install: Installer) -> None:
    """A plugin raising at import (not a missing module) is recorded with an upgrade hint."""
    module = f"crashy_{unique()}"
    install(
        "crashy-sink", {module: "raise RuntimeError('bad import-time code')\n"}, {"crashy": module}
    )
    broken = {b.name: b for b in make_plugin_manager().broken}["crashy"]
    assert broken.error == "RuntimeError: bad import-time code"
    assert broken.hint is not None
    assert "crashy-sink" in broken.hint
    assert "crashy-sink" in broken.message()


def test_misspelt_hookimpl_fails_at_start_up(install: Installer) -> None:
    """A hookimpl whose name matches no hook stops make_plugin_manager, naming the plugin."""
    module = f"typo_sink_{unique()}"
    install(
        "typo-sink",
        {
            module: """
            from collector.hookspecs import hookimpl

            @hookimpl
            def collector_register_sink():
                return []
            """
        },
        {"typo": module},
    )
    with pytest.raises(PluginLoadError, match="typo") as caught:
        make_plugin_manager()
    assert "collector_register_sink" in str(caught.value)


def test_hookimpl_with_unknown_argument_fails_at_start_up(install: Installer) -> None:
    """A hookimpl asking for an argument its hook does not have stops start-up."""
    module = f"argy_{unique()}"
    install(
        "argy-sink",
        {
            module: """
            from collector.hookspecs import hookimpl

            @hookimpl
            def collector_tenant_failed(tenant, reason):
                pass
            """
        },
        {"argy": module},
    )
    with pytest.raises(PluginLoadError, match="argy"):
        make_plugin_manager()


def test_without_entry_points_only_explicit_plugins_count() -> None:
    """load_entrypoints=False gives an empty manager to which plugins can be added by hand."""
    pm = make_plugin_manager(load_entrypoints=False)
    assert SinkRegistry.from_plugin_manager(pm).types() == {}
    pm.register(testing_sinks, name="testing")
    registry = SinkRegistry.from_plugin_manager(pm)
    assert registry.types() == {"failing": FailingSink, "recording": RecordingSink}
    assert {i.distribution for i in registry.describe()} == {"zencoder-collector"}


class _Plugin:
    def __init__(self, *classes: object) -> None:
        self.classes = list(classes)

    @hookimpl
    def collector_register_sinks(self) -> list[object]:
        return self.classes


class _Raising:
    @hookimpl
    def collector_register_sinks(self) -> list[object]:
        raise RuntimeError("plugin bug")


def test_conflicts_and_invalid_classes_are_reported_not_raised() -> None:
    """Two claims of one type, invalid classes and a raising hook become broken entries."""

    class Dup1(RecordingSink):
        type_name = "dup"

    class Dup2(RecordingSink):
        type_name = "dup"

    class BadName(RecordingSink):
        type_name = "Bad Name"

    class OpaqueConfig(RecordingSinkConfig):
        handle: Callable[[], None] = print

    class NoSchema(RecordingSink):
        type_name = "noschema"
        Config = OpaqueConfig

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(_Plugin(Dup1, RecordingSink, RecordingSink), name="one")
    pm.register(_Plugin(Dup2, BadName, "not a class", NoSchema), name="two")
    pm.register(_Raising(), name="three")
    registry = SinkRegistry.from_plugin_manager(pm)
    assert registry.types() == {"recording": RecordingSink}
    broken = {b.name: b.error for b in registry.broken()}
    assert "claimed by" in broken["dup"]
    assert "Dup1" in broken["dup"]
    assert "Dup2" in broken["dup"]
    assert "must be lower-case" in broken["Bad Name"]
    assert "not a subclass" in broken["two"]
    assert "NoSchema.Config has no JSON schema" in broken["noschema"]
    assert broken["three"] == "RuntimeError: plugin bug"
    with pytest.raises(PluginLoadError, match="claimed by"):
        registry.require("dup")
    with pytest.raises(PluginLoadError, match=r"unknown sink type 'nope' \(installed: recording"):
        registry.require("nope")


def test_create_and_render(tmp_path: Path) -> None:
    """create() builds an instance from its config; render() lists types, origins and breakage."""
    pm = make_plugin_manager()
    registry = SinkRegistry.from_plugin_manager(pm)
    sink = registry.create("sheets", CsvSinkConfig(type="csv", path=tmp_path))
    assert isinstance(sink, CsvSink)
    assert sink.name == "sheets"
    text = registry.render()
    assert any(
        line.startswith("csv ") and "zencoder-collector" in line for line in text.splitlines()
    )
    payload = json.loads(registry.render(as_json=True))
    csv_entry = next(s for s in payload["sinks"] if s["type"] == "csv")
    assert csv_entry["class"] == "collector_sinks.csv.CsvSink"
    assert csv_entry["config_schema"]["required"] == ["path"]
    assert "broken" in payload
    assert '"properties"' in registry.render(schemas=True)


def test_notifier_isolates_a_raising_plugin() -> None:
    """A raising hookimpl is logged and counted; the implementations around it still run."""
    seen: list[str] = []

    class Recorder:
        def __init__(self, label: str) -> None:
            self.label = label

        @hookimpl
        def collector_tenant_failed(self, tenant: str, error: str) -> None:
            seen.append(f"{self.label}:{tenant}:{error}")

    class Broken:
        @hookimpl
        def collector_tenant_failed(self, tenant: str) -> None:
            raise ValueError(f"cannot alert about {tenant}")

    class TenantOnly:
        @hookimpl
        def collector_tenant_failed(self, tenant: str) -> None:
            seen.append(f"tenant-only:{tenant}")

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Recorder("first"), name="first")
    pm.register(Broken(), name="broken")
    pm.register(TenantOnly(), name="tenant-only")
    pm.register(Recorder("last"), name="last")
    with capture_logs() as logs:
        failures = Notifier(pm).tenant_failed(tenant="acme", error="AuthError")
    assert failures == 1
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert (warning["event"], warning["plugin"], warning["hook"], warning["error"]) == (
        "plugin hook raised",
        "broken",
        "collector_tenant_failed",
        "ValueError: cannot alert about acme",
    )
    # pluggy's order (the last registered first) is kept; "broken" sat in the middle.
    assert seen == ["last:acme:AuthError", "tenant-only:acme", "first:acme:AuthError"]


def test_notifier_logs_a_raising_plugins_traceback_at_debug() -> None:
    """A hookimpl's exception is a one-line warning plus its traceback at debug level."""

    class Broken:
        @hookimpl
        def collector_tenant_failed(self, tenant: str) -> None:
            raise ValueError(f"cannot alert about {tenant}")

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Broken(), name="broken")
    with capture_logs() as logs:
        assert Notifier(pm).tenant_failed(tenant="acme", error="AuthError") == 1
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("plugin hook raised", "warning"),
        ("plugin hook traceback", "debug"),
    ]
    kind, error, trace = logs[1]["exc_info"]
    assert (kind, str(error)) == (ValueError, "cannot alert about acme")
    assert logs[1]["plugin"] == "broken"
    assert trace is not None


def test_create_hands_the_host_settings_to_the_sink(tmp_path: Path) -> None:
    """registry.create sets sink.host when given one; without, the sink keeps private defaults."""
    registry = SinkRegistry.from_plugin_manager(make_plugin_manager())
    config = CsvSinkConfig(type="csv", path=tmp_path)
    shared = registry.create("sheets", config, SinkHost(shared_group=True))
    assert shared.host.shared_group is True
    assert registry.create("sheets", config).host == SinkHost(shared_group=False)


def test_notifier_runs_wrapper_hookimpls_around_each_plugin() -> None:
    """A wrapper hookimpl runs through pluggy around every implementation of the hook."""
    ran: list[str] = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def collector_tenant_day_collected(self, tenant: str):  # type: ignore[no-untyped-def]
            ran.append(f"before {tenant}")
            result = yield
            ran.append(f"after {tenant}")
            return result

    class Plain:
        def __init__(self, label: str) -> None:
            self.label = label

        @hookimpl
        def collector_tenant_day_collected(self, tenant: str, day: dt.date, changed: bool) -> None:
            ran.append(f"{self.label} {tenant} {day} {changed}")

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Wrapper(), name="wrapper")
    notifier = Notifier(pm)
    day = dt.date(2025, 1, 1)
    assert notifier.tenant_day_collected(tenant="acme", day=day, changed=False) == 0
    assert ran == ["before acme", "after acme"]  # only the wrapper: it still runs
    ran.clear()
    pm.register(Plain("one"), name="one")
    pm.register(Plain("two"), name="two")  # registered after the notifier was built
    assert notifier.tenant_day_collected(tenant="acme", day=day, changed=True) == 0
    assert ran == [
        "before acme",
        "two acme 2025-01-01 True",
        "after acme",
        "before acme",
        "one acme 2025-01-01 True",
        "after acme",
    ]


def test_notifier_isolates_a_plugin_that_raises_under_a_wrapper() -> None:
    """A raising implementation under a wrapper reaches the wrapper, and the next plugin runs."""
    seen: list[str] = []

    class Watcher:
        @hookimpl(wrapper=True)
        def collector_tenant_failed(self, tenant: str):  # type: ignore[no-untyped-def]
            try:
                return (yield)
            except ValueError as exc:
                seen.append(f"wrapper saw {exc}")
                raise

    class Broken:
        @hookimpl
        def collector_tenant_failed(self, tenant: str) -> None:
            raise ValueError(f"cannot alert about {tenant}")

    class Healthy:
        @hookimpl
        def collector_tenant_failed(self, tenant: str, error: str) -> None:
            seen.append(f"healthy {tenant} {error}")

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(Healthy(), name="healthy")
    pm.register(Broken(), name="broken")
    pm.register(Watcher(), name="watcher")
    assert Notifier(pm).tenant_failed(tenant="acme", error="AuthError") == 1
    assert seen == ["wrapper saw cannot alert about acme", "healthy acme AuthError"]


def test_a_notifier_without_plugins_calls_nothing() -> None:
    """Notifier() (a pipeline or deliverer built without plugins) knows the hooks, calls none."""
    notifier = Notifier()
    assert notifier.tenant_failed(tenant="acme", error="AuthError") == 0
    assert notifier.pm.hook.collector_tenant_failed.get_hookimpls() == []


def test_sink_class_reaches_registry_only_through_the_hook() -> None:
    """A Sink subclass that no plugin returns is not a registered type."""

    class Orphan(Sink):
        type_name = "orphan"

    pm = make_plugin_manager()
    assert "orphan" not in SinkRegistry.from_plugin_manager(pm).types()
    assert Orphan.type_name == "orphan"
