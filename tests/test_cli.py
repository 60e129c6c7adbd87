"""The command line: schema, plugins, argument errors, backfill, report, replay, demo."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

from collector.app import load_plugins
from collector.config import json_schema
from collector.pipeline import utc_today
from collector.retry import NO_WAIT_ENV
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
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


async def test_demo_runs_and_prints_a_report(tmp_path: Path) -> None:
    """`demo` collects 30 days for five tenants into SQLite and CSV and prints both tables."""
    result = await run_cli("demo", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5/5 tenants ok" in result.stdout
    assert "Zencoder usage" in result.stdout
    assert count_rows(tmp_path / "out" / "usage.db")["usage_daily"] == 5 * 30
    assert len(list((tmp_path / "out" / "csv").rglob("usage_daily/*.csv"))) == 5 * 30


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
    objects frozen, so a daemon never runs with collection paused."""
    config = _small_config(tmp_path)
    code = (
        "import argparse, asyncio, gc\n"
        "from collector import cli, commands\n"
        "cli.pause_gc_for_startup()\n"
        "assert not gc.isenabled()\n"
        f"args = argparse.Namespace(config={str(config)!r}, check_credentials=False)\n"
        "asyncio.run(commands.validate(args))\n"
        "print('gc', gc.isenabled(), gc.get_freeze_count() > 0)"
    )
    result = run_python(code)
    assert "gc True True" in result.stdout.splitlines()
