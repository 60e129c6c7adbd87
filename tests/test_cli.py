"""The command line: schema, plugins, argument errors, backfill, report, replay, demo."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import pty
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

from collector.app import load_plugins
from collector.config import json_schema
from collector.pipeline import utc_today
from collector.retry import NO_WAIT_ENV
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from collector.simulator.cli import ready_config
from tests.e2e import REPO, count_rows, run_cli, run_python, write_config


def first_party_schema() -> dict[str, object]:
    """The config schema with the sinks this distribution ships (not other installed plugins)."""
    registry = load_plugins().registry
    own = {i.type_name for i in registry.describe() if i.distribution == "zencoder-collector"}
    return json_schema({t: c for t, c in registry.config_types().items() if t in own})


def test_schema_file_in_repo_is_current() -> None:
    """config/schema.json (referenced by example.yaml for editor completion) is the schema of the
    config with the first-party sinks; regenerate it with this function when a model changes."""
    assert first_party_schema() == json.loads((REPO / "config" / "schema.json").read_text())


async def test_schema_command_prints_every_installed_sink_type() -> None:
    """`schema` prints a JSON Schema whose sinks cover every installed sink type."""
    result = await run_cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    mapping = schema["properties"]["sinks"]["additionalProperties"]["discriminator"]["mapping"]
    assert {"sqlite", "csv", "s3", "webhook"} <= set(mapping)


async def test_plugins_lists_first_party_sinks_with_origin() -> None:
    """`plugins --json` lists sqlite, csv, s3 and webhook, each from zencoder-collector."""
    result = await run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)["sinks"]
    origin = {entry["type"]: entry["distribution"] for entry in entries}
    for name in ("sqlite", "csv", "s3", "webhook"):
        assert origin[name] == "zencoder-collector"


async def test_invalid_date_is_a_clear_usage_error(tmp_path: Path) -> None:
    """`backfill --since 2026-02-30` exits 2 naming the bad value and the expected format."""
    config = tmp_path / "c.yaml"
    config.write_text("tenants: []\n")
    result = await run_cli("backfill", "-c", str(config), "--since", "2026-02-30")
    assert result.returncode == 2
    assert "invalid date '2026-02-30': expected YYYY-MM-DD" in result.stderr


async def test_backfill_report_and_replay_to_a_new_sink(tmp_path: Path) -> None:
    """Backfill an explicit range, report on it as CSV, then replay the stored history to a sink
    added later without one more API request."""
    tenants = demo_tenants(2)
    today = utc_today()
    since = today.replace(day=1) if today.day > 3 else today
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(tmp_path / "c.yaml", sim, tenants, workdir=tmp_path)
        backfill = await run_cli("backfill", "-c", str(config), "--since", since.isoformat())
        assert backfill.returncode == 0, backfill.stdout + backfill.stderr
        span = (today - since).days + 1
        assert count_rows(tmp_path / "usage.db")["usage_daily"] == 2 * span

        report = await run_cli("report", "-c", str(config), "--days", str(span), "--format", "csv")
        assert report.returncode == 0, report.stderr
        rows = list(csv.DictReader(io.StringIO(report.stdout)))
        assert [r["tenant"] for r in rows] == ["tenant-01", "tenant-02"]
        with sqlite3.connect(tmp_path / "usage.db") as conn:
            messages = dict(
                conn.execute("SELECT tenant, SUM(messages) FROM usage_daily GROUP BY tenant")
            )
        assert {r["tenant"]: int(r["messages"]) for r in rows} == messages

        requests = sum(sim.stats.usage_requests.values())
        text = config.read_text().replace(
            "sinks:\n", f"sinks:\n  later:\n    type: csv\n    path: {tmp_path / 'later'}\n", 1
        )
        config.write_text(text)
        replay = await run_cli("replay", "-c", str(config), "--sink", "later")
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert sum(sim.stats.usage_requests.values()) == requests
    partitions = sorted((tmp_path / "later").rglob("usage_daily/*.csv"))
    assert len(partitions) == 2 * span


async def test_backfill_past_the_api_window_collects_only_what_the_api_serves(
    tmp_path: Path,
) -> None:
    """`backfill --since` 10 days back with a 5-day API window asks for and stores the 5 served
    days only, and names the window and the 5 days that cannot be collected."""
    tenants = demo_tenants(1)
    today = utc_today()
    since = today - dt.timedelta(days=9)
    settings = SimulatorSettings(tenants=tenants, history_days=5)
    async with running_simulator(settings) as sim:
        config = write_config(
            tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, extra={"api": {"history_days": 5}}
        )
        backfill = await run_cli("backfill", "-c", str(config), "--since", since.isoformat())
        asked = sorted(record.param for record in sim.stats.log)
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    oldest = today - dt.timedelta(days=4)
    assert asked == [(oldest + dt.timedelta(days=i)).isoformat() for i in range(5)]
    too_old = f"5 day(s), {since}..{oldest - dt.timedelta(days=1)}, cannot be collected"
    assert too_old in backfill.stderr
    assert f"the API serves the last 5 days (api.history_days), from {oldest} on" in (
        backfill.stderr
    )
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert conn.execute("SELECT MIN(day), COUNT(*) FROM tenant_day").fetchone() == (
            oldest.isoformat(),
            5,
        )


async def test_demo_runs_and_prints_a_report(tmp_path: Path) -> None:
    """`demo` collects 30 days for five tenants into SQLite and CSV and prints both tables."""
    result = await run_cli("demo", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5/5 tenants ok" in result.stdout
    assert "Zencoder usage" in result.stdout
    assert count_rows(tmp_path / "out" / "usage.db")["usage_daily"] == 5 * 30
    assert len(list((tmp_path / "out" / "csv").rglob("usage_daily/*.csv"))) == 5 * 30
    assert f"{tmp_path / 'out' / 'simulator.yaml'} collects them" in result.stdout
    ready = yaml.safe_load((tmp_path / "out" / "simulator.yaml").read_text())
    assert ready["api"]["base_url"] == "http://127.0.0.1:8080"
    assert [t["id"] for t in ready["tenants"]] == [t.id for t in demo_tenants(5)]


async def test_simulators_ready_config_collects_every_tenant(tmp_path: Path) -> None:
    """The config `simulate` prints (and `demo` writes) collects every simulated tenant as it is."""
    tenants = demo_tenants(3)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = tmp_path / "sim.yaml"
        config.write_text(ready_config(sim.base_url, sim.tenants, workdir=str(tmp_path / "o")))
        result = await run_cli("run", "--once", "-q", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "o" / "csv").iterdir()) == [t.id for t in tenants]


# What `run --once` must not pay for at start-up unless the command needs it: the simulator's web
# server, the CSV export, the S3 client libraries; and the runtime as a whole for `--help`.
_NOT_FOR_THE_PARSER = {
    "aiohttp",
    "aiohttp.web",
    "aiobotocore",
    "botocore",
    "sqlalchemy",
    "pydantic",
    "structlog",
    "asyncio",
    "collector.commands",
    "collector.export",
    "collector.simulator",
    "collector_sinks",
}


def _imported_by(code: str) -> set[str]:
    """The modules in sys.modules after running ``code`` in a fresh interpreter."""
    return set(run_python(f"{code}\nimport sys\nprint('\\n'.join(sys.modules))").stdout.split())


def _small_config(tmp_path: Path, sinks: str = "") -> Path:
    """A one-tenant config whose API nobody listens on (port 9), state in ``tmp_path``."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "api: {base_url: 'http://127.0.0.1:9', token_url: 'http://127.0.0.1:9/oauth/token'}\n"
        f"state: {{url: 'sqlite:///{tmp_path / 'state.db'}'}}\n"
        f"{sinks}"
        "tenants: [{id: acme, client_id: acme-client, client_secret: acme-secret}]\n"
    )
    return config


