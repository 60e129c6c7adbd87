"""Fixtures shared by every test module: real servers and databases only, never mocks."""

from __future__ import annotations

import inspect
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy

from collector.simulator import Simulator, running_simulator
from tests.simulator_helpers import make_settings


@pytest.fixture
def postgres_url() -> str:
    """A real PostgreSQL database URL from COLLECTOR_TEST_POSTGRES_URL (started by .ci/run)."""
    url = os.environ.get("COLLECTOR_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("COLLECTOR_REQUIRE_POSTGRES") == "1":
            pytest.fail("COLLECTOR_REQUIRE_POSTGRES=1 but COLLECTOR_TEST_POSTGRES_URL is not set")
        pytest.skip("set COLLECTOR_TEST_POSTGRES_URL to run the PostgreSQL tests (.ci/run does)")
    return url


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(make_settings()) as simulator:
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty state database URL: a SQLite file, or a new schema in the test PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'state.db'}"
        return
    base = sqlalchemy.make_url(request.getfixturevalue("postgres_url"))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Every async test runs on asyncio, the collector's runtime (anyio's pytest plugin)."""
    return "asyncio"


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Iterator[object]:
    """Mark every coroutine test ``anyio`` before anyio's own hook looks for the mark, so test
    modules need no marks of their own (what pytest-asyncio's auto mode did); every test uses
    ``anyio_backend``, so a plain test may take an async fixture too (anyio runs it)."""
    if collector.istestfunction(obj, name):
        pytest.mark.usefixtures("anyio_backend")(obj)
        if inspect.iscoroutinefunction(obj):
            pytest.mark.anyio(obj)
    return (yield)
