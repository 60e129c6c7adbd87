"""``zencoder-collector simulate``: serve the fake API until SIGINT/SIGTERM.

The lead's ``collector/cli.py`` wires it as::

    simulate = subparsers.add_parser("simulate", help="serve a fake Zencoder API")
    add_simulate_arguments(simulate)
    ...
    return run_simulate(args)
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any, TextIO

import yaml

from collector.simulator.app import TOKEN_PATH, Simulator, serve
from collector.simulator.settings import (
    DEMO_CREDENTIALS_RULE,
    SimTenant,
    SimulatorSettings,
    demo_tenants,
    load_tenants_file,
)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to a (sub)parser."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8080, help="port to bind, 0 for any free one (default 8080)"
    )
    parser.add_argument(
        "--tenants",
        type=_positive_int,
        default=3,
        metavar="N",
        help="serve N demo tenants tenant-01..tenant-NN (default 3)",
    )
    parser.add_argument(
        "--tenants-file",
        metavar="FILE.yaml",
        help="serve the tenants listed in this YAML file (id, client_id, client_secret, api_key, "
        "users, variant: an API variant such as datetime_last_active or gzip) instead of demo "
        "tenants",
    )
    parser.add_argument(
        "--latency",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="delay added to every usage response (default 0)",
    )
    parser.add_argument(
        "--failure-rate",
        type=_share,
        default=0.0,
        metavar="SHARE",
        help='share of usage requests answered 500 "Failed to fetch data" (default 0)',
    )
    parser.add_argument(
        "--rate-limit",
        type=_positive_float,
        default=None,
        metavar="PER_SECOND",
        help="usage requests per second per tenant before 429 + Retry-After (default: no limit)",
    )
    parser.add_argument(
        "--token-lifetime",
        type=_positive_int,
        default=86400,
        metavar="SECONDS",
        help="lifetime of issued tokens, also announced as expires_in (default 86400)",
    )
    parser.add_argument(
        "--today",
        type=dt.date.fromisoformat,
        default=None,
        metavar="YYYY-MM-DD",
        help="simulated UTC date (default: the real UTC date)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generated data and failures (default 0)"
    )


def settings_from_args(args: argparse.Namespace) -> SimulatorSettings:
    """The simulator settings the parsed ``simulate`` options describe."""
    tenants = (
        load_tenants_file(args.tenants_file) if args.tenants_file else demo_tenants(args.tenants)
    )
    return SimulatorSettings(
        tenants=tenants,
        latency=args.latency,
        failure_rate=args.failure_rate,
        rate_limit=args.rate_limit,
        token_lifetime=args.token_lifetime,
        today=args.today,
        seed=args.seed,
    )


def ready_config(
    base_url: str,
    tenants: list[SimTenant],
    sinks: dict[str, Any] | None = None,
    workdir: str = "sim-output",
) -> str:
    """A collector config (YAML) that collects ``tenants`` from the simulator at ``base_url`` into
    ``sinks`` (by default one CSV sink to replace with your own), state under ``workdir``."""
    config = {
        "api": {
            "base_url": base_url,
            "token_url": base_url + TOKEN_PATH,
            # The simulator is local; the real API's default is 2 requests/second per tenant.
            "rate_limit": {"per_second": 25, "burst": 10},
        },
        "state": {"url": f"sqlite:///{workdir}/state.db"},
        "server": {"listen": None},
        "sinks": sinks or {"mine": {"type": "csv", "path": f"{workdir}/csv"}},
        "tenants": [
            {"id": t.id, "client_id": t.client_id, "client_secret": t.client_secret}
            for t in tenants
        ],
    }
    head = (
        "# A collector config for this simulator (its credentials are fake): save it as\n"
        "# sim.yaml, put your own sink under `sinks:`, then\n"
        "#   zencoder-collector run --once -c sim.yaml\n"
    )
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def announce(sim: Simulator, *, from_file: bool, out: TextIO) -> None:
    """Print where the simulator listens, which credentials it accepts, and a config that
    collects from it, once."""
    print(f"Zencoder API simulator listening on {sim.base_url}", file=out)
    print(f"  token URL: {sim.token_url}", file=out)
    print(f"  usage URL: {sim.usage_url}", file=out)
    if from_file:
        print(f"  tenants:   {len(sim.tenants)} from the tenants file", file=out)
    else:
        print(f"  tenants:   {len(sim.tenants)} demo tenants ({DEMO_CREDENTIALS_RULE})", file=out)
    print(f"\n{ready_config(sim.base_url, sim.tenants)}", file=out)
    print("Stop with Ctrl-C (SIGINT) or SIGTERM.", file=out, flush=True)


def run_simulate(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Serve until interrupted; 0 on a clean stop, 2 when the options or tenants file are bad."""
    stream = out if out is not None else sys.stdout
    try:
        settings = settings_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    try:
        serve(
            settings,
            args.host,
            args.port,
            on_start=lambda sim: announce(sim, from_file=bool(args.tenants_file), out=stream),
        )
    except OSError as exc:
        print(f"simulate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print("simulator stopped", file=stream, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m collector.simulator.cli --port 0``."""
    parser = argparse.ArgumentParser(prog="zencoder-collector simulate", description=__doc__)
    add_simulate_arguments(parser)
    return run_simulate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
