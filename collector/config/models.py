"""The configuration models: every section of the YAML file, ``extra="forbid"`` throughout.

Loading (lines, interpolation, secret files, error messages) lives in :mod:`.loader` and
:mod:`.source`; these models only say what a valid value is and compute effective per-tenant values.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)

from collector.concurrency import DEFAULT_WORKER_THREADS
from collector.config.durations import Duration
from collector.config.source import FILE_SUFFIX, SecretFileError, read_secret_file
from collector.errors import ConfigProblem
from collector.log import register_secrets
from collector.sink import SinkConfig

log = structlog.get_logger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Names Windows reserves for devices, with or without an extension ("nul", "con.txt"): a tenant id
# is a directory name in the csv sink, so the rule is the one every file system accepts.
_RESERVED_NAME = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)
TENANT_ID_RULE = (
    "1-64 letters, digits, '_', '.', '-', starting with a letter or digit, not ending with '.', "
    "not a device name (con, nul, com1, ...)"
)
# Fingerprints only need to differ when credentials differ within this process; a per-process key
# keeps them useless for guessing a weak secret offline.
_FINGERPRINT_KEY = secrets.token_bytes(32)


def tenant_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a tenant id, or None. The id names a directory (csv sink), an S3
    partition and a metric label, so it is the one rule every first-party sink accepts."""
    if not NAME_PATTERN.fullmatch(value) or value.endswith(".") or _RESERVED_NAME.fullmatch(value):
        return f"invalid tenant id {value!r}: {TENANT_ID_RULE}"
    return None


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return value.rstrip("/")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class RateLimitConfig(_Model):
    """A token bucket: ``per_second`` requests on average, at most ``burst`` at once."""

    per_second: float = Field(default=2.0, gt=0, le=100_000, description="Average requests/second.")
    burst: int = Field(default=5, ge=1, le=100_000, description="Requests allowed back to back.")


class RetryConfig(_Model):
    """Retries of transient API failures (5xx, 429, timeouts, connection errors), full jitter."""

    max_attempts: int = Field(
        default=5, ge=1, le=100, description="Tries per request, first included."
    )
    max_time: Duration = Field(
        default=dt.timedelta(seconds=60), description="Give up retrying a request after this long."
    )
    backoff_initial: Duration = Field(
        default=dt.timedelta(seconds=0.5), description="Upper bound of the first backoff."
    )
    backoff_max: Duration = Field(
        default=dt.timedelta(seconds=30), description="Upper bound of any backoff."
    )

    @field_validator("backoff_max")
    @classmethod
    def _max_not_below_initial(cls, value: dt.timedelta, info: ValidationInfo) -> dt.timedelta:
        initial = info.data.get("backoff_initial")
        if isinstance(initial, dt.timedelta) and value < initial:
            raise ValueError("backoff_max must not be smaller than backoff_initial")
        return value


