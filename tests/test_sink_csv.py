"""The CSV sink against real files in tmp_path: layout, exact content, atomic replacement."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from collector.errors import SinkPermanentError, SinkTransientError
from collector.models import TenantDay
from collector.sink import SinkHost
from collector.testing import make_batch, make_tenant_day, refetched
from collector_sinks.csv import COLUMNS, CsvSink, CsvSinkConfig, partition_path


def read_csv(path: Path) -> list[list[str]]:
    """All rows of a CSV file, header first."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def expected_rows(td: TenantDay) -> dict[str, list[list[str]]]:
    """The four files' rows (without header) a tenant-day must produce."""
    day = td.day.isoformat()
    return {
        "usage_daily": [
            [
                td.tenant,
                day,
                str(td.daily.active_users),
                str(td.daily.messages),
                td.fetched_at.astimezone(dt.UTC).isoformat(),
                "true" if td.final else "false",
            ]
        ],
        "usage_daily_ide": [[td.tenant, day, i.ide_name, str(i.engaged_users)] for i in td.ides],
        "usage_daily_language": [
            [td.tenant, day, x.language_name, str(x.engaged_users)] for x in td.languages
        ],
        "usage_user_daily": [
            [
                td.tenant,
                day,
                u.user,
                str(u.messages),
                u.last_active.isoformat() if u.last_active else "",
                json.dumps(list(u.ides), ensure_ascii=False),
                json.dumps(list(u.languages), ensure_ascii=False),
                u.last_active_at.astimezone(dt.UTC).isoformat() if u.last_active_at else "",
            ]
            for u in td.users
        ],
    }


def assert_partition(root: Path, td: TenantDay) -> None:
    """The four files of td exist with the header and exactly td's rows."""
    for table, rows in expected_rows(td).items():
        content = read_csv(root / td.tenant / table / f"{td.day.isoformat()}.csv")
        assert content[0] == list(COLUMNS[table])
        assert content[1:] == rows


@pytest.fixture
async def sink(tmp_path: Path) -> CsvSink:
    """An opened CSV sink rooted in tmp_path/csv."""
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=tmp_path / "csv"))
    await sink.open()
    return sink


async def test_layout_and_exact_content(sink: CsvSink) -> None:
    """Each tenant-day becomes ROOT/TENANT/TABLE/DAY.csv for the four tables, with exact rows."""
    batch = make_batch(("acme", "globex"), 2, users=4)
    await sink.write(batch)
    for td in batch:
        assert_partition(sink.root, td)
    files = sorted(p.relative_to(sink.root).as_posix() for p in sink.root.rglob("*") if p.is_file())
    assert len(files) == 16
    assert files[0] == "acme/usage_daily/2025-01-15.csv"


async def test_redelivery_replaces_only_its_partition(sink: CsvSink) -> None:
    """A re-fetch rewrites its own day's files; other days' files are not touched."""
    first = make_batch(("acme",), 2, users=5)
    await sink.write(first)
    other = sink.root / "acme" / "usage_user_daily" / "2025-01-16.csv"
    before = other.stat()
    newer = refetched(first[0], drop_users=2)
    await sink.write([newer])
    await sink.write([newer])
    assert_partition(sink.root, newer)
    assert_partition(sink.root, first[1])
    after = other.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(read_csv(sink.root / "acme" / "usage_user_daily" / "2025-01-15.csv")) == 1 + 3


async def test_idle_day_has_header_only_files(sink: CsvSink) -> None:
    """A day without activity still gets all four files; the detail files hold only a header."""
    idle = make_tenant_day("acme", users=0)
    await sink.write([idle])
    assert_partition(sink.root, idle)
    assert read_csv(sink.root / "acme" / "usage_user_daily" / "2025-01-15.csv") == [
        list(COLUMNS["usage_user_daily"])
    ]


async def test_unicode_and_hostile_characters_round_trip(sink: CsvSink) -> None:
    """Commas, quotes, semicolons and non-ASCII names survive as UTF-8 CSV."""
    batch = make_batch(("acme",), 1, users=4, unicode=True)
    await sink.write(batch)
    assert_partition(sink.root, batch[0])


async def test_no_temporary_files_remain(sink: CsvSink) -> None:
    """After writes and rewrites only the partition files exist (no .tmp leftovers)."""
    batch = make_batch(("acme",), 3)
    await sink.write(batch)
    await sink.write(batch)
    leftovers = [p.name for p in sink.root.rglob("*") if p.is_file() and p.suffix != ".csv"]
    assert leftovers == []


