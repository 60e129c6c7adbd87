"""Soak test: run the daemon for a long time against the simulator with faults; watch for leaks.

Not part of CI. It starts, in this process, the API simulator and a webhook receiver (both on
127.0.0.1, ephemeral ports), writes a config with SQLite, CSV and webhook sinks, and runs
``python -m collector run -c CONFIG`` as a child process. While the daemon runs, it injects faults
on a timetable:

- the whole time: a share of usage requests fail with 500 (``--failure-rate``);
- every ``--api-outage-every``: the API is ``down`` (every request 500) for ``--api-outage-for``;
- every ``--hook-outage-every``: the webhook receiver answers 503 for ``--hook-outage-for``;
- every few seconds a random tenant's today changes (a late correction), so redeliveries flow.

The first ``--large-tenants`` tenants are organizations of ``--large-users`` people (default two
of 2,000: day bodies of about 100 KB, several hundred user rows per day), and every other one of
them sends ``last_active`` as a date-time, so large bodies and the ``last_active_at`` column stay
under load the whole time.

Every ``--sample-every`` it samples the daemon's resident memory and open file descriptors (from
``/proc/PID``) and its asyncio task count, backlogs and fetch counters (from ``/metrics``), and
prints a row (JSON). At the end it stops the daemon with SIGTERM (checking exit code 0 within the
grace period), writes ``samples.json``, and prints a table and a verdict: *flat* when the median
memory of the last quarter (after ``--warmup``) is within ``--rss-tolerance`` of the first
quarter's, and the last quarter's median descriptor and task counts do not exceed the first
quarter's peak; *growing* otherwise. Exit code: 0 flat, 1 growing, 2 the daemon died or did not
stop cleanly.

::

    python bench/soak.py --duration 45m --tenants 25 --output /tmp/soak
    nohup python bench/soak.py --duration 60m > soak.out 2>&1 &
    python bench/soak.py --from-samples /tmp/soak/samples.json   # table and verdict again
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from collector.simulator import SimTenant, SimulatorSettings, demo_tenants, running_simulator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def duration(text: str) -> float:
    """``90``, ``90s``, ``45m`` or ``2h`` in seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 45m, 2h)")
    value = float(match.group(1))
    return value * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


@dataclass
class Sample:
    """One observation of the daemon process."""

    elapsed_s: float
    rss_mb: float
    fds: int
    tasks: int
    fetches: int
    fetch_errors: int
    delivered: int
    hook_backlog: int
    dead_letters: int


class FlakyReceiver:
    """A webhook receiver that accepts everything, except while ``down`` (then 503)."""

    def __init__(self) -> None:
        self.down = False
        self.accepted = 0
        self.refused = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.down:
            self.refused += 1
            return web.Response(status=503, headers={"Retry-After": "1"})
        self.accepted += 1
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def soak_tenants(args: Any) -> list[SimTenant]:
    """The demo tenants, the first ``--large-tenants`` of them large organizations."""
    tenants = demo_tenants(args.tenants)
    for index in range(min(args.large_tenants, len(tenants))):
        variant = "datetime_last_active" if index % 2 else None
        tenants[index] = replace(tenants[index], users=args.large_users, variant=variant)
    return tenants


