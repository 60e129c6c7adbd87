"""The Prometheus registry: exposition through prometheus_client, labels, zero series, the docs."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collector import __version__
from collector.metrics import API_OUTCOMES, PREFIX, Metric, Metrics
from tests.metrics_helpers import exported, series_names

OPERATIONS_DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample of an exposition, parsed by prometheus_client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return found


def test_counter_sums_per_label_set() -> None:
    """A counter adds up per label set and renders one ``_total`` sample for each."""
    metrics = Metrics()
    metrics.fetches.inc(tenant="b")
    metrics.fetches.inc(2, tenant="a")
    metrics.fetches.inc(tenant="b")
    values = samples(metrics.render())
    assert values['zencoder_collector_fetches_total{tenant="a"}'] == 2
    assert values['zencoder_collector_fetches_total{tenant="b"}'] == 2


def test_label_values_are_escaped() -> None:
    """Quotes, backslashes and newlines in a label value survive the exposition round trip."""
    registry = CollectorRegistry()
    metric = Metric("zc_gauge", "gauge", "A gauge.", ("sink",))
    registry.register(metric)
    metric.set(1.5, sink='we"ird\\na\nme')
    (family,) = text_string_to_metric_families(generate_latest(registry).decode())
    assert family.samples[0].labels == {"sink": 'we"ird\\na\nme'}
    assert family.samples[0].value == 1.5


def test_gauge_set_replaces_and_remove_forgets_one_label_set() -> None:
    """``set`` replaces a gauge's value; ``remove`` drops only the given label set."""
    metrics = Metrics()
    metrics.sink_backlog.set(5, sink="a")
    metrics.sink_backlog.set(3, sink="a")
    metrics.sink_backlog.set(7, sink="b")
    metrics.sink_backlog.remove(sink="a")
    values = samples(metrics.render())
    assert 'zencoder_collector_sink_backlog{sink="a"}' not in values
    assert values['zencoder_collector_sink_backlog{sink="b"}'] == 7


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    """Each observation counts in every bucket at or above it; +Inf equals the count."""
    metrics = Metrics()
    for value in (0.05, 0.5, 0.5, 3.0):
        metrics.fetch_latency.observe(value)
    values = samples(metrics.render())
    name = "zencoder_collector_fetch_duration_seconds"
    assert values[f'{name}_bucket{{le="0.1"}}'] == 1
    assert values[f'{name}_bucket{{le="1.0"}}'] == 3
    assert values[f'{name}_bucket{{le="+Inf"}}'] == 4
    assert values[f"{name}_sum"] == pytest.approx(4.05)
    assert values[f"{name}_count"] == 4


def test_declared_labels_are_enforced() -> None:
    """A sample with label names other than the declared ones is refused, naming both."""
    metrics = Metrics()
    with pytest.raises(ValueError, match=r"labels \['sink'\] given, \['tenant'\] declared"):
        metrics.fetches.inc(sink="oops")


def test_counters_never_decrease_through_inc() -> None:
    """``inc`` with a negative amount on a counter raises instead of corrupting ``rate()``."""
    with pytest.raises(ValueError, match="cannot decrease"):
        Metrics().fetches.inc(-1, tenant="acme")


def test_unlabelled_counters_are_exported_at_zero_from_the_start() -> None:
    """A fresh registry already exports the reload counters at 0."""
    values = samples(Metrics().render())
    assert values["zencoder_collector_config_reloads_total"] == 0
    assert values["zencoder_collector_config_reload_failures_total"] == 0


def test_start_series_exports_per_tenant_and_per_sink_counters_at_zero() -> None:
    """``start_series`` creates a 0 sample of every per-tenant and per-sink counter (and of each
    API request outcome) and keeps existing values; gauges get no invented value."""
    metrics = Metrics()
    metrics.fetches.inc(3, tenant="acme")
    metrics.start_series(tenants=["acme", "globex"], sinks=["lake"])
    values = samples(metrics.render())
    assert values['zencoder_collector_fetches_total{tenant="acme"}'] == 3
    assert values['zencoder_collector_fetch_errors_total{tenant="globex"}'] == 0
    assert values['zencoder_collector_sink_failures_total{sink="lake"}'] == 0
    rate_limited = 'zencoder_collector_api_requests_total{outcome="rate_limited",tenant="globex"}'
    assert values[rate_limited] == 0
    assert 'zencoder_collector_days_complete{tenant="globex"}' not in values


