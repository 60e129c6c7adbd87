"""Every error the collector raises on purpose, in one hierarchy.

Callers decide what to do by class, never by parsing messages::

    CollectorError
    ├── ConfigError                 the config could not be loaded (lists every problem)
    ├── ApiError                    talking to the Zencoder API failed, for one tenant
    │   ├── TransientApiError       worth retrying later (retryable = True)
    │   │   ├── TransportError      refused/reset, DNS, TLS: the request may not have arrived
    │   │   │   └── ApiTimeout      no complete answer within the configured timeout
    │   │   ├── ServerError         5xx, e.g. 500 "Failed to fetch data"
    │   │   ├── RateLimited         429 (or 503) with an optional Retry-After, in seconds
    │   │   └── BadResponse         a 200 that is not the documented payload (HTML, bad JSON)
    │   └── PermanentApiError       retrying the same request cannot help (retryable = False)
    │       ├── AuthError           credentials rejected (token endpoint) or 401 after one refresh
    │       └── RequestRejected     any other 4xx, carrying the API's own message
    ├── SinkError                   a sink could not store a batch
    │   ├── SinkTransientError      try again later (down, timeout, 5xx)
    │   └── SinkPermanentError      this batch will never be accepted: dead-letter it at once
    └── StoreError                  the state database failed

No aiohttp, botocore or sqlite exception crosses a module boundary: the client, the sinks and the
store translate them into these. Messages never contain secrets: they are built from status codes,
scrubbed API messages and tenant ids, and as a last line of defence every API and sink error
message passes the log redactor (registered secrets, access tokens, credential shapes) when the
exception is created, so no exception text can carry one into the state store or ``status``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


def _redact(message: str) -> str:
    # Imported here: the CLI parser imports this module and must not pull in structlog.
    from collector.log import redact

    return redact(message)


class CollectorError(Exception):
    """Base of every error raised on purpose by the collector."""

    retryable: ClassVar[bool] = False


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config file, located by file, line and dotted path."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        line = "?" if self.line is None else str(self.line)
        path = self.path or "<root>"
        return f"{self.file}:{line}: {path}: {self.message}"


class ConfigError(CollectorError):
    """The config could not be loaded; ``problems`` lists every problem, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ApiError(CollectorError):
    """Something went wrong talking to the Zencoder API on behalf of one tenant."""

    def __init__(
        self, message: str, *, tenant: str | None = None, status: int | None = None
    ) -> None:
        self.tenant = tenant
        self.status = status
        super().__init__(_redact(message))

    @property
    def reason(self) -> str:
        """A short, secret-free reason suitable for the state store and ``status``."""
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{type(self).__name__}: {prefix}{self.args[0]}"


class TransientApiError(ApiError):
    """A failure that may go away: retried with backoff, and the day is re-planned later."""

    retryable = True


class TransportError(TransientApiError):
    """The request failed below HTTP (connection refused or reset, DNS, TLS)."""


class ApiTimeout(TransportError):
    """No complete response arrived within the configured timeout."""


class ServerError(TransientApiError):
    """The API answered 5xx."""


class RateLimited(TransientApiError):
    """The API answered 429 (or 503 with Retry-After); ``retry_after`` is in seconds, if given."""

    def __init__(
        self,
        message: str,
        *,
        tenant: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, tenant=tenant, status=status)
        self.retry_after = retry_after


class BadResponse(TransientApiError):
    """A 2xx response that is not the documented payload; no record is derived from it.

    ``body`` is the 200 body as received, when there is one: the day is quarantined with it
    (kept for ``reprocess``). Never part of the message (user rows hold emails).
    """

    body: bytes | None = None


class PermanentApiError(ApiError):
    """Retrying the same request cannot help."""

    retryable = False


class AuthError(PermanentApiError):
    """The tenant's credentials were rejected, or a fresh token was refused with 401."""


class RequestRejected(PermanentApiError):
    """A 4xx other than 401/429: the API's own message says why."""


class SinkError(CollectorError):
    """A sink could not store a batch."""

    def __init__(self, message: object = "", *args: object) -> None:
        # Plugins may pass anything; only text can carry a secret.
        super().__init__(_redact(message) if isinstance(message, str) else message, *args)


class SinkTransientError(SinkError):
    """The sink may accept the batch later (down, timeout, 5xx, throttled)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkPermanentError(SinkError):
    """The sink will never accept this batch as it is; it goes to that sink's dead-letter."""


class StoreError(CollectorError):
    """The state database failed."""
