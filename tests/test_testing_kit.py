"""collector.testing: our sinks pass the conformance suite, which catches bad sinks; helpers."""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from collector.errors import SinkPermanentError, SinkTransientError
from collector.simulator import Simulator
from collector.testing import (
    UNICODE_EMAILS,
    FailingSink,
    RecordingSink,
    RecordingSinkConfig,
    SinkConformance,
    SinkFactory,
    make_batch,
    make_tenant_day,
    refetched,
)
from collector_sinks.csv import CsvSink, CsvSinkConfig
from collector_sinks.sqlite import SqliteSink, SqliteSinkConfig, SqlSink

TABLES = ("usage_daily", "usage_daily_ide", "usage_daily_language", "usage_user_daily")


class TestSqliteConformance(SinkConformance):
    """The sqlite sink against SQLite files."""

    @pytest.fixture
    def sink_factory(self, tmp_path: Path) -> SinkFactory:
        def make() -> SqliteSink:
            path = tmp_path / f"{uuid.uuid4().hex}.db"
            return SqliteSink("conformance", SqliteSinkConfig(type="sqlite", path=path))

        return make

    @pytest.fixture
    def broken_sink_factory(self, tmp_path: Path) -> SinkFactory:
        return lambda: SqliteSink("broken", SqliteSinkConfig(type="sqlite", path=tmp_path))

    def read_back(self, sink: Any) -> dict[str, list[tuple[Any, ...]]]:
        with sqlite3.connect(sink.config.path) as conn:
            return {t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}  # noqa: S608 - fixed names


@pytest.mark.postgres
class TestPostgresConformance(SinkConformance):
    """The sql sink against a real PostgreSQL, one schema per sink instance."""

    @pytest.fixture
    def sink_factory(self, postgres_url: str) -> Iterator[SinkFactory]:
        admin = sa.create_engine(postgres_url)
        schemas: list[str] = []

        def make() -> SqlSink:
            schema = f"kit_{uuid.uuid4().hex[:12]}"
            with admin.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            schemas.append(schema)
            url = sa.make_url(postgres_url).update_query_dict(
                {"options": f"-csearch_path={schema}"}
            )
            return SqlSink(
                "conformance",
                SqliteSinkConfig(
                    type="sql", url=SecretStr(url.render_as_string(hide_password=False))
                ),
            )

        yield make
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    @pytest.fixture
    def broken_sink_factory(self) -> SinkFactory:
        url = "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2"
        return lambda: SqlSink("broken", SqliteSinkConfig(type="sql", url=SecretStr(url)))

    def read_back(self, sink: Any) -> dict[str, list[tuple[Any, ...]]]:
        engine = sa.create_engine(sink.config.sqlalchemy_url())
        try:
            with engine.connect() as conn:
                return {
                    t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t}"))]  # noqa: S608 - fixed names
                    for t in TABLES
                }
        finally:
            engine.dispose()


class TestCsvConformance(SinkConformance):
    """The csv sink against directories in tmp_path."""

    @pytest.fixture
    def sink_factory(self, tmp_path: Path) -> SinkFactory:
        return lambda: CsvSink(
            "conformance", CsvSinkConfig(type="csv", path=tmp_path / uuid.uuid4().hex)
        )

    @pytest.fixture
    def broken_sink_factory(self, tmp_path: Path) -> SinkFactory:
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the root directory should be")
        return lambda: CsvSink("broken", CsvSinkConfig(type="csv", path=blocker))

    def read_back(self, sink: Any) -> dict[str, list[list[str]]]:
        root: Path = sink.root
        files = sorted(p for p in root.rglob("*.csv")) if root.exists() else []
        return {
            p.relative_to(root).as_posix(): list(csv.reader(p.open(newline="", encoding="utf-8")))
            for p in files
        }


