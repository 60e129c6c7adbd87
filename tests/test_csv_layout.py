"""The CSV partition layout shared by the csv sink, ``export csv`` and ``report --sink``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from collector.csv_layout import (
    MARKER,
    MARKER_FIRST,
    complete_partitions,
    day_is_complete,
    partition_path,
)
from collector.tables import USAGE_COLUMNS

DAY = dt.date(2026, 11, 30)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("tenant,day\n", encoding="utf-8")
    return path


def test_partition_path_is_root_tenant_table_day(tmp_path: Path) -> None:
    """A partition lives at ROOT/TENANT/TABLE/DAY.csv."""
    assert partition_path(tmp_path, "acme", "usage_daily_ide", DAY) == (
        tmp_path / "acme" / "usage_daily_ide" / "2026-11-30.csv"
    )


def test_marker_first_lists_every_table_once_with_the_marker_first() -> None:
    """The writer's order names every usage table once, ``usage_daily`` first."""
    assert MARKER_FIRST[0] == MARKER == "usage_daily"
    assert sorted(MARKER_FIRST) == sorted(USAGE_COLUMNS)


def test_a_day_is_complete_only_with_its_marker(tmp_path: Path) -> None:
    """Detail files without the usage_daily file do not make a complete day."""
    _touch(partition_path(tmp_path, "acme", "usage_user_daily", DAY))
    assert not day_is_complete(tmp_path, "acme", DAY)
    _touch(partition_path(tmp_path, "acme", MARKER, DAY))
    assert day_is_complete(tmp_path, "acme", DAY)


def test_complete_partitions_skip_incomplete_hidden_foreign_and_out_of_range_files(
    tmp_path: Path,
) -> None:
    """Only day-named, visible files of complete days inside the range come out, by day."""
    table = "usage_user_daily"
    days = [DAY - dt.timedelta(days=i) for i in range(4)]
    for day in days:
        _touch(partition_path(tmp_path, "acme", table, day))
    for day in days[:3]:  # days[3] has no marker: a write that failed half-way
        _touch(partition_path(tmp_path, "acme", MARKER, day))
    _touch(tmp_path / "acme" / table / ".2026-11-30.csv.tmp1234.csv")  # a temporary file
    _touch(tmp_path / "acme" / table / "notes.csv")
    found = list(complete_partitions(tmp_path / "acme", table, days[2], days[0]))
    assert found == [partition_path(tmp_path, "acme", table, d) for d in sorted(days[:3])]
    assert list(complete_partitions(tmp_path / "acme", "usage_daily_ide", days[3], DAY)) == []
