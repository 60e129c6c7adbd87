"""The usage report (collector/report): sources, figures, seat hygiene, text/CSV/JSON renderings.

The data comes from the real pipeline (``backfill`` against the simulator, tests/report_data.py)
and every figure is checked against what the simulator served, computed here independently.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from collector.app import load, load_plugins
from collector.config import AppConfig
from collector.report.model import NO_USER_ROWS, ReportError, UsageReport, Window
from collector.report.render import render, render_csv, report_dict
from collector.report.sources import CsvSource, SqlSource, choose_sink, make_report
from collector.testing import make_tenant_day
from collector_sinks.sqlite import SqliteSink, SqliteSinkConfig
from tests.e2e import REPO
from tests.report_data import NAMES, Collected, collect, pseudonym

WINDOW_DAYS = 30


@pytest.fixture(scope="module")
def postgres_schema() -> Iterator[str | None]:
    """A fresh schema in the test PostgreSQL for the ``sql`` sink, when one is configured."""
    base = os.environ.get("COLLECTOR_TEST_POSTGRES_URL")
    if not base:
        yield None
        return
    schema = f"report_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory, postgres_schema: str | None) -> Collected:
    return collect(tmp_path_factory.mktemp("report"), postgres_schema)


@pytest.fixture(scope="module")
def config(collected: Collected) -> AppConfig:
    return load(collected.config, load_plugins())


def _window(collected: Collected, days: int = WINDOW_DAYS) -> Window:
    return Window.last(days, collected.until)


def _report(config: AppConfig, sink: str, window: Window, stale_days: int = 14) -> UsageReport:
    names = {t.id: t.name for t in config.tenants}
    return make_report(choose_sink(config.sinks, sink), window, names=names, stale_days=stale_days)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", "report", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def _expected_seats(
    collected: Collected, window: Window, stale_days: int
) -> set[tuple[str, str, str, int]]:
    """(tenant id, email, status, idle days) from the served data, by the documented rule."""
    seats = set()
    for tenant in collected.truth:
        last_seen: dict[str, dt.date] = {}
        in_window: set[str] = set()
        for day, users in sorted(collected.users_by_day(tenant).items()):
            if day > window.until:
                continue
            for email in users:
                last_seen[email] = day
                if day >= window.since:
                    in_window.add(email)
        for email, seen in last_seen.items():
            idle = (window.until - seen).days
            if idle > stale_days:
                seats.add((tenant, email, "stale", idle))
            elif email in in_window and seen < window.until - dt.timedelta(days=6):
                seats.add((tenant, email, "quiet", idle))
    return seats


def _comparable(report: UsageReport) -> dict[str, Any]:
    """The JSON document without what names the source or the time of rendering."""
    document = report_dict(report)
    for key in ("source", "pii", "generated_at"):
        document.pop(key)
    return document


def test_sql_sink_figures_match_what_the_api_served(
    collected: Collected, config: AppConfig
) -> None:
    """Per tenant: days, messages, distinct users, average and peak daily active users, under
    the configured name, equal what the simulator served over the window."""
    window = _window(collected)
    report = _report(config, "warehouse", window)
    by_id = {t.tenant_id: t for t in report.tenants}
    assert set(by_id) == set(NAMES)
    for tenant, served in collected.truth.items():
        days = [d for d in window.dates() if d in served]
        daily = [served[d]["daily"][0] if served[d]["daily"] else None for d in days]
        active = [e["active_users"] if e else 0 for e in daily]
        users = {u["email"] for d in days for u in served[d]["users"]}
        row = by_id[tenant]
        assert row.tenant == NAMES[tenant]
        assert row.days == len(days) == WINDOW_DAYS
        assert row.messages == sum(e["messages"] for e in daily if e)
        assert row.distinct_users == len(users)
        assert row.avg_daily_active == round(sum(active) / len(active), 1)
        assert row.peak_daily_active == max(active)


def test_distinct_users_are_counted_from_user_rows_not_summed_from_days(
    collected: Collected, config: AppConfig
) -> None:
    """The portfolio's distinct users are the tenants' distinct emails over the window, far
    fewer than the sum of daily active users (what summing days would give)."""
    window = _window(collected)
    report = _report(config, "warehouse", window)
    distinct = sum(
        len({u["email"] for d in window.dates() for u in served[d]["users"]})
        for served in collected.truth.values()
    )
    summed_days = sum(d.active_users for d in report.portfolio.daily)
    assert report.portfolio.distinct_users == distinct
    assert distinct < summed_days


def test_csv_sink_gives_the_same_report_as_the_sql_sink(
    collected: Collected, config: AppConfig
) -> None:
    """Reading the CSV sink's files gives the very report the SQLite sink gives."""
    window = _window(collected)
    assert _comparable(_report(config, "sheets", window)) == _comparable(
        _report(config, "warehouse", window)
    )


