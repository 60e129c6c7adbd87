"""The state store's files, failures and raw-payload policy on real SQLite files (and a real full
tmpfs where the test may mount one)."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from collector.errors import StoreError
from collector.models import tenant_day_from_body
from collector.pii import Pseudonymizer, raw_body_policy, raw_payload_policy
from collector.store import Store
from collector.store.base import HEALTH_LOG_INTERVAL, StoreHealth
from tests.disk import fill, small_disk
from tests.test_store import DAY, FETCHED_AT, days, fetched, usage_data


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which new files would be world-readable."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize(
    ("shared_group", "file_mode", "dir_mode"), [(False, 0o600, 0o700), (True, 0o640, 0o750)]
)
async def test_state_files_and_directories_are_private(
    tmp_path: Path, shared_group: bool, file_mode: int, dir_mode: int
) -> None:
    """The database, its -wal, -shm and .lock files are 0600 and the directories created for it
    0700 under umask 022 (0640/0750 with files.shared_group)."""
    path = tmp_path / "data" / "state" / "state.db"
    store = await Store.open(f"sqlite:///{path}", exclusive=True, shared_group=shared_group)
    try:
        await store.record_fetched(days("acme", 2))
        files = [path, path.with_name("state.db-wal"), path.with_name("state.db-shm")]
        files.append(path.with_name("state.db.lock"))
        assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(file_mode) for f in files}
        assert oct(_mode(path.parent)) == oct(dir_mode)
        assert oct(_mode(path.parent.parent)) == oct(dir_mode)
    finally:
        await store.aclose()


@pytest.mark.usefixtures("umask_022")
async def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    """Only what the collector creates gets the private mode: an operator's directory stays."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    store = await Store.open(f"sqlite:///{data / 'state.db'}")
    await store.aclose()
    assert oct(_mode(data)) == oct(0o755)
    assert oct(_mode(data / "state.db")) == oct(0o600)