async def test_leftovers_of_a_killed_write_are_swept_where_the_sink_writes(tmp_path: Path) -> None:
    """Temporary files older than the sink's start are deleted the first time it writes into
    their directory; a newer one (another write under way) and other directories are left."""
    root = tmp_path / "csv"
    batch = make_batch(("acme",), 1)
    first = CsvSink("sheets", CsvSinkConfig(type="csv", path=root))
    await first.open()
    await first.write(batch)
    daily = partition_path(root, "acme", "usage_daily", batch[0].day).parent
    elsewhere = root / "other-tenant" / "usage_daily"
    elsewhere.mkdir(parents=True)
    stale = [daily / ".2026-01-01.csv.abc123.tmp", elsewhere / ".2026-01-01.csv.def456.tmp"]
    for path in stale:
        path.write_bytes(b"half a fi")
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    fresh = daily / ".2026-01-02.csv.ghi789.tmp"
    fresh.write_bytes(b"being written")
    os.utime(fresh, (time.time() + 3600, time.time() + 3600))

    second = CsvSink("sheets", CsvSinkConfig(type="csv", path=root))  # the restarted process
    with capture_logs() as logs:
        await second.open()
        await second.write(batch)
    assert not stale[0].exists()
    assert stale[1].exists()  # nothing was written there
    assert fresh.exists()
    assert_partition(root, batch[0])
    assert [e["files"] for e in logs if e["event"].startswith("removed temporary")] == [1]


@pytest.mark.parametrize("tenant", ["../evil", "a/b", "..", ".hidden", "", "con", "x" * 200, "ok."])
async def test_unsafe_tenant_id_is_refused(sink: CsvSink, tenant: str) -> None:
    """A tenant id that is not one safe path segment fails permanently and writes nothing."""
    good = make_tenant_day("acme")
    with pytest.raises(SinkPermanentError, match="cannot be a directory name"):
        await sink.write([good, make_tenant_day(tenant)])
    assert not (sink.root / "acme").exists()
    assert not (sink.root.parent / "evil").exists()