@pytest.mark.postgres
def test_postgresql_sql_sink_gives_the_same_report(
    collected: Collected, config: AppConfig, postgres_url: str
) -> None:
    """A ``sql`` sink on PostgreSQL gives the very report the SQLite sink gives."""
    assert "dwh" in config.sinks
    window = _window(collected)
    assert _comparable(_report(config, "dwh", window)) == _comparable(
        _report(config, "warehouse", window)
    )


@pytest.mark.parametrize("stale_days", [14, 3])
def test_seat_hygiene_flags_the_users_the_rule_names(
    collected: Collected, config: AppConfig, stale_days: int
) -> None:
    """Stale (idle more than N days, also before the window) and quiet (in the window, not in
    its last week) users are exactly those the served data gives, per tenant."""
    window = _window(collected)
    report = _report(config, "warehouse", window, stale_days=stale_days)
    expected = _expected_seats(collected, window, stale_days)
    assert expected, "the simulated organizations have dormant members"
    assert {(s.tenant_id, s.user, s.status, s.idle_days) for s in report.seats} == expected
    for tenant in report.tenants:
        mine = [s for s in expected if s[0] == tenant.tenant_id]
        assert tenant.stale_users == sum(1 for s in mine if s[2] == "stale")
        assert tenant.quiet_users == sum(1 for s in mine if s[2] == "quiet")


def test_pseudonymized_sink_shows_pseudonyms(collected: Collected, config: AppConfig) -> None:
    """A sink with pii: pseudonymize yields the same seats under the users' keyed pseudonyms,
    and no email anywhere in the report."""
    window = _window(collected)
    report = _report(config, "pseudo", window)
    expected = {
        (tenant, pseudonym(email), status)
        for tenant, email, status, _ in _expected_seats(collected, window, 14)
    }
    assert {(s.tenant_id, s.user, s.status) for s in report.seats} == expected
    emails = {
        email
        for tenant in collected.truth
        for users in collected.users_by_day(tenant).values()
        for email in users
    }
    for fmt in ("table", "json", "html"):
        text = render(report, fmt)  # type: ignore[arg-type]
        assert not [email for email in emails if email in text]


def test_sink_without_user_rows_reports_totals_and_says_why_seats_are_missing(
    collected: Collected, config: AppConfig
) -> None:
    """A sink with pii: drop still gives messages and daily figures; distinct users and seat
    hygiene are shown as unavailable, with the reason, in every format."""
    window = _window(collected)
    report = _report(config, "totals", window)
    full = _report(config, "warehouse", window)
    assert [t.messages for t in report.tenants] == [t.messages for t in full.tenants]
    assert all(t.distinct_users is None and t.stale_users is None for t in report.tenants)
    assert report.portfolio.distinct_users is None
    assert not report.has_user_rows
    assert report.seats == []
    assert NO_USER_ROWS in render(report, "table")
    assert NO_USER_ROWS.capitalize() in render(report, "html")
    assert json.loads(render(report, "json"))["seat_hygiene"]["available"] is False


def test_every_format_names_tenants_by_their_configured_name(collected: Collected) -> None:
    """table, csv, json and html show the configured names (escaped in HTML), not the ids."""
    base = ["-c", str(collected.config), "--sink", "warehouse", "--until", str(collected.until)]
    outputs = {fmt: _cli(*base, "--format", fmt) for fmt in ("table", "csv", "json", "html")}
    for fmt, result in outputs.items():
        assert result.returncode == 0, (fmt, result.stderr)
    rows = list(csv.DictReader(io.StringIO(outputs["csv"].stdout)))
    assert [r["tenant"] for r in rows] == sorted(NAMES.values(), key=str.casefold)
    document = json.loads(outputs["json"].stdout)
    assert {t["tenant"] for t in document["tenants"]} == set(NAMES.values())
    assert {t["tenant_id"] for t in document["tenants"]} == set(NAMES)
    table = outputs["table"].stdout
    assert all(name in table for name in NAMES.values())
    assert not any(line.startswith("tenant-0") for line in table.splitlines())
    page = outputs["html"].stdout
    assert "Globex &lt;R&amp;D&gt; &quot;East&quot;" in page
    assert "<R&D>" not in page
    assert ">tenant-01<" not in page


