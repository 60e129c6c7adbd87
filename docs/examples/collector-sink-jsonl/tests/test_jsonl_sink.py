"""The jsonl example sink: the collector's conformance suite, and its own checks."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from collector_sink_jsonl import JsonlConfig, JsonlSink

from collector.plugin_manager import SinkRegistry, make_plugin_manager
from collector.testing import SinkConformance, SinkFactory, make_batch


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, the collector's runtime (anyio's pytest plugin runs them)."""
    return "asyncio"


class TestJsonlConformance(SinkConformance):
    """Runs every test of the sink contract against JsonlSink."""

    @pytest.fixture
    def sink_factory(self, tmp_path: Path) -> SinkFactory:
        # A new, empty directory for every sink the suite builds.
        return lambda: JsonlSink("test", JsonlConfig(path=tmp_path / uuid.uuid4().hex))

    @pytest.fixture
    def broken_sink_factory(self, tmp_path: Path) -> SinkFactory:
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where the directory should be")
        return lambda: JsonlSink("test", JsonlConfig(path=blocker))

    def read_back(self, sink: Any) -> list[dict[str, Any]]:
        files = sorted(sink.root.rglob("*.jsonl"))
        return [json.loads(line) for f in files for line in f.read_text("utf-8").splitlines()]


def test_installed_through_the_entry_point() -> None:
    """After pip install, the collector finds the jsonl type through the collector.sinks group."""
    registry = SinkRegistry.from_plugin_manager(make_plugin_manager())
    assert registry.types()["jsonl"] is JsonlSink
    info = next(i for i in registry.describe() if i.type_name == "jsonl")
    assert info.distribution == "collector-sink-jsonl"


def jsonl_files(root: Path) -> list[str]:
    """The .jsonl files under root, relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jsonl"))


@pytest.mark.anyio
async def test_one_file_per_tenant_day(tmp_path: Path) -> None:
    """Each tenant-day is one file, ROOT/TENANT/DAY.jsonl, starting with its usage_daily row."""
    sink = JsonlSink("lines", JsonlConfig(path=tmp_path))
    await sink.write(make_batch(("acme", "globex"), 2))
    files = jsonl_files(tmp_path)
    assert files == [
        "acme/2025-01-15.jsonl",
        "acme/2025-01-16.jsonl",
        "globex/2025-01-15.jsonl",
        "globex/2025-01-16.jsonl",
    ]
    first = json.loads((tmp_path / files[0]).read_text("utf-8").splitlines()[0])
    assert first["table"] == "usage_daily"
