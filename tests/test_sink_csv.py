"""The CSV sink against real files in tmp_path: layout, exact content, atomic replacement."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from collector.errors import SinkPermanentError, SinkTransientError
from collector.models import TenantDay
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