class TestRecordingSinkConformance(SinkConformance):
    """The in-memory RecordingSink; its broken twin is a FailingSink."""

    @pytest.fixture
    def sink_factory(self) -> SinkFactory:
        return RecordingSink

    @pytest.fixture
    def broken_sink_factory(self) -> SinkFactory:
        return FailingSink

    def read_back(self, sink: Any) -> list[Any]:
        return list(sink.rows())


BAD_SINKS = '''
import asyncio
import pytest
from collector.sink import Sink, SinkConfig
from collector.testing import SinkConformance


class AppendingSink(Sink):
    """Appends rows: duplicates on redelivery, raises a raw OSError on a broken target."""

    type_name = "appending"

    def __init__(self, name, config, broken=False):
        super().__init__(name, config)
        self.rows = []
        self.broken = broken
        self.closed = False

    async def write(self, batch):
        if self.broken:
            raise OSError("disk on fire")
        for td in batch:
            self.rows.extend((td.tenant, td.day, u.user, u.messages) for u in td.users)

    async def aclose(self):
        if self.closed:
            raise RuntimeError("closed twice")
        self.closed = True


class TestAppending(SinkConformance):
    @pytest.fixture
    def sink_factory(self):
        return lambda: AppendingSink("a", SinkConfig(type="appending"))

    @pytest.fixture
    def broken_sink_factory(self):
        return lambda: AppendingSink("a", SinkConfig(type="appending"), broken=True)

    def read_back(self, sink):
        return list(sink.rows)


class TestForgetful(SinkConformance):
    """No factory fixture at all."""
'''


def test_the_suite_catches_a_non_conforming_sink(tmp_path: Path) -> None:
    """A duplicating sink raising raw errors and failing a 2nd aclose fails exactly those tests."""
    test_file = tmp_path / "test_bad_sink.py"
    test_file.write_text(textwrap.dedent(BAD_SINKS), encoding="utf-8")
    # A fresh pytest in strict asyncio mode, as a plugin author's project would run it.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-rA", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    outcomes = {}
    for line in result.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] in {"PASSED", "FAILED", "ERROR"} and "::" in parts[1]:
            outcomes[parts[1].split("::", 1)[1]] = parts[0]
    appending = {k.split("::")[1]: v for k, v in outcomes.items() if k.startswith("TestAppending")}
    assert appending == {
        "test_conformance_declares_the_contract": "PASSED",
        "test_conformance_stores_what_it_is_given": "PASSED",
        "test_conformance_redelivery_is_idempotent": "FAILED",
        "test_conformance_refetch_replaces": "FAILED",
        "test_conformance_partitions_are_independent": "PASSED",
        "test_conformance_empty_batch": "PASSED",
        "test_conformance_idle_day": "FAILED",  # it keeps no trace of a day without users
        "test_conformance_unicode": "FAILED",
        "test_conformance_broken_target_raises_sink_error": "FAILED",
        "test_conformance_close_is_clean": "FAILED",
    }, result.stdout[-3000:]
    forgetful = [v for k, v in outcomes.items() if k.startswith("TestForgetful")]
    assert len(forgetful) == 10
    assert "PASSED" not in forgetful
    assert "must define a sink_factory fixture" in result.stdout
    assert result.returncode == 1


def test_tenant_day_builder_is_consistent_and_deterministic() -> None:
    """Totals and engaged users derive from the users; the same inputs give the same tenant-day."""
    td = make_tenant_day("acme", users=12, seed=3)
    assert td == make_tenant_day("acme", users=12, seed=3)
    assert td != make_tenant_day("acme", users=12, seed=4)
    assert td.daily.active_users == 12 == len({u.user for u in td.users})
    assert td.daily.messages == sum(u.messages for u in td.users)
    for ide in td.ides:
        assert ide.engaged_users == sum(ide.ide_name in u.ides for u in td.users) > 0
    for language in td.languages:
        assert language.engaged_users == sum(
            language.language_name in u.languages for u in td.users
        )
    assert all(u.tenant == "acme" and u.day == td.day for u in td.users)
    assert len(td.content_hash) == 64


