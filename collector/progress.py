"""Progress of ``run --once`` and ``backfill``: per tenant and overall, with rate and ETA.

The pipeline knows nothing of terminals: it reports through the notification hooks of
:mod:`collector.hookspecs` (``collector_tenant_cycle_started``, ``..._day_collected``,
``..._day_failed``, ``..._cycle_done``), and :class:`CycleProgress` is a plugin of those hooks that
the CLI registers for one command. It counts, and hands the counts to one of two displays:

- :class:`RichDisplay` on a terminal: an overall bar and a bar for each running tenant (at most
  :data:`VISIBLE_TENANTS` at a time), with rate and time remaining, drawn by ``rich``;
- :class:`LineDisplay` elsewhere (CI logs, ``| tee``, a service's journal): one plain line per
  finished tenant and an overall line at most every ``interval`` seconds, on stderr.

``--quiet`` registers no display at all.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TextIO

from collector.hookspecs import hookimpl

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, Task, TaskID
    from rich.text import Text

VISIBLE_TENANTS = 8
"""Tenant bars shown at once on a terminal; a thousand-tenant run shows the first running ones."""

Mode = Literal["rich", "lines", "off"]


@dataclass
class TenantCount:
    """One tenant's days: planned, settled (fetched or failed) and failed."""

    planned: int = 0
    settled: int = 0
    failed: int = 0
    finished: bool = False
    error: str | None = None


@dataclass
class Totals:
    """The whole run so far; ``planned`` grows as tenants are planned."""

    tenants: int
    started_tenants: int = 0
    finished_tenants: int = 0
    planned: int = 0
    settled: int = 0
    failed: int = 0


class Display(Protocol):
    """What the counts are shown on."""

    def start(self) -> None: ...
    def tenant_started(self, tenant: str, count: TenantCount, totals: Totals) -> None: ...
    def advanced(self, tenant: str, count: TenantCount, totals: Totals) -> None: ...
    def tenant_finished(self, tenant: str, count: TenantCount, totals: Totals) -> None: ...
    def stop(self) -> None: ...


def choose_mode(*, quiet: bool, stream: TextIO) -> Mode:
    """``off`` with ``--quiet``, ``rich`` on a terminal, plain ``lines`` otherwise."""
    if quiet:
        return "off"
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "rich" if tty else "lines"


class CycleProgress:
    """Counts one command's tenant-days from the pipeline's hooks and drives a display.

    Register it with the plugin manager for the duration of the command (``with`` starts and
    stops the display)::

        with CycleProgress(len(tenants), display) as progress:
            plugins.pm.register(progress)
            ...
    """

    def __init__(self, tenants: int, display: Display | None) -> None:
        self.totals = Totals(tenants=tenants)
        self.tenants: dict[str, TenantCount] = {}
        self.display = display

    def __enter__(self) -> CycleProgress:
        if self.display is not None:
            self.display.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.display is not None:
            self.display.stop()

    def _count(self, tenant: str) -> TenantCount:
        count = self.tenants.get(tenant)
        if count is None:
            count = self.tenants[tenant] = TenantCount()
        return count

    @hookimpl
    def collector_tenant_cycle_started(self, tenant: str, planned: int) -> None:
        count = self._count(tenant)
        count.planned = planned
        self.totals.started_tenants += 1
        self.totals.planned += planned
        if self.display is not None:
            self.display.tenant_started(tenant, count, self.totals)

    @hookimpl
    def collector_tenant_day_collected(self, tenant: str) -> None:
        self._settle(tenant, failed=False)

    @hookimpl
    def collector_tenant_day_failed(self, tenant: str) -> None:
        self._settle(tenant, failed=True)

    def _settle(self, tenant: str, *, failed: bool) -> None:
        count = self._count(tenant)
        count.settled += 1
        self.totals.settled += 1
        if failed:
            count.failed += 1
            self.totals.failed += 1
        if self.display is not None:
            self.display.advanced(tenant, count, self.totals)

    @hookimpl
    def collector_tenant_cycle_done(
        self, tenant: str, fetched: int, failed: int, error: str | None
    ) -> None:
        count = self._count(tenant)
        # Days never tried (credentials rejected: the rest of the tenant is dropped) settle here.
        unsettled = max(0, count.planned - count.settled)
        count.settled += unsettled
        self.totals.settled += unsettled
        extra_failed = max(0, failed - count.failed)
        count.failed += extra_failed
        self.totals.failed += extra_failed
        count.finished = True
        count.error = error
        self.totals.finished_tenants += 1
        if self.display is not None:
            self.display.tenant_finished(tenant, count, self.totals)


