"""The HTML report (collector/report/html.py, charts.py): self-contained, charts that draw.

The browser test opens the page in headless Chromium (Debian's ``chromium``) through Playwright,
checks that every chart drew its series and that the page logged no error and requested nothing
but itself, and keeps a screenshot (under the test's tmp dir, and in $COLLECTOR_TEST_ARTIFACTS
when set). It skips without Chromium, except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from collector.app import load, load_plugins
from collector.report.charts import MAX_BARS, MAX_LINES, nice_step, top_with_other
from collector.report.html import tenant_series
from collector.report.model import DayFigures, TenantUsage, UsageReport, Window
from collector.report.render import render
from collector.report.sources import choose_sink, make_report
from tests.e2e import run_cli
from tests.report_data import NAMES, Collected, collect

CHROMIUM = Path(os.environ.get("COLLECTOR_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    return collect(tmp_path_factory.mktemp("report-html"))


@pytest.fixture(scope="module")
def report(collected: Collected) -> UsageReport:
    config = load(collected.config, load_plugins())
    names = {t.id: t.name for t in config.tenants}
    window = Window.last(30, collected.until)
    return make_report(choose_sink(config.sinks, "warehouse"), window, names=names)


class _Charts(HTMLParser):
    """Collects, per ``svg[data-chart]``, the ``data-series`` of its ``g.series`` children."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, list[str]] = {}
        self.tags: set[str] = set()
        self._chart: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = dict(attrs)
        if tag == "svg":
            self._chart = attributes.get("data-chart") or ""
            self.series[self._chart] = []
        elif tag == "g" and attributes.get("class") == "series" and self._chart is not None:
            self.series[self._chart].append(attributes.get("data-series") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None


def _expected_series(report: UsageReport) -> dict[str, int]:
    return {
        "portfolio": 1,
        "active-users": min(len(report.tenants), MAX_LINES),
        "messages": min(len(report.tenants), MAX_LINES),
        "ides": min(len(report.ides), MAX_BARS),
        "languages": min(len(report.languages), MAX_BARS),
    }


def test_page_fetches_nothing_and_runs_no_script(report: UsageReport) -> None:
    """The page holds no URL, no script, no external stylesheet or image, and a CSP that
    forbids loading anything."""
    page = render(report, "html")
    assert not re.search(r"https?:|//[a-z0-9]|\burl\(", page, re.IGNORECASE)
    parser = _Charts()
    parser.feed(page)
    assert not parser.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert "default-src 'none'" in page
    assert " src=" not in page
    assert " href=" not in page


def test_every_chart_has_one_series_per_tenant_or_name(report: UsageReport) -> None:
    """Line charts have a series per tenant (by name) and the portfolio one series; the IDE and
    language charts a bar per name."""
    parser = _Charts()
    parser.feed(render(report, "html"))
    assert {chart: len(s) for chart, s in parser.series.items()} == _expected_series(report)
    assert set(parser.series["active-users"]) == set(NAMES.values())
    assert parser.series["ides"] == [name for name, _ in report.ides][:MAX_BARS]


def test_many_tenants_fold_into_an_other_line() -> None:
    """Beyond the palette's size, the busiest tenants keep a line each and the rest are summed
    into one "Other tenants" line, day by day."""
    day = dt.date(2026, 1, 5)
    tenants = [
        TenantUsage(f"T{i}", f"t{i}", 1, 100 - i, i, 1.0, 1, None, None,
                    daily=[DayFigures(day, i, 100 - i)])
        for i in range(MAX_LINES + 3)
    ]  # fmt: skip
    series = tenant_series(tenants, "active_users")
    assert len(series) == MAX_LINES
    assert [s.name for s in series[:-1]] == [f"T{i}" for i in range(MAX_LINES - 1)]
    assert series[-1].name == "Other tenants (4)"
    assert series[-1].values == {day: sum(range(MAX_LINES - 1, MAX_LINES + 3))}


def test_bars_beyond_the_limit_become_one_other_bar() -> None:
    """More names than bars: the largest keep a bar each, the rest share one "Other (N)"."""
    items = [(f"L{i}", 20 - i) for i in range(MAX_BARS + 2)]
    folded = top_with_other(items)
    assert len(folded) == MAX_BARS
    assert folded[-1] == ("Other (3)", sum(v for _, v in items[MAX_BARS - 1 :]))
    assert top_with_other(items[:3]) == items[:3]


@pytest.mark.parametrize(
    ("largest", "step"), [(0, 1), (3, 1), (9, 5), (40, 10), (130, 50), (31854, 10000)]
)
def test_axis_steps_are_round_numbers(largest: int, step: int) -> None:
    """Axis ticks step by 1, 2 or 5 times a power of ten, about four per axis."""
    assert nice_step(largest) == step


def test_empty_window_draws_placeholders_not_errors(collected: Collected) -> None:
    """A window before any data renders every chart with a "No data" note and no series."""
    config = load(collected.config, load_plugins())
    window = Window.last(7, collected.until - dt.timedelta(days=365))
    page = render(make_report(choose_sink(config.sinks, "warehouse"), window), "html")
    parser = _Charts()
    parser.feed(page)
    assert all(not series for series in parser.series.values())
    assert page.count("No data in this window") == 5


def _launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)


