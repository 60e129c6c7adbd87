"""``export csv``: joining the CSV sink's partitions of a date range into one file per table."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import stat
from pathlib import Path

import pytest

from collector.export import ExportError, add_export_arguments, export_csv, run_export
from collector.testing import make_batch, make_tenant_day
from collector_sinks.csv import COLUMNS, CsvSink, CsvSinkConfig

START = dt.date(2025, 1, 15)


def read_csv(path: Path) -> list[list[str]]:
    """All rows of a CSV file, header first."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


@pytest.fixture
async def csv_root(tmp_path: Path) -> Path:
    """A CSV sink root holding tenants acme, globex and initech for five days from START."""
    root = tmp_path / "csv"
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=root))
    await sink.write(make_batch(("globex", "acme", "initech"), 5, users=3, unicode=True))
    await sink.aclose()
    return root


def test_export_joins_the_range_in_order(csv_root: Path, tmp_path: Path) -> None:
    """Days inside the range, every tenant, sorted by tenant then day, under one header."""
    out = tmp_path / "out"
    result = export_csv(csv_root, out, START + dt.timedelta(days=1), START + dt.timedelta(days=3))
    daily = read_csv(out / "usage_daily.csv")
    assert daily[0] == list(COLUMNS["usage_daily"])
    keys = [(row[0], row[1]) for row in daily[1:]]
    days = [(START + dt.timedelta(days=i)).isoformat() for i in (1, 2, 3)]
    assert keys == [(t, d) for t in ("acme", "globex", "initech") for d in days]
    users = read_csv(out / "usage_user_daily.csv")
    assert len(users) == 1 + 3 * 3 * 3
    assert users[1] == read_csv(csv_root / "acme" / "usage_user_daily" / f"{days[0]}.csv")[1]
    assert result.rows == {
        "usage_daily": 9,
        "usage_daily_ide": len(read_csv(out / "usage_daily_ide.csv")) - 1,
        "usage_daily_language": len(read_csv(out / "usage_daily_language.csv")) - 1,
        "usage_user_daily": 27,
    }
    assert result.partitions == 9
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}.csv" for t in COLUMNS)


def test_export_limits_tenants_and_tolerates_gaps(csv_root: Path, tmp_path: Path) -> None:
    """--tenant limits the export; days without partitions and unknown tenants are just absent."""
    out = tmp_path / "out"
    result = export_csv(
        csv_root,
        out,
        START - dt.timedelta(days=10),
        START + dt.timedelta(days=1),
        ["initech", "nobody"],
    )
    daily = read_csv(out / "usage_daily.csv")
    assert [(r[0], r[1]) for r in daily[1:]] == [
        ("initech", START.isoformat()),
        ("initech", (START + dt.timedelta(days=1)).isoformat()),
    ]
    assert result.partitions == 2


def test_export_of_an_empty_range_has_headers_only(csv_root: Path, tmp_path: Path) -> None:
    """A range without data still writes the four files, each with its header only."""
    out = tmp_path / "out"
    export_csv(csv_root, out, dt.date(2020, 1, 1), dt.date(2020, 1, 31))
    for table, header in COLUMNS.items():
        assert read_csv(out / f"{table}.csv") == [list(header)]


def test_export_rejects_bad_input(csv_root: Path, tmp_path: Path) -> None:
    """A reversed range, a missing root and an unsafe tenant id are refused with clear errors."""
    with pytest.raises(ExportError, match="before"):
        export_csv(csv_root, tmp_path / "o", START, START - dt.timedelta(days=1))
    with pytest.raises(ExportError, match="not a directory"):
        export_csv(tmp_path / "missing", tmp_path / "o", START, START)
    for unsafe in ("../etc", "nul", "acme."):
        with pytest.raises(ExportError, match="invalid tenant id"):
            export_csv(csv_root, tmp_path / "o", START, START, [unsafe])


def test_export_replaces_an_older_export(csv_root: Path, tmp_path: Path) -> None:
    """Exporting again into the same directory replaces the files instead of appending."""
    out = tmp_path / "out"
    export_csv(csv_root, out, START, START + dt.timedelta(days=4))
    export_csv(csv_root, out, START, START)
    assert len(read_csv(out / "usage_daily.csv")) == 1 + 3
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_partition_columns_are_mapped_by_header(tmp_path: Path) -> None:
    """A partition whose columns are in another order (or missing) is mapped by header name."""
    root = tmp_path / "csv"
    part = root / "acme" / "usage_daily"
    part.mkdir(parents=True)
    (part / f"{START.isoformat()}.csv").write_text(
        "day,tenant,messages,active_users\r\n2025-01-15,acme,7,2\r\n", encoding="utf-8"
    )
    export_csv(root, tmp_path / "out", START, START)
    assert read_csv(tmp_path / "out" / "usage_daily.csv")[1] == [
        "acme",
        "2025-01-15",
        "2",
        "7",
        "",
        "",
    ]


