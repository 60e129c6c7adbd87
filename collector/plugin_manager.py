"""Discovering plugins, building the sink registry, and calling notification hooks safely.

Every sink, first-party or third-party, arrives the same way: an entry point in the
``collector.sinks`` group names a module (or object) that implements the hooks of
:mod:`collector.hookspecs`. :func:`make_plugin_manager` loads them all, and

- a plugin that fails to import (a missing optional dependency, a broken install) does not stop
  the collector: it is recorded as a :class:`BrokenPlugin` with the command that fixes it, and
  only becomes an error when a sink of that type is configured (its config model then refuses
  validation with that message);
- a misspelt or mistyped hookimpl *does* stop start-up (:class:`PluginLoadError`), because a
  plugin that silently does nothing is worse than one that refuses to start.

:class:`SinkRegistry` turns the ``collector_register_sinks`` answers into ``type -> class`` and
``type -> Config`` maps (the latter is what :func:`collector.config.load_config` takes as
``sink_types``). :class:`Notifier` calls the notification hooks through pluggy, one typed method
per hook, each plugin on its own, because pluggy stops at the first implementation that raises.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pluggy
import structlog
from pydantic import ConfigDict, model_validator

from collector import hookspecs
from collector.errors import CollectorError
from collector.sink import Sink, SinkConfig, SinkHost

if TYPE_CHECKING:
    from datetime import date

    from collector.config import AppConfig

ENTRY_POINT_GROUP = "collector.sinks"
OWN_DISTRIBUTION = "zencoder-collector"

log = structlog.get_logger(__name__)

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class PluginLoadError(CollectorError):
    """A plugin is unusable in a way that must stop start-up (bad hookimpl, failing configure)."""


@dataclass(frozen=True)
class PluginOrigin:
    """Where a registered plugin came from."""

    entry_point: str | None
    distribution: str | None
    version: str | None


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin or sink type that could not be loaded; fatal only if a sink of this type is used."""

    name: str
    """The entry-point name, which is by convention the sink type it provides (or the type name)."""
    distribution: str | None
    version: str | None
    error: str
    """What went wrong, e.g. ``ModuleNotFoundError: No module named 'aiobotocore'``."""
    hint: str | None = None
    """What fixes it, e.g. ``pip install 'zencoder-collector[s3]'``."""
    missing_extra: str | None = None
    """The optional extra of its distribution that is not installed (``s3``), when that is all
    that is wrong: the plugin is then merely *not installed*, not broken."""

    def message(self) -> str:
        origin = ""
        if self.distribution:
            version = f" {self.version}" if self.version else ""
            origin = f" (from {self.distribution}{version})"
        text = f"sink type '{self.name}' is not available{origin}: {self.error}"
        if self.hint:
            text += f"; to fix: {self.hint}"
        return text


@dataclass(frozen=True)
class SinkTypeInfo:
    """One sink type as ``zencoder-collector plugins`` shows it."""

    type_name: str
    sink_class: type[Sink]
    plugin: str
    distribution: str | None
    version: str | None
    summary: str
    config_schema: dict[str, Any] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "class": f"{self.sink_class.__module__}.{self.sink_class.__qualname__}",
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "summary": self.summary,
            "config_schema": self.config_schema,
        }


class CollectorPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers each plugin's origin and the plugins that failed."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.origins: dict[str, PluginOrigin] = {}
        self.broken: list[BrokenPlugin] = []


def make_plugin_manager(load_entrypoints: bool = True) -> CollectorPluginManager:
    """Build the plugin manager: hook specs, every ``collector.sinks`` entry point, checks.

    Raises :class:`PluginLoadError` when a loaded plugin has a hookimpl that matches no hook or
    whose arguments do not match the hook's, so the mistake shows at start-up.
    """
    pm = CollectorPluginManager()
    pm.add_hookspecs(hookspecs)
    if load_entrypoints:
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in eps:
            _load_entry_point(pm, ep)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"plugin '{pm.get_name(exc.plugin)}': {exc}") from None
    return pm


