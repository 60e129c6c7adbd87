"""What each CLI command does; ``cli.py`` only parses arguments and maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from collector.app import Plugins, load, load_plugins, open_runtime
from collector.cli import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, dump_json, end_startup
from collector.config import AppConfig, json_schema, summarize
from collector.errors import ApiError
from collector.pipeline import CycleResult, utc_today
from collector.report import cycle_summary

if TYPE_CHECKING:
    from collector.report.sources import ReportSource

log = structlog.get_logger("collector.cli")


def _load(args: argparse.Namespace) -> tuple[AppConfig, Plugins]:
    plugins = load_plugins()
    config = load(args.config, plugins)
    end_startup()  # plugins imported, config built: see collector.cli
    return config, plugins


def _select(config: AppConfig, ids: list[str] | None) -> list[object] | None:
    if not ids:
        return None
    known = {t.id: t for t in config.tenants}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise SystemExit(f"error: unknown tenant(s): {', '.join(unknown)}")
    return [known[i] for i in ids]


def schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(load_plugins().registry.config_types()), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return EXIT_OK


def plugins(args: argparse.Namespace) -> int:
    print(load_plugins().registry.render(as_json=args.json, schemas=args.schemas))
    return EXIT_OK


async def validate(args: argparse.Namespace) -> int:
    config, _ = _load(args)
    print(summarize(config))
    if not args.check_credentials:
        return EXIT_OK
    from collector.client import ApiClient

    failures = 0
    async with ApiClient(config.api) as client:

        async def check(tenant_id: str) -> str:
            tenant = next(t for t in config.tenants if t.id == tenant_id)
            try:
                await client.fetch_day(tenant, utc_today() - dt.timedelta(days=1), retry=False)
            except ApiError as exc:
                return exc.reason
            return "ok"

        ids = [t.id for t in config.tenants if t.enabled]
        results = await asyncio.gather(*(check(i) for i in ids))
    for tenant_id, outcome in zip(ids, results, strict=True):
        print(f"  {tenant_id}: {outcome}")
        failures += outcome != "ok"
    return EXIT_OK if failures == 0 else EXIT_INCOMPLETE


async def _cycle(
    config: AppConfig, loaded: Plugins, tenants: list[object] | None, days: object = None
) -> tuple[CycleResult, bool]:
    async with open_runtime(config, loaded) as runtime:
        assert runtime.collector is not None
        deliver = (
            asyncio.create_task(runtime.deliverer.run_forever()) if runtime.deliverer else None
        )
        result = await runtime.collector.run_cycle(tenants, days=days)  # type: ignore[arg-type]
        delivered = True
        if runtime.deliverer is not None and deliver is not None:
            await runtime.deliverer.stop(grace=30.0)
            await asyncio.gather(deliver, return_exceptions=True)
            delivered = await runtime.deliverer.run_until_drained()
    return result, delivered


async def run(args: argparse.Namespace) -> int:
    config, loaded = _load(args)
    tenants = _select(config, args.tenant)
    if not args.once:
        from collector.daemon import run_daemon

        return await run_daemon(args.config, loaded, tenants=args.tenant)
    result, delivered = await _cycle(config, loaded, tenants)
    print(cycle_summary(result))
    if not delivered:
        print(
            "some sinks still have undelivered days: see `zencoder-collector status`",
            file=sys.stderr,
        )
    return EXIT_OK if result.ok and delivered else EXIT_INCOMPLETE


async def backfill(args: argparse.Namespace) -> int:
    config, loaded = _load(args)
    until: dt.date = args.until or utc_today()
    since: dt.date = args.since
    if since > until:
        print(f"error: --since {since} is after --until {until}", file=sys.stderr)
        return EXIT_USAGE
    span = [since + dt.timedelta(days=i) for i in range((until - since).days + 1)]
    tenants = _select(config, args.tenant)
    result, delivered = await _cycle(config, loaded, tenants, days=lambda _tenant: span)
    print(cycle_summary(result))
    return EXIT_OK if result.ok and delivered else EXIT_INCOMPLETE


async def status(args: argparse.Namespace) -> int:
    config, _ = _load(args)
    from collector.status import render_status, status_snapshot
    from collector.store import Store

    store = await Store.open(config.state.connection_url())
    try:
        snapshot = await status_snapshot(config, store)
    finally:
        await store.aclose()
    print(dump_json(snapshot) if args.json else render_status(snapshot))
    return EXIT_OK


async def replay(args: argparse.Namespace) -> int:
    config, loaded = _load(args)
    if args.sink not in config.sinks:
        print(
            f"error: no sink named {args.sink!r} (configured: {', '.join(config.sinks)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    async with open_runtime(config, loaded, only_sinks={args.sink}) as runtime:
        reset = 0
        for tenant in args.tenant or [None]:
            reset += await runtime.store.replay(
                args.sink, tenant=tenant, since=args.since, only_dead=args.dead_letters
            )
        print(f"{reset} tenant-day(s) queued for redelivery to {args.sink}")
        assert runtime.deliverer is not None
        delivered = await runtime.deliverer.run_until_drained()
        backlog = await runtime.store.backlog(args.sink)
    print(f"{args.sink}: backlog {backlog}")
    return EXIT_OK if delivered else EXIT_INCOMPLETE


def report(args: argparse.Namespace) -> int:
    from collector.report.model import ReportError, Window
    from collector.report.render import render
    from collector.report.sources import make_report

    try:
        until: dt.date = args.until or utc_today()
        window = Window(args.since, until) if args.since else Window.last(args.days, until)
        source, names = _report_source(args)
        usage = make_report(source, window, names=names, stale_days=args.stale_days)
        text = render(usage, args.format, args.section)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not args.output:
        print(text)
        return EXIT_OK
    try:
        Path(args.output).write_text(text if text.endswith("\n") else text + "\n", "utf-8")
    except OSError as error:
        print(f"error: cannot write {args.output}: {error.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _report_source(args: argparse.Namespace) -> tuple[ReportSource, dict[str, str]]:
    """What ``report`` reads (``--db``, ``--csv`` or a sink of the config) and the tenant names
    of the config, if one is given."""
    from collector.report.model import ReportError
    from collector.report.sources import CsvSource, SqlSource, choose_sink

    if sum(bool(x) for x in (args.db, args.csv, args.sink)) > 1:
        raise ReportError("give one of --sink, --db and --csv")
    config = _load(args)[0] if args.config else None
    names = {t.id: t.name for t in config.tenants} if config else {}
    if args.db:
        return SqlSource.from_argument(args.db), names
    if args.csv:
        return CsvSource(Path(args.csv).expanduser(), f"CSV files in {args.csv}"), names
    if config is None:
        raise ReportError("give -c CONFIG (to read its SQL or CSV sink), --db URL or --csv DIR")
    return choose_sink(config.sinks, args.sink), names


async def demo(args: argparse.Namespace) -> int:
    from collector.simulator import SimulatorSettings, demo_tenants, running_simulator

    output = Path(args.output)
    await asyncio.to_thread(output.mkdir, parents=True, exist_ok=True)
    settings = SimulatorSettings(tenants=demo_tenants(5), latency=0.005)
    async with running_simulator(settings) as sim:
        environ = {
            **os.environ,
            "ZC_DEMO_BASE_URL": sim.base_url,
            "ZC_DEMO_TOKEN_URL": sim.token_url,
            "ZC_DEMO_OUTPUT": str(output),
        }
        plugins_ = load_plugins()
        config = load(_demo_config_path(), plugins_, environ=environ)
        print(f"simulator on {sim.base_url} with 5 demo organizations; collecting 30 days...\n")
        result, delivered = await _cycle(config, plugins_, None)
    print(cycle_summary(result))
    from collector.report.model import Window
    from collector.report.render import render
    from collector.report.sources import choose_sink, make_report

    usage = make_report(choose_sink(config.sinks, None), Window.last(30, utc_today()))
    print()
    print(render(usage, "table", "usage"))
    page = output / "report.html"
    await asyncio.to_thread(page.write_text, render(usage, "html"), "utf-8")
    print(
        f"\nfiles: {output}/usage.db (SQLite), {output}/csv/ (CSV), {output}/state.db (state), "
        f"{page} (HTML report)"
    )
    print(f"next: zencoder-collector report --db {output}/usage.db --format html -o report.html")
    return EXIT_OK if result.ok and delivered else EXIT_INCOMPLETE


def _demo_config_path() -> Path:
    """The demo config is package data: wheel and editable installs both have it, whatever the
    working directory (config/demo.yaml in the repository is a link to it)."""
    from importlib import resources

    return Path(str(resources.files("collector") / "_data" / "demo.yaml"))
