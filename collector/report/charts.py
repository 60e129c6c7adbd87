"""Charts as inline SVG, drawn in Python: nothing to download, nothing run in the browser.

Each chart is an HTML ``<figure>``: an ``<svg role="img">`` with a ``<title>`` and a ``<desc>``
(what a screen reader announces), one ``<g class="series" data-series="NAME">`` per line or bar
(hovering shows its values through ``<title>`` elements), and an HTML legend under it. Colours
are the Okabe-Ito palette, which stays distinguishable with the common colour-vision
deficiencies; lines also carry point markers, so no chart depends on colour alone.

The SVG is built with :mod:`xml.etree.ElementTree`, which escapes every name and label.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#D55E00",
    "#56B4E9",
    "#8C6D1F",
    "#000000",
)
OTHER_COLOUR = "#9A9A9A"
MAX_LINES = len(PALETTE)
"""Lines in one chart: one per tenant up to this, else one fewer and an "Other tenants" line."""
MAX_BARS = 10
"""Bars drawn one per name; the rest are summed into one "other" bar."""
MAX_MARKED_POINTS = 62
"""Series longer than this are drawn as lines without point markers (a 90-day window)."""

WIDTH, HEIGHT = 760, 280
BAR_WIDTH = 500
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 40


@dataclass(frozen=True)
class Series:
    """One line: a value per day (days without a value are gaps)."""

    name: str
    values: dict[dt.date, int]


def _svg(
    chart_id: str, title: str, description: str, height: int, width: int = WIDTH
) -> ET.Element:
    svg = ET.Element(
        "svg",
        {
            "role": "img",
            "viewBox": f"0 0 {width} {height}",
            "width": "100%",
            "aria-labelledby": f"{chart_id}-title {chart_id}-desc",
            "data-chart": chart_id,
            "font-family": "system-ui, sans-serif",
            "font-size": "12",
        },
    )
    ET.SubElement(svg, "title", {"id": f"{chart_id}-title"}).text = title
    ET.SubElement(svg, "desc", {"id": f"{chart_id}-desc"}).text = description
    return svg


def _figure(svg: ET.Element, title: str, legend: Sequence[tuple[str, str]]) -> str:
    items = "".join(
        f'<li><span class="swatch" style="background:{colour}"></span>{html.escape(name)}</li>'
        for name, colour in legend
    )
    legend_html = f'<ul class="legend">{items}</ul>' if items else ""
    return (
        f'<figure class="chart"><figcaption>{html.escape(title)}</figcaption>'
        f"{ET.tostring(svg, encoding='unicode')}{legend_html}</figure>"
    )


def nice_step(largest: float, ticks: int = 4) -> int:
    """A round whole step (1, 2 or 5 times a power of ten) giving at most about ``ticks`` ticks
    up to ``largest`` (the values are counts, so never a step below 1)."""
    raw = max(largest, 1) / ticks
    power = int(10 ** max(0, math.floor(math.log10(raw))))
    return next(f * power for f in (1, 2, 5, 10) if raw <= f * power)


def fmt(value: float) -> str:
    """Thousands separated; one decimal only when there is a fraction."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: object) -> ET.Element:
    """A child element; ``text_anchor=`` becomes ``text-anchor``, ``class_`` ``class``, and
    floats are written with one decimal."""
    element = ET.SubElement(
        parent,
        tag,
        {
            name.rstrip("_").replace("_", "-"): f"{v:.1f}" if isinstance(v, float) else str(v)
            for name, v in attrs.items()
        },
    )
    element.text = text
    return element


def _no_data(svg: ET.Element, height: int, width: int = WIDTH) -> None:
    _el(svg, "text", "No data in this window", x=width / 2, y=height / 2, text_anchor="middle")


