"""The ``zencoder-collector`` command line (also ``python -m collector``).

Exit codes: 0 success; 1 at least one tenant (or sink) did not complete; 2 the config or the
command line is invalid (every problem printed, nothing touched).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from collector import __version__
from collector.errors import CollectorError, ConfigError
from collector.loop import run_async
from collector.process import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    dump_json,
    end_startup,
    pause_gc_for_startup,
)


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


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_log_level(value: str) -> str:
    """argparse type for ``--log-level``: one of :data:`LOG_LEVELS`, any case."""
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {value!r}: use one of {', '.join(LOG_LEVELS)}"
        )
    return level


def _global_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """``--log-level`` and ``--log-format``, before the command or (``after_command``) after it.

    After the command they default to SUPPRESS, so a subcommand that is not given them keeps
    what was given before it (or the defaults).
    """
    parser.add_argument(
        "--log-level",
        type=parse_log_level,
        default=argparse.SUPPRESS
        if after_command
        else os.environ.get("ZENCODER_COLLECTOR_LOG_LEVEL"),
        help="debug, info (default), warning, error, critical; the demo defaults to warning "
        "(default: $ZENCODER_COLLECTOR_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=argparse.SUPPRESS if after_command else "auto",
        help="auto: console on a terminal, JSON otherwise",
    )


def _progress_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress and no summary (the exit code tells); errors still go to stderr",
    )
    # The option of earlier versions; --quiet also drops the summary.
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument(
        "--json", action="store_true", help="print the outcome as JSON (docs/operations.md)"
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
    """A subcommand's parser: takes the global options too, and can add its arguments on first use.

    Every command accepts ``--log-level`` and ``--log-format`` after its name as well
    (``status -c x --log-level debug``), as users type them.

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
        _global_options(self, after_command=True)

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


# --- the commands: one table, one argument function each ----------------------------------------


def _run_arguments(run: argparse.ArgumentParser) -> None:
    _config_arg(run)
    run.add_argument(
        "--once",
        action="store_true",
        help="one cycle, then exit; exit code 0 only if every tenant succeeded",
    )
    run.add_argument("--tenant", action="append", help="limit to these tenant ids (repeatable)")
    _progress_args(run)


def _validate_arguments(validate: argparse.ArgumentParser) -> None:
    _config_arg(validate)
    validate.add_argument(
        "--check-credentials",
        action="store_true",
        help="ask the API for a token (or one day) per tenant",
    )
    validate.add_argument("--json", action="store_true", help="print the outcome as JSON")


def _backfill_arguments(backfill: argparse.ArgumentParser) -> None:
    _config_arg(backfill)
    backfill.add_argument("--tenant", action="append", help="tenant id (repeatable); default: all")
    backfill.add_argument("--since", type=parse_day, required=True, help="first day, YYYY-MM-DD")
    backfill.add_argument(
        "--until", type=parse_day, help="last day, YYYY-MM-DD (default: today UTC)"
    )
    backfill.add_argument(
        "--refetch",
        action="store_true",
        help="fetch every day again, also those already stored as final (default: skip them, so "
        "an interrupted backfill resumes where it stopped)",
    )
    _progress_args(backfill)


def _status_arguments(status: argparse.ArgumentParser) -> None:
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print JSON (same as GET /status)")


def _report_arguments(report: argparse.ArgumentParser) -> None:
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


def _replay_arguments(replay: argparse.ArgumentParser) -> None:
    _config_arg(replay)
    replay.add_argument("--sink", required=True, help="sink instance name")
    replay.add_argument(
        "--tenant", action="append", help="tenant id (repeatable); default: all routed"
    )
    replay.add_argument("--since", type=parse_day, help="first day to redeliver")
    replay.add_argument("--dead-letters", action="store_true", help="only dead-lettered days")


def _reprocess_arguments(reprocess: argparse.ArgumentParser) -> None:
    _config_arg(reprocess)
    reprocess.add_argument("--tenant", action="append", help="tenant id (repeatable); default: all")
    reprocess.add_argument("--since", type=parse_day, help="first day, YYYY-MM-DD")
    reprocess.add_argument("--until", type=parse_day, help="last day, YYYY-MM-DD")


def _plugins_arguments(plugins: argparse.ArgumentParser) -> None:
    plugins.add_argument("--json", action="store_true")
    plugins.add_argument(
        "--schemas", action="store_true", help="include each sink's config JSON Schema"
    )


def _schema_arguments(schema: argparse.ArgumentParser) -> None:
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    schema.add_argument(
        "--markdown",
        action="store_true",
        help="the configuration reference as Markdown (docs/config-reference.md)",
    )


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--output", default="demo-output", help="directory for the demo's files")