async def test_root_that_is_a_file_is_transient(tmp_path: Path) -> None:
    """A root path occupied by a regular file fails open() and ping() with SinkTransientError."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=blocker))
    with pytest.raises(SinkTransientError, match="sink sheets"):
        await sink.open()
    with pytest.raises(SinkTransientError):
        await sink.ping()
    with pytest.raises(SinkTransientError):
        await sink.write(make_batch(("acme",), 1))


async def test_readers_never_see_a_torn_file(sink: CsvSink) -> None:
    """While one partition is rewritten with alternating sizes, every read is a complete version."""
    small = make_tenant_day("acme", users=2)
    large = make_tenant_day("acme", users=400)
    target = sink.root / "acme" / "usage_user_daily" / "2025-01-15.csv"
    await sink.write([small])
    valid = {3, 401}
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
            seen.append(len(rows))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            await sink.write([large if i % 2 == 0 else small])
            await asyncio.sleep(0)
    finally:
        stop.set()
        thread.join()
    assert seen
    assert set(seen) <= valid


async def test_ping_and_close(sink: CsvSink) -> None:
    """ping() succeeds on a writable root; aclose() may be called twice."""
    await sink.ping()
    await sink.aclose()
    await sink.aclose()


def test_config_requires_a_path() -> None:
    """The csv sink needs a path and rejects unknown keys."""
    with pytest.raises(ValidationError, match="path"):
        CsvSinkConfig.model_validate({"type": "csv"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        CsvSinkConfig.model_validate({"type": "csv", "path": "x", "compress": True})


# --- spreadsheet formulas -------------------------------------------------------------------------

FORMULAS = (
    '=HYPERLINK("http://x","y")',
    "+cmd|' /C calc'!A0",
    "@SUM(1+1)",
    "-2+3+cmd",
    "\t=1+1",
    "\r=1+1",
)
"""Cells a spreadsheet would run as formulas (the OWASP CSV-injection triggers)."""


def formula_day() -> TenantDay:
    """A tenant-day whose emails, IDE names and language names are all formulas."""
    return make_tenant_day("acme", users=list(FORMULAS), ides=FORMULAS, languages=FORMULAS)


async def test_formula_cells_are_neutralized_by_default(sink: CsvSink) -> None:
    """Every text cell starting with =, +, -, @, tab or CR gets a leading quote; numbers do not."""
    td = formula_day()
    await sink.write([td])
    guarded = {"'" + text for text in FORMULAS}
    users = read_csv(partition_path(sink.root, "acme", "usage_user_daily", td.day))[1:]
    assert {row[2] for row in users} == guarded
    assert [row[3] for row in users] == [str(u.messages) for u in td.users]
    ides = read_csv(partition_path(sink.root, "acme", "usage_daily_ide", td.day))[1:]
    assert {row[2] for row in ides} == guarded
    assert all(row[3].isdigit() for row in ides)
    languages = read_csv(partition_path(sink.root, "acme", "usage_daily_language", td.day))[1:]
    assert {row[2] for row in languages} == guarded
    daily = read_csv(partition_path(sink.root, "acme", "usage_daily", td.day))[1]
    assert daily[2:4] == [str(td.daily.active_users), str(td.daily.messages)]


async def test_formula_guard_can_be_turned_off(tmp_path: Path) -> None:
    """csv_formula_guard: false writes the text exactly as the API sent it."""
    sink = CsvSink(
        "feed", CsvSinkConfig(type="csv", path=tmp_path / "csv", csv_formula_guard=False)
    )
    await sink.open()
    td = formula_day()
    await sink.write([td])
    assert_partition(sink.root, td)


# --- a day is all four tables or none -----------------------------------------------------------


def visible_days(root: Path) -> dict[str, set[str]]:
    """Per table, the partitions a reader can see (temporary files excluded)."""
    return {
        table: {p.name for p in (root / "acme" / table).glob("*.csv")}
        if (root / "acme" / table).is_dir()
        else set()
        for table in COLUMNS
    }


async def test_a_failing_table_directory_publishes_no_file_of_the_day(tmp_path: Path) -> None:
    """When one table's directory cannot take the file, none of the day's four files appear."""
    root = tmp_path / "csv"
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=root))
    await sink.open()
    (root / "acme").mkdir(parents=True)
    (root / "acme" / "usage_user_daily").write_text("a file where a directory belongs")
    with pytest.raises(SinkTransientError):
        await sink.write(make_batch(("acme",), 2))
    assert visible_days(root) == {
        "usage_daily": set(),
        "usage_daily_ide": set(),
        "usage_daily_language": set(),
        "usage_user_daily": set(),
    }
    assert [p.name for p in root.rglob("*.tmp")] == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted on a fresh directory (skips where mounting is not permitted)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


async def test_a_full_disk_leaves_no_partial_day(tiny_disk: Path) -> None:
    """A day that does not fit on the disk leaves none of its files; days written before stay."""
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=tiny_disk / "csv"))
    await sink.open()
    small = make_tenant_day("acme", users=3)
    await sink.write([small])
    huge = make_tenant_day("acme", day=small.day + dt.timedelta(days=1), users=4000)
    with pytest.raises(SinkTransientError, match="No space left"):
        await sink.write([huge])
    days = visible_days(sink.root)
    assert all(names == {f"{small.day.isoformat()}.csv"} for names in days.values())
    assert_partition(sink.root, small)
    assert [p.name for p in sink.root.rglob("*.tmp")] == []


async def test_a_replaced_day_keeps_its_marker_with_its_own_version(sink: CsvSink) -> None:
    """While a day is replaced, whenever usage_daily/DAY.csv exists the user file beside it is of
    the same version (same user count as the marker's active users)."""
    small = make_tenant_day("acme", users=2)
    large = make_tenant_day("acme", users=300)
    await sink.write([small])
    marker = partition_path(sink.root, "acme", "usage_daily", small.day)
    users = partition_path(sink.root, "acme", "usage_user_daily", small.day)
    mismatches: list[tuple[str, int]] = []
    checks = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal checks
        while not stop.is_set():
            try:
                before = marker.stat()
                active = read_csv(marker)[1][2]
                user_rows = len(read_csv(users)) - 1
                after = marker.stat()
            except FileNotFoundError:
                continue  # the day is being replaced: absent, as the contract says
            if (before.st_ino, before.st_mtime_ns) != (after.st_ino, after.st_mtime_ns):
                continue  # replaced while reading: a reader reads again
            checks += 1
            if int(active) != user_rows:
                mismatches.append((active, user_rows))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            await sink.write([large if i % 2 == 0 else small])
            await asyncio.sleep(0)
    finally:
        stop.set()
        thread.join()
    assert checks
    assert mismatches == []


# --- file modes ---------------------------------------------------------------------------------


async def test_files_and_directories_are_owner_only_by_default(tmp_path: Path) -> None:
    """Under umask 022 the sink creates its directories 0700 and its files 0600."""
    old = os.umask(0o022)
    try:
        sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=tmp_path / "a" / "csv"))
        await sink.open()
        await sink.write(make_batch(("acme",), 1))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    directories = [p for p in sink.root.rglob("*") if p.is_dir()] + [sink.root]
    files = [p for p in sink.root.rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in directories} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


async def test_shared_group_makes_them_group_readable(tmp_path: Path) -> None:
    """With files.shared_group the sink creates directories 0750 and files 0640."""
    sink = CsvSink("sheets", CsvSinkConfig(type="csv", path=tmp_path / "csv"))
    sink.host = SinkHost(shared_group=True)
    await sink.open()
    await sink.write(make_batch(("acme",), 1))
    directories = [p for p in sink.root.rglob("*") if p.is_dir()] + [sink.root]
    files = [p for p in sink.root.rglob("*") if p.is_file()]
    assert {stat.S_IMODE(p.stat().st_mode) for p in directories} == {0o750}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}
