"""Offboarding a tenant: `tenant export` and `tenant purge` over real stores, sinks and servers."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import os
import sqlite3
import sys
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.app import load, load_plugins
from collector.hookspecs import hookimpl
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from collector.sink import Sink
from collector.tenant_admin import TenantStore, purge_sinks, write_export
from collector.testing import usage_body
from tests.e2e import CliResult, run_cli, write_config
from tests.servers import (
    MOTO_CREDENTIALS,
    WebhookReceiver,
    list_keys,
    running_moto_s3,
    s3_admin_client,
    sample_day,
)

SECRET = "purge-test-webhook-secret"


def _disable(config: Path, tenant: str) -> None:
    """Offboarding step one: the tenant stays in the file, but disabled."""
    data = yaml.safe_load(config.read_text())
    for entry in data["tenants"]:
        if entry["id"] == tenant:
            entry["enabled"] = False
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def _count(db: Path, sql: str, *params: object) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


async def _run_cli_with_input(*args: str, stdin: str) -> CliResult:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "collector",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLLECTOR_TESTING_NO_WAIT": "1"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


async def _collected(tmp_path: Path, sinks: dict[str, Any]) -> Path:
    """Two tenants, three days each, collected into ``sinks``; returns the config path."""
    tenants = demo_tenants(2)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(
            tmp_path / "c.yaml", sim, tenants, workdir=tmp_path, lookback_days=3, sinks=sinks
        )
        result = await run_cli("run", "--once", "-q", "-c", str(config))
    assert result.returncode == 0, result.stderr
    return config


async def test_export_writes_every_table_of_one_tenant_as_csv_and_json(tmp_path: Path) -> None:
    """`tenant export` writes each per-tenant table of the state store as CSV and JSON, holding
    that tenant's rows only, and a manifest with the row counts."""
    config = await _collected(tmp_path, {"db": {"type": "sqlite", "path": str(tmp_path / "u.db")}})
    out = tmp_path / "export"
    result = await run_cli("tenant", "export", "tenant-01", "-c", str(config), "-o", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tenant"] == "tenant-01"
    assert manifest["tables"] == {
        "tenant_day": 3,
        "tenant_status": 1,
        "quarantine": 0,
        "delivery": 3,
    }
    days = json.loads((out / "tenant_day.json").read_text())
    assert {row["tenant"] for row in days} == {"tenant-01"}
    assert all(json.loads(row["payload"]) for row in days)  # the API's body, as received
    with (out / "tenant_day.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["day"] for r in rows] == [r["day"] for r in days]
    assert {r["tenant"] for r in rows} == {"tenant-01"}
    assert (out / "delivery.csv").is_file()
    assert (out / "tenant_status.json").is_file()


async def test_export_of_an_unknown_tenant_is_a_clear_error(tmp_path: Path) -> None:
    """Exporting a tenant the store has never seen says so and writes nothing."""
    config = await _collected(tmp_path, {})
    out = tmp_path / "export"
    result = await run_cli("tenant", "export", "nobody", "-c", str(config), "-o", str(out))
    assert result.returncode == 1
    assert "the state store holds nothing for tenant 'nobody'" in result.stderr
    assert not out.exists()


async def test_purge_deletes_the_tenant_from_the_store_and_every_sink_that_can(
    tmp_path: Path,
) -> None:
    """`tenant purge --yes` removes the tenant from the state store, the SQLite and CSV sinks,
    keeps the other tenant everywhere, and lists the webhook as unable to delete."""
    async with WebhookReceiver(secret=SECRET) as receiver:
        sinks = {
            "db": {"type": "sqlite", "path": str(tmp_path / "u.db")},
            "files": {"type": "csv", "path": str(tmp_path / "csv")},
            "hook": {"type": "webhook", "url": receiver.url, "secret": SECRET},
        }
        config = await _collected(tmp_path, sinks)
    _disable(config, "tenant-01")
    result = await run_cli("tenant", "purge", "tenant-01", "--yes", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["ok"] is True
    assert outcome["cannot_delete"] == ["hook"]
    by_sink = {s["sink"]: s for s in outcome["sinks"]}
    assert by_sink["db"]["outcome"] == "purged"
    assert by_sink["db"]["deleted"] > 3
    assert by_sink["files"] == {
        "sink": "files", "type": "csv", "outcome": "purged", "deleted": 12, "error": None
    }  # fmt: skip
    assert outcome["state_store"] == {
        "delivery": 9,
        "quarantine": 0,
        "tenant_day": 3,
        "tenant_status": 1,
    }
    usage = tmp_path / "u.db"
    assert _count(usage, "SELECT COUNT(*) FROM usage_daily WHERE tenant = 'tenant-01'") == 0
    assert _count(usage, "SELECT COUNT(*) FROM usage_user_daily WHERE tenant = 'tenant-01'") == 0
    assert _count(usage, "SELECT COUNT(*) FROM usage_daily WHERE tenant = 'tenant-02'") == 3
    assert not (tmp_path / "csv" / "tenant-01").exists()
    assert (tmp_path / "csv" / "tenant-02").is_dir()
    state = tmp_path / "state.db"
    assert _count(state, "SELECT COUNT(*) FROM tenant_day WHERE tenant = 'tenant-01'") == 0
    assert _count(state, "SELECT COUNT(*) FROM delivery WHERE tenant = 'tenant-01'") == 0
    assert _count(state, "SELECT COUNT(*) FROM tenant_day WHERE tenant = 'tenant-02'") == 3


async def test_purge_refuses_a_tenant_still_enabled(tmp_path: Path) -> None:
    """A tenant still enabled in the config is not purged (its next cycle would collect it
    again): exit 2, a message saying what to do, nothing deleted."""
    config = await _collected(tmp_path, {})
    result = await run_cli("tenant", "purge", "tenant-01", "--yes", "-c", str(config))
    assert result.returncode == 2
    assert "still enabled in the config" in result.stderr
    state = tmp_path / "state.db"
    assert _count(state, "SELECT COUNT(*) FROM tenant_day WHERE tenant = 'tenant-01'") == 3


async def test_purge_asks_for_the_tenant_id_without_yes(tmp_path: Path) -> None:
    """Without --yes the purge asks for the tenant id: a wrong answer deletes nothing, the right
    one goes ahead."""
    config = await _collected(tmp_path, {})
    _disable(config, "tenant-01")
    state = tmp_path / "state.db"
    args = ("tenant", "purge", "tenant-01", "-c", str(config))
    refused = await _run_cli_with_input(*args, stdin="tenant-02\n")
    assert refused.returncode == 2
    assert "Type the tenant id to confirm" in refused.stderr
    assert "aborted: nothing was deleted" in refused.stderr
    assert _count(state, "SELECT COUNT(*) FROM tenant_day WHERE tenant = 'tenant-01'") == 3
    confirmed = await _run_cli_with_input(*args, stdin="tenant-01\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "state store: deleted" in confirmed.stdout
    assert _count(state, "SELECT COUNT(*) FROM tenant_day WHERE tenant = 'tenant-01'") == 0


@pytest.fixture
def moto_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A moto S3 server, and an AWS credential chain that finds only its fake keys."""
    for name, value in MOTO_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with running_moto_s3() as endpoint:
        yield endpoint


async def test_purge_deletes_the_tenant_partitions_of_an_s3_sink(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """The s3 sink's purge deletes every object under the tenant's partitions, and only those."""
    admin = s3_admin_client(moto_endpoint)
    bucket = f"purge-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=bucket)
    lake = {
        "type": "s3",
        "bucket": bucket,
        "prefix": "zc",
        "endpoint_url": moto_endpoint,
        "region": "us-east-1",
    }
    config = await _collected(tmp_path, {"lake": lake})
    before = list_keys(admin, bucket)
    assert len(before) == 2 * 3 * 4
    _disable(config, "tenant-01")
    result = await run_cli("tenant", "purge", "tenant-01", "--yes", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "sink lake (s3): deleted 12 item(s)" in result.stdout
    after = list_keys(admin, bucket)
    assert after == [key for key in before if "/tenant=tenant-02/" in key]


class RefusingPurger:
    """A plugin whose purge of every sink fails, as a broken third-party one would."""

    @hookimpl
    def collector_sink_purge(self, sink: Sink, tenant: str) -> Awaitable[int] | None:
        if sink.name != "files":
            return None
        raise RuntimeError(f"cannot reach the archive of {tenant}")


async def test_a_failing_purge_hook_fails_only_its_sink(tmp_path: Path) -> None:
    """A plugin whose purge hook raises marks that sink failed; the next sink is still purged."""
    config_path = await _collected(
        tmp_path,
        {
            "files": {"type": "csv", "path": str(tmp_path / "a")},
            "other": {"type": "csv", "path": str(tmp_path / "b")},
        },
    )
    plugins = load_plugins()
    plugins.pm.register(RefusingPurger())
    config = load(config_path, plugins)
    results = {r.sink: r for r in await purge_sinks(config, plugins, "tenant-01")}
    assert results["files"].outcome == "failed"
    assert results["files"].error == "RuntimeError: cannot reach the archive of tenant-01"
    assert (tmp_path / "a" / "tenant-01").is_dir()
    assert results["other"].outcome == "purged"
    assert not (tmp_path / "b" / "tenant-01").exists()


async def test_store_rows_and_purge_of_one_tenant(store_url: str) -> None:
    """On SQLite and PostgreSQL the store reads and deletes exactly one tenant's rows of every
    per-tenant table, deliveries before days."""
    days = [dt.date(2024, 5, 6), dt.date(2024, 5, 7)]
    store = await TenantStore.open(store_url)
    try:
        await store.sync_sinks({"db": None})
        stored = [sample_day(t, d) for t in ("acme", "globex") for d in days]
        fetched = [(td, usage_body(td)) for td in stored]
        await store.record_fetched(fetched)
        await store.set_tenant_success("acme")
        await store.set_tenant_success("globex")
        rows = await store.tenant_rows("acme")
        assert {name: len(r) for name, r in rows.items()} == {
            "tenant_day": 2, "tenant_status": 1, "quarantine": 0, "delivery": 2
        }  # fmt: skip
        assert [r["day"] for r in rows["tenant_day"]] == days
        deleted = await store.purge_tenant("acme")
        assert deleted == {"delivery": 2, "quarantine": 0, "tenant_status": 1, "tenant_day": 2}
        assert not any((await store.tenant_rows("acme")).values())
        left = await store.tenant_rows("globex")
        assert {name: len(r) for name, r in left.items()} == {
            "tenant_day": 2, "tenant_status": 1, "quarantine": 0, "delivery": 2
        }  # fmt: skip
    finally:
        await store.aclose()


async def test_export_and_purge_include_a_quarantined_body(tmp_path: Path) -> None:
    """A quarantined day's kept API body is exported as the text received, and purged."""
    store = await TenantStore.open(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        body = '{"status": "success", "data": {"users": "not a list"}}'
        await store.record_quarantined("acme", dt.date(2026, 3, 3), "BadResponse", body.encode())
        rows = await store.tenant_rows("acme")
        write_export(tmp_path / "out", "acme", rows)
        deleted = await store.purge_tenant("acme")
    finally:
        await store.aclose()
    exported = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    assert [row["body"] for row in exported] == [body]
    assert deleted["quarantine"] == 1