def make_display(mode: Mode, *, stream: TextIO | None = None) -> Display | None:
    """The display for ``mode`` (None for ``off``), writing to ``stream`` (default stderr)."""
    out = sys.stderr if stream is None else stream
    if mode == "off":
        return None
    if mode == "rich":
        from rich.console import Console

        return RichDisplay(Console(file=out))
    return LineDisplay(out)


def _eta(totals: Totals, elapsed: float) -> tuple[float, float | None]:
    """Tenant-days per second so far, and the seconds left (None until it can be estimated)."""
    rate = totals.settled / elapsed if elapsed > 0 else 0.0
    if rate <= 0 or totals.started_tenants < totals.tenants:
        return rate, None  # some tenants are not planned yet: the total is not known
    return rate, max(0, totals.planned - totals.settled) / rate


class LineDisplay:
    """Plain progress lines on a stream that is not a terminal."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self._started = 0.0
        self._last_line = 0.0

    def _print(self, text: str) -> None:
        print(f"progress: {text}", file=self.stream, flush=True)

    def start(self) -> None:
        self._started = self._last_line = self.clock()

    def tenant_started(self, tenant: str, count: TenantCount, totals: Totals) -> None:
        return None  # all tenants start at once: a line each would say nothing new

    def advanced(self, tenant: str, count: TenantCount, totals: Totals) -> None:
        if self.clock() - self._last_line >= self.interval:
            self._overall(totals)

    def tenant_finished(self, tenant: str, count: TenantCount, totals: Totals) -> None:
        outcome = f", {count.failed} failed" if count.failed else ""
        error = f" ({count.error})" if count.error else ""
        self._print(
            f"{tenant}: {count.settled - count.failed}/{count.planned} day(s){outcome}{error}; "
            f"{totals.finished_tenants}/{totals.tenants} tenant(s) done"
        )
        if totals.finished_tenants == totals.tenants:
            self._overall(totals)

    def _overall(self, totals: Totals) -> None:
        now = self.clock()
        self._last_line = now
        rate, eta = _eta(totals, now - self._started)
        share = f" ({100 * totals.settled // totals.planned}%)" if totals.planned else ""
        left = f", ETA {dt.timedelta(seconds=round(eta))}" if eta is not None else ""
        self._print(
            f"{totals.settled}/{totals.planned} tenant-day(s){share}, "
            f"{totals.finished_tenants}/{totals.tenants} tenant(s) done, {rate:.1f} days/s{left}"
        )

    def stop(self) -> None:
        return None


class RichDisplay:
    """An overall bar and the running tenants' bars, redrawn in place on a terminal."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class RateColumn(ProgressColumn):
            """Tenant-days per second (rich's own speed column counts bytes)."""

            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:.1f} days/s" if speed else "", style="progress.data.speed")

        self.progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            RateColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._overall: TaskID | None = None
        self._tasks: dict[str, TaskID] = {}
        self._shown: set[str] = set()

    def start(self) -> None:
        self.progress.start()
        self._overall = self.progress.add_task("all tenants", total=None)

    def tenant_started(self, tenant: str, count: TenantCount, totals: Totals) -> None:
        visible = len(self._shown) < VISIBLE_TENANTS
        self._tasks[tenant] = self.progress.add_task(
            f"  {tenant}", total=count.planned, visible=visible
        )
        if visible:
            self._shown.add(tenant)
        self._update_overall(totals)

    def advanced(self, tenant: str, count: TenantCount, totals: Totals) -> None:
        task = self._tasks.get(tenant)
        if task is not None:
            self.progress.update(task, completed=count.settled)
        self._update_overall(totals)

    def tenant_finished(self, tenant: str, count: TenantCount, totals: Totals) -> None:
        task = self._tasks.pop(tenant, None)
        if task is not None:
            self.progress.update(task, completed=count.settled, visible=False)
        if tenant in self._shown:
            self._shown.discard(tenant)
            for other, other_task in self._tasks.items():  # show the next running tenant
                if other not in self._shown:
                    self._shown.add(other)
                    self.progress.update(other_task, visible=True)
                    break
        if count.failed or count.error:
            reason = f": {count.error}" if count.error else ""
            self.progress.console.print(f"{tenant}: {count.failed} day(s) failed{reason}")
        self._update_overall(totals)

    def _update_overall(self, totals: Totals) -> None:
        if self._overall is None:
            return
        # The total grows while tenants are planned; rich's ETA follows it.
        self.progress.update(
            self._overall,
            total=totals.planned,
            completed=totals.settled,
            description=f"all tenants ({totals.finished_tenants}/{totals.tenants} done)",
        )

    def stop(self) -> None:
        self.progress.stop()
