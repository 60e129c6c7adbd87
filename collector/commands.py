"""What each CLI command does; ``cli.py`` only parses arguments and maps errors to exit codes."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import anyio
import structlog

from collector.app import Plugins, load, load_plugins, open_runtime
from collector.concurrency import run_sync
from collector.config import AppConfig, json_schema, summarize
from collector.errors import ApiError
from collector.pipeline import CycleResult, utc_today
from collector.planner import oldest_servable, split_by_history
from collector.process import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE, dump_json, end_startup
from collector.report import cycle_summary

if TYPE_CHECKING:
    from collector.config import TenantConfig
    from collector.deliverer import Deliverer
    from collector.report.sources import ReportSource
    from collector.simulator import SimTenant

log = structlog.get_logger(__name__)


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
    if args.markdown:
        from collector.config_reference import render_reference

        text = render_reference().rstrip("\n")
    else:
        text = json.dumps(json_schema(load_plugins().registry.config_types()), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return EXIT_OK


def plugins(args: argparse.Namespace) -> int:
    print(load_plugins().registry.render(as_json=args.json, schemas=args.schemas))
    return EXIT_OK


def _validate_document(config: AppConfig, credentials: dict[str, str] | None) -> dict[str, object]:
    """``validate --json``: the shape is documented in docs/operations.md ("Scripting")."""
    return {
        "ok": credentials is None or all(v == "ok" for v in credentials.values()),
        "summary": summarize(config),
        "tenants": [
            {
                "id": t.id,
                "name": t.name or t.id,
                "enabled": t.enabled,
                "auth": t.auth_mode,
                "sinks": sorted(config.tenant_sinks(t)),
            }
            for t in config.tenants
        ],
        "sinks": {name: sink.type for name, sink in config.sinks.items()},
        "credentials": credentials,
    }


async def validate(args: argparse.Namespace) -> int:
    config, _ = _load(args)
    if not args.check_credentials:
        print(dump_json(_validate_document(config, None)) if args.json else summarize(config))
        return EXIT_OK
    if not args.json:
        print(summarize(config))
    from collector.client import ApiClient

    async with ApiClient(config.api) as client:

        async def check(tenant_id: str) -> str:
            tenant = next(t for t in config.tenants if t.id == tenant_id)
            try:
                await client.fetch_day(tenant, utc_today() - dt.timedelta(days=1), retry=False)
            except ApiError as exc:
                return exc.reason
            return "ok"

        ids = [t.id for t in config.tenants if t.enabled]
        outcomes: dict[str, str] = {}
        errors: list[Exception] = []

        async def record(tenant_id: str) -> None:
            try:
                outcomes[tenant_id] = await check(tenant_id)
            except Exception as exc:  # raised below, unwrapped, once every check has finished
                errors.append(exc)

        async with anyio.create_task_group() as group:
            for tenant_id in ids:
                group.start_soon(record, tenant_id, name=f"check:{tenant_id}")
        if errors:
            raise errors[0]
        results = [outcomes[tenant_id] for tenant_id in ids]
    credentials = dict(zip(ids, results, strict=True))
    if args.json:
        print(dump_json(_validate_document(config, credentials)))
    else:
        for tenant_id, outcome in credentials.items():
            print(f"  {tenant_id}: {outcome}")
    failures = sum(outcome != "ok" for outcome in credentials.values())
    return EXIT_OK if failures == 0 else EXIT_INCOMPLETE


def cycle_document(result: CycleResult, delivered: bool, **extra: object) -> dict[str, object]:
    """``run --once --json`` and ``backfill --json``: the shape is documented in
    docs/operations.md ("Scripting")."""
    tenants = {
        tenant: {
            "ok": r.ok,
            "planned": r.planned,
            "fetched": r.fetched,
            "changed": r.changed,
            "failed": r.failed,
            "error": r.error,
            "skipped": r.skipped,
            "seconds": round(r.seconds, 3),
        }
        for tenant, r in result.tenants.items()
    }
    return {
        "ok": result.ok and delivered,
        "collected": result.ok,
        "delivered": delivered,
        "seconds": round(result.seconds, 3),
        **extra,
        "totals": {
            "planned": sum(r.planned for r in result.tenants.values()),
            "fetched": result.fetched,
            "changed": sum(r.changed for r in result.tenants.values()),
            "failed": sum(r.failed for r in result.tenants.values()),
        },
        "tenants": tenants,
    }


async def _cycle_with_progress(
    args: argparse.Namespace,
    config: AppConfig,
    loaded: Plugins,
    tenants: list[object] | None,
    days: object = None,
) -> tuple[CycleResult, bool]:
    """:func:`_cycle` with the progress display as a plugin of the pipeline's hooks."""
    from collector.log import configure_logging
    from collector.progress import CycleProgress, choose_mode, make_display

    selected = tenants if tenants is not None else config.tenants
    count = sum(1 for t in selected if getattr(t, "enabled", True))
    mode = choose_mode(quiet=args.quiet or args.no_progress, stream=sys.stderr)
    progress = CycleProgress(count, make_display(mode))
    level, fmt = args.log_setup
    loaded.pm.register(progress, name="progress")
    try:
        with progress:
            if mode == "rich":
                # Log lines through rich's stderr, so they print above the bars, not across them.
                configure_logging(level, json=fmt)
            return await _cycle(config, loaded, tenants, days)
    finally:
        loaded.pm.unregister(progress)
        if mode == "rich":
            configure_logging(level, json=fmt)  # the real stderr again