def _load_entry_point(pm: CollectorPluginManager, ep: metadata.EntryPoint) -> None:
    dist = ep.dist
    dist_name = dist.name if dist is not None else None
    version = dist.version if dist is not None else None
    try:
        plugin = ep.load()
    except Exception as exc:  # any import-time failure of a plugin must not stop the collector
        extra = _missing_extra(dist, ep, exc)
        broken = BrokenPlugin(
            name=ep.name,
            distribution=dist_name,
            version=version,
            error=_describe(exc),
            hint=_install_hint(dist, ep, exc),
            missing_extra=extra,
        )
        pm.broken.append(broken)
        # An extra left out on purpose (a plain install without [s3]) is not worth a warning on
        # every start: it becomes an error if a configured sink needs it (see _unavailable_config).
        (log.debug if extra else log.warning)(
            "plugin could not be loaded", plugin=ep.name, error=broken.message()
        )
        return
    if pm.is_registered(plugin):
        return  # a second entry point for the same module (an alias) adds nothing
    name = ep.name if pm.get_plugin(ep.name) is None else f"{ep.name}@{dist_name}"
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"plugin '{name}' ({dist_name}): {exc}") from None
    pm.origins[name] = PluginOrigin(entry_point=ep.value, distribution=dist_name, version=version)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _install_hint(
    dist: metadata.Distribution | None, ep: metadata.EntryPoint, exc: BaseException
) -> str | None:
    """The command that most likely fixes a failed plugin import."""
    if dist is None:
        return None
    if not isinstance(exc, ImportError):
        return f"report it to the authors of {dist.name}, or upgrade: pip install -U '{dist.name}'"
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing is None:
        return f"pip install -U '{dist.name}'"
    plugin_module = ep.value.split(":")[0].strip()
    if plugin_module == missing or plugin_module.startswith(missing + "."):
        # The distribution names a module it does not ship: a broken or outdated install.
        return f"pip install --force-reinstall '{dist.name}'"
    extra = _missing_extra(dist, ep, exc)
    if extra is not None:
        return f"pip install '{dist.name}[{extra}]'"
    return f"install the package that provides the module '{missing.split('.')[0]}'"


def _missing_extra(
    dist: metadata.Distribution | None, ep: metadata.EntryPoint, exc: BaseException
) -> str | None:
    """The extra of ``dist`` that provides the module whose absence ``exc`` reports, if any."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if dist is None or missing is None:
        return None
    plugin_module = ep.value.split(":")[0].strip()
    if plugin_module == missing or plugin_module.startswith(missing + "."):
        return None  # the distribution lacks its own module: broken, not an extra left out
    top = _normalize(missing.split(".")[0])
    extras_needing: dict[str, int] = {}
    extra_sizes: dict[str, int] = {}
    for requirement in dist.requires or []:
        name_match = _REQUIREMENT_NAME.match(requirement)
        extra_match = _EXTRA_MARKER.search(requirement)
        if not name_match or not extra_match:
            continue
        extra = extra_match.group(1)
        extra_sizes[extra] = extra_sizes.get(extra, 0) + 1
        if _normalize(name_match.group(1)) == top:
            extras_needing[extra] = 1
    if extras_needing:
        # Prefer the extra named like the plugin, then the smallest one ("s3" over "all").
        return min(extras_needing, key=lambda e: (e != ep.name, extra_sizes[e], e))
    if ep.name in (dist.metadata.get_all("Provides-Extra") or []):
        return ep.name
    return None


# --- the registry of sink types -----------------------------------------------------------------


def _unavailable_config(broken: BrokenPlugin) -> type[SinkConfig]:
    """A config model that refuses every value with the broken plugin's message."""
    message = broken.message()

    class UnavailableSinkConfig(SinkConfig):
        model_config = ConfigDict(extra="allow")

        @model_validator(mode="before")
        @classmethod
        def _refuse(cls, data: Any) -> Any:
            raise ValueError(message)

    UnavailableSinkConfig.__name__ = f"Unavailable_{re.sub(r'[^A-Za-z0-9_]', '_', broken.name)}"
    return UnavailableSinkConfig


