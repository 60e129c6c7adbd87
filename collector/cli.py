"""The ``zencoder-collector`` command line (also ``python -m collector``).

Exit codes: 0 success; 1 at least one tenant (or sink) did not complete; 2 the config or the
command line is invalid (every problem printed, nothing touched).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from collector import __version__
from collector.errors import CollectorError, ConfigError

T = TypeVar("T")

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2

# Start-up builds some 150k long-lived objects (modules, classes, pydantic validators, the config)
# and hardly any garbage. Letting the cyclic garbage collector walk them over and over while they
# are made, and again several times at interpreter exit, cost about a fifth of the CPU of a short
# `run --once`. So main() pauses the collector until the command has loaded its config, then
# freezes what exists (gc.freeze: later collections, the ones at exit included, skip it) and
# resumes collecting. Reference counting still frees frozen objects; only cycles among them stay.
_gc_paused_for_startup = False


def pause_gc_for_startup() -> None:
    """Stop cyclic garbage collection until :func:`end_startup` (only if it is running now)."""
    global _gc_paused_for_startup
    if gc.isenabled():
        gc.disable()
        _gc_paused_for_startup = True


def end_startup() -> None:
    """Freeze the objects start-up built and resume garbage collection; a no-op unless
    :func:`pause_gc_for_startup` stopped the collector (never undoes someone else's gc.disable)."""
    global _gc_paused_for_startup
    if _gc_paused_for_startup:
        _gc_paused_for_startup = False
        gc.freeze()
        gc.enable()


def parse_day(value: str) -> dt.date:
    """argparse type for YYYY-MM-DD with a message that says what was expected."""
    try:
        return dt.date.fromisoformat(value) if len(value) == 10 else _bad_day(value)
    except ValueError:
        return _bad_day(value)


def _bad_day(value: str) -> dt.date:
    raise argparse.ArgumentTypeError(
        f"invalid date {value!r}: expected YYYY-MM-DD, e.g. 2026-01-31"
    )


def _config_arg(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "-c",
        "--config",
        required=required and "ZENCODER_COLLECTOR_CONFIG" not in os.environ,
        default=os.environ.get("ZENCODER_COLLECTOR_CONFIG"),
        help="config file (YAML); default: $ZENCODER_COLLECTOR_CONFIG",
    )


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser that can add its arguments on first use.

    ``simulate`` and ``export`` take their options from modules that import aiohttp.web, the
    simulator and the CSV sink; adding them only when that subcommand is parsed (or its help shown)
    keeps those imports out of every other command's start-up.
    """

    def __init__(
        self,
        *args: Any,
        populate: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ensure_populated(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(  # argparse calls this for the chosen subcommand
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        self._ensure_populated()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._ensure_populated()
        return super().format_usage()

    def format_help(self) -> str:
        self._ensure_populated()
        return super().format_help()


def _add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    from collector.simulator.cli import add_simulate_arguments

    add_simulate_arguments(parser)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from collector.export import add_export_arguments

    export_sub = parser.add_subparsers(dest="export_format", required=True)
    add_export_arguments(
        export_sub.add_parser("csv", help="concatenate CSV partitions into one file per table")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zencoder-collector",
        description="Collect Zencoder usage analytics for many organizations, deliver it to sinks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("ZENCODER_COLLECTOR_LOG_LEVEL"),
        help="debug, info (default), warning, error; the demo defaults to warning",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="auto: console on a terminal, JSON otherwise",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_SubcommandParser
    )

    run = sub.add_parser("run", help="run the daemon (or one cycle with --once)")
    _config_arg(run)
    run.add_argument(
        "--once",
        action="store_true",
        help="one cycle, then exit; exit code 0 only if every tenant succeeded",
    )
    run.add_argument("--tenant", action="append", help="limit to these tenant ids (repeatable)")

    validate = sub.add_parser(
        "validate",
        help="check the config (and with --check-credentials, each tenant's credentials)",
    )
    _config_arg(validate)
    validate.add_argument(
        "--check-credentials",
        action="store_true",
        help="ask the API for a token (or one day) per tenant",
    )

    backfill = sub.add_parser("backfill", help="fetch an explicit date range for one tenant or all")
    _config_arg(backfill)
    backfill.add_argument("--tenant", action="append", help="tenant id (repeatable); default: all")
    backfill.add_argument("--since", type=parse_day, required=True, help="first day, YYYY-MM-DD")
    backfill.add_argument(
        "--until", type=parse_day, help="last day, YYYY-MM-DD (default: today UTC)"
    )
    backfill.add_argument("--no-progress", action="store_true", help="no progress bar")

    status = sub.add_parser("status", help="per-tenant and per-sink state from the state store")
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print JSON (same as GET /status)")

    report = sub.add_parser(
        "report", help="cross-tenant usage and seat hygiene from a SQL or CSV sink (text/HTML)"
    )
    _config_arg(report, required=False)
    report.add_argument("--sink", help="sink to read, by name (default: the first SQL or CSV one)")
    report.add_argument("--db", help="read this SQLAlchemy URL or SQLite file instead of a sink")
    report.add_argument("--csv", metavar="DIR", help="read this CSV sink directory instead")
    window = report.add_mutually_exclusive_group()
    window.add_argument(
        "--days", type=int, default=30, help="window of N days ending --until (7, 30, 90...; 30)"
    )
    window.add_argument("--since", type=parse_day, help="first day of the window, YYYY-MM-DD")
    report.add_argument(
        "--until", type=parse_day, help="last day of the window (default: today UTC)"
    )
    report.add_argument(
        "--stale-days",
        type=int,
        default=14,
        help="seat hygiene: a user last active more than N days ago is stale (default 14)",
    )
    report.add_argument("--format", choices=["table", "csv", "json", "html"], default="table")
    report.add_argument(
        "--section",
        choices=["usage", "seats"],
        help="table/csv: only this part (csv default: usage); json and html hold both",
    )
    report.add_argument("-o", "--output", help="write to this file instead of stdout")

    replay = sub.add_parser(
        "replay", help="redeliver stored history to a sink without calling the API"
    )
    _config_arg(replay)
    replay.add_argument("--sink", required=True, help="sink instance name")
    replay.add_argument(
        "--tenant", action="append", help="tenant id (repeatable); default: all routed"
    )
    replay.add_argument("--since", type=parse_day, help="first day to redeliver")
    replay.add_argument("--dead-letters", action="store_true", help="only dead-lettered days")

    plugins = sub.add_parser("plugins", help="list discovered sink types, origin and config schema")
    plugins.add_argument("--json", action="store_true")
    plugins.add_argument(
        "--schemas", action="store_true", help="include each sink's config JSON Schema"
    )

    schema = sub.add_parser("schema", help="print the config JSON Schema")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")

    sub.add_parser(
        "simulate",
        help="serve the built-in Zencoder API simulator",
        populate=_add_simulate_arguments,
    )

    demo = sub.add_parser(
        "demo", help="simulator + collection into SQLite and CSV + report, in one go"
    )
    demo.add_argument("--output", default="demo-output", help="directory for the demo's files")

    sub.add_parser("export", help="export stored data", populate=_add_export_arguments)
    return parser


def _limit_malloc_arenas() -> None:
    """Ask glibc for at most two malloc arenas (``M_ARENA_MAX``), before any thread starts.

    Every worker thread (state store, sink writes) otherwise gets an arena of its own, and memory
    freed in one is rarely handed back: on a 1,000-tenant backfill that fragmentation is about
    10 MB of resident memory. Other C libraries have no such call; nothing happens there.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    m_arena_max = -8
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 2)