async def _cycle(
    config: AppConfig, loaded: Plugins, tenants: list[object] | None, days: object = None
) -> tuple[CycleResult, bool]:
    async with open_runtime(config, loaded) as runtime:
        assert runtime.collector is not None
        deliverer = runtime.deliverer
        error: Exception | None = None
        # The deliverer delivers while the cycle fetches, in the same task group; stopped (its
        # writes in flight may finish) once the cycle is over.
        async with anyio.create_task_group() as group:
            if deliverer is not None:
                group.start_soon(_deliver_meanwhile, deliverer, name="deliverer")
            try:
                result = await runtime.collector.run_cycle(tenants, days=days)  # type: ignore[arg-type]
            except Exception as exc:  # raised after the group, unwrapped: the CLI's message
                error = exc
            finally:
                if deliverer is not None:
                    await deliverer.stop(grace=30.0)
        if error is not None:
            raise error
        delivered = await deliverer.run_until_drained() if deliverer is not None else True
    return result, delivered


async def _deliver_meanwhile(deliverer: Deliverer) -> None:
    try:
        await deliverer.run_forever()
    except Exception:  # its lanes catch their own failures; what is left is drained below
        log.exception("deliverer crashed")


async def run(args: argparse.Namespace) -> int:
    if not args.once and (args.json or args.quiet or args.no_progress):
        print("error: --json, --quiet and --no-progress go with run --once", file=sys.stderr)
        return EXIT_USAGE
    config, loaded = _load(args)
    tenants = _select(config, args.tenant)
    if not args.once:
        from collector.daemon import run_daemon

        return await run_daemon(args.config, loaded, tenants=args.tenant, config=config)
    result, delivered = await _cycle_with_progress(args, config, loaded, tenants)
    _print_outcome(args, result, delivered)
    return EXIT_OK if result.ok and delivered else EXIT_INCOMPLETE


def _print_outcome(
    args: argparse.Namespace, result: CycleResult, delivered: bool, **extra: object
) -> None:
    if args.json:
        print(dump_json(cycle_document(result, delivered, **extra)))
    elif not args.quiet:
        print(cycle_summary(result))
    if not delivered:
        print(
            "some sinks still have undelivered days: see `zencoder-collector status`",
            file=sys.stderr,
        )


async def backfill(args: argparse.Namespace) -> int:
    config, loaded = _load(args)
    until: dt.date = args.until or utc_today()
    since: dt.date = args.since
    if since > until:
        print(f"error: --since {since} is after --until {until}", file=sys.stderr)
        return EXIT_USAGE
    span = [since + dt.timedelta(days=i) for i in range((until - since).days + 1)]
    tenants = _select(config, args.tenant)
    history = config.api.history_days
    # The pipeline never asks for days older than the API's window (an empty answer would be
    # stored as zeros); say so here, before collecting what the window still holds.
    servable, too_old = split_by_history(span, utc_today(), history)
    if too_old:
        print(
            f"warning: {_days_text(too_old)} cannot be collected: the API serves the last "
            f"{history} days (api.history_days), from {oldest_servable(utc_today(), history)} "
            "on; nothing is stored for them",
            file=sys.stderr,
        )
    if not servable:
        return EXIT_OK
    plans = await _backfill_plans(config, tenants, servable, refetch=args.refetch)
    result, delivered = await _cycle_with_progress(
        args, config, loaded, tenants, days=lambda tenant: plans[tenant.id]
    )
    _print_outcome(args, result, delivered, since=since.isoformat(), until=until.isoformat())
    return EXIT_OK if result.ok and delivered else EXIT_INCOMPLETE


def _days_text(days: list[dt.date]) -> str:
    """``3 day(s), 2026-01-01..2026-01-03`` for a contiguous, sorted list of days."""
    span = days[0].isoformat() if len(days) == 1 else f"{days[0]}..{days[-1]}"
    return f"{len(days)} day(s), {span},"


