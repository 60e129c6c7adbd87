"""An example zencoder-collector sink: each tenant-day as one JSON-lines file.

``ROOT/TENANT/DAY.jsonl`` holds one JSON object per row of the collector's four tables, each with
a ``table`` key. A redelivery of the same tenant-day replaces its file atomically (temporary file,
fsync, ``os.replace``), which makes the sink idempotent on (tenant, day) as the contract requires.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from collector.plugin import (
    Batch,
    Sink,
    SinkConfig,
    SinkPermanentError,
    SinkTransientError,
    TenantDay,
    hookimpl,
    run_blocking,
)

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class JsonlConfig(SinkConfig):
    """Settings of a ``jsonl`` sink (plus the common ones: pii, timeout, batch_size, ...)."""

    type: Literal["jsonl"] = "jsonl"
    path: Path = Field(description="Root directory of the files; created if missing.")


def rows(td: TenantDay) -> list[dict[str, Any]]:
    """The tenant-day's rows, as the collector's data model names them."""
    key = {"tenant": td.tenant, "day": td.day.isoformat()}
    lines = [
        {
            "table": "usage_daily",
            **key,
            "active_users": td.daily.active_users,
            "messages": td.daily.messages,
            "fetched_at": td.fetched_at.isoformat(),
            "final": td.final,
        }
    ]
    lines += [
        {
            "table": "usage_daily_ide",
            **key,
            "ide_name": i.ide_name,
            "engaged_users": i.engaged_users,
        }
        for i in td.ides
    ]
    lines += [
        {
            "table": "usage_daily_language",
            **key,
            "language_name": x.language_name,
            "engaged_users": x.engaged_users,
        }
        for x in td.languages
    ]
    lines += [
        {
            "table": "usage_user_daily",
            **key,
            "user": u.user,
            "messages": u.messages,
            "last_active": u.last_active.isoformat() if u.last_active else None,
            "ides": list(u.ides),
            "languages": list(u.languages),
            "last_active_at": u.last_active_at.isoformat() if u.last_active_at else None,
        }
        for u in td.users
    ]
    return lines


class JsonlSink(Sink):
    """JSON-lines files, one per tenant and day (ROOT/TENANT/DAY.jsonl)."""

    type_name: ClassVar[str] = "jsonl"
    Config: ClassVar[type[SinkConfig]] = JsonlConfig

    def __init__(self, name: str, config: JsonlConfig) -> None:
        super().__init__(name, config)
        self.root = Path(config.path)

    async def open(self) -> None:
        await run_blocking(self._mkdir, self.root)

    async def write(self, batch: Batch) -> None:
        # Blocking file I/O runs in a worker thread so the collector keeps fetching meanwhile.
        await run_blocking(self._write, batch)

    def _mkdir(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a full disk or a file in the way may be fixed: retry later
            raise SinkTransientError(f"sink {self.name}: {error.strerror}") from None

    def _write(self, batch: Batch) -> None:
        for td in batch:
            if not _SAFE.match(td.tenant):  # never retried: this tenant id cannot be a file name
                raise SinkPermanentError(f"sink {self.name}: unsafe tenant id {td.tenant!r}")
        for td in batch:
            directory = self.root / td.tenant
            self._mkdir(directory)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(td))
            try:
                fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, directory / f"{td.day.isoformat()}.jsonl")
            except OSError as error:
                raise SinkTransientError(f"sink {self.name}: {error.strerror}") from None


@hookimpl
def collector_register_sinks() -> list[type[Sink]]:
    """Tell the collector about the sink; the entry point in pyproject.toml points here."""
    return [JsonlSink]