def test_html_report_draws_in_headless_chromium(report: UsageReport, tmp_path: Path) -> None:
    """In Chromium every chart has the expected series, each drawn with a non-empty size, the
    console shows no error, the page requests nothing but itself; the screenshot is kept."""
    sync_api = _browser_or_skip()
    page_file = tmp_path / "report.html"
    page_file.write_text(render(report, "html"), encoding="utf-8")
    problems: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_file.as_uri())
            drawn = page.evaluate(_MEASURE_CHARTS)
            screenshot = tmp_path / "report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    artifacts = os.environ.get("COLLECTOR_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artifacts) / "report.png")
    assert problems == []
    assert requests == [page_file.as_uri()]
    assert {chart: d["series"] for chart, d in drawn.items()} == _expected_series(report)
    for chart, measured in drawn.items():
        assert measured["width"] > 100, chart
        assert measured["height"] > 50, chart
        assert measured["empty"] == 0, chart
    assert screenshot.stat().st_size > 10_000


# Per chart: its series count, the drawn size of the series layer, and how many series drew
# nothing (a polyline without points, a bar of zero width).
_MEASURE_CHARTS = """() => {
  const result = {};
  for (const svg of document.querySelectorAll('svg[data-chart]')) {
    const series = [...svg.querySelectorAll('g.series')];
    const box = series.length ? svg.getBBox() : {width: 0, height: 0};
    const empty = series.filter(g => {
      const shapes = [...g.querySelectorAll('polyline, rect')];
      return shapes.length === 0 || shapes.every(s => {
        const b = s.getBBox();
        return b.width === 0 && b.height === 0;
      });
    }).length;
    result[svg.dataset.chart] = {series: series.length, width: box.width,
                                 height: box.height, empty: empty};
  }
  return result;
}"""


def _browser_or_skip() -> Any:
    """Playwright's sync API when Chromium and Playwright are installed; otherwise skip, or fail
    in CI, where .ci/run installs them."""
    missing = None
    try:
        from playwright import sync_api
    except ImportError:
        missing = "the playwright package (dev dependency)"
    if missing is None and not CHROMIUM.exists():
        missing = f"Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is None:
        return sync_api
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test needs {missing}")
    pytest.skip(f"the browser test needs {missing}")


async def test_demo_writes_the_html_report(tmp_path: Path) -> None:
    """``demo`` leaves the HTML report of its five organizations next to its data files."""
    result = await run_cli("demo", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    parser = _Charts()
    parser.feed(page)
    assert len(parser.series["active-users"]) == 5
    assert f"{tmp_path / 'out' / 'report.html'} (HTML report)" in result.stdout