class SinkRegistry:
    """Sink types by name, built from every plugin's ``collector_register_sinks`` answer."""

    def __init__(
        self,
        infos: Mapping[str, SinkTypeInfo],
        broken: Iterable[BrokenPlugin] = (),
    ) -> None:
        self._infos = dict(sorted(infos.items()))
        self._broken = list(broken)

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> SinkRegistry:
        """Ask each plugin for its sinks one at a time, so one failing plugin spoils no other."""
        origins = pm.origins if isinstance(pm, CollectorPluginManager) else {}
        broken: list[BrokenPlugin] = list(getattr(pm, "broken", []))
        claims: dict[str, list[SinkTypeInfo]] = {}
        for impl in reversed(pm.hook.collector_register_sinks.get_hookimpls()):
            origin = origins.get(impl.plugin_name) or _origin_of(impl.plugin)
            try:
                classes = list(cast("Iterable[object]", impl.function() or []))
            except Exception as exc:  # a plugin's bug must not hide the other plugins' sinks
                broken.append(
                    BrokenPlugin(
                        impl.plugin_name, origin.distribution, origin.version, _describe(exc)
                    )
                )
                continue
            for candidate in classes:
                checked = _check_contract(candidate)
                if isinstance(checked, str):
                    label = getattr(candidate, "type_name", "") or impl.plugin_name
                    broken.append(
                        BrokenPlugin(str(label), origin.distribution, origin.version, checked)
                    )
                    continue
                sink_class = cast("type[Sink]", candidate)
                info = SinkTypeInfo(
                    type_name=sink_class.type_name,
                    sink_class=sink_class,
                    plugin=impl.plugin_name,
                    distribution=origin.distribution,
                    version=origin.version,
                    summary=(sink_class.__doc__ or "").strip().split("\n")[0],
                    config_schema=checked,
                )
                claimants = claims.setdefault(sink_class.type_name, [])
                if all(c.sink_class is not sink_class for c in claimants):
                    claimants.append(info)
        infos: dict[str, SinkTypeInfo] = {}
        for type_name, claimants in claims.items():
            if len(claimants) == 1:
                infos[type_name] = claimants[0]
                continue
            who = " and ".join(
                f"{c.sink_class.__module__}.{c.sink_class.__qualname__} ({c.distribution})"
                for c in claimants
            )
            broken.append(BrokenPlugin(type_name, None, None, f"the type name is claimed by {who}"))
        return cls(infos, broken)

    def types(self) -> dict[str, type[Sink]]:
        """Every usable sink type: ``type_name -> Sink subclass``."""
        return {name: info.sink_class for name, info in self._infos.items()}

    def config_types(self) -> dict[str, type[SinkConfig]]:
        """``type_name -> Config`` for the config loader; broken types get a refusing model."""
        result: dict[str, type[SinkConfig]] = {}
        for broken in self._broken:
            if broken.name not in self._infos and broken.name not in result:
                result[broken.name] = _unavailable_config(broken)
        for name, info in self._infos.items():
            result[name] = info.sink_class.Config
        return dict(sorted(result.items()))

    def describe(self) -> list[SinkTypeInfo]:
        """Every usable sink type with its origin and config JSON schema, sorted by name."""
        return list(self._infos.values())

    def broken(self) -> list[BrokenPlugin]:
        """Plugins and sink types that could not be loaded (shown by ``plugins``, ``validate``)."""
        return list(self._broken)

    def require(self, type_name: str) -> type[Sink]:
        """The sink class for ``type_name``, or :class:`PluginLoadError` saying how to get it."""
        info = self._infos.get(type_name)
        if info is not None:
            return info.sink_class
        for broken in self._broken:
            if broken.name == type_name:
                raise PluginLoadError(broken.message())
        known = ", ".join(self._infos) or "none"
        raise PluginLoadError(f"unknown sink type '{type_name}' (installed: {known})")

    def create(self, name: str, config: SinkConfig, host: SinkHost | None = None) -> Sink:
        """Instantiate the sink instance ``name`` from its validated config (no I/O)."""
        sink = self.require(config.type)(name, config)
        if host is not None:
            sink.host = host
        return sink

    def render(self, *, as_json: bool = False, schemas: bool = False) -> str:
        """The text (or JSON) the ``zencoder-collector plugins`` command prints."""
        if as_json:
            payload = {
                "sinks": [info.as_dict() for info in self._infos.values()],
                "broken": [
                    b.__dict__
                    | {
                        "message": b.message(),
                        "status": "not installed" if b.missing_extra else "broken",
                    }
                    for b in self._broken
                ],
            }
            return json.dumps(payload, indent=2, sort_keys=False)
        lines: list[str] = []
        for info in self._infos.values():
            origin = f"{info.distribution} {info.version}" if info.distribution else info.plugin
            lines.append(f"{info.type_name:<12} {origin:<32} {info.summary}")
            if schemas:
                lines.append(json.dumps(info.config_schema, indent=2))
        for broken in self._broken:
            if broken.missing_extra is not None and broken.hint:
                lines.append(f"{broken.name:<12} not installed ({broken.hint})")
            else:
                lines.append(f"{broken.name:<12} BROKEN  {broken.message()}")
        return "\n".join(lines) if lines else "no sink plugins installed"


