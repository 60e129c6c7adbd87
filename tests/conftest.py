"""Fixtures shared by every test module: real servers and databases only, never mocks."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

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
