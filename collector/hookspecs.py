"""The pluggy hooks a collector plugin can implement (project name ``collector``).

A plugin is a module (or any object) named by an entry point in the ``collector.sinks`` group; the
collector registers it with :func:`collector.plugin_manager.make_plugin_manager` and calls the
functions it marks with :data:`hookimpl`::

    from collector.hookspecs import hookimpl

    @hookimpl
    def collector_register_sinks():
        return [MySink]

Pluggy only registers and notifies. It never sits on the async hot path: the host calls
``collector_register_sinks`` and ``collector_configure`` at start-up, ``collector_sink_purge``
when a tenant is purged, and the notification hooks (``collector_tenant_cycle_started``,
``collector_tenant_day_collected``, ``collector_tenant_day_failed``,
``collector_tenant_cycle_done``, ``collector_tenant_failed``, ``collector_sink_delivery_failed``)
through :class:`collector.plugin_manager.Notifier`: one typed method per hook, calling it through
pluggy (wrappers run) once per implementing plugin, logging and swallowing what a plugin raises, so
one broken alerting plugin can neither stop the others nor the collector. Notification hooks run
on the event loop thread: keep them quick and non-blocking (hand slow work to a thread or a queue
of your own).

A hookimpl may accept a subset of a hook's arguments (pluggy passes only the names it asks for),
so a hook that later gains an argument keeps working with older plugins. Every hook below is
documented under its exact signature in docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import date
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collector.config import AppConfig
    from collector.sink import Sink

PROJECT_NAME = "collector"
"""The pluggy project name: hook functions are ``collector_``-prefixed and marked with it."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def collector_register_sinks() -> list[type[Sink]]:  # type: ignore[empty-body]
    """Return the sink classes this plugin provides.

    Called once at start-up. Each class subclasses :class:`collector.sink.Sink`, sets a unique
    ``type_name`` (what users write as ``type:`` in the config) and a ``Config`` model subclassing
    :class:`collector.sink.SinkConfig`. Two plugins claiming the same ``type_name`` make that type
    unusable (the conflict is reported when a sink of that type is configured).
    """


@hookspec
def collector_configure(config: AppConfig) -> None:
    """Receive the validated application config, once after it is loaded (and after a reload).

    Use it to read settings or prepare clients; do not start long-running work here. Raising
    stops start-up with the plugin's name and the error, because a plugin that cannot configure
    itself would otherwise fail silently later. The config holds secrets as ``SecretStr``: never
    log or store their values.
    """


@hookspec
def collector_tenant_cycle_started(tenant: str, planned: int) -> None:
    """A tenant's cycle (or its part of a backfill) begins with ``planned`` tenant-days to fetch.

    Together with ``collector_tenant_day_collected``, ``collector_tenant_day_failed`` and
    ``collector_tenant_cycle_done`` this is enough to show progress (the CLI's progress display is
    a plugin of exactly these hooks). Called on the event loop: keep it quick. Exceptions are
    logged and swallowed.
    """


@hookspec
def collector_tenant_day_collected(tenant: str, day: date, changed: bool) -> None:
    """A tenant-day was fetched and committed to the state store.

    ``changed`` is True when its content differs from the stored version (or it is new), i.e. it
    will be delivered to the sinks; False when a re-fetch found nothing new. Called on the event
    loop: keep it quick. Exceptions are logged and swallowed.
    """


@hookspec
def collector_tenant_day_failed(tenant: str, day: date, error: str) -> None:
    """Fetching one tenant-day failed in this cycle; it is planned again next cycle.

    ``error`` is the short, secret-free reason. Bad credentials stop the whole tenant instead
    (``collector_tenant_failed``; the days not attempted get no call of their own). Called on the
    event loop: keep it quick. Exceptions are logged and swallowed.
    """


@hookspec
def collector_tenant_cycle_done(tenant: str, fetched: int, failed: int, error: str | None) -> None:
    """A tenant's cycle ended: ``fetched`` days committed, ``failed`` days not (those never tried
    after an authentication failure included), ``error`` the reason the tenant failed, or None.

    Also called for a tenant skipped because its credentials are paused (``fetched`` and
    ``failed`` 0, ``error`` says until when). Called on the event loop: keep it quick. Exceptions
    are logged and swallowed.
    """


@hookspec
def collector_tenant_failed(tenant: str, error: str) -> None:
    """A tenant's collection failed for this cycle (bad credentials, API down after retries, ...).

    ``error`` is a short, secret-free reason such as ``"AuthError: HTTP 401: ..."``. The other
    tenants are unaffected. Called on the event loop: keep it quick. Exceptions are logged and
    swallowed.
    """


@hookspec
def collector_sink_delivery_failed(
    sink: str, tenant: str, day: date, error: str, dead_lettered: bool
) -> None:
    """Delivering one tenant-day to the sink instance named ``sink`` failed.

    ``error`` is the secret-free reason the sink gave. ``dead_lettered`` is True when the
    collector gave up on this tenant-day for this sink (a permanent error, or ``max_attempts``
    reached); it can then only reach that sink again by ``replay``. False means it will be retried
    with backoff. Called on the event loop: keep it quick. Exceptions are logged and swallowed.
    """


@hookspec
def collector_sink_purge(sink: Sink, tenant: str) -> Awaitable[int] | None:
    """Delete everything the open sink instance ``sink`` holds for ``tenant``, if this plugin
    knows how (``tenant purge``, offboarding a client).

    Return None when ``sink`` is not one of this plugin's sinks (or it cannot delete); otherwise
    an awaitable that performs the deletion and gives the number of items removed (rows, files,
    objects). The host opens the sink before and closes it after; the first implementation that
    returns an awaitable decides. A sink no plugin purges is listed as "cannot delete" for the
    operator to handle by hand. Raising (or failing the awaitable) reports that sink as failed;
    the state store and the other sinks are still purged.
    """