def _check_contract(sink_class: object) -> str | dict[str, Any]:
    """What is wrong with a registered sink class, or (nothing wrong) its config JSON schema,
    which is built once here: it is part of the contract and costs milliseconds per type."""
    if not isinstance(sink_class, type) or not issubclass(sink_class, Sink):
        return f"{sink_class!r} is not a subclass of collector.sink.Sink"
    if not isinstance(sink_class.type_name, str) or not _TYPE_NAME.match(sink_class.type_name):
        return (
            f"{sink_class.__qualname__}.type_name {sink_class.type_name!r} must be lower-case "
            "letters, digits, '-' or '_', starting with a letter"
        )
    config = sink_class.Config
    if not isinstance(config, type) or not issubclass(config, SinkConfig):
        return f"{sink_class.__qualname__}.Config must subclass collector.sink.SinkConfig"
    try:
        return config.model_json_schema()
    except Exception as exc:  # the config schema is part of the contract (plugins, schema)
        return f"{sink_class.__qualname__}.Config has no JSON schema: {_describe(exc)}"


def _origin_of(plugin: object) -> PluginOrigin:
    """Find the distribution of a plugin registered without an entry point (e.g. in tests)."""
    module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", "")
    top = str(module).split(".")[0]
    dists = list(metadata.packages_distributions().get(top, []))
    if not dists:
        # Editable installs do not list their packages; the entry points still tell.
        dists = [
            ep.dist.name
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
            if ep.dist is not None and ep.value.split(".")[0].split(":")[0] == top
        ]
    if not dists and top == "collector":
        dists = [OWN_DISTRIBUTION]
    if not dists:
        return PluginOrigin(None, None, None)
    try:
        return PluginOrigin(None, dists[0], metadata.version(dists[0]))
    except metadata.PackageNotFoundError:
        return PluginOrigin(None, dists[0], None)


# --- calling hooks ------------------------------------------------------------------------------

_HookCallers = list[tuple[str, pluggy.HookCaller]]


