"""Where the wall time of the rate-limited scenario goes: start-up, pacing, exit.

    python bench/timeline_ratelimited.py [--runs 3]

Runs ``python -m collector run --once`` on the rate-limited scenario of ``bench_fetch.py`` (50
tenants x 30 days, 20 ms latency, 5 requests/s per tenant with a burst of 5, the same limit in
our config) against a simulator in this process, and prints, from the simulator's request log
(monotonic clock, shared with the child): the first usage request after the spawn, the spread of
the tenants' first requests, each tenant's span from its first to its last request (the bound
allows no less than (30 - 5) / 5 = 5.0 s), the last request, the exit, and the 429s. The
simulator shares this process, so the collector's figures are a little better than with
``bench_fetch.py``'s separate simulator process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from collector.simulator import SimulatorSettings, demo_tenants, running_simulator  # noqa: E402

TENANTS, DAYS, LATENCY, RATE, BURST = 50, 30, 0.020, 5.0, 5


async def one_run(workdir: Path) -> str:
    """One run in a fresh directory; returns the timeline as one line."""
    tenants = demo_tenants(TENANTS)
    settings = SimulatorSettings(tenants=tenants, latency=LATENCY, rate_limit=RATE)
    async with running_simulator(settings) as sim:
        config = {
            "api": {
                "base_url": sim.base_url,
                "token_url": sim.token_url,
                "max_concurrency": 64,
                "rate_limit": {"per_second": RATE, "burst": BURST},
            },
            "collection": {"lookback_days": DAYS},
            "state": {"url": f"sqlite:///{workdir / 'state.db'}"},
            "server": {"listen": None},
            "sinks": {"warehouse": {"type": "sqlite", "path": str(workdir / "usage.db")}},
            "tenants": [
                {"id": t.id, "client_id": t.client_id, "client_secret": t.client_secret}
                for t in tenants
            ],
        }
        config_path = workdir / "config.yaml"
        config_path.write_text(json.dumps(config))  # JSON is YAML
        spawned = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "collector", "run", "--once", "-c", str(config_path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        code = await process.wait()
        exited = time.monotonic() - spawned
        log = list(sim.stats.log)
    first: dict[str | None, float] = {}
    last: dict[str | None, float] = {}
    for record in log:
        first.setdefault(record.tenant, record.time - spawned)
        last[record.tenant] = record.time - spawned
    spans = [last[t] - first[t] for t in first]
    bound = (DAYS - BURST) / RATE + LATENCY
    return (
        f"exit code {code}; first usage request {min(first.values()):.2f} s after the spawn, "
        f"tenants' first requests spread over {max(first.values()) - min(first.values()):.2f} s, "
        f"spans {min(spans):.2f}-{max(spans):.2f} s, last request {max(last.values()):.2f} s, "
        f"exit {exited:.2f} s ({exited / bound:.2f}x the {bound:.2f} s bound), "
        f"{sum(r.status == 429 for r in log)} x 429 of {len(log)} requests"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="zc-timeline-") as tmp:
            print(f"run {run}: {asyncio.run(one_run(Path(tmp)))}", flush=True)


if __name__ == "__main__":
    main()