def test_process_and_build_info_metrics_are_exported() -> None:
    """The standard process_* metrics and build_info (version, Python) are on the registry."""
    values = samples(Metrics().render())
    assert values["process_resident_memory_bytes"] > 10 * 1024 * 1024
    assert values["process_open_fds"] >= 3
    assert "process_cpu_seconds_total" in values
    build = (
        f'zencoder_collector_build_info{{python_version="{platform.python_version()}",'
        f'version="{__version__}"}}'
    )
    assert values[build] == 1


def test_registries_are_independent() -> None:
    """Two Metrics instances share no state (no global registry)."""
    first, second = Metrics(), Metrics()
    first.fetches.inc(tenant="acme")
    assert 'tenant="acme"' not in second.render()


def test_a_duplicate_metric_name_is_rejected() -> None:
    """Registering a second family under an existing name fails instead of exporting both."""
    metrics = Metrics()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.registry.register(Metric(PREFIX + "up", "gauge", "Again.", ()))


def test_metrics_are_labelled_by_tenant_and_sink_only() -> None:
    """Every family of the collector declares tenant, sink (the API requests also their bounded
    outcome) or no label; build_info alone carries its version labels."""
    metrics = Metrics()
    allowed = ((), ("tenant",), ("sink",), ("tenant", "outcome"))
    for family in metrics.families():
        assert family.labels in allowed, family.name
    metrics.start_series(tenants=["acme"], sinks=["hook"])
    metrics.api_requests.inc(tenant="acme", outcome="ok")
    metrics.fetch_latency.observe(1.0)
    for family in text_string_to_metric_families(metrics.render()):
        if family.name.startswith(PREFIX) and family.name != PREFIX + "build_info":
            for sample in family.samples:
                assert set(sample.labels) <= {"tenant", "sink", "outcome", "le"}, sample


def test_forget_tenant_removes_only_that_tenant() -> None:
    """A tenant removed by a reload disappears from every family; others stay."""
    metrics = Metrics()
    metrics.fetches.inc(tenant="gone")
    metrics.fetches.inc(tenant="stays")
    metrics.days_complete.set(4, tenant="gone")
    metrics.api_requests.inc(tenant="gone", outcome="rate_limited")
    metrics.forget_tenant("gone")
    text = metrics.render()
    assert 'tenant="gone"' not in text
    assert samples(text)['zencoder_collector_fetches_total{tenant="stays"}'] == 1


def test_series_names_cover_every_sample_a_query_can_select() -> None:
    """The names queries may select: counters with _total, histogram parts, gauges as exposed."""
    names = series_names(Metrics())
    assert "zencoder_collector_fetches_total" in names
    assert "zencoder_collector_fetch_duration_seconds_bucket" in names
    assert "zencoder_collector_build_info" in names
    assert "process_resident_memory_bytes" in names
    assert "zencoder_collector_fetches" not in names


def test_every_metric_is_documented_in_operations_md() -> None:
    """docs/operations.md names every exported metric with its type, and no metric that is gone."""
    doc = OPERATIONS_DOC.read_text(encoding="utf-8")
    families = exported(Metrics())
    for name, kind in families.items():
        row = re.search(rf"^\| `{name}` \| {kind} \|", doc, re.MULTILINE)
        assert row, f"{name} ({kind}) is not in the metrics tables of docs/operations.md"
    rows = r"^\| `((?:zencoder_collector|process)_\w+)` \|"
    documented = set(re.findall(rows, doc, re.MULTILINE))
    assert documented == set(families)


def test_api_outcomes_cover_every_outcome_the_client_counts() -> None:
    """Every outcome the API client can record for a response or a failure is pre-exported."""
    from collector.client import _status_outcome  # the client's own status classification

    statuses = (200, 204, 301, 400, 401, 403, 404, 429, 500, 502, 503)
    assert {_status_outcome(s) for s in statuses} | {"timeout", "transport_error"} == set(
        API_OUTCOMES
    )