def test_cli_parser_imports_no_runtime_package() -> None:
    """Importing the CLI and parsing `run --once` imports none of the heavy runtime packages."""
    loaded = _imported_by(
        "from collector.cli import build_parser\n"
        "build_parser().parse_args(['run', '--once', '-c', 'config.yaml'])"
    )
    assert sorted(loaded & _NOT_FOR_THE_PARSER) == []


def test_a_run_talks_to_the_api_through_aiohttp(tmp_path: Path) -> None:
    """`run --once` with a SQLite sink sends its requests through aiohttp (the one HTTP stack),
    and every first-party sink is loaded."""
    config = _small_config(
        tmp_path,
        f"sinks: {{db: {{type: sqlite, path: '{tmp_path / 'usage.db'}'}}}}\n"
        "collection: {lookback_days: 1}\n",
    )
    code = (
        "import os, sys\n"
        "for name in ('http_proxy', 'https_proxy', 'all_proxy'):\n"
        "    os.environ.pop(name, None); os.environ.pop(name.upper(), None)\n"
        f"os.environ[{NO_WAIT_ENV!r}] = '1'\n"
        "from collector import cli\n"
        f"code = cli.main(['run', '--once', '-c', {str(config)!r}])\n"
        "print('exit', code)\n"
        "print('\\n'.join(sys.modules))"
    )
    result = run_python(code)
    loaded = set(result.stdout.split())
    assert "exit 1" in result.stdout  # nothing listens on port 9: the token request failed
    assert "token request failed" in result.stderr
    assert {"collector.client_transport", "aiohttp", "collector_sinks.webhook"} <= loaded
    assert "collector_sinks.s3" in loaded


