"""Progress of a cycle: the pipeline's progress hooks, the counts, the plain and rich displays."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from rich.console import Console

from collector.app import load, load_plugins, open_runtime
from collector.hookspecs import hookimpl
from collector.progress import (
    CycleProgress,
    LineDisplay,
    RichDisplay,
    TenantCount,
    Totals,
    choose_mode,
)
from collector.retry import no_wait
from collector.simulator import SimulatorSettings, demo_tenants, running_simulator
from tests.e2e import write_config


class Recorder:
    """A plugin that records the progress hooks in order."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    @hookimpl
    def collector_tenant_cycle_started(self, tenant: str, planned: int) -> None:
        self.events.append(("started", tenant, planned))

    @hookimpl
    def collector_tenant_day_failed(self, tenant: str, day: dt.date, error: str) -> None:
        self.events.append(("day_failed", tenant, day, error))

    @hookimpl
    def collector_tenant_cycle_done(
        self, tenant: str, fetched: int, failed: int, error: str | None
    ) -> None:
        self.events.append(("done", tenant, fetched, failed, error))


async def test_pipeline_reports_planned_failed_and_done_days(tmp_path: Path) -> None:
    """A cycle calls the progress hooks: planned days per tenant, each failed day with its reason,
    and a done call whose counts cover every planned day (a rejected tenant's too)."""
    tenants = demo_tenants(3)
    async with running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        sim.faults.set("tenant-02", bad_response="malformed_json")
        config_path = write_config(
            tmp_path / "c.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=3,
            sinks={},
            bad_secret_for={"tenant-03"},
        )
        plugins = load_plugins()
        recorder = Recorder()
        plugins.pm.register(recorder)
        progress = CycleProgress(3, display=None)
        plugins.pm.register(progress)
        config = load(config_path, plugins)
        with no_wait():
            async with open_runtime(config, plugins) as runtime:
                assert runtime.collector is not None
                await runtime.collector.run_cycle()
    started = {e[1]: e[2] for e in recorder.events if e[0] == "started"}
    assert started == {"tenant-01": 3, "tenant-02": 3, "tenant-03": 3}
    failed_days = [e for e in recorder.events if e[0] == "day_failed"]
    assert {e[1] for e in failed_days} == {"tenant-02"}
    assert len(failed_days) == 3
    done = {e[1]: e[2:] for e in recorder.events if e[0] == "done"}
    assert done["tenant-01"] == (3, 0, None)
    assert done["tenant-02"][:2] == (0, 3)
    fetched, failed, error = done["tenant-03"]
    assert (fetched, failed) == (0, 3)
    assert error is not None
    assert "401" in error
    assert progress.totals.planned == progress.totals.settled == 9
    assert progress.totals.failed == 6
    assert progress.totals.finished_tenants == 3


def test_line_display_prints_each_finished_tenant_and_the_total() -> None:
    """Off a terminal, each finished tenant gets a line, and the last one the overall figures."""
    out = io.StringIO()
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    display = LineDisplay(out, interval=60, clock=lambda: next(clock))
    with CycleProgress(2, display) as progress:
        progress.collector_tenant_cycle_started("acme", 2)
        progress.collector_tenant_cycle_started("globex", 1)
        progress.collector_tenant_day_collected("acme")
        progress.collector_tenant_day_failed("acme")
        progress.collector_tenant_cycle_done("acme", 1, 1, None)
        progress.collector_tenant_day_collected("globex")
        progress.collector_tenant_cycle_done("globex", 1, 0, None)
    lines = out.getvalue().splitlines()
    assert lines[0] == "progress: acme: 1/2 day(s), 1 failed; 1/2 tenant(s) done"
    assert lines[1] == "progress: globex: 1/1 day(s); 2/2 tenant(s) done"
    assert lines[2].startswith("progress: 3/3 tenant-day(s) (100%), 2/2 tenant(s) done, ")
    assert "days/s" in lines[2]


def test_line_display_prints_the_overall_line_with_eta_at_most_every_interval() -> None:
    """The overall line with rate and ETA comes once ``interval`` seconds have passed, not on
    every day."""
    out = io.StringIO()
    now = [0.0]
    display = LineDisplay(out, interval=5, clock=lambda: now[0])
    with CycleProgress(1, display) as progress:
        progress.collector_tenant_cycle_started("acme", 10)
        now[0] = 1.0
        progress.collector_tenant_day_collected("acme")
        assert out.getvalue() == ""
        now[0] = 5.0
        progress.collector_tenant_day_collected("acme")
    assert out.getvalue() == (
        "progress: 2/10 tenant-day(s) (20%), 0/1 tenant(s) done, 0.4 days/s, ETA 0:00:20\n"
    )


def test_days_never_tried_settle_when_the_tenant_is_done() -> None:
    """A tenant stopped by rejected credentials still completes its share of the total."""
    progress = CycleProgress(1, display=None)
    progress.collector_tenant_cycle_started("acme", 30)
    progress.collector_tenant_cycle_done("acme", 0, 30, "AuthError: HTTP 401")
    assert progress.tenants["acme"] == TenantCount(
        planned=30, settled=30, failed=30, finished=True, error="AuthError: HTTP 401"
    )
    assert progress.totals == Totals(
        tenants=1, started_tenants=1, finished_tenants=1, planned=30, settled=30, failed=30
    )


def test_rich_display_draws_overall_and_tenant_bars() -> None:
    """On a terminal the display draws the overall bar, the running tenants, the rate, and a line
    for a tenant that failed."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with CycleProgress(2, RichDisplay(console)) as progress:
        progress.collector_tenant_cycle_started("acme", 4)
        progress.collector_tenant_cycle_started("globex", 2)
        for _ in range(4):
            progress.collector_tenant_day_collected("acme")
        progress.collector_tenant_cycle_done("acme", 4, 0, None)
        progress.collector_tenant_day_failed("globex")
        progress.collector_tenant_day_failed("globex")
        progress.collector_tenant_cycle_done("globex", 0, 2, "ApiError: HTTP 500")
    text = out.getvalue()
    assert "all tenants (2/2 done)" in text
    assert "acme" in text
    assert "6/6" in text
    assert "globex: 2 day(s) failed: ApiError: HTTP 500" in text


def test_mode_is_off_when_quiet_rich_on_a_terminal_lines_otherwise(tmp_path: Path) -> None:
    """--quiet turns progress off; a terminal gets rich bars; a file or pipe plain lines."""
    with (tmp_path / "log").open("w") as not_a_terminal:
        assert choose_mode(quiet=True, stream=not_a_terminal) == "off"
        assert choose_mode(quiet=False, stream=not_a_terminal) == "lines"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert choose_mode(quiet=False, stream=Terminal()) == "rich"
