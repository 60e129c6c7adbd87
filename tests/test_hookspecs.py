"""The hook specifications: names, documentation, and each hook called with its arguments."""

from __future__ import annotations

import datetime as dt
import inspect
from pathlib import Path
from typing import Any

import pluggy
import pytest

from collector import hookspecs
from collector.config import AppConfig, load_config
from collector.hookspecs import hookimpl
from collector.plugin_manager import (
    Notifier,
    PluginLoadError,
    SinkRegistry,
    configure_plugins,
    make_plugin_manager,
)
from collector.sink import Sink
from collector.testing import RecordingSink

HOOKS = [
    name
    for name, value in vars(hookspecs).items()
    if callable(value) and hasattr(value, f"{hookspecs.PROJECT_NAME}_spec")
]


class AlertingPlugin:
    """A plugin implementing every hook, recording what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def collector_register_sinks(self) -> list[type[Sink]]:
        self.calls.append(("register", {}))
        return [RecordingSink]

    @hookimpl
    def collector_configure(self, config: AppConfig) -> None:
        self.calls.append(("configure", {"config": config}))

    @hookimpl
    def collector_tenant_day_collected(self, tenant: str, day: dt.date, changed: bool) -> None:
        self.calls.append(("collected", {"tenant": tenant, "day": day, "changed": changed}))

    @hookimpl
    def collector_tenant_failed(self, tenant: str, error: str) -> None:
        self.calls.append(("failed", {"tenant": tenant, "error": error}))

    @hookimpl
    def collector_sink_delivery_failed(
        self, sink: str, tenant: str, day: dt.date, error: str, dead_lettered: bool
    ) -> None:
        self.calls.append(
            (
                "delivery_failed",
                {"sink": sink, "tenant": tenant, "day": day, "error": error, "dl": dead_lettered},
            )
        )


def test_every_hook_is_prefixed_typed_and_documented() -> None:
    """Each hook spec is collector_-prefixed, fully annotated and has a docstring."""
    assert set(HOOKS) == {
        "collector_register_sinks",
        "collector_configure",
        "collector_tenant_cycle_started",
        "collector_tenant_day_collected",
        "collector_tenant_day_failed",
        "collector_tenant_cycle_done",
        "collector_tenant_failed",
        "collector_sink_delivery_failed",
        "collector_sink_purge",
    }
    for name in HOOKS:
        function = getattr(hookspecs, name)
        signature = inspect.signature(function)
        assert name.startswith("collector_")
        assert (function.__doc__ or "").strip(), name
        assert signature.return_annotation is not inspect.Signature.empty, name
        for parameter in signature.parameters.values():
            assert parameter.annotation is not inspect.Parameter.empty, f"{name}.{parameter.name}"


def test_markers_belong_to_the_collector_project() -> None:
    """hookimpl and hookspec are pluggy markers of the project named collector."""
    assert isinstance(hookspecs.hookimpl, pluggy.HookimplMarker)
    assert hookspecs.hookimpl.project_name == "collector"
    assert hookspecs.hookspec.project_name == "collector"


def test_register_sinks_hook_feeds_the_registry() -> None:
    """collector_register_sinks answers become sink types of the registry."""
    pm = make_plugin_manager(load_entrypoints=False)
    plugin = AlertingPlugin()
    pm.register(plugin, name="alerting")
    registry = SinkRegistry.from_plugin_manager(pm)
    assert registry.types() == {"recording": RecordingSink}
    assert plugin.calls == [("register", {})]


def test_configure_hook_receives_the_loaded_config(tmp_path: Path) -> None:
    """collector_configure is called with the AppConfig; a failing plugin stops start-up."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text("tenants:\n  - id: acme\n    api_key: zak_test\n", encoding="utf-8")
    config = load_config(config_file)
    pm = make_plugin_manager(load_entrypoints=False)
    plugin = AlertingPlugin()
    pm.register(plugin, name="alerting")
    configure_plugins(pm, config)
    assert plugin.calls == [("configure", {"config": config})]

    class Picky:
        @hookimpl
        def collector_configure(self, config: AppConfig) -> None:
            raise RuntimeError("needs an alerting.url setting")

    pm.register(Picky(), name="picky")
    with pytest.raises(PluginLoadError, match="plugin 'picky': RuntimeError: needs an alerting"):
        configure_plugins(pm, config)
    assert len(plugin.calls) == 2  # the healthy plugin was configured again all the same


def test_notification_hooks_receive_their_arguments() -> None:
    """The three notification hooks reach a plugin with exactly the arguments given."""
    pm = make_plugin_manager(load_entrypoints=False)
    plugin = AlertingPlugin()
    pm.register(plugin, name="alerting")
    notifier = Notifier(pm)
    day = dt.date(2025, 1, 15)
    assert notifier.tenant_day_collected("acme", day, changed=True) == 0
    assert notifier.tenant_failed("globex", "AuthError: HTTP 401: Unauthorized") == 0
    assert notifier.sink_delivery_failed("lake", "acme", day, "SinkTransientError: 503", False) == 0
    assert plugin.calls == [
        ("collected", {"tenant": "acme", "day": day, "changed": True}),
        ("failed", {"tenant": "globex", "error": "AuthError: HTTP 401: Unauthorized"}),
        (
            "delivery_failed",
            {
                "sink": "lake",
                "tenant": "acme",
                "day": day,
                "error": "SinkTransientError: 503",
                "dl": False,
            },
        ),
    ]


def test_the_notifier_has_one_method_per_notification_hook_with_its_signature() -> None:
    """Each notification hook has a Notifier method of the same name and parameters."""
    notification_hooks = {
        name
        for name in HOOKS
        if name not in {"collector_register_sinks", "collector_configure", "collector_sink_purge"}
    }
    methods = {
        name
        for name in vars(Notifier)
        if not name.startswith("_") and callable(vars(Notifier)[name])
    }
    assert {f"collector_{name}" for name in methods} == notification_hooks
    for name in methods:
        spec = inspect.signature(getattr(hookspecs, f"collector_{name}"))
        method = inspect.signature(getattr(Notifier, name))
        parameters = list(method.parameters.values())[1:]  # without self
        assert [(p.name, p.annotation) for p in parameters] == [
            (p.name, p.annotation) for p in spec.parameters.values()
        ], name