def test_parsing_simulate_loads_its_options_on_demand() -> None:
    """`simulate` gets its options (and the simulator import) only when that command is parsed."""
    loaded = _imported_by(
        "from collector.cli import build_parser\n"
        "args = build_parser().parse_args(['simulate', '--port', '0', '--tenants', '2'])\n"
        "assert (args.port, args.tenants, args.latency) == (0, 2, 0.0), args"
    )
    assert "collector.simulator.cli" in loaded


def test_loading_the_config_ends_the_startup_gc_pause(tmp_path: Path) -> None:
    """Once a command has loaded its config the garbage collector runs again, with start-up's
    objects frozen and the run's thresholds, so a daemon never runs with collection paused."""
    config = _small_config(tmp_path)
    code = (
        "import argparse, asyncio, gc\n"
        "from collector import cli, commands, process\n"
        "cli.pause_gc_for_startup()\n"
        "assert not gc.isenabled()\n"
        f"args = argparse.Namespace(config={str(config)!r}, check_credentials=False, json=False)\n"
        "asyncio.run(commands.validate(args))\n"
        "print('gc', gc.isenabled(), gc.get_freeze_count() > 0,"
        " gc.get_threshold() == process.RUN_GC_THRESHOLDS)"
    )
    result = run_python(code)
    assert "gc True True True" in result.stdout.splitlines()


# --- progress, --json, resuming -------------------------------------------------------------------