def test_batch_builders_cover_tenants_days_and_unicode() -> None:
    """make_batch is tenant-major over consecutive days; unicode uses the documented names."""
    batch = make_batch(3, 2)
    assert [(td.tenant, td.day.day) for td in batch] == [
        ("tenant-01", 15),
        ("tenant-01", 16),
        ("tenant-02", 15),
        ("tenant-02", 16),
        ("tenant-03", 15),
        ("tenant-03", 16),
    ]
    unicode_day = make_batch(("acme",), 1, users=6, unicode=True)[0]
    emails = [u.user for u in unicode_day.users]
    assert emails[:4] == list(UNICODE_EMAILS)
    assert len(set(emails)) == 6
    explicit = make_tenant_day("acme", users=["a@x.example", "b@x.example"])
    assert [u.user for u in explicit.users] == ["a@x.example", "b@x.example"]


def test_refetched_drops_users_and_can_make_an_idle_day() -> None:
    """refetched removes the last users, raises activity, and with many drops gives an idle day."""
    td = make_tenant_day("acme", users=5)
    later = refetched(td, drop_users=2, extra_messages=3)
    assert [u.user for u in later.users] == [u.user for u in td.users[:3]]
    assert [u.messages for u in later.users] == [u.messages + 3 for u in td.users[:3]]
    assert later.fetched_at > td.fetched_at
    assert later.content_hash != td.content_hash
    idle = refetched(td, drop_users=99)
    assert (idle.users, idle.ides, idle.languages, idle.daily.active_users) == ((), (), (), 0)


async def test_failing_sink_modes() -> None:
    """FailingSink raises per mode for its first failures, hangs until cancelled, then records."""
    transient = FailingSink(mode="transient", failures=2, retry_after=1.5)
    batch = make_batch(("acme",), 1)
    for _ in range(2):
        with pytest.raises(SinkTransientError) as caught:
            await transient.write(batch)
        assert caught.value.retry_after == 1.5
    await transient.write(batch)
    assert (transient.write_calls, transient.failed, transient.rows()) == (3, 2, batch)
    with pytest.raises(SinkPermanentError):
        await FailingSink(mode="permanent").write(batch)
    with pytest.raises(RuntimeError, match="on purpose"):
        await FailingSink(mode="crash").write(batch)
    with pytest.raises(SinkTransientError):
        await FailingSink().ping()
    hanging = FailingSink(mode="hang")
    task = asyncio.create_task(hanging.write(batch))
    await asyncio.sleep(0.05)
    assert hanging.hanging == 1
    assert not task.done()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(task, 0.05)
    assert hanging.hanging == 0
    assert hanging.rows() == []


async def test_recording_sink_records_batches_and_delay() -> None:
    """RecordingSink keeps batches as written, the latest version per day, and honours delay."""
    sink = RecordingSink("rec", RecordingSinkConfig(delay=0.05))
    first = make_batch(("acme",), 2)
    newer = refetched(first[0])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sink.write(first)
    await sink.write([newer])
    assert loop.time() - started >= 0.1
    assert sink.batches == [first, [newer]]
    assert sink.rows() == [newer, first[1]]
    await sink.open()
    await sink.aclose()
    assert (sink.opened, sink.closed, sink.write_calls) == (1, 1, 2)


async def test_simulator_fixture_serves_the_api(simulator: Simulator) -> None:
    """The simulator fixture is a real server answering day requests for the demo tenants."""
    day = make_tenant_day().day
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{simulator.base_url}/api/v1/data/usage",
            params={"day": day.isoformat()},
            headers={"zencoder-api-key": "zak_test_tenant-02"},
        ) as response,
    ):
        assert response.status == 200
        body = await response.json()
    assert body["data"] == json.loads(json.dumps(simulator.day_data("tenant-02", day)))
    assert simulator.stats.usage_requests["tenant-02"] == 1
