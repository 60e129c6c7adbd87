"""Shared by the metrics and deploy tests: what the collector's registry exposes, by name."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from collector.metrics import Metrics

# The sample names a family of each type exposes (PromQL selects these, not the family name).
_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def exported(metrics: Metrics) -> dict[str, str]:
    """Each family the registry exports, as its exposed name (``*_total``, ``*_info``) and type.

    The ``*_created`` gauge that the text format adds beside the histogram (its start time)
    belongs to the histogram and is not listed on its own."""
    families = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in text_string_to_metric_families(metrics.render())
    }
    return {
        name: kind
        for name, kind in families.items()
        if not (name.endswith("_created") and families.get(name[: -len("_created")]) == "histogram")
    }


def series_names(metrics: Metrics) -> set[str]:
    """Every sample name a PromQL query can select (``_bucket``, ``_sum``... included)."""
    names: set[str] = set()
    for name, kind in exported(metrics).items():
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + suffix for suffix in _SERIES_SUFFIXES.get(kind, ("",)))
    return names