async def test_backfill_shows_progress_lines_prints_json_and_resumes(tmp_path: Path) -> None:
    """Off a terminal `backfill --json` prints plain progress lines on stderr and the documented
    JSON on stdout; run again with --quiet it prints no progress and fetches only the days that
    were not yet final."""
    tenants = demo_tenants(2)
    since = utc_today() - dt.timedelta(days=3)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(tmp_path / "c.yaml", sim, tenants, workdir=tmp_path)
        args = ("backfill", "-c", str(config), "--since", since.isoformat(), "--json")
        first = await run_cli(*args)
        second = await run_cli(*args, "--quiet")
    assert first.returncode == 0, first.stderr
    assert "progress: tenant-01: 4/4 day(s); " in first.stderr
    assert "progress: 8/8 tenant-day(s) (100%), 2/2 tenant(s) done, " in first.stderr
    outcome = json.loads(first.stdout)
    assert outcome["ok"] is True
    assert (outcome["since"], outcome["until"]) == (since.isoformat(), utc_today().isoformat())
    assert outcome["totals"] == {"planned": 8, "fetched": 8, "changed": 8, "failed": 0}
    assert set(outcome["tenants"]["tenant-01"]) == {
        "ok", "planned", "fetched", "changed", "failed", "error", "skipped", "seconds"
    }  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "progress:" not in second.stderr
    # settle_days 1: the two oldest days were final when stored, today and yesterday are not.
    assert json.loads(second.stdout)["totals"]["planned"] == 4


async def test_run_once_json_names_the_failing_tenant(tmp_path: Path) -> None:
    """`run --once --json` exits 1 and its JSON says which tenant failed and why."""
    tenants = demo_tenants(2)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(
            tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, bad_secret_for={"tenant-02"}
        )
        result = await run_cli("run", "--once", "--json", "-q", "-c", str(config))
    assert result.returncode == 1
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False
    assert outcome["tenants"]["tenant-01"]["ok"] is True
    assert "401" in outcome["tenants"]["tenant-02"]["error"]


async def test_interrupted_backfill_resumes_where_it_stopped(tmp_path: Path) -> None:
    """SIGINT stops a backfill with exit 130 keeping what it committed; the same command run
    again fetches only the days still missing and completes the range."""
    tenants = demo_tenants(1)
    days = 40
    since = utc_today() - dt.timedelta(days=days - 1)
    settings = SimulatorSettings(tenants=tenants, latency=0.1)
    async with running_simulator(settings) as sim:
        config = write_config(tmp_path / "c.yaml", sim, tenants, workdir=tmp_path)
        args = ("-m", "collector", "backfill", "-c", str(config), "--since", since.isoformat())
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, NO_WAIT_ENV: "1"},
        )
        state = tmp_path / "state.db"
        # The other process's progress is only visible in the database: poll it.
        while _stored_days(state) < 6:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 130
        stored = _stored_days(state)
        assert stored < days
        again = await run_cli(*args[2:], "--json", "--quiet")
    assert again.returncode == 0, again.stderr
    totals = json.loads(again.stdout)["totals"]
    # Only days that were final when stored are skipped (the last two are never final yet).
    assert totals["planned"] <= days - stored + 2
    assert _stored_days(state) == days


def _stored_days(state: Path) -> int:
    if not state.exists():
        return 0
    try:
        with sqlite3.connect(state) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM tenant_day").fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not created yet
        return 0


# --- validate --json, manners ---------------------------------------------------------------------