async def test_a_full_disk_fails_writes_with_one_log_line_and_recovers(tmp_path: Path) -> None:
    """On a full disk every write raises StoreError, the store reports itself failing, logs one
    error for twenty failures and /readyz's ping fails; once space returns the ping's probe write
    succeeds, the recovery is logged, and new days are stored beside the old ones."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        store = await Store.open(f"sqlite:///{disk / 'state.db'}", exclusive=True)
        try:
            await store.sync_sinks({"warehouse": None})
            await store.record_fetched(days("acme", 3))
            filler = fill(disk)
            big = [fetched("globex", DAY + dt.timedelta(days=i), users=60) for i in range(120)]
            with capture_logs() as logs:
                for _ in range(20):
                    with pytest.raises(StoreError, match="disk is full"):
                        await store.record_fetched(big)
                with pytest.raises(StoreError):
                    await store.ping()
            failing = [e for e in logs if e["event"].startswith("state store failing")]
            assert len(failing) == 1
            assert failing[0]["log_level"] == "error"
            assert "disk is full" in failing[0]["error"]
            assert store.health.failing
            assert store.health.failures >= 21

            filler.unlink()
            with capture_logs() as logs:
                await store.ping()
            assert not store.health.failing
            assert [e["event"] for e in logs] == ["state store recovered"]
            await store.record_fetched(big)
            assert len(await store.days_state("acme")) == 3
            assert len(await store.days_state("globex")) == 120
            assert await store.backlog("warehouse") == 123
        finally:
            await store.aclose()


async def test_pseudonymized_raw_payloads_hold_no_email(tmp_path: Path) -> None:
    """With state.raw_pii: pseudonymize no email reaches the database files, and the sinks read
    back the keyed pseudonyms, also after a restart (the stored payload still parses)."""
    path = tmp_path / "state.db"
    url = f"sqlite:///{path}"
    store = await Store.open(url)
    store.payload_policy = raw_payload_policy("pseudonymize", b"state-key")
    data = usage_data(DAY, users=3)
    data["users"].append(dict(data["users"][0], email="USER0@acme.example"))
    body = json.dumps({"status": "success", "data": data})
    item = tenant_day_from_body("acme", DAY, body.encode(), fetched_at=FETCHED_AT, final=False)
    await store.sync_sinks({"warehouse": None})
    await store.record_fetched([(item, body)])
    first = await store.pending("warehouse")
    await store.aclose()

    alias = Pseudonymizer(b"state-key").pseudonym
    expected = sorted(alias(f"user{i}@acme.example") for i in range(3))
    assert sorted(u.user for u in first[0].users) == expected
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for file in path.parent.iterdir():
        assert b"@acme.example" not in file.read_bytes(), file.name

    reopened = await Store.open(url)
    try:
        again = await reopened.pending("warehouse")
        assert sorted(u.user for u in again[0].users) == expected
        assert again[0].daily == first[0].daily
    finally:
        await reopened.aclose()


async def test_pseudonymized_quarantined_bodies_hold_no_email(tmp_path: Path) -> None:
    """Under state.raw_pii: pseudonymize a body kept unparsed (quarantined) holds pseudonyms in
    place of its emails, and parsing it again later gives the same pseudonyms as a fetched day
    (the state's pseudonymizer does not hash a pseudonym twice)."""
    path = tmp_path / "state.db"
    store = await Store.open(f"sqlite:///{path}")
    store.payload_policy = raw_payload_policy("pseudonymize", b"state-key")
    store.body_policy = raw_body_policy("pseudonymize", b"state-key")
    data = usage_data(DAY, users=2)
    body = json.dumps({"status": "success", "data": {**data, "surprise": [[1]]}}).encode()
    try:
        await store.record_quarantined("acme", DAY, "data.surprise: not understood", body)
        [kept] = await store.stored_bodies("acme")
        alias = Pseudonymizer(b"state-key").pseudonym
        expected = sorted(alias(f"user{i}@acme.example") for i in range(2))
        assert b"@acme.example" not in kept.body
        assert sorted(u["email"] for u in json.loads(kept.body)["data"]["users"]) == expected
        # reprocess: the kept body parses and is stored through the same policy, unchanged.
        reparsed = tenant_day_from_body("acme", DAY, kept.body, fetched_at=FETCHED_AT, final=True)
        [(stored, _payload)] = store.private([(reparsed, kept.body.decode())])
        assert sorted(u.user for u in stored.users) == expected
    finally:
        await store.aclose()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for file in path.parent.iterdir():
        assert b"@acme.example" not in file.read_bytes(), file.name


async def test_kept_raw_payloads_are_stored_as_received(tmp_path: Path) -> None:
    """The default policy keeps the emails (the sinks apply their own pii policies)."""
    assert raw_payload_policy("keep", None) is None
    store = await Store.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        await store.sync_sinks({"warehouse": None})
        await store.record_fetched([fetched("acme", users=2)])
        [day] = await store.pending("warehouse")
        assert sorted(u.user for u in day.users) == ["user0@acme.example", "user1@acme.example"]
    finally:
        await store.aclose()


def test_a_flapping_store_is_logged_once_per_interval() -> None:
    """Failures alternating with successes (small writes fitting where big ones do not) give one
    error and one recovery line per interval; the next error line counts those not logged."""
    now = [1000.0]
    health = StoreHealth(clock=lambda: now[0])
    with capture_logs() as logs:
        for reason in ("database or disk is full", "disk I/O error", "database or disk is full"):
            health.failed(reason)
            health.succeeded()
        health.failed("database or disk is full")
        now[0] += HEALTH_LOG_INTERVAL
        health.failed("disk I/O error")
    assert [(e["event"], e.get("similar_errors_not_logged")) for e in logs] == [
        ("state store failing: nothing new is stored until it recovers", 0),
        ("state store recovered", None),
        ("state store failing: nothing new is stored until it recovers", 3),
    ]
    assert health.failing
    assert health.error == "disk I/O error"
    assert health.failures == 5
