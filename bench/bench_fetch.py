"""Benchmark of issue 3: our collector against the naive script and a dlt pipeline, same scenario.

The simulator runs in its own process (``python -m collector.simulator``), restarted fresh for
each runner so rate-limit buckets and counters start empty; its CPU is read from its
``/_simulator/stats`` endpoint and reported apart. Each runner is a child process reaped with
``os.wait4``, which gives its CPU time (user + system) and peak RSS. Every runner's SQLite output
is checked against the simulator's own figures (same seed, same day): per tenant-day the daily
message count, the number of user rows and the sum of user messages.

    python bench/bench_fetch.py --scenario small          # 200 tenants x 30 days, 20 ms latency
    python bench/bench_fetch.py --scenario large          # 1,000 x 90; naive/dlt from a sample
    python bench/bench_fetch.py --scenario ratelimited    # 50 x 30 at 5 requests/s per tenant
    python bench/bench_fetch.py --scenario small --runners naive,dlt --sample-naive 20

Runners: ``ours`` (``python -m collector run --once -c CONFIG``), ``naive``
(bench/naive_collector.py) and ``dlt`` (bench/dlt_collector.py, skipped if dlt is not installed);
on request also ``floor`` and ``floor-noraw`` (bench/floor_collector.py: the least a collector on
the specified stack does, with and without keeping raw bodies first).
A runner given a sample of k tenants is extrapolated linearly to the full scenario, and the
table says so.
"""

from __future__ import annotations

import argparse
import compileall
import datetime as dt
import importlib.util
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

from collector.simulator import Simulator, SimulatorSettings, demo_tenants  # noqa: E402

# Per tenant-day: (daily messages, number of user rows, sum of user messages).
Rows = dict[tuple[str, str], tuple[int, int, int]]


@dataclass(frozen=True)
class Scenario:
    tenants: int
    days: int
    latency: float
    rate_limit: float | None
    sample: dict[str, int]  # runner -> tenants actually run (absent: all)


SCENARIOS = {
    "small": Scenario(200, 30, 0.020, None, {}),
    "large": Scenario(1000, 90, 0.020, None, {"naive": 10, "dlt": 50}),
    "ratelimited": Scenario(50, 30, 0.020, 5.0, {"naive": 10, "dlt": 20}),
}
OUR_CONCURRENCY = 64


@dataclass
class Result:
    runner: str
    tenants_run: int
    scale: float  # full scenario size / what ran (1.0: measured, not extrapolated)
    wall: float = 0.0
    cpu: float = 0.0
    max_rss_mib: float = 0.0
    requests: int = 0
    responses: dict[str, int] = field(default_factory=dict)
    sim_cpu: float = 0.0
    rows_ok: bool | None = None
    note: str = ""

    @property
    def wall_full(self) -> float:
        return self.wall * self.scale

    @property
    def cpu_full(self) -> float:
        return self.cpu * self.scale


# --- the simulator process ---------------------------------------------------------------------


class SimulatorProcess:
    """``python -m collector.simulator`` on an ephemeral port, until ``stop``."""

    def __init__(self, scenario: Scenario, workdir: Path) -> None:
        cmd = [sys.executable, "-m", "collector.simulator", "--port", "0"]
        cmd += ["--tenants", str(scenario.tenants), "--latency", str(scenario.latency)]
        if scenario.rate_limit is not None:
            cmd += ["--rate-limit", str(scenario.rate_limit)]
        self.log = (workdir / "simulator.log").open("a")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "listening on" not in first:
            self.stop()
            raise RuntimeError(f"simulator did not start: {first!r} (see {self.log.name})")
        self.base_url = first.rsplit(" ", 1)[-1].strip()
        self.token_url = self.base_url + "/oauth/token"
        # The simulator goes on printing a ready config listing every tenant (about 75 KB for
        # 1,000): read it away, or the simulator blocks on a full pipe and never answers.
        threading.Thread(target=self.proc.stdout.read, name="simulator-stdout", daemon=True).start()

    def stats(self) -> dict[str, Any]:
        url = self.base_url + "/_simulator/stats"  # http://127.0.0.1:PORT, printed by the simulator
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (our own http URL)
            stats: dict[str, Any] = json.load(response)
        return stats

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- running one child and measuring it --------------------------------------------------------


