"""Micro-benchmark of the SQL sink: start-up imports and the CPU of writing tenant-days.

Two figures, each the best of several runs (the machine is shared; the minimum is the least
disturbed run):

- **import**: the cumulative ``python -X importtime`` of ``collector_sinks.sqlite`` (what a run
  with the SQLite sink pays before its first write), each run in a fresh interpreter;
- **write**: process CPU per tenant-day for writing 6,000 tenant-days of 30 users each (the
  small scenario's shape: 200 tenants x 30 days) into a fresh SQLite file, in batches of 500.

::

    python bench/bench_sink_write.py [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from collector.testing import make_batch
from collector_sinks.sqlite import SqliteSink, SqliteSinkConfig

MODULES = ("collector_sinks.sqlite", "collector.tables", "sqlmodel", "sqlalchemy.orm")


def import_times() -> dict[str, float]:
    """Cumulative import time in seconds of each of MODULES, in one fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import collector_sinks.sqlite"],
        capture_output=True,
        text=True,
        check=True,
    )
    times = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)$", line)
        if match and match.group(2) in MODULES:
            times[match.group(2)] = int(match.group(1)) / 1e6
    return times


async def write_cost(batches: list[list]) -> float:  # type: ignore[type-arg]
    """CPU seconds per tenant-day for writing ``batches`` into a fresh SQLite file."""
    with tempfile.TemporaryDirectory() as directory:
        sink = SqliteSink("bench", SqliteSinkConfig(type="sqlite", path=Path(directory) / "u.db"))
        await sink.open()
        started = time.process_time()
        for batch in batches:
            await sink.write(batch)
        spent = time.process_time() - started
        await sink.aclose()
    return spent / sum(len(b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [import_times() for _ in range(args.runs)]
    for module in MODULES:
        values = [r[module] for r in runs if module in r]
        if values:
            print(
                f"import {module:<24} best {min(values):.3f} s  median "
                f"{sorted(values)[len(values) // 2]:.3f} s"
            )
    days = make_batch(200, 30, users=30)
    batches = [days[i : i + 500] for i in range(0, len(days), 500)]
    costs = sorted(asyncio.run(write_cost(batches)) for _ in range(args.runs))
    print(
        f"write: best {costs[0] * 1000:.3f} ms CPU per tenant-day, median "
        f"{costs[len(costs) // 2] * 1000:.3f} ms ({len(days)} tenant-days, 30 users each)"
    )


if __name__ == "__main__":
    main()