def _segments(dates: Sequence[dt.date], values: dict[dt.date, int]) -> list[list[tuple[int, int]]]:
    """Runs of consecutive days with a value, as (index of the day, value); a gap ends a run."""
    runs: list[list[tuple[int, int]]] = [[]]
    for index, day in enumerate(dates):
        if day in values:
            runs[-1].append((index, values[day]))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def line_chart(
    chart_id: str,
    title: str,
    dates: Sequence[dt.date],
    series: Sequence[Series],
    unit: str,
) -> str:
    """Lines over ``dates``, one per series (the caller limits them to :data:`MAX_LINES`)."""
    peak = max((v for s in series for v in s.values.values()), default=0)
    description = f"{unit.capitalize()} per day from {dates[0]} to {dates[-1]}, " + (
        f"{len(series)} series; the highest value is {fmt(peak)}." if series else "no data."
    )
    svg = _svg(chart_id, title, description, HEIGHT)
    if not series:
        _no_data(svg, HEIGHT)
        return _figure(svg, title, [])
    step = nice_step(peak)
    top = step * max(1, math.ceil(peak / step))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(index: int) -> float:
        return LEFT + (plot_w * index / (len(dates) - 1) if len(dates) > 1 else plot_w / 2)

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    axes = _el(svg, "g", class_="axes", stroke="#d0d0d0")
    for tick in range(0, top + 1, step):
        _el(axes, "line", x1=LEFT, x2=WIDTH - RIGHT, y1=y(tick), y2=y(tick))
        _el(svg, "text", fmt(tick), x=LEFT - 6, y=y(tick) + 4, text_anchor="end", fill="#555")
    every = max(1, math.ceil(len(dates) / 8))
    for index in range(0, len(dates), every):
        label = f"{dates[index]:%m-%d}"
        _el(svg, "text", label, x=x(index), y=HEIGHT - BOTTOM + 18, text_anchor="middle")
    _el(svg, "text", f"{unit} per day (UTC)", x=LEFT, y=HEIGHT - 4, fill="#555")

    legend = []
    for number, line in enumerate(series):
        colour = PALETTE[number % len(PALETTE)]
        if line.name.startswith("Other "):
            colour = OTHER_COLOUR
        legend.append((line.name, colour))
        group = _el(svg, "g", class_="series", data_series=line.name, stroke=colour, fill=colour)
        _el(group, "title", line.name)
        marked = len(line.values) <= MAX_MARKED_POINTS
        for run in _segments(dates, line.values):
            points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in run)
            _el(group, "polyline", points=points, fill="none", stroke_width=2)
            for index, value in run if marked or len(run) == 1 else ():
                dot = _el(group, "circle", cx=x(index), cy=y(value), r=2.5)
                _el(dot, "title", f"{line.name}, {dates[index]}: {fmt(value)}")
    return _figure(svg, title, legend)


def bar_chart(chart_id: str, title: str, items: Sequence[tuple[str, int]], unit: str) -> str:
    """Horizontal bars with each item's share of the total (the caller limits them)."""
    total = sum(v for _, v in items)
    # Narrower than a line chart: two bar charts sit side by side at their natural text size.
    width, row, label_w, value_w = BAR_WIDTH, 26, 130, 110
    height = TOP + row * max(1, len(items)) + 8
    description = f"Share of {unit} by name, " + (
        f"{len(items)} series; the largest is {items[0][0]} with {fmt(items[0][1])}."
        if items
        else "no data."
    )
    svg = _svg(chart_id, title, description, height, width)
    if not items or total == 0:
        _no_data(svg, height, width)
        return _figure(svg, title, [])
    largest = max(v for _, v in items)
    bar_w = width - label_w - value_w - 8
    for number, (name, value) in enumerate(items):
        colour = OTHER_COLOUR if name.startswith("Other (") else PALETTE[0]
        share = 100 * value / total
        top = TOP + number * row
        group = _el(svg, "g", class_="series", data_series=name, fill=colour)
        _el(group, "title", f"{name}: {share:.1f}% ({fmt(value)} {unit})")
        _el(group, "text", name, x=label_w - 8, y=top + 15, text_anchor="end", fill="#222")
        length = max(1.0, bar_w * value / largest)
        _el(group, "rect", x=label_w, y=top + 3, width=length, height=row - 8, rx=2)
        label = f"{share:.1f}% ({fmt(value)})"
        _el(group, "text", label, x=label_w + length + 6, y=top + 15, fill="#222")
    return _figure(svg, title, [])


def top_with_other(
    items: Sequence[tuple[str, int]], limit: int = MAX_BARS
) -> list[tuple[str, int]]:
    """The first ``limit - 1`` items and one "Other (N)" summing the rest, when there are more."""
    if len(items) <= limit:
        return list(items)
    kept, rest = list(items[: limit - 1]), items[limit - 1 :]
    return [*kept, (f"Other ({len(rest)})", sum(v for _, v in rest))]