def run_measured(
    cmd: list[str], out: Path, env: dict[str, str], timeout: float
) -> tuple[int, float, float, float]:
    """Run a runner through the small launcher: exit code, wall s, CPU s, peak RSS MiB."""
    measured = out / "measure.json"
    launcher = [sys.executable, str(BENCH_DIR / "_measure.py"), str(measured), "--", *cmd]
    with (out / "run.log").open("w") as log:
        started = time.perf_counter()
        # A session of its own, so a timeout can stop the launcher and the runner together.
        proc = subprocess.Popen(
            launcher,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -1, time.perf_counter() - started, 0.0, 0.0
    figures = json.loads(measured.read_text())
    return (
        int(figures["exit_code"]),
        float(figures["wall"]),
        float(figures["cpu"]),
        figures["max_rss_kib"] / 1024,
    )


def write_tenants_json(path: Path, count: int) -> None:
    tenants = [
        {"id": t.id, "client_id": t.client_id, "client_secret": t.client_secret}
        for t in demo_tenants(count)
    ]
    path.write_text(json.dumps(tenants))


def write_our_config(
    path: Path, sim: SimulatorProcess, scenario: Scenario, tenants: int, out: Path
) -> None:
    rate: dict[str, float]
    if scenario.rate_limit is None:
        rate = {"per_second": 100_000, "burst": 100_000}  # the API sets no limit here
    else:
        rate = {"per_second": scenario.rate_limit, "burst": max(1, math.ceil(scenario.rate_limit))}
    config = {
        "api": {
            "base_url": sim.base_url,
            "token_url": sim.token_url,
            "max_concurrency": OUR_CONCURRENCY,
            "rate_limit": rate,
        },
        "collection": {"lookback_days": scenario.days},
        "state": {"url": f"sqlite:///{out / 'state.db'}"},
        "server": {"listen": None},
        "sinks": {"warehouse": {"type": "sqlite", "path": str(out / "usage.db")}},
        "tenants": [
            {"id": t.id, "client_id": t.client_id, "client_secret": t.client_secret}
            for t in demo_tenants(tenants)
        ],
    }
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML


RUNNERS = ("ours", "naive", "dlt", "floor", "floor-noraw")


def runner_command(
    name: str,
    sim: SimulatorProcess,
    scenario: Scenario,
    tenants: int,
    out: Path,
    args: argparse.Namespace,
) -> list[str]:
    today = dt.datetime.now(dt.UTC).date()
    since = today - dt.timedelta(days=scenario.days - 1)
    if name == "ours":
        # TODO(lead): this is the command of issue 3; it works once `run --once` is complete.
        config = out / "config.yaml"
        write_our_config(config, sim, scenario, tenants, out)
        return [sys.executable, "-m", "collector", "run", "--once", "-c", str(config)]
    tenants_file = out / "tenants.json"
    write_tenants_json(tenants_file, tenants)
    common = ["--base-url", sim.base_url, "--token-url", sim.token_url]
    common += ["--tenants-file", str(tenants_file), "--since", since.isoformat()]
    common += ["--until", today.isoformat(), "--db", str(out / "usage.db")]
    if name == "naive":
        return [sys.executable, str(BENCH_DIR / "naive_collector.py"), *common]
    if name == "floor":
        cmd = [sys.executable, str(BENCH_DIR / "floor_collector.py"), *common]
        return [*cmd, "--concurrency", str(OUR_CONCURRENCY), "--state-db", str(out / "state.db")]
    if name == "floor-noraw":
        cmd = [sys.executable, str(BENCH_DIR / "floor_collector.py"), *common]
        return [*cmd, "--concurrency", str(OUR_CONCURRENCY), "--no-raw"]
    cmd = [sys.executable, str(BENCH_DIR / "dlt_collector.py"), *common]
    cmd += ["--pipelines-dir", str(out / "pipelines")]
    if args.dlt_workers is not None:
        cmd += ["--workers", str(args.dlt_workers)]
    return cmd


# --- checking what each runner stored ---------------------------------------------------------


ROWS_SQL = {
    "four_tables": """
        SELECT d.tenant, d.day, d.messages, COUNT(u.user), COALESCE(SUM(u.messages), 0)
        FROM usage_daily d
        LEFT JOIN usage_user_daily u ON u.tenant = d.tenant AND u.day = d.day
        GROUP BY d.tenant, d.day""",
    "dlt": """
        SELECT d.tenant, d.day, d.messages, COUNT(u._dlt_id), COALESCE(SUM(u.messages), 0)
        FROM usage_daily d
        LEFT JOIN usage_daily__users u ON u._dlt_parent_id = d._dlt_id
        GROUP BY d._dlt_id""",
}


def stored_rows(db: Path, layout: str) -> Rows:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(ROWS_SQL[layout]).fetchall()
    return {(t, str(day)[:10]): (int(m), int(n), int(s)) for t, day, m, n, s in rows}


def expected_rows(tenants: int, days: int, today: dt.date) -> Rows:
    """The simulator's own figures: same seed (0) and the same demo tenants as the process."""
    sim = Simulator(SimulatorSettings(tenants=demo_tenants(tenants), today=today))
    expected: Rows = {}
    for tenant in sim.tenants:
        for offset in range(days):
            day = today - dt.timedelta(days=offset)
            data = sim.day_data(tenant.id, day)
            daily = data["summary"]["total_messages"]
            users = data["users"]
            expected[(tenant.id, day.isoformat())] = (
                daily,
                len(users),
                sum(u["messages"] for u in users),
            )
    return expected


def demo_number(tenant_id: str) -> int:
    """1 for tenant-01: demo tenants are numbered, and a sample is the first k of them."""
    return int(tenant_id.rsplit("-", 1)[1])


def check_rows(name: str, out: Path, expected: Rows) -> tuple[bool, str]:
    db = out / "usage.db"
    if not db.exists():
        return False, "no output database"
    try:
        got = stored_rows(db, "dlt" if name == "dlt" else "four_tables")
    except sqlite3.Error as exc:
        return False, f"cannot read output: {exc}"
    if got == expected:
        return True, ""
    missing = len(expected.keys() - got.keys())
    extra = len(got.keys() - expected.keys())
    wrong = sum(1 for k in expected.keys() & got.keys() if expected[k] != got[k])
    return False, f"rows differ: {missing} missing, {extra} extra, {wrong} wrong"


# --- the lower bound and the table ------------------------------------------------------------


def lower_bound(scenario: Scenario, concurrency: int = OUR_CONCURRENCY) -> tuple[float, str]:
    """The fastest any client could finish, given latency, concurrency and the per-tenant limit."""
    requests = scenario.tenants * scenario.days
    by_latency = math.ceil(requests / concurrency) * scenario.latency
    why = f"{requests} requests x {scenario.latency * 1000:g} ms / {concurrency} in flight"
    if scenario.rate_limit is None:
        return by_latency, why
    burst = max(1, math.ceil(scenario.rate_limit))
    by_rate = max(0, scenario.days - burst) / scenario.rate_limit + scenario.latency
    if by_rate >= by_latency:
        why = (
            f"per tenant ({scenario.days} - {burst} burst) / {scenario.rate_limit:g} req/s "
            f"+ {scenario.latency * 1000:g} ms"
        )
    return max(by_latency, by_rate), why


def print_table(name: str, scenario: Scenario, results: list[Result]) -> None:
    bound, why = lower_bound(scenario)
    tenant_days = scenario.tenants * scenario.days
    print()
    print(
        f"scenario {name}: {scenario.tenants} tenants x {scenario.days} days = {tenant_days} "
        f"tenant-days, latency {scenario.latency * 1000:g} ms, rate limit "
        f"{'none' if scenario.rate_limit is None else f'{scenario.rate_limit:g}/s per tenant'}"
    )
    print(f"lower bound (concurrency {OUR_CONCURRENCY}): {bound:.2f} s  ({why})")
    header = (
        f"{'runner':<11} {'ran':>9} {'wall s':>9} {'xours':>6} {'xbound':>7} {'CPU s':>8} "
        f"{'ms CPU/td':>9} {'RSS MiB':>8} {'req/s':>7} {'sim CPU s':>9} {'rows':>5}  note"
    )
    print(header)
    print("-" * len(header))
    ours = next((r for r in results if r.runner == "ours" and r.rows_ok), None)
    for r in results:
        ran = f"{r.tenants_run}x{scenario.days}"
        star = "*" if r.scale != 1.0 else " "
        ratio = f"{r.wall_full / ours.wall_full:5.1f}x" if ours and ours.wall_full else "   -  "
        vs_bound = f"{r.wall_full / bound:6.2f}x" if bound > 0 else "    -  "
        per_td = r.cpu / max(1, r.tenants_run * scenario.days) * 1000
        rps = r.requests / r.wall if r.wall else 0.0
        rows = {True: "ok", False: "BAD", None: "-"}[r.rows_ok]
        print(
            f"{r.runner:<11} {ran:>9} {r.wall_full:8.2f}{star} {ratio:>6} {vs_bound:>7} "
            f"{r.cpu_full:7.2f}{star} {per_td:9.3f} {r.max_rss_mib:8.1f} {rps:7.0f} "
            f"{r.sim_cpu:9.2f} {rows:>5}  {r.note}"
        )
    if any(r.scale != 1.0 for r in results):
        print("* extrapolated linearly from the sampled tenants to the full scenario")
    floor = next((r for r in results if r.runner == "floor" and r.rows_ok), None)
    if ours and floor and floor.cpu_full and floor.wall_full:
        print(
            f"ours / floor: {ours.cpu_full / floor.cpu_full:.2f}x the CPU, "
            f"{ours.wall_full / floor.wall_full:.2f}x the wall time (what the product's own logic "
            "and imports cost over the least a collector on this stack does)"
        )
    print(
        "xours: wall time relative to ours; xbound: relative to the lower bound; "
        "ms CPU/td: runner CPU per tenant-day;\nsim CPU s: the simulator's own CPU during that "
        "run (a separate process sharing the same cores)"
    )


# --- main ---------------------------------------------------------------------------------------


def run_one(
    name: str,
    scenario: Scenario,
    tenants: int,
    workdir: Path,
    args: argparse.Namespace,
) -> Result:
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = Result(name, tenants, scenario.tenants / tenants)
    sim = SimulatorProcess(scenario, workdir)
    try:
        cmd = runner_command(name, sim, scenario, tenants, out, args)
        before = sim.stats()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RUNTIME__DLTHUB_TELEMETRY": "false"}
        code, result.wall, result.cpu, result.max_rss_mib = run_measured(
            cmd, out, env, args.timeout
        )
        after = sim.stats()
    finally:
        sim.stop()
    result.requests = after["usage_requests"] - before["usage_requests"]
    result.responses = {
        k: v - before["responses"].get(k, 0)
        for k, v in after["responses"].items()
        if v - before["responses"].get(k, 0)
    }
    result.sim_cpu = (after["cpu_seconds"] - before["cpu_seconds"]) * result.scale
    if code != 0:
        tail = (out / "run.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        result.note = f"exit {code}: {tail[0][:80]} (log: {out / 'run.log'})"
    if name == "dlt" and args.dlt_workers is None:
        result.note = (result.note + "; " if result.note else "") + "dlt default workers (5)"
    return result


def median_results(rounds: list[list[Result]]) -> list[Result]:
    """Per runner, the median of each measured figure over the rounds (rows ok only if all were)."""
    medians = []
    for position, first in enumerate(rounds[0]):
        runs = [round_[position] for round_ in rounds]
        medians.append(
            replace(
                first,
                wall=statistics.median(r.wall for r in runs),
                cpu=statistics.median(r.cpu for r in runs),
                max_rss_mib=statistics.median(r.max_rss_mib for r in runs),
                requests=round(statistics.median(r.requests for r in runs)),
                sim_cpu=statistics.median(r.sim_cpu for r in runs),
                rows_ok=all(r.rows_ok for r in runs),
                note="; ".join(sorted({r.note for r in runs if r.note})),
            )
        )
    return medians


def precompile() -> None:
    """Byte-compile our sources, as installing the wheel does.

    An editable install under ``PYTHONDONTWRITEBYTECODE=1`` (this machine, many CI images) would
    otherwise compile every module on every start, about 0.1 s that no installed copy pays; the
    naive and dlt runners use installed packages, which are compiled.
    """
    for tree in ("collector", "plugins"):
        compileall.compile_dir(ROOT / tree, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="small")
    parser.add_argument("--runners", default="ours,naive,dlt", help="comma-separated subset")
    parser.add_argument("--tenants", type=int, help="override the scenario's tenant count")
    parser.add_argument("--days", type=int, help="override the scenario's days (1..90)")
    parser.add_argument("--sample-naive", type=int, help="run naive on this many tenants only")
    parser.add_argument("--sample-dlt", type=int, help="run dlt on this many tenants only")
    parser.add_argument("--dlt-workers", type=int, help="dlt extract workers (default: dlt's 5)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per runner")
    parser.add_argument("--workdir", type=Path, help="keep outputs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every runner, interleaved (ours, naive, dlt, ours, ...); with more than "
        "one, a table per round and one of the medians",
    )
    args = parser.parse_args(argv)

    base = SCENARIOS[args.scenario]
    sample = dict(base.sample)
    if args.sample_naive is not None:
        sample["naive"] = args.sample_naive
    if args.sample_dlt is not None:
        sample["dlt"] = args.sample_dlt
    scenario = Scenario(
        tenants=args.tenants or base.tenants,
        days=args.days or base.days,
        latency=base.latency,
        rate_limit=base.rate_limit,
        sample=sample,
    )
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = sorted(set(runners) - set(RUNNERS))
    if unknown:
        parser.error(f"unknown runner(s) {', '.join(unknown)}: choose from {', '.join(RUNNERS)}")
    if "dlt" in runners and importlib.util.find_spec("dlt") is None:
        print("dlt is not installed (`pip install dlt`): skipping the dlt runner", file=sys.stderr)
        runners.remove("dlt")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="zc-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.UTC).date()
    precompile()

    rounds: list[list[Result]] = []
    for round_number in range(1, args.repeat + 1):
        results = []
        for name in runners:
            tenants = min(scenario.tenants, sample.get(name) or scenario.tenants)
            print(
                f"round {round_number}: running {name} on {tenants} tenants x {scenario.days} "
                "days ...",
                file=sys.stderr,
                flush=True,
            )
            result = run_one(name, scenario, tenants, workdir, args)
            print(
                f"  {result.wall:.2f} s wall, {result.cpu:.2f} s CPU, responses {result.responses}",
                file=sys.stderr,
            )
            # Checked now: the next round writes over this runner's outputs.
            expected = expected_rows(result.tenants_run, scenario.days, today)
            result.rows_ok, why = check_rows(result.runner, workdir / result.runner, expected)
            if why:
                result.note = f"{why}; {result.note}" if result.note else why
            results.append(result)
        rounds.append(results)
    if dt.datetime.now(dt.UTC).date() != today:
        print("warning: the UTC date changed during the run; row checks may fail", file=sys.stderr)

    for number, results in enumerate(rounds, 1):
        label = args.scenario if len(rounds) == 1 else f"{args.scenario}, round {number}"
        print_table(label, scenario, results)
    results = rounds[0] if len(rounds) == 1 else median_results(rounds)
    if len(rounds) > 1:
        print_table(f"{args.scenario}, median of {len(rounds)} rounds", scenario, results)
    print(f"outputs: {workdir}")
    if args.json:
        bound, why = lower_bound(scenario)
        payload = {
            "scenario": args.scenario,
            "settings": asdict(scenario),
            "lower_bound_s": bound,
            "lower_bound_why": why,
            "results": [
                {**asdict(r), "wall_full": r.wall_full, "cpu_full": r.cpu_full} for r in results
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if all(r.rows_ok for round_ in rounds for r in round_) else 1


if __name__ == "__main__":
    sys.exit(main())