class ApiConfig(_Model):
    """Where and how the Zencoder API is called."""

    base_url: str = Field(default="https://api.zencoder.ai", description="Usage API host.")
    token_url: str = Field(
        default="https://fe.zencoder.ai/oauth/token", description="OAuth2 token endpoint."
    )
    timeout: Duration = Field(
        default=dt.timedelta(seconds=30), description="Upper bound for one HTTP request."
    )
    max_concurrency: int = Field(
        default=64, ge=1, le=10_000, description="Requests in flight, all tenants together."
    )
    rate_limit: RateLimitConfig = Field(
        default_factory=RateLimitConfig, description="Default rate limit of each tenant."
    )
    global_rate_limit: RateLimitConfig | None = Field(
        default=None, description="Optional rate limit over all tenants together."
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)
    history_days: int = Field(
        default=90,
        ge=1,
        le=3650,
        description="Days the API serves, today included; older days are never requested.",
    )

    @field_validator("base_url", "token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: dt.timedelta) -> dt.timedelta:
        if value <= dt.timedelta(0):
            raise ValueError("the timeout must be greater than zero")
        return value


class ScheduleConfig(_Model):
    """When cycles run: every ``every`` or on a ``cron`` expression, plus random jitter."""

    every: Duration | None = Field(
        default=dt.timedelta(hours=1), description="Interval between cycles (not with cron)."
    )
    cron: str | None = Field(default=None, description='Cron expression, e.g. "5 * * * *" (UTC).')
    jitter: Duration = Field(
        default=dt.timedelta(minutes=5), description="Random delay added to each start."
    )

    @model_validator(mode="before")
    @classmethod
    def _every_or_cron(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("cron") is not None:
            if data.get("every") is not None:
                raise ValueError("give either every or cron, not both")
            data = {**data, "every": None}
        return data

    @field_validator("every")
    @classmethod
    def _positive_every(cls, value: dt.timedelta | None) -> dt.timedelta | None:
        if value is not None and value < dt.timedelta(seconds=1):
            raise ValueError("every must be at least 1s")
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from croniter import croniter  # only configs with a cron schedule need it (start-up cost)

        if not croniter.is_valid(value):
            raise ValueError(f"invalid cron expression {value!r}")
        return value

    @model_validator(mode="after")
    def _has_a_rhythm(self) -> ScheduleConfig:
        if self.every is None and self.cron is None:
            raise ValueError("give every (an interval) or cron (an expression)")
        return self


class CollectionConfig(_Model):
    """What to collect: how far back, which days to re-fetch, how often."""

    lookback_days: int = Field(
        default=30,
        ge=1,
        le=90,
        description="First run backfills this many days (the API keeps 90).",
    )
    settle_days: int = Field(
        default=2, ge=0, le=90, description="Recent days re-fetched every cycle until final."
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @field_validator("settle_days")
    @classmethod
    def _settle_within_lookback(cls, value: int, info: ValidationInfo) -> int:
        lookback = info.data.get("lookback_days")
        if isinstance(lookback, int) and value > lookback:
            raise ValueError(f"settle_days ({value}) cannot exceed lookback_days ({lookback})")
        return value


class StateConfig(_Model):
    """The state database: the durable record of every fetched tenant-day (the outbox)."""

    url: str = Field(
        default="sqlite:///data/state.db",
        description="sqlite:///PATH (relative to the working directory) or postgresql+psycopg://...",
    )
    password: SecretStr | None = Field(
        default=None, description="Database password put into the URL (or password_file)."
    )
    payload_retention_days: int | None = Field(
        default=None, ge=1, description="Drop raw payloads older than this; null keeps them all."
    )
    raw_pii: Literal["keep", "pseudonymize"] = Field(
        default="keep",
        description="Emails in the stored raw payloads: keep, or pseudonymize (keyed pseudonyms "
        "replace them before anything is stored; sinks then receive the pseudonyms).",
    )
    pii_key: SecretStr | None = Field(
        default=None,
        description="Key of the raw_pii: pseudonymize pseudonyms (or pii_key_file); keep it "
        "stable, or the same user gets a new pseudonym.",
    )

    replicas: bool = Field(
        default=False,
        description="Several collector processes share this PostgreSQL state and split the "
        'tenants by lease (docs/operations.md, "Several replicas"); SQLite is one process.',
    )
    lease_ttl: Duration = Field(
        default=dt.timedelta(seconds=30),
        description="replicas: how long a tenant's lease lasts without renewal (renewed every "
        "third of it); a dead replica's tenants move to the others after this.",
    )

    @model_validator(mode="after")
    def _replicas_need_postgresql(self) -> StateConfig:
        if self.replicas and not self.url.startswith("postgresql"):
            raise ValueError(
                "replicas: true needs a PostgreSQL state.url (postgresql+psycopg://...); a "
                "SQLite state is one process, guarded by its lock file (state migrate --to "
                "copies it into PostgreSQL)"
            )
        if self.lease_ttl < dt.timedelta(seconds=1):
            raise ValueError("lease_ttl must be at least 1s")
        return self

    @model_validator(mode="after")
    def _key_for_pseudonyms(self) -> StateConfig:
        if self.raw_pii == "pseudonymize" and (
            self.pii_key is None or not self.pii_key.get_secret_value()
        ):
            raise ValueError("raw_pii: pseudonymize needs a non-empty pii_key (or pii_key_file)")
        return self

    @field_validator("url")
    @classmethod
    def _supported_url(cls, value: str) -> str:
        if not (value.startswith("sqlite:///") or value.startswith("postgresql")):
            raise ValueError("expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value

    def connection_url(self) -> str:
        """The URL to connect with, ``password`` inserted (never log this)."""
        if self.password is None:
            return self.url
        parts = urlsplit(self.url)
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        secret = quote(self.password.get_secret_value(), safe="")
        return parts._replace(netloc=f"{user}:{secret}@{host}{port}").geturl()

    def secret_values(self) -> list[str]:
        """The password (from ``password`` or written inside the URL) and the ``pii_key``."""
        found = [s.get_secret_value() for s in (self.password, self.pii_key) if s is not None]
        inline = urlsplit(self.url).password
        if inline:
            found += [inline, unquote(inline)]
        return found


class RuntimeConfig(_Model):
    """How the process runs its work (changes take effect after a restart)."""

    worker_threads: int = Field(
        default=DEFAULT_WORKER_THREADS,
        ge=1,
        le=256,
        description="Worker threads for blocking work (state store SQL, file and database sinks); "
        "more calls than this wait their turn.",
    )


class ServerConfig(_Model):
    """The ops HTTP server (/healthz /readyz /metrics /status)."""

    listen: str | None = Field(
        default="127.0.0.1:9464", description="HOST:PORT to listen on; null disables the server."
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        host, sep, port = value.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9464 or [::]:9464, or null")
        return value.strip()

    @property
    def host(self) -> str | None:
        """The host part of ``listen`` (IPv6 brackets removed)."""
        return None if self.listen is None else self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int | None:
        """The port part of ``listen``."""
        return None if self.listen is None else int(self.listen.rpartition(":")[2])


class FilesConfig(_Model):
    """Modes of the files and directories the collector creates (state database, sinks, export)."""

    shared_group: bool = Field(
        default=False,
        description="false: files 0600 and directories 0700 (owner only); true: 0640 and 0750, "
        "readable by the group, for teams that share a data directory.",
    )


class TenantConfig(_Model):
    """One client organization: its credentials and optional overrides of the defaults."""

    id: str = Field(description="Stable key in every table, file and metric.")
    name: str = Field(default="", description="Display name; defaults to id.")
    client_id: str | None = Field(default=None, description="OAuth client id (with client_secret).")
    client_secret: SecretStr | None = Field(default=None, description="OAuth client secret.")
    api_key: SecretStr | None = Field(default=None, description="API key (instead of OAuth).")
    client_id_file: str | None = Field(default=None, description="Read client_id from this file.")
    client_secret_file: str | None = Field(
        default=None, description="Read client_secret from this file (re-read on rotation)."
    )
    api_key_file: str | None = Field(
        default=None, description="Read api_key from this file (re-read on rotation)."
    )
    sinks: list[str] | None = Field(
        default=None, description="Names of the sinks this tenant goes to; default: every sink."
    )
    rate_limit: RateLimitConfig | None = Field(
        default=None, description="Overrides api.rate_limit (keys not given are inherited)."
    )
    lookback_days: int | None = Field(default=None, ge=1, le=90)
    settle_days: int | None = Field(default=None, ge=0, le=90)
    schedule: ScheduleConfig | None = Field(
        default=None, description="Overrides collection.schedule (jitter inherited if not given)."
    )
    enabled: bool = Field(default=True, description="false keeps the tenant configured but idle.")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        problem = tenant_id_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("client_id", "client_secret", "api_key", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("settle_days")
    @classmethod
    def _settle_within_lookback(cls, value: int | None, info: ValidationInfo) -> int | None:
        lookback = info.data.get("lookback_days")
        if value is not None and isinstance(lookback, int) and value > lookback:
            raise ValueError(f"settle_days ({value}) cannot exceed lookback_days ({lookback})")
        return value

    @model_validator(mode="after")
    def _one_auth_mode(self) -> TenantConfig:
        oauth = self.client_id is not None or self.client_secret is not None
        if oauth and self.api_key is not None:
            raise ValueError("give either api_key or client_id + client_secret, not both")
        # An idle tenant makes no request: its secrets may be absent (not yet issued, or already
        # revoked) without failing the whole config.
        if self.enabled and self.api_key is None:
            if not oauth:
                raise ValueError(
                    "no credentials: give client_id + client_secret (OAuth) or api_key"
                )
            if self.client_id is None:
                raise ValueError("client_secret needs client_id")
            if self.client_secret is None:
                raise ValueError("client_id needs client_secret")
        if not self.name:
            self.name = self.id
        return self

    @property
    def auth_mode(self) -> Literal["oauth", "api_key"]:
        """``"api_key"`` when an API key is configured, else ``"oauth"`` (client credentials)."""
        return "api_key" if self.api_key is not None else "oauth"

    @property
    def credentials_fingerprint(self) -> str:
        """Keyed SHA-256 of the credentials: changes when any of them does (in this process)."""
        # Asked for on every request (the token cache key); the HMAC is redone only when one of
        # the credential objects was replaced (a reload or a rotated secret file assigns anew).
        # Compared by identity, and the cache holds them, so an id can never be reused.
        current = (self.client_id, self.client_secret, self.api_key)
        cached = self.__dict__.get("_fingerprint_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0], current, strict=True)):
            fingerprint: str = cached[1]
            return fingerprint
        parts = [
            self.auth_mode,
            self.client_id or "",
            self.client_secret.get_secret_value() if self.client_secret else "",
            self.api_key.get_secret_value() if self.api_key else "",
        ]
        message = "\0".join(parts).encode()
        fingerprint = hmac.new(_FINGERPRINT_KEY, message, hashlib.sha256).hexdigest()[:32]
        self.__dict__["_fingerprint_cache"] = (current, fingerprint)
        return fingerprint

    def secret_values(self) -> list[str]:
        """The tenant's secret strings (client secret, API key)."""
        return [s.get_secret_value() for s in (self.client_secret, self.api_key) if s is not None]

    def reload_secrets(self) -> bool:
        """Re-read every ``*_file`` credential; True if a value changed.

        A new secret is registered with the log redactor at once. A file that cannot be read now
        (e.g. mid-rotation) keeps the previous value and logs a warning; the next call tries
        again. Blocking, but reads a few bytes per file.
        """
        changed = False
        for key in ("client_id", "client_secret", "api_key"):
            file_path = getattr(self, key + FILE_SUFFIX)
            if not file_path:
                continue
            try:
                fresh = read_secret_file(file_path)
            except SecretFileError as exc:
                log.warning(
                    "secret file unreadable; keeping the previous value",
                    tenant=self.id,
                    error=str(exc),
                )
                continue
            current = getattr(self, key)
            current_text = current.get_secret_value() if isinstance(current, SecretStr) else current
            if fresh != current_text:
                if key != "client_id":
                    register_secrets([fresh])  # hidden in logs before anything can print it
                setattr(self, key, fresh if key == "client_id" else SecretStr(fresh))
                changed = True
        return changed


class GenericSinkConfig(SinkConfig):
    """A sink validated without its plugin: base keys checked, the rest kept in ``model_extra``."""

    model_config = ConfigDict(extra="allow")


class AppConfig(_Model):
    """The whole configuration file."""

    api: ApiConfig = Field(default_factory=ApiConfig)
    collection: CollectionConfig = Field(default_factory=CollectionConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    sinks: dict[str, SerializeAsAny[SinkConfig]] = Field(
        default_factory=dict, description="Sink instances by name; the name is the routing key."
    )
    tenants: list[TenantConfig] = Field(default_factory=list)
    _warnings: list[ConfigProblem] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[ConfigProblem]:
        """What the loader found doubtful but not wrong (e.g. two tenants with one set of
        credentials): logged at start and by ``validate``, never a reason to refuse the file."""
        return self._warnings

    @property
    def enabled_tenants(self) -> list[TenantConfig]:
        """Tenants with ``enabled: true``."""
        return [t for t in self.tenants if t.enabled]

    def tenant(self, tenant_id: str) -> TenantConfig:
        """The tenant with this id; KeyError if there is none."""
        for tenant in self.tenants:
            if tenant.id == tenant_id:
                return tenant
        raise KeyError(tenant_id)

    @model_validator(mode="after")
    def _tenant_rate_limits_inherit(self) -> AppConfig:
        # Every consumer (the API client reads ``tenant.rate_limit``) must see the effective
        # limit: a partial override is completed here, once, from ``api.rate_limit``. A copy,
        # not an assignment: a TenantConfig instance may be shared with another AppConfig.
        if any(t.rate_limit is not None for t in self.tenants):
            self.tenants = [
                t
                if t.rate_limit is None
                else t.model_copy(update={"rate_limit": self.tenant_rate_limit(t)})
                for t in self.tenants
            ]
        return self

    def tenant_rate_limit(self, tenant: TenantConfig) -> RateLimitConfig:
        """The tenant's rate limit: its own keys over ``api.rate_limit``."""
        if tenant.rate_limit is None:
            return self.api.rate_limit
        own = {k: getattr(tenant.rate_limit, k) for k in tenant.rate_limit.model_fields_set}
        return self.api.rate_limit.model_copy(update=own)

    def tenant_lookback(self, tenant: TenantConfig) -> int:
        """Days the tenant's window reaches back."""
        return tenant.lookback_days or self.collection.lookback_days

    def tenant_settle(self, tenant: TenantConfig) -> int:
        """Recent days re-fetched each cycle for the tenant (never more than its lookback)."""
        settle = self.collection.settle_days if tenant.settle_days is None else tenant.settle_days
        return min(settle, self.tenant_lookback(tenant))

    def tenant_schedule(self, tenant: TenantConfig) -> ScheduleConfig:
        """The tenant's schedule: its every/cron if given, its jitter if given, else the default."""
        base, own = self.collection.schedule, tenant.schedule
        if own is None:
            return base
        given = own.model_fields_set
        rhythm = own if {"every", "cron"} & given else base
        jitter = own.jitter if "jitter" in given else base.jitter
        return ScheduleConfig.model_construct(every=rhythm.every, cron=rhythm.cron, jitter=jitter)

    def tenant_sinks(self, tenant: TenantConfig) -> list[str]:
        """Names of the sinks the tenant's data goes to."""
        return list(self.sinks) if tenant.sinks is None else list(tenant.sinks)

    def secret_values(self) -> list[str]:
        """Every secret string in the config, for log redaction and canary tests."""
        found: list[str] = []
        for tenant in self.tenants:
            found += tenant.secret_values()
        found += self.state.secret_values()
        for sink in self.sinks.values():
            found += _secrets_in(sink)
        return list(dict.fromkeys(s for s in found if s))


def _secrets_in(value: object) -> list[str]:
    if isinstance(value, SecretStr):
        return [value.get_secret_value()]
    if isinstance(value, BaseModel):
        items = [getattr(value, name) for name in type(value).model_fields]
        return [
            s for item in [*items, *(value.model_extra or {}).values()] for s in _secrets_in(item)
        ]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _secrets_in(item)]
    if isinstance(value, list | tuple | set):
        return [s for item in value for s in _secrets_in(item)]
    return []