def main(argv: Sequence[str] | None = None) -> int:
    """The process's entry point: parse ``argv``, run the command, return the exit code."""
    _limit_malloc_arenas()
    pause_gc_for_startup()
    try:
        return _main(argv)
    finally:
        end_startup()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from collector.log import configure_logging

    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    level = args.log_level or ("warning" if args.command in {"demo", "report"} else "info")
    configure_logging(level, json=fmt)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        return EXIT_USAGE
    except CollectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `zencoder-collector plugins | head`: the reader left; not an error worth a traceback.
        sys.stderr.close()
        return EXIT_OK


_LOADS_CONFIG = frozenset({"validate", "run", "backfill", "status", "replay"})


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "simulate":
        from collector.simulator.cli import run_simulate

        end_startup()
        return run_simulate(args)
    if command == "export":
        from collector.export import run_export

        end_startup()
        return run_export(args)
    # Imported here, not at the top: it pulls in the whole runtime (SQLAlchemy, pydantic, ...).
    from collector import commands

    if command not in _LOADS_CONFIG:
        end_startup()  # the others end start-up once their config is loaded (commands._load)
    if command == "schema":
        return commands.schema(args)
    if command == "plugins":
        return commands.plugins(args)
    if command == "demo":
        return run_async(commands.demo(args))
    if command == "report":
        return commands.report(args)
    handler = {
        "validate": commands.validate,
        "run": commands.run,
        "backfill": commands.backfill,
        "status": commands.status,
        "replay": commands.replay,
    }[command]
    return run_async(handler(args))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed (about a sixth less CPU per tenant-day
    than the default loop); ``ZENCODER_COLLECTOR_LOOP=asyncio`` opts out. Commands and the
    simulator's server both run through here."""
    import asyncio  # not at the top: `--help` and usage errors do without it

    if os.environ.get("ZENCODER_COLLECTOR_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(coro)
    return asyncio.run(coro)


def dump_json(value: object) -> str:
    return json.dumps(value, indent=2, default=str, sort_keys=True)