async def _backfill_plans(
    config: AppConfig, tenants: list[object] | None, span: list[dt.date], *, refetch: bool
) -> dict[str, list[dt.date]]:
    """The days of ``span`` each tenant still needs: a day stored once it was final is not
    fetched again (so an interrupted backfill, run again, resumes), unless ``refetch``."""
    from collector.planner import needs_fetch
    from collector.store import Store

    selected = cast("list[TenantConfig]", tenants if tenants is not None else config.tenants)
    if refetch:
        return {t.id: span for t in selected}
    today = utc_today()
    store = await Store.open(config.state.connection_url())
    try:
        plans: dict[str, list[dt.date]] = {}
        for t in selected:
            states = await store.days_state(t.id, since=span[0])
            settle = config.tenant_settle(t)
            plans[t.id] = [d for d in span if needs_fetch(d, today, settle, states.get(d))]
    finally:
        await store.aclose()
    return plans


async def tenant(args: argparse.Namespace) -> int:
    """``tenant export`` and ``tenant purge`` (collector.tenant_admin)."""
    from collector import tenant_admin

    config, loaded = _load(args)
    if args.tenant_action == "export":
        return await tenant_admin.export_command(config, args.tenant_id, Path(args.output))
    return await tenant_admin.purge_command(
        config, loaded, args.tenant_id, assume_yes=args.yes, as_json=args.json
    )


async def status(args: argparse.Namespace) -> int:
    config, _ = _load(args)
    from collector.status import render_status, status_snapshot
    from collector.store import Store

    store = await Store.open(config.state.connection_url())
    try:
        snapshot = await status_snapshot(config, store)
    finally:
        await store.aclose()
    print(dump_json(snapshot.to_dict()) if args.json else render_status(snapshot))
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


async def reprocess(args: argparse.Namespace) -> int:
    config, loaded = _load(args)
    from collector.reprocess import reprocess_stored

    if args.since and args.until and args.since > args.until:
        print(f"error: --since {args.since} is after --until {args.until}", file=sys.stderr)
        return EXIT_USAGE
    _select(config, args.tenant)  # exits naming unknown tenants
    ids: list[str] = args.tenant or [t.id for t in config.tenants]
    by_id = {t.id: t for t in config.tenants}
    async with open_runtime(config, loaded, exclusive=False) as runtime:
        result = await reprocess_stored(
            runtime.store,
            ids,
            lambda tenant: config.tenant_settle(by_id[tenant]),
            since=args.since,
            until=args.until,
        )
        print(result.summary())
        delivered = True
        if runtime.deliverer is not None:
            delivered = await runtime.deliverer.run_until_drained()
    if not delivered:
        print(
            "some sinks still have undelivered days: see `zencoder-collector status`",
            file=sys.stderr,
        )
    return EXIT_OK if delivered and not result.still_quarantined else EXIT_INCOMPLETE


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
    await anyio.Path(output).mkdir(parents=True, exist_ok=True)
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
    await anyio.Path(page).write_text(render(usage, "html"), "utf-8")
    print(
        f"\nfiles: {output}/usage.db (SQLite), {output}/csv/ (CSV), {output}/state.db (state), "
        f"{page} (HTML report)"
    )
    command = _cli_command()
    print(f"next: {command} report --db {output}/usage.db --format html -o report.html")
    ready = await run_sync(_write_simulator_config, output, settings.tenants)
    print(
        f"your own sink: `{command} simulate --tenants 5` serves these organizations on "
        f"{SIMULATE_URL};\n  {ready} collects them (URL and credentials filled in): put your "
        f"sink under `sinks:`, then `{command} run --once -c {ready}`"
    )
    return EXIT_OK if result.ok and delivered else EXIT_INCOMPLETE


SIMULATE_URL = "http://127.0.0.1:8080"
"""Where ``zencoder-collector simulate`` listens by default."""


def _write_simulator_config(output: Path, tenants: list[SimTenant]) -> Path:
    from collector.simulator.cli import ready_config

    path = output / "simulator.yaml"
    path.write_text(
        ready_config(SIMULATE_URL, tenants, workdir=str(output / "own-sink")), encoding="utf-8"
    )
    return path


def _cli_command() -> str:
    """How to run this CLI again from the current shell: ``zencoder-collector`` when that is on
    PATH, else the script's own path (e.g. ``.venv/bin/zencoder-collector`` without an activated
    venv), else ``python -m collector``."""
    import shutil

    script = Path(sys.argv[0])
    if script.name == "zencoder-collector":
        found = shutil.which("zencoder-collector")
        if found is not None and Path(found).resolve() == script.resolve():
            return "zencoder-collector"
        if script.is_file():
            return str(script)
    return f"{sys.executable} -m collector"


def _demo_config_path() -> Path:
    """The demo config is package data: wheel and editable installs both have it, whatever the
    working directory (config/demo.yaml in the repository is a link to it)."""
    from importlib import resources

    return Path(str(resources.files("collector") / "_data" / "demo.yaml"))