def write_config(
    path: Path, base_url: str, token_url: str, hook_url: str, workdir: Path, args: Any, port: int
) -> None:
    tenants = soak_tenants(args)
    config = {
        "api": {
            "base_url": base_url,
            "token_url": token_url,
            "timeout": "5s",
            "max_concurrency": 32,
            "rate_limit": {"per_second": 20, "burst": 10},
            "retry": {
                "max_attempts": 4,
                "max_time": "10s",
                "backoff_initial": "100ms",
                "backoff_max": "2s",
            },
        },
        "collection": {
            "lookback_days": args.lookback,
            "settle_days": 1,
            "schedule": {"every": f"{args.every}s", "jitter": f"{args.jitter}s"},
        },
        "state": {"url": f"sqlite:///{workdir / 'state.db'}", "payload_retention_days": 7},
        "server": {"listen": f"127.0.0.1:{port}"},
        "sinks": {
            "warehouse": {"type": "sqlite", "path": str(workdir / "usage.db")},
            "sheets": {"type": "csv", "path": str(workdir / "csv")},
            "hook": {
                "type": "webhook",
                "url": hook_url,
                "secret": "soak-secret",
                "max_retries": 1,
                "backoff_initial": "200ms",
                "timeout": "10s",
                "max_attempts": 1000,
            },
        },
        "tenants": [
            {"id": t.id, "client_id": t.client_id, "client_secret": t.client_secret}
            for t in tenants
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def proc_stats(pid: int) -> tuple[float, int]:
    """Resident memory (MiB) and open descriptors of ``pid`` from /proc."""
    rss_kb = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of every sample per metric name and label set, as ``name{labels}`` -> value."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
    return values


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


async def sample(
    session: aiohttp.ClientSession, pid: int, metrics_url: str, started: float
) -> Sample | None:
    try:
        rss, fds = proc_stats(pid)
        async with session.get(metrics_url) as response:
            metrics = parse_metrics(await response.text())
    except (OSError, aiohttp.ClientError, TimeoutError):
        return None
    return Sample(
        elapsed_s=round(time.monotonic() - started, 1),
        rss_mb=round(rss, 1),
        fds=fds,
        tasks=int(total(metrics, "zencoder_collector_asyncio_tasks")),
        fetches=int(total(metrics, "zencoder_collector_fetches_total")),
        fetch_errors=int(total(metrics, "zencoder_collector_fetch_errors_total")),
        delivered=int(total(metrics, "zencoder_collector_sink_delivered_total")),
        hook_backlog=int(metrics.get('zencoder_collector_sink_backlog{sink="hook"}', 0)),
        dead_letters=int(total(metrics, "zencoder_collector_sink_dead_letters")),
    )


def render(samples: list[Sample]) -> str:
    header = list(asdict(samples[0]).keys()) if samples else []
    rows = [[str(v) for v in asdict(s).values()] for s in samples]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(lines)


def verdict(samples: list[Sample], warmup: float, tolerance: float) -> tuple[bool, str]:
    """Flat when, after warm-up, the last quarter's median memory is within ``tolerance`` of the
    first quarter's, and the last quarter's typical (median) descriptor and task counts stay
    within what the first quarter already reached (tasks come and go with the work of the moment;
    a leak makes the typical late value exceed the early peak)."""
    steady = [s for s in samples if s.elapsed_s >= warmup]
    if len(steady) < 8:
        return False, f"too few samples after warm-up ({len(steady)}); run longer"
    quarter = max(2, len(steady) // 4)
    head, tail = steady[:quarter], steady[-quarter:]

    def median(rows: list[Sample], field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in rows))

    rss_head, rss_tail = median(head, "rss_mb"), median(tail, "rss_mb")
    fds_peak, fds_tail = max(s.fds for s in head), median(tail, "fds")
    tasks_peak, tasks_tail = max(s.tasks for s in head), median(tail, "tasks")
    growth = (rss_tail - rss_head) / rss_head
    # A couple of descriptors come and go with pooled connections (HTTP keep-alive, SQLite).
    flat = growth <= tolerance and fds_tail <= fds_peak + 2 and tasks_tail <= tasks_peak
    text = (
        f"RSS median {rss_head:.1f} MiB (first quarter after warm-up) -> {rss_tail:.1f} MiB "
        f"(last quarter): {growth * 100:+.1f}% (tolerance {tolerance * 100:.0f}%); "
        f"open fds: first-quarter peak {fds_peak}, last-quarter median {fds_tail:g}; "
        f"asyncio tasks: first-quarter peak {tasks_peak}, last-quarter median {tasks_tail:g}; "
        f"after warm-up RSS min/max {min(s.rss_mb for s in steady):.1f}/"
        f"{max(s.rss_mb for s in steady):.1f} MiB, fds max {max(s.fds for s in steady)}, "
        f"tasks max {max(s.tasks for s in steady)}"
    )
    return flat, ("FLAT: " if flat else "GROWING: ") + text


def summarize(samples: list[Sample], every: float) -> str:
    """The table thinned to about one row per ``every`` seconds (the last row always kept)."""
    shown: list[Sample] = []
    for sample in samples:
        if not shown or sample.elapsed_s - shown[-1].elapsed_s >= every or sample is samples[-1]:
            shown.append(sample)
    return render(shown)


async def fault_timetable(
    sim: Any, receiver: FlakyReceiver, args: Any, stop: asyncio.Event
) -> None:
    """Switch the API and webhook outages on and off, and change today's data now and then."""
    rng = random.Random(args.seed)
    started = time.monotonic()
    tenants = [t.id for t in sim.tenants]
    while not stop.is_set():
        elapsed = time.monotonic() - started
        api_down = (
            args.api_outage_every > 0
            and elapsed > args.api_outage_every
            and elapsed % args.api_outage_every < args.api_outage_for
        )
        hook_down = (
            args.hook_outage_every > 0
            and elapsed > args.hook_outage_every / 2
            and (elapsed + args.hook_outage_every / 2) % args.hook_outage_every
            < args.hook_outage_for
        )
        if api_down != bool(sim.faults.everyone.down):
            print(f"[{elapsed:7.0f}s] API {'down' if api_down else 'back'}", flush=True)
            sim.faults.set(None, down=True if api_down else None)
        if hook_down != receiver.down:
            print(f"[{elapsed:7.0f}s] webhook {'503' if hook_down else 'back'}", flush=True)
            receiver.down = hook_down
        if rng.random() < 0.3:
            sim.change_day(rng.choice(tenants), dt.datetime.now(dt.UTC).date())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def soak(args: Any) -> int:
    workdir = Path(args.output)
    settings = SimulatorSettings(
        tenants=soak_tenants(args),
        latency=args.latency,
        failure_rate=args.failure_rate,
        seed=args.seed,
    )
    receiver = FlakyReceiver()
    await receiver.start()
    samples: list[Sample] = []
    exit_code = 0
    async with running_simulator(settings) as sim:
        port = free_port()
        config = workdir / "config.yaml"
        write_config(config, sim.base_url, sim.token_url, receiver.url, workdir, args, port)
        log_file = (workdir / "daemon.log").open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "collector",
            "--log-level",
            args.log_level,
            "--log-format",
            "json",
            "run",
            "-c",
            str(config),
            stdout=log_file,
            stderr=log_file,
            env={**os.environ, "ZENCODER_COLLECTOR_SHUTDOWN_GRACE": str(args.grace)},
        )
        print(
            f"soak: daemon pid {process.pid}, {args.tenants} tenants, every {args.every}s, "
            f"for {args.duration:.0f}s; output {workdir}",
            flush=True,
        )
        stop = asyncio.Event()
        faults = asyncio.create_task(fault_timetable(sim, receiver, args, stop))
        started = time.monotonic()
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while time.monotonic() - started < args.duration:
                if process.returncode is not None:
                    print(f"soak: the daemon exited early with {process.returncode}", flush=True)
                    exit_code = 2
                    break
                found = await sample(session, process.pid, metrics_url, started)
                if found is not None:
                    samples.append(found)
                    print(json.dumps(asdict(found)), flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), args.sample_every)
        stop.set()
        await faults
        sim.faults.set(None, down=None)
        receiver.down = False
        if process.returncode is None:
            asked = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(process.wait(), args.grace + 10)
            except TimeoutError:
                process.kill()
                code = await process.wait()
                print("soak: the daemon did not stop within the grace period", flush=True)
                exit_code = 2
            took = time.monotonic() - asked
            print(f"soak: SIGTERM -> exit code {code} after {took:.1f}s", flush=True)
            if code != 0:
                exit_code = 2
        log_file.close()
        print(
            f"soak: simulator answered {sum(sim.stats.usage_requests.values())} usage requests "
            f"({dict(sim.stats.responses)}); webhook accepted {receiver.accepted}, "
            f"refused {receiver.refused}",
            flush=True,
        )
    await receiver.stop()
    if samples:
        print()
        print(summarize(samples, args.table_every))
    flat, text = verdict(samples, args.warmup, args.rss_tolerance)
    print()
    print(text)
    (workdir / "samples.json").write_text(json.dumps([asdict(s) for s in samples]) + "\n")
    if exit_code == 0 and not flat:
        exit_code = 1
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=duration, default=duration("30m"))
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument(
        "--large-tenants", type=int, default=2, help="how many tenants are large organizations"
    )
    parser.add_argument("--large-users", type=int, default=2000, help="people per large tenant")
    parser.add_argument("--lookback", type=int, default=30)
    parser.add_argument("--every", type=float, default=5.0, help="schedule interval, seconds")
    parser.add_argument("--jitter", type=float, default=2.0, help="schedule jitter, seconds")
    parser.add_argument("--latency", type=float, default=0.01)
    parser.add_argument("--failure-rate", type=float, default=0.05)
    parser.add_argument("--api-outage-every", type=duration, default=duration("7m"))
    parser.add_argument("--api-outage-for", type=duration, default=duration("40s"))
    parser.add_argument("--hook-outage-every", type=duration, default=duration("5m"))
    parser.add_argument("--hook-outage-for", type=duration, default=duration("60s"))
    parser.add_argument("--sample-every", type=duration, default=duration("30s"))
    parser.add_argument("--warmup", type=duration, default=duration("3m"))
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--grace", type=float, default=20.0)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default="soak-output")
    parser.add_argument(
        "--from-samples",
        metavar="FILE",
        help="do not run: print the table and verdict of a previous run's samples.json",
    )
    parser.add_argument(
        "--table-every", type=duration, default=duration("5m"), help="rows in the final table"
    )
    args = parser.parse_args(argv)
    if args.from_samples:
        rows = json.loads(Path(args.from_samples).read_text(encoding="utf-8"))
        samples = [Sample(**row) for row in rows]
        print(summarize(samples, args.table_every))
        flat, text = verdict(samples, args.warmup, args.rss_tolerance)
        print()
        print(text)
        return 0 if flat else 1
    Path(args.output).mkdir(parents=True, exist_ok=True)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