def test_seats_section_as_csv(collected: Collected, config: AppConfig) -> None:
    """``--format csv --section seats`` prints one row per flagged user with its tenant name."""
    result = _cli("-c", str(collected.config), "--until", str(collected.until), "--format",
                  "csv", "--section", "seats")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = _expected_seats(collected, _window(collected), 14)
    assert {(r["tenant_id"], r["user"], r["status"]) for r in rows} == {
        (t, e, s) for t, e, s, _ in expected
    }
    assert {r["tenant"] for r in rows} <= set(NAMES.values())


async def test_csv_rendering_neutralizes_formula_cells(tmp_path: Path) -> None:
    """Tenant names and emails that a spreadsheet would run as formulas get a leading quote in
    ``--format csv`` (usage and seats); numbers stay numbers."""
    formulas = ('=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3+cmd")
    until = dt.date(2026, 1, 31)
    sink = SqliteSink("w", SqliteSinkConfig(type="sqlite", path=tmp_path / "usage.db"))
    await sink.write(
        [
            make_tenant_day("acme", until - dt.timedelta(days=20), list(formulas)),
            make_tenant_day("acme", until, ["still.here@example.com"]),
        ]
    )
    await sink.aclose()
    report = make_report(
        SqlSource.from_argument(str(tmp_path / "usage.db")),
        Window.last(7, until),
        names={"acme": "=1+1"},
    )
    [usage] = list(csv.DictReader(io.StringIO(render_csv(report, "usage"))))
    assert (usage["tenant"], usage["tenant_id"]) == ("'=1+1", "acme")
    assert usage["messages"].isdigit()
    seats = list(csv.DictReader(io.StringIO(render_csv(report, "seats"))))
    assert sorted(row["user"] for row in seats) == sorted("'" + f for f in formulas)
    assert all(row["idle_days"].isdigit() for row in seats)


def test_since_until_window_equals_the_same_days_window(collected: Collected) -> None:
    """``--since A --until B`` reports the same as ``--days N --until B`` for the same days,
    and --since with --days is refused as a usage error."""
    until = collected.until
    since = until - dt.timedelta(days=6)
    base = ["-c", str(collected.config), "--format", "json", "--until", str(until)]
    by_since = json.loads(_cli(*base, "--since", str(since)).stdout)
    by_days = json.loads(_cli(*base, "--days", "7").stdout)
    for document in (by_since, by_days):
        document.pop("generated_at")
    assert by_since == by_days
    assert by_since["since"] == str(since)
    assert by_since["days"] == 7
    both = _cli(*base, "--since", str(since), "--days", "7")
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr


def test_first_readable_sink_is_the_default(collected: Collected, config: AppConfig) -> None:
    """Without --sink the report reads the first SQL or CSV sink of the config."""
    source = choose_sink(config.sinks, None)
    assert source.description == "sink 'warehouse' (type sqlite)"
    assert source.pii == "keep"


def test_unreadable_or_unknown_sink_is_a_clear_usage_error(
    collected: Collected, tmp_path: Path
) -> None:
    """A webhook sink, an unknown sink name, and a config with no readable sink each exit 2
    with a message naming the problem and what can be read."""
    hook = _cli("-c", str(collected.config), "--sink", "hook")
    assert hook.returncode == 2
    assert "sink 'hook' (type webhook) cannot be read back" in hook.stderr
    unknown = _cli("-c", str(collected.config), "--sink", "nope")
    assert unknown.returncode == 2
    assert "no sink named 'nope'" in unknown.stderr
    assert "warehouse" in unknown.stderr
    document = yaml.safe_load(collected.config.read_text(encoding="utf-8"))
    document["sinks"] = {"hook": document["sinks"]["hook"]}
    for tenant in document["tenants"]:
        tenant["sinks"] = ["hook"]
    only_hook = tmp_path / "hook-only.yaml"
    only_hook.write_text(yaml.safe_dump(document), encoding="utf-8")
    none = _cli("-c", str(only_hook))
    assert none.returncode == 2, none.stderr
    assert "no sink in the config can be read back (configured: hook (webhook))" in none.stderr
    assert "Traceback" not in hook.stderr + unknown.stderr + none.stderr


def test_missing_database_file_is_an_error_and_not_created(tmp_path: Path) -> None:
    """``--db`` naming a file that does not exist is refused, and no empty file is left."""
    missing = tmp_path / "typo.db"
    result = _cli("--db", str(missing))
    assert result.returncode == 2
    assert "no such SQLite file" in result.stderr
    assert not missing.exists()


def test_database_without_usage_tables_is_named(tmp_path: Path) -> None:
    """A database that is not a SQL sink's (the state store, say) is refused with the tables
    it lacks."""
    other = tmp_path / "other.db"
    engine = sa.create_engine(f"sqlite:///{other}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE something (x INTEGER)")
    engine.dispose()
    with pytest.raises(ReportError, match="has no table usage_daily, usage_daily_ide"):
        make_report(SqlSource.from_argument(str(other)), Window.last(7, dt.date(2026, 1, 31)))


def test_bad_csv_file_is_named_with_its_line(collected: Collected, tmp_path: Path) -> None:
    """A CSV partition missing a column, or with a non-number where a count belongs, is
    reported with its path (and line), not as a traceback."""
    root = tmp_path / "csv"
    shutil.copytree(collected.workdir / "csv", root)
    window = _window(collected)
    day_file = root / "tenant-01" / "usage_daily" / f"{collected.until}.csv"
    original = day_file.read_text(encoding="utf-8")
    day_file.write_text(original.replace("messages", "msgs", 1), encoding="utf-8")
    with pytest.raises(ReportError, match=f"{day_file}: no column messages"):
        make_report(CsvSource(root, "test"), window)
    header, first, *rest = original.splitlines()
    fields = first.split(",")
    fields[3] = "many"
    day_file.write_text("\n".join([header, ",".join(fields), *rest]) + "\n", encoding="utf-8")
    with pytest.raises(ReportError, match=f"{day_file}:2: messages is not a whole number"):
        make_report(CsvSource(root, "test"), window)


def test_csv_day_without_its_usage_daily_file_is_left_out(
    collected: Collected, tmp_path: Path
) -> None:
    """Detail files of a day whose usage_daily file is missing (a day the csv sink has not
    completed) are not counted: the report equals one without any file of that day."""
    window = _window(collected)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(collected.workdir / "csv", incomplete)
    name = f"{collected.until}.csv"
    (incomplete / "tenant-01" / "usage_daily" / name).unlink()
    absent = tmp_path / "absent"
    shutil.copytree(incomplete, absent)
    for table in ("usage_daily_ide", "usage_daily_language", "usage_user_daily"):
        (absent / "tenant-01" / table / name).unlink()
    assert _comparable(make_report(CsvSource(incomplete, "test"), window)) == _comparable(
        make_report(CsvSource(absent, "test"), window)
    )


def test_csv_directory_option_reads_the_files(collected: Collected) -> None:
    """``--csv DIR`` (no config) reads a CSV sink's files; tenants then show by id."""
    result = _cli("--csv", str(collected.workdir / "csv"), "--until", str(collected.until),
                  "--format", "json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [t["tenant"] for t in json.loads(result.stdout)["tenants"]] == sorted(NAMES)


def test_output_option_writes_the_file(collected: Collected, tmp_path: Path) -> None:
    """``-o FILE`` writes the rendering to the file and nothing to stdout; a file that cannot
    be written is a one-line error."""
    target = tmp_path / "usage.csv"
    result = _cli("--db", str(collected.workdir / "usage.db"), "--format", "csv", "-o",
                  str(target))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert target.read_text(encoding="utf-8").startswith("tenant,days,messages")
    nowhere = _cli("--db", str(collected.workdir / "usage.db"), "-o", str(tmp_path / "no" / "x"))
    assert nowhere.returncode == 2
    assert f"cannot write {tmp_path / 'no' / 'x'}: No such file or directory" in nowhere.stderr


def test_unreachable_database_error_never_shows_the_password() -> None:
    """A database that cannot be reached is a one-line error naming the URL with its password
    masked, and the password appears nowhere."""
    url = "postgresql+psycopg://reader:report-pw-canary@127.0.0.1:1/usage?connect_timeout=2"
    result = _cli("--db", url)
    assert result.returncode == 2
    assert "cannot read postgresql+psycopg://reader:***@127.0.0.1:1/usage" in result.stderr
    assert "report-pw-canary" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_window_that_ends_before_it_starts_is_refused(tmp_path: Path) -> None:
    """--since after --until, --days 0 and a negative --stale-days are usage errors that say
    which option is wrong."""
    db = str(tmp_path / "x.db")
    backwards = _cli("--db", db, "--since", "2026-02-01", "--until", "2026-01-31")
    assert backwards.returncode == 2
    assert "the window starts (2026-02-01) after it ends (2026-01-31)" in backwards.stderr
    no_days = _cli("--db", db, "--days", "0")
    assert no_days.returncode == 2
    assert "--days must be at least 1" in no_days.stderr
    negative = _cli("--db", db, "--stale-days", "-1")
    assert negative.returncode == 2
    assert "--stale-days must be 0 or more" in negative.stderr
