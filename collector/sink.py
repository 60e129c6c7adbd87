"""The sink contract: what a first- or third-party sink implements, and what the host promises it.

A sink is a class with

- ``type_name``: the ``type:`` users write in the config (``sqlite``, ``csv``, ``s3``, ...);
- ``Config``: a pydantic model (subclass of :class:`SinkConfig`) validated before any network call;
- ``__init__(self, name, config)``: cheap, no I/O; ``name`` is the instance name from the config;
- ``async open()``: connect, create tables, check the target exists (optional);
- ``async write(batch)``: store every tenant-day of the batch, idempotently on (tenant, day);
- ``async aclose()``: release everything, flush nothing new;
- ``async ping()``: optional health probe used by ``validate --check`` and ``/readyz``.

The host sets ``sink.host`` (a :class:`SinkHost`) after creating the instance and before
``open()``: settings of the whole collector a sink should honour, such as the mode of the files it
creates (``host.shared_group``, see :mod:`collector.files`).

The host promises: ``write`` is never called concurrently on one instance; every call runs under
the instance's ``timeout``; the batch already has the instance's PII policy applied; a raise of
:class:`~collector.errors.SinkTransientError` (or any unexpected exception) is retried with backoff,
:class:`~collector.errors.SinkPermanentError` dead-letters the batch at once. Blocking code belongs
in :func:`run_blocking` (a bounded pool of worker threads), never on the event loop.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, ParamSpec, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from collector.concurrency import run_sync
from collector.models import Batch

P = ParamSpec("P")
R = TypeVar("R")

PiiMode = Literal["keep", "pseudonymize", "drop"]


class SinkConfig(BaseModel):
    """Settings every sink instance accepts; a sink's own ``Config`` subclasses this."""

    # Errors never echo their input: a sink config holds secrets (pii_key, URLs, webhook secrets).
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    type: str = Field(
        description="The sink type, as registered by a plugin (sqlite, csv, s3, webhook, ...)."
    )
    pii: PiiMode = Field(
        default="keep",
        description="keep: emails as the API gives them; pseudonymize: keyed HMAC-SHA256 "
        "pseudonyms; "
        "drop: no per-user rows at all.",
    )
    timeout: dt.timedelta = Field(
        default=dt.timedelta(seconds=60), description="Upper bound for one write call."
    )
    batch_size: int = Field(default=100, ge=1, le=10_000, description="Tenant-days per write call.")
    max_attempts: int = Field(
        default=8,
        ge=1,
        description="Failed deliveries of one tenant-day before it is dead-lettered.",
    )
    pii_key: SecretStr | None = Field(
        default=None,
        description="Key of the HMAC-SHA256 pseudonyms of pii: pseudonymize (or pii_key_file). "
        "Keep it stable: a new key gives every user a new pseudonym.",
    )

    @model_validator(mode="after")
    def _pseudonymize_needs_a_key(self) -> SinkConfig:
        # A pseudonym without a secret key is a plain hash, which anyone can reverse by hashing a
        # list of candidate emails, so a missing key is a config error, never a silent fallback.
        if self.pii == "pseudonymize" and (
            self.pii_key is None or not self.pii_key.get_secret_value()
        ):
            raise ValueError("pii: pseudonymize needs a non-empty pii_key (or pii_key_file)")
        return self


@dataclass(frozen=True)
class SinkHost:
    """Collector-wide settings a sink instance honours, beyond its own config."""

    shared_group: bool = False
    """``files.shared_group``: files and directories the sink creates are group-readable (0640 /
    0750) instead of owner-only (0600 / 0700); see :mod:`collector.files`."""


class Sink:
    """Base class for sinks. Subclasses set ``type_name`` and ``Config`` and implement ``write``."""

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[SinkConfig]] = SinkConfig
    host: SinkHost = SinkHost()
    """Set by the host after ``__init__`` (defaults: private files)."""

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config

    async def open(self) -> None:
        """Prepare the target (connect, create tables). Called once before the first write."""

    async def write(self, batch: Batch) -> None:
        """Store every tenant-day of ``batch``; a redelivery must replace, never duplicate."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release connections and files."""

    async def ping(self) -> None:
        """Raise a SinkError if the target is unreachable."""


async def run_blocking(func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run blocking sink code in a worker thread so the event loop keeps fetching.

    The threads are the collector's (``runtime.worker_threads``, shared with the state store). A
    call cancelled by the sink's ``timeout`` returns at once; its thread finishes on its own.
    """
    return await run_sync(functools.partial(func, *args, **kwargs), abandon_on_cancel=True)