def test_cli_arguments_and_run(
    csv_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """add_export_arguments + run_export export a range and print one line per file."""
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    args = parser.parse_args(
        [
            "--root",
            str(csv_root),
            "-o",
            str(tmp_path / "out"),
            "--since",
            "2025-01-15",
            "--until",
            "2025-01-16",
            "--tenant",
            "acme",
        ]
    )
    assert run_export(args) == 0
    printed = capsys.readouterr().out
    assert "usage_daily.csv  2 rows" in printed
    assert "2 tenant-day(s) from 2025-01-15 to 2025-01-16 exported" in printed
    with pytest.raises(SystemExit):
        parser.parse_args(["--root", "x", "-o", "y", "--since", "15/01/2025"])


async def test_cli_finds_the_root_through_the_config(tmp_path: Path) -> None:
    """--sink NAME with -c FILE exports from that csv sink's path."""
    root = tmp_path / "csv"
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=root))
    await sink.write([make_tenant_day("acme", START, 2)])
    config = tmp_path / "collector.yaml"
    config.write_text(
        f"sinks:\n  sheets: {{type: csv, path: '{root}'}}\n"
        "tenants:\n  - id: acme\n    api_key: zak_test_acme\n",
        encoding="utf-8",
    )
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        ["--sink", "sheets", "-c", str(config), "-o", str(out), "--since", "2025-01-15"]
    )
    assert run_export(args) == 0
    assert len(read_csv(out / "usage_user_daily.csv")) == 1 + 2
    missing = parser.parse_args(
        ["--sink", "nope", "-c", str(config), "-o", str(out), "--since", "2025-01-15"]
    )
    with pytest.raises(ExportError, match="no sink named"):
        run_export(missing)


FORMULAS = ('=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3+cmd", "\t=1+1")
"""Cells a spreadsheet would run as formulas (the OWASP CSV-injection triggers)."""


@pytest.fixture
async def raw_root(tmp_path: Path) -> Path:
    """A CSV sink root written with csv_formula_guard off: formula-like emails and IDEs as sent."""
    root = tmp_path / "raw"
    sink = CsvSink("feed", CsvSinkConfig(type="csv", path=root, csv_formula_guard=False))
    await sink.write([make_tenant_day("acme", START, list(FORMULAS), ides=FORMULAS)])
    return root


def test_export_neutralizes_formula_cells(raw_root: Path, tmp_path: Path) -> None:
    """Formula-like text cells get a leading quote in the export; counts stay plain numbers."""
    out = tmp_path / "out"
    export_csv(raw_root, out, START, START)
    users = read_csv(out / "usage_user_daily.csv")[1:]
    assert sorted(row[2] for row in users) == sorted("'" + f for f in FORMULAS)
    assert all(row[3].isdigit() for row in users)
    ides = read_csv(out / "usage_daily_ide.csv")[1:]
    assert sorted(row[2] for row in ides) == sorted("'" + f for f in FORMULAS)
    daily = read_csv(out / "usage_daily.csv")[1]
    assert daily[2].isdigit()
    assert daily[3].isdigit()


async def test_export_guard_is_idempotent(tmp_path: Path) -> None:
    """Partitions the csv sink already guarded are exported with one quote, not two."""
    root = tmp_path / "csv"
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=root))
    await sink.write([make_tenant_day("acme", START, list(FORMULAS))])
    export_csv(root, tmp_path / "out", START, START)
    users = read_csv(tmp_path / "out" / "usage_user_daily.csv")[1:]
    assert sorted(row[2] for row in users) == sorted("'" + f for f in FORMULAS)


def test_no_formula_guard_keeps_the_text(raw_root: Path, tmp_path: Path) -> None:
    """export csv --no-formula-guard writes the stored text unchanged."""
    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        ["--root", str(raw_root), "-o", str(out), "--since", "2025-01-15", "--until",
         "2025-01-15", "--no-formula-guard"]
    )  # fmt: skip
    assert run_export(args) == 0
    users = read_csv(out / "usage_user_daily.csv")[1:]
    assert sorted(row[2] for row in users) == sorted(FORMULAS)


def test_export_skips_a_day_without_its_usage_daily_file(csv_root: Path, tmp_path: Path) -> None:
    """Detail files of a day whose usage_daily partition is missing (an incomplete day) are not
    exported."""
    (csv_root / "acme" / "usage_daily" / f"{START.isoformat()}.csv").unlink()
    out = tmp_path / "out"
    result = export_csv(csv_root, out, START, START, ["acme", "globex"])
    assert {row[0] for row in read_csv(out / "usage_user_daily.csv")[1:]} == {"globex"}
    assert {row[0] for row in read_csv(out / "usage_daily_ide.csv")[1:]} == {"globex"}
    assert result.partitions == 1


def test_export_creates_private_files_unless_shared(csv_root: Path, tmp_path: Path) -> None:
    """Under umask 022 the export's directory is 0700 and its files 0600; shared: 0750 / 0640."""
    old = os.umask(0o022)
    try:
        export_csv(csv_root, tmp_path / "private" / "out", START, START)
        export_csv(csv_root, tmp_path / "shared", START, START, shared_group=True)
    finally:
        os.umask(old)
    for directory, dir_mode, file_mode in (
        (tmp_path / "private", 0o700, 0o600),
        (tmp_path / "private" / "out", 0o700, 0o600),
        (tmp_path / "shared", 0o750, 0o640),
    ):
        assert stat.S_IMODE(directory.stat().st_mode) == dir_mode
        for path in directory.glob("*.csv"):
            assert stat.S_IMODE(path.stat().st_mode) == file_mode
    assert len(list((tmp_path / "shared").glob("*.csv"))) == 4
