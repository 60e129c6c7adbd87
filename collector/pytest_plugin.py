"""The pytest plugin named ``collector``: fixtures only, loaded through the ``pytest11`` entry
point in every project where the collector is installed.

It stays thin on purpose: pytest imports it at start-up in every such project, so it imports no
part of the collector until a test asks for one of its fixtures. The test kit itself (the sink
conformance suite, batch builders, test sinks) is :mod:`collector.testing`, imported by the tests
that use it.

- fixture ``simulator_settings``: the settings of ``simulator`` (three demo tenants; override it);
- fixture ``simulator``: a running fake Zencoder API on 127.0.0.1 for the duration of a test.

The async fixture is a plain ``pytest.fixture``: anyio's pytest plugin (installed with anyio, a
dependency of the collector) runs it for tests marked ``anyio``, on the asyncio backend when the
test's ``anyio_backend`` fixture says so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collector.simulator import Simulator, SimulatorSettings


@pytest.fixture
def simulator_settings() -> SimulatorSettings:
    """Settings of the ``simulator`` fixture: three demo tenants (override to change)."""
    from collector.simulator import SimulatorSettings, demo_tenants

    return SimulatorSettings(tenants=demo_tenants(3))


@pytest.fixture
async def simulator(simulator_settings: SimulatorSettings) -> AsyncIterator[Simulator]:
    """A running simulator on 127.0.0.1 (ephemeral port) for the duration of the test."""
    from collector.simulator import running_simulator

    async with running_simulator(simulator_settings) as sim:
        yield sim