def _tenant_arguments(tenant: argparse.ArgumentParser) -> None:
    tenant_sub = tenant.add_subparsers(dest="tenant_action", required=True, metavar="ACTION")
    export_one = tenant_sub.add_parser(
        "export", help="every stored table of one tenant, as CSV and JSON"
    )
    _config_arg(export_one)
    export_one.add_argument("tenant_id", metavar="TENANT", help="tenant id")
    export_one.add_argument("-o", "--output", required=True, help="directory for the files")
    purge = tenant_sub.add_parser(
        "purge",
        help="delete one tenant from the state store and every sink that can delete",
    )
    _config_arg(purge)
    purge.add_argument("tenant_id", metavar="TENANT", help="tenant id")
    purge.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    purge.add_argument("--json", action="store_true", help="print the outcome as JSON")


@dataclass(frozen=True)
class Command:
    """One verb of the CLI, complete: a new command is one entry in :data:`COMMANDS`."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: str
    """``module:function``, imported only when the command runs (the parser stays light). The
    function takes the parsed arguments and returns the exit code, or a coroutine of it."""
    loads_config: bool = False
    """The handler ends the start-up GC pause itself once its config is loaded (see
    :func:`end_startup`); the others end it before the handler runs."""
    lazy_arguments: bool = False
    """Add the arguments only when this command is parsed: they come from heavy modules."""


COMMANDS: tuple[Command, ...] = (
    Command(
        "run",
        "run the daemon (or one cycle with --once)",
        _run_arguments,
        "collector.commands:run",
        loads_config=True,
    ),
    Command(
        "validate",
        "check the config (and with --check-credentials, each tenant's credentials)",
        _validate_arguments,
        "collector.commands:validate",
        loads_config=True,
    ),
    Command(
        "backfill",
        "fetch an explicit date range for one tenant or all",
        _backfill_arguments,
        "collector.commands:backfill",
        loads_config=True,
    ),
    Command(
        "status",
        "per-tenant and per-sink state from the state store",
        _status_arguments,
        "collector.commands:status",
        loads_config=True,
    ),
    Command(
        "report",
        "cross-tenant usage and seat hygiene from a SQL or CSV sink (text/HTML)",
        _report_arguments,
        "collector.commands:report",
    ),
    Command(
        "replay",
        "redeliver stored history to a sink without calling the API",
        _replay_arguments,
        "collector.commands:replay",
        loads_config=True,
    ),
    Command(
        "reprocess",
        "re-derive days from stored API bodies with the current parser, without the API",
        _reprocess_arguments,
        "collector.commands:reprocess",
        loads_config=True,
    ),
    Command(
        "plugins",
        "list discovered sink types, origin and config schema",
        _plugins_arguments,
        "collector.commands:plugins",
    ),
    Command(
        "schema", "print the config JSON Schema", _schema_arguments, "collector.commands:schema"
    ),
    Command(
        "simulate",
        "serve the built-in Zencoder API simulator",
        _add_simulate_arguments,
        "collector.simulator.cli:run_simulate",
        lazy_arguments=True,
    ),
    Command(
        "demo",
        "simulator + collection into SQLite and CSV + report, in one go",
        _demo_arguments,
        "collector.commands:demo",
    ),
    Command(
        "export",
        "export stored data",
        _add_export_arguments,
        "collector.export:run_export",
        lazy_arguments=True,
    ),
    Command(
        "tenant",
        "export or purge one tenant's data (offboarding)",
        _tenant_arguments,
        "collector.commands:tenant",
        loads_config=True,
    ),
)
COMMANDS_BY_NAME = {command.name: command for command in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zencoder-collector",
        description="Collect Zencoder usage analytics for many organizations, deliver it to sinks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, after_command=False)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_SubcommandParser
    )
    for command in COMMANDS:
        if command.lazy_arguments:
            sub.add_parser(command.name, help=command.help, populate=command.arguments)
        else:
            command.arguments(sub.add_parser(command.name, help=command.help))
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
    # Kept for commands that set logging up again (the progress display redirects stderr).
    args.log_setup = (level, fmt)
    configure_logging(level, json=fmt)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        if args.command == "validate" and args.json:
            print(dump_json({"ok": False, "problems": list(exc.problems)}))
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


def _dispatch(args: argparse.Namespace) -> int:
    command = COMMANDS_BY_NAME[args.command]
    module_name, _, function_name = command.handler.partition(":")
    # Imported here, not at the top: most handlers pull in the whole runtime (SQLAlchemy,
    # pydantic, ...), which `--help` and usage errors do without.
    handler: Callable[[argparse.Namespace], int | Coroutine[Any, Any, int]] = getattr(
        importlib.import_module(module_name), function_name
    )
    if not command.loads_config:
        end_startup()  # the others end start-up once their config is loaded (commands._load)
    outcome = handler(args)
    return run_async(outcome) if inspect.iscoroutine(outcome) else cast(int, outcome)
