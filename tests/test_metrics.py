"""The Prometheus registry: text exposition format, labels, histogram, and documentation."""

from __future__ import annotations

import re
from pathlib import Path

from collector.metrics import PREFIX, Histogram, Metric, Metrics, process_stats

OPERATIONS_DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"

# One sample line of the text format: name, optional {labels}, value.
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? (\S+)$')


def test_counter_renders_help_type_and_sorted_labelled_samples() -> None:
    """A counter renders HELP and TYPE lines, then one line per label set, sorted, summed."""
    metric = Metric("zc_requests_total", "counter", "Requests.")
    metric.inc(tenant="b")
    metric.inc(2, tenant="a")
    metric.inc(tenant="b")
    assert metric.render() == [
        "# HELP zc_requests_total Requests.",
        "# TYPE zc_requests_total counter",
        'zc_requests_total{tenant="a"} 2',
        'zc_requests_total{tenant="b"} 2',
    ]


def test_label_values_are_escaped() -> None:
    """Quotes, backslashes and newlines in a label value are escaped per the text format."""
    metric = Metric("zc_gauge", "gauge", "A gauge.")
    metric.set(1.5, sink='we"ird\\na\nme')
    assert metric.render()[-1] == 'zc_gauge{sink="we\\"ird\\\\na\\nme"} 1.5'


def test_gauge_set_replaces_and_remove_forgets_one_label_set() -> None:
    """``set`` replaces a gauge's value; ``remove`` drops only the given label set."""
    metric = Metric("zc_backlog", "gauge", "Backlog.")
    metric.set(5, sink="a")
    metric.set(3, sink="a")
    metric.set(7, sink="b")
    metric.remove(sink="a")
    assert metric.render()[2:] == ['zc_backlog{sink="b"} 7']


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    """Each observation counts in every bucket at or above it; +Inf equals the count."""
    hist = Histogram("zc_seconds", "Latency.", buckets=(0.1, 1.0))
    for value in (0.05, 0.5, 0.5, 3.0):
        hist.observe(value)
    assert hist.render()[2:] == [
        'zc_seconds_bucket{le="0.1"} 1',
        'zc_seconds_bucket{le="1"} 3',
        'zc_seconds_bucket{le="+Inf"} 4',
        "zc_seconds_sum 4.05",
        "zc_seconds_count 4",
    ]


def test_every_rendered_line_is_valid_exposition_format() -> None:
    """The whole registry renders as HELP/TYPE comments and well-formed samples, newline-ended."""
    metrics = Metrics()
    metrics.fetches.inc(tenant="acme")
    metrics.fetch_latency.observe(0.2)
    metrics.sink_backlog.set(3, sink="hook")
    metrics.up.set(1)
    text = metrics.render()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) zencoder_collector_\w+ \S", line), line
        else:
            assert _SAMPLE.match(line), line
    assert 'zencoder_collector_fetches_total{tenant="acme"} 1' in text
    assert 'zencoder_collector_sink_backlog{sink="hook"} 3' in text


def test_metrics_are_labelled_by_tenant_and_sink_only() -> None:
    """After every metric got a sample with its natural label, no other label name appears."""
    metrics = Metrics()
    for family in metrics.families():
        if isinstance(family, Histogram):
            family.observe(1.0)
        elif "sink" in family.name:
            family.set(1, sink="hook")
        elif family.name.endswith(("_up", "asyncio_tasks", "_bytes", "_fds")) or "reload" in (
            family.name
        ):
            family.set(1)
        else:
            family.set(1, tenant="acme")
    labels = set(re.findall(r"[{,]([a-z_]+)=", metrics.render()))
    assert labels <= {"tenant", "sink", "le"}


def test_forget_tenant_removes_only_that_tenant() -> None:
    """A tenant removed by a reload disappears from every family; others stay."""
    metrics = Metrics()
    metrics.fetches.inc(tenant="gone")
    metrics.fetches.inc(tenant="stays")
    metrics.days_complete.set(4, tenant="gone")
    metrics.forget_tenant("gone")
    text = metrics.render()
    assert 'tenant="gone"' not in text
    assert 'zencoder_collector_fetches_total{tenant="stays"} 1' in text


def test_every_metric_is_documented_in_operations_md() -> None:
    """docs/operations.md names every exported metric with its type, and no metric that is gone."""
    doc = OPERATIONS_DOC.read_text(encoding="utf-8")
    metrics = Metrics()
    for family in metrics.families():
        kind = family.kind if isinstance(family, Metric) else "histogram"
        row = re.search(rf"^\| `{family.name}` \| {kind} \|", doc, re.MULTILINE)
        assert row, f"{family.name} ({kind}) is not in the metrics table of docs/operations.md"
    documented = set(re.findall(r"^\| `(zencoder_collector_\w+)` \|", doc, re.MULTILINE))
    assert documented == set(metrics.names())
    assert all(name.startswith(PREFIX) for name in metrics.names())


def test_process_stats_reads_this_process() -> None:
    """RSS and open descriptors of the running process are positive numbers on Linux."""
    rss, fds = process_stats()
    assert rss is not None
    assert rss > 10 * 1024 * 1024
    assert fds is not None
    assert fds >= 3