class Notifier:
    """The notification hooks of :mod:`collector.hookspecs`, one typed method each.

    Each method has its hook's exact signature and calls it through pluggy
    (``pm.hook.<name>(...)``), so wrapper hookimpls run and the hook's arguments are checked by
    the type checker at every call site. Pluggy ends a hook call at the first implementation that
    raises; so that one broken plugin disturbs neither the caller nor the other plugins, a hook
    implemented by several plugins is called once per plugin, through
    :meth:`pluggy.PluginManager.subset_hook_caller` (the hook without the other plugins'
    implementations, the wrappers kept), in pluggy's order. What a call raises is logged (plugin,
    hook, error; the traceback at debug) and swallowed. Each method returns how many plugins
    raised. The per-plugin callers are built once and again only when the hook's
    implementations change (a plugin registered or unregistered).
    """

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        if pm is None:  # a pipeline or deliverer built without plugins: the hooks, no plugins
            pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
        self.pm = pm
        self._callers: dict[str, tuple[tuple[pluggy.HookImpl, ...], _HookCallers]] = {}

    def tenant_cycle_started(self, tenant: str, planned: int) -> int:
        return self._call(
            self.pm.hook.collector_tenant_cycle_started, tenant=tenant, planned=planned
        )

    def tenant_day_collected(self, tenant: str, day: date, changed: bool) -> int:
        return self._call(
            self.pm.hook.collector_tenant_day_collected, tenant=tenant, day=day, changed=changed
        )

    def tenant_day_failed(self, tenant: str, day: date, error: str) -> int:
        return self._call(
            self.pm.hook.collector_tenant_day_failed, tenant=tenant, day=day, error=error
        )

    def tenant_cycle_done(self, tenant: str, fetched: int, failed: int, error: str | None) -> int:
        return self._call(
            self.pm.hook.collector_tenant_cycle_done,
            tenant=tenant,
            fetched=fetched,
            failed=failed,
            error=error,
        )

    def tenant_failed(self, tenant: str, error: str) -> int:
        return self._call(self.pm.hook.collector_tenant_failed, tenant=tenant, error=error)

    def sink_delivery_failed(
        self, sink: str, tenant: str, day: date, error: str, dead_lettered: bool
    ) -> int:
        return self._call(
            self.pm.hook.collector_sink_delivery_failed,
            sink=sink,
            tenant=tenant,
            day=day,
            error=error,
            dead_lettered=dead_lettered,
        )

    def _call(self, hook: pluggy.HookCaller, **kwargs: object) -> int:
        failures = 0
        for plugin_name, caller in self._per_plugin(hook):
            try:
                caller(**kwargs)
            except Exception as exc:  # an alerting plugin's bug must never stop the collector
                failures += 1
                log.warning(
                    "plugin hook raised", plugin=plugin_name, hook=hook.name, error=_describe(exc)
                )
                # The traceback is for the plugin's authors: at debug, so a hook failing on every
                # event does not fill the log.
                log.debug(
                    "plugin hook traceback",
                    plugin=plugin_name,
                    hook=hook.name,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
        return failures

    def _per_plugin(self, hook: pluggy.HookCaller) -> _HookCallers:
        """One caller per implementing plugin, last registered first (pluggy's order)."""
        impls = tuple(hook.get_hookimpls())
        cached = self._callers.get(hook.name)
        if cached is not None and cached[0] == impls:
            return cached[1]
        plain = [impl for impl in impls if not (impl.wrapper or impl.hookwrapper)]
        callers: _HookCallers
        if len(plain) <= 1:
            # Nothing another plugin could stop: the hook itself (none at all when no plugin
            # implements it, the common case on the hot path).
            callers = [(plain[0].plugin_name if plain else "wrappers", hook)] if impls else []
        else:
            others = [impl.plugin for impl in plain]
            callers = [
                (
                    impl.plugin_name,
                    self.pm.subset_hook_caller(
                        hook.name, [p for p in others if p is not impl.plugin]
                    ),
                )
                for impl in reversed(plain)
            ]
        self._callers[hook.name] = (impls, callers)
        return callers


def configure_plugins(pm: pluggy.PluginManager, config: AppConfig) -> None:
    """Call ``collector_configure`` on every plugin; raise :class:`PluginLoadError` if any fails.

    All implementations run even when one fails, and the error lists every failing plugin.
    """
    problems: list[str] = []
    for impl in reversed(pm.hook.collector_configure.get_hookimpls()):
        try:
            impl.function(*[{"config": config}[name] for name in impl.argnames])
        except Exception as exc:  # collected and raised together below
            problems.append(f"plugin '{impl.plugin_name}': {_describe(exc)}")
    if problems:
        raise PluginLoadError("collector_configure failed: " + "; ".join(problems))