async def test_validate_json_describes_the_config(tmp_path: Path) -> None:
    """`validate --json` prints tenants (id, name, auth, sinks) and sinks by type."""
    config = _small_config(tmp_path, f"sinks: {{db: {{type: sqlite, path: '{tmp_path}/u.db'}}}}\n")
    result = await run_cli("validate", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is True
    assert outcome["sinks"] == {"db": "sqlite"}
    assert outcome["tenants"] == [
        {"id": "acme", "name": "acme", "enabled": True, "auth": "oauth", "sinks": ["db"]}
    ]
    assert outcome["credentials"] is None


async def test_validate_json_lists_the_problems_of_a_bad_config(tmp_path: Path) -> None:
    """`validate --json` on an invalid config exits 2 with ok false and each problem."""
    config = tmp_path / "c.yaml"
    config.write_text("tenants: [{id: acme}]\nnonsense: 1\n")
    result = await run_cli("validate", "--json", "-c", str(config))
    assert result.returncode == 2
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is False
    assert any("nonsense" in problem for problem in outcome["problems"])


async def test_global_options_are_accepted_after_the_command(tmp_path: Path) -> None:
    """`--log-format` and `--log-level` after the command work as they do before it."""
    config = _small_config(tmp_path)
    as_json = await run_cli("run", "--once", "-q", "-c", str(config), "--log-format", "json")
    events = [json.loads(line)["event"] for line in as_json.stderr.splitlines()]
    assert "day failed" in events
    quieter = await run_cli("run", "--once", "-q", "-c", str(config), "--log-level", "error")
    assert as_json.returncode == quieter.returncode == 1
    assert "day failed" not in quieter.stderr


async def test_a_cycle_with_failures_is_logged_at_warning(tmp_path: Path) -> None:
    """A tenant whose cycle failed gets its "tenant cycle done" line at warning, not info."""
    config = _small_config(tmp_path)
    result = await run_cli("run", "--once", "-q", "-c", str(config), "--log-format", "json")
    done = [
        entry
        for entry in map(json.loads, result.stderr.splitlines())
        if entry["event"] == "tenant cycle done"
    ]
    assert [(entry["tenant"], entry["level"]) for entry in done] == [("acme", "warning")]


async def test_output_options_of_run_once_are_refused_for_the_daemon(tmp_path: Path) -> None:
    """`run --json` (no --once) is a usage error, not a daemon that ignores the option."""
    result = await run_cli("run", "--json", "-c", str(_small_config(tmp_path)))
    assert result.returncode == 2
    assert "--json, --quiet and --no-progress go with run --once" in result.stderr


async def test_unknown_log_level_is_one_line_listing_the_valid_ones(tmp_path: Path) -> None:
    """An unknown --log-level (or $ZENCODER_COLLECTOR_LOG_LEVEL) is a usage error that lists the
    levels, with no traceback."""
    config = _small_config(tmp_path)
    for result in (
        await run_cli("status", "-c", str(config), "--log-level", "verbose"),
        await run_cli("status", "-c", str(config), env={"ZENCODER_COLLECTOR_LOG_LEVEL": "loud"}),
    ):
        assert result.returncode == 2
        assert "use one of debug, info, warning, error, critical" in result.stderr
        assert "Traceback" not in result.stderr


async def test_busy_ops_port_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    """The daemon cannot bind server.listen: one error line naming the setting, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _small_config(tmp_path, f"server: {{listen: '127.0.0.1:{port}'}}\n")
        result = await run_cli("run", "-c", str(config))
    assert result.returncode == 1
    assert f"error: cannot serve the ops endpoints on 127.0.0.1:{port}: " in result.stderr
    assert "set server.listen to a free host:port" in result.stderr
    assert "Traceback" not in result.stderr


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run the CLI with stderr on a pseudo-terminal; return what it wrote there."""
    leader, follower = pty.openpty()
    try:
        subprocess.run(
            [sys.executable, "-m", "collector", *args],
            stderr=follower,
            stdout=subprocess.DEVNULL,
            env={**os.environ, NO_WAIT_ENV: "1", **env},
            check=False,
            timeout=60,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_no_color_turns_off_colours_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal log lines are coloured, unless NO_COLOR is set."""
    config = _small_config(tmp_path)
    args = ["run", "--once", "--quiet", "-c", str(config)]
    coloured = _stderr_on_a_terminal(args, {"NO_COLOR": ""})
    plain = _stderr_on_a_terminal(args, {"NO_COLOR": "1"})
    assert "token request failed" in coloured
    assert "\x1b[" in coloured
    assert "token request failed" in plain
    assert "\x1b[" not in plain


def test_every_command_of_the_table_has_a_parser_and_a_handler() -> None:
    """Each entry of the command table is a subcommand with help, and its handler exists."""
    import importlib

    from collector.cli import COMMANDS, build_parser

    parser = build_parser()
    help_text = parser.format_help()
    for command in COMMANDS:
        assert command.name in help_text
        module_name, _, function_name = command.handler.partition(":")
        assert callable(getattr(importlib.import_module(module_name), function_name))
