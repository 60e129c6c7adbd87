"""The ``s3`` sink: one object per table per tenant-day in an S3 bucket (or an S3-compatible store).

Keys are Hive-style partitions, deterministic in (table, tenant, day)::

    {prefix}{table}/tenant={tenant}/day={YYYY-MM-DD}/part-0.ndjson[.gz]   (or .csv[.gz])

so a redelivery of a tenant-day overwrites its four objects instead of adding new ones, and query
engines (Athena, Trino, Spark, DuckDB) read ``tenant`` and ``day`` as partition columns.

Credentials come from the standard AWS chain (environment, shared config and credentials files,
SSO, web identity, container and instance metadata) unless ``aws_access_key_id`` and
``aws_secret_access_key`` are both set, for S3-compatible stores that have no chain.

Needs the ``s3`` extra (``pip install 'zencoder-collector[s3]'``): importing this module without
aiobotocore fails, and the plugin manager reports the sink as unavailable, naming the extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, ClassVar, Final, Literal

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from collector.plugin import (
    Batch,
    Sink,
    SinkConfig,
    SinkError,
    SinkPermanentError,
    SinkTransientError,
    TenantDay,
    hookimpl,
)
from collector_sinks import _serialize as ser

# aiobotocore (with botocore's client machinery) takes about a quarter of a second to import, so it
# is imported when a config with an s3 sink is validated (see S3SinkConfig), not whenever the
# plugin manager loads this module. Without it this module must still fail to import, naming the
# missing package, so the plugin manager reports the sink as unavailable with the extra to install.
if importlib.util.find_spec("aiobotocore") is None:
    raise ModuleNotFoundError("No module named 'aiobotocore'", name="aiobotocore")

# Error codes that retrying cannot fix, with what the operator should check (S3's own messages
# can be terse, and we never echo request details that could carry credentials).
_PERMANENT_CODES: Final[dict[str, str]] = {
    "NoSuchBucket": "the bucket does not exist (check `bucket`, `endpoint_url` and `region`)",
    "404": "the bucket does not exist (check `bucket`, `endpoint_url` and `region`)",
    "AccessDenied": "access denied: the credentials need s3:PutObject on the prefix "
    "(and kms:GenerateDataKey for aws:kms encryption)",
    "403": "access denied: the credentials need s3:ListBucket (for the health check) and "
    "s3:PutObject on the prefix",
    "AllAccessDisabled": "all access to this bucket has been disabled",
    "AccountProblem": "the AWS account has a problem that prevents the operation",
    "InvalidAccessKeyId": "the access key id is not known to the store (check the credentials)",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "InvalidBucketName": "the bucket name is not valid",
    "PermanentRedirect": "the bucket lives in another region or endpoint (set `region`)",
    "301": "the bucket lives in another region or endpoint (set `region`)",
    "AuthorizationHeaderMalformed": "the bucket lives in another region (set `region`)",
    "InvalidArgument": "the store rejected a request argument (check `sse` and `sse_kms_key_id`)",
    "InvalidRequest": "the store rejected the request (check `sse` and `sse_kms_key_id`)",
    "NotImplemented": "the store does not implement a requested feature (for example `sse`)",
    "KMS.NotFoundException": "the KMS key in `sse_kms_key_id` does not exist",
    "KMS.DisabledException": "the KMS key in `sse_kms_key_id` is disabled",
}
_TRANSIENT_CODES: Final[frozenset[str]] = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
        "ExpiredToken",
        "TokenRefreshRequired",
    }
)
_MAX_REMOTE_MESSAGE: Final = 300

# Characters Hive escapes in partition values, so a tenant id can never add a path level.
_HIVE_ESCAPED: Final = frozenset("\"#%'*/:=?\\\x7f{[]^") | {chr(c) for c in range(0x20)}

_CONTENT_TYPES: Final[dict[str, str]] = {
    "ndjson": "application/x-ndjson; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
}


class S3SinkConfig(SinkConfig):
    """Settings of one ``s3`` sink instance."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    type: Literal["s3"] = "s3"
    bucket: str = Field(min_length=1, max_length=255, description="Target bucket name.")
    prefix: str = Field(
        default="",
        description="Key prefix, treated as a folder: `zencoder` and `zencoder/` both give "
        "`zencoder/usage_daily/...`.",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (MinIO, Ceph, R2, ...); "
        "default: AWS S3 for the region.",
    )
    region: str | None = Field(
        default=None, description="AWS region; default: from the AWS environment/config files."
    )
    aws_access_key_id: SecretStr | None = Field(
        default=None,
        description="Static access key id, only for stores without a credential chain; "
        "set together with aws_secret_access_key. Default: the standard AWS credential chain.",
    )
    aws_secret_access_key: SecretStr | None = Field(
        default=None, description="Static secret access key (see aws_access_key_id)."
    )
    addressing_style: Literal["auto", "virtual", "path"] = Field(
        default="auto",
        description="Bucket addressing; many S3-compatible stores (MinIO) need `path`.",
    )
    format: Literal["ndjson", "csv"] = Field(
        default="ndjson", description="Object format: newline-delimited JSON or CSV with header."
    )
    csv_formula_guard: bool = Field(
        default=True,
        description="format: csv only: prefix ' to text cells starting with =, +, -, @, tab or "
        "carriage return, so spreadsheets show them as text instead of running them as "
        "formulas; turn off only for machine consumers that need the exact text.",
    )
    gzip: bool = Field(default=False, description="Gzip each object (key gets a .gz suffix).")
    sse: Literal["none", "AES256", "aws:kms"] = Field(
        default="none",
        description="Server-side encryption requested on each PUT (none: the bucket default).",
    )
    sse_kms_key_id: str | None = Field(
        default=None, description="KMS key id or ARN for sse: aws:kms (default: the AWS key)."
    )
    request_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Attempts per S3 request inside one write (botocore standard retry mode); "
        "after that the write fails and the collector retries the batch later.",
    )
    max_concurrency: int = Field(
        default=8, ge=1, le=64, description="PUT requests in flight at once during one write."
    )

    @field_validator("prefix")
    @classmethod
    def _prefix_is_a_folder(cls, value: str) -> str:
        value = value.lstrip("/")
        return value if not value or value.endswith("/") else value + "/"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("endpoint_url must start with http:// or https://")
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket_is_one_name(cls, value: str) -> str:
        if "/" in value or value != value.strip():
            raise ValueError("bucket is a bucket name only; put folders in `prefix`")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> S3SinkConfig:
        if (self.aws_access_key_id is None) != (self.aws_secret_access_key is None):
            raise ValueError(
                "aws_access_key_id and aws_secret_access_key go together "
                "(or leave both out to use the AWS credential chain)"
            )
        if self.sse_kms_key_id is not None and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id needs sse: aws:kms")
        return self

    @model_validator(mode="after")
    def _client_library_imports(self) -> S3SinkConfig:
        # A configured s3 sink needs aiobotocore: an install where it is present but cannot be
        # imported is refused with the config, as when this module imported it at the top.
        try:
            importlib.import_module("aiobotocore.session")
        except ImportError as exc:
            raise ValueError(
                f"sink type 's3' is not available: {type(exc).__name__}: {exc}; "
                "to fix: pip install 'zencoder-collector[s3]'"
            ) from None
        return self


_shared: dict[str, Any] = {}


def _new_session() -> Any:
    """A new aiobotocore session that shares one data loader with every other S3 sink instance.

    Parsing botocore's S3 service model takes a noticeable fraction of a second; the loader caches
    it, so sharing the loader makes every later client (more sinks, a config reload) cheap.
    """
    from aiobotocore.session import get_session

    session = get_session()
    loader = _shared.setdefault("data_loader", session.get_component("data_loader"))
    session.register_component("data_loader", loader)
    return session


def partition_value(value: str) -> str:
    """Escape a partition value the way Hive does (``%XX``), so it stays one path segment."""
    return "".join(f"%{ord(ch):02X}" if ch in _HIVE_ESCAPED else ch for ch in value)


class S3Sink(Sink):
    """Writes each tenant-day as four objects (one per table) under Hive-style partition keys."""

    type_name: ClassVar[str] = "s3"
    Config: ClassVar[type[SinkConfig]] = S3SinkConfig

    def __init__(self, name: str, config: S3SinkConfig) -> None:
        super().__init__(name, config)
        self.config: S3SinkConfig = config
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    # --- keys and bodies ----------------------------------------------------------------------

    def object_key(self, table: str, tenant: str, day: str) -> str:
        """The key of one table's object for one tenant-day."""
        suffix = ".gz" if self.config.gzip else ""
        return (
            f"{self.config.prefix}{table}/tenant={partition_value(tenant)}/day={day}/"
            f"part-0.{self.config.format}{suffix}"
        )

    def _objects(self, day: TenantDay) -> list[tuple[str, bytes]]:
        rows = ser.table_rows(day)
        tables = ser.TABLES
        if self.config.pii == "drop":
            # Under `drop` there is no per-user table at all, not an empty one per day.
            tables = tuple(t for t in tables if t != ser.USAGE_USER_DAILY)
        objects = []
        for table in tables:
            if self.config.format == "csv":
                body = ser.to_csv(table, rows[table], formula_guard=self.config.csv_formula_guard)
            else:
                body = ser.to_ndjson(rows[table])
            if self.config.gzip:
                body = ser.gzip_bytes(body)
            objects.append((self.object_key(table, day.tenant, day.day.isoformat()), body))
        return objects

    def _put_arguments(self, day: TenantDay) -> dict[str, Any]:
        arguments: dict[str, Any] = {
            "Bucket": self.config.bucket,
            "ContentType": "application/gzip"
            if self.config.gzip
            else _CONTENT_TYPES[self.config.format],
            # ASCII-only metadata (S3 sends it as headers); lets readers skip unchanged days.
            "Metadata": {"content-hash": day.content_hash, "final": str(day.final).lower()},
        }
        if self.config.sse != "none":
            arguments["ServerSideEncryption"] = self.config.sse
            if self.config.sse_kms_key_id is not None:
                arguments["SSEKMSKeyId"] = self.config.sse_kms_key_id
        return arguments

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the S3 client (no network call; credentials resolve on the first request)."""
        if self._client is not None:
            return
        from aiobotocore.config import AioConfig  # imported by S3SinkConfig's validation

        cfg = self.config
        timeout = cfg.timeout.total_seconds()
        client_config = AioConfig(
            connect_timeout=min(10.0, timeout),
            read_timeout=timeout,
            retries={"mode": "standard", "total_max_attempts": cfg.request_attempts},
            s3={"addressing_style": cfg.addressing_style},
            max_pool_connections=cfg.max_concurrency,
            warm_up_loader_caches=True,  # loads botocore's JSON models in a thread, not the loop
        )
        credentials: dict[str, str] = {}
        if cfg.aws_access_key_id is not None and cfg.aws_secret_access_key is not None:
            credentials = {
                "aws_access_key_id": cfg.aws_access_key_id.get_secret_value(),
                "aws_secret_access_key": cfg.aws_secret_access_key.get_secret_value(),
            }
        stack = contextlib.AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                _new_session().create_client(
                    "s3",
                    region_name=cfg.region,
                    endpoint_url=cfg.endpoint_url,
                    config=client_config,
                    **credentials,
                )
            )
        except (BotoCoreError, ValueError) as exc:
            await stack.aclose()
            raise SinkPermanentError(
                f"s3 sink {self.name!r}: cannot create the S3 client: {type(exc).__name__}: "
                f"{self._scrub(str(exc))[:_MAX_REMOTE_MESSAGE]}"
            ) from None
        self._stack = stack

    async def aclose(self) -> None:
        """Close the client and its connection pool; safe to call twice."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def ping(self) -> None:
        """Check that the bucket exists and the credentials may use it (HeadBucket)."""
        await self.open()
        await self._call(
            "HeadBucket", "", lambda: self._client.head_bucket(Bucket=self.config.bucket)
        )

    # --- writing --------------------------------------------------------------------------------

    async def write(self, batch: Batch) -> None:
        """PUT the four objects of every tenant-day; a redelivery overwrites the same keys."""
        if not batch:
            return
        await self.open()
        # If one batch carries a tenant-day twice, the later one wins (two concurrent PUTs of one
        # key would race).
        latest = {(day.tenant, day.day): day for day in batch}
        limit = asyncio.Semaphore(self.config.max_concurrency)

        async def put(key: str, body: bytes, arguments: dict[str, Any]) -> None:
            async with limit:
                await self._call(
                    "PutObject",
                    key,
                    lambda: self._client.put_object(Key=key, Body=body, **arguments),
                )

        puts = [
            put(key, body, self._put_arguments(day))
            for day in latest.values()
            for key, body in self._objects(day)
        ]
        results = await asyncio.gather(*puts, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return
        # A permanent failure decides the batch (retrying cannot fix it); otherwise retry later.
        for failure in failures:
            if isinstance(failure, SinkPermanentError):
                raise failure
        for failure in failures:
            if isinstance(failure, SinkError):
                raise failure
        raise failures[0]

    async def _call(self, operation: str, key: str, request: Callable[[], Awaitable[Any]]) -> Any:
        """Run one S3 request, translating every botocore/aiohttp failure into a SinkError."""
        import aiohttp  # aiobotocore has imported it; the module stays light

        where = f"s3://{self.config.bucket}/{key}"
        try:
            return await request()
        except ClientError as exc:
            raise self._client_error(operation, where, exc) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise SinkPermanentError(
                f"s3 sink {self.name!r}: {operation} {where}: no usable AWS credentials were found "
                "in the credential chain (environment, config files, instance/container role)"
            ) from None
        except (
            BotoConnectionError,
            HTTPClientError,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ) as exc:
            raise SinkTransientError(
                f"s3 sink {self.name!r}: {operation} {where}: connection failed or timed out "
                f"({type(exc).__name__})"
            ) from None
        except BotoCoreError as exc:
            raise SinkTransientError(
                f"s3 sink {self.name!r}: {operation} {where}: {type(exc).__name__}"
            ) from None

    def _scrub(self, text: str) -> str:
        # The store's own message is shown for unknown errors; never let it echo our keys.
        for secret in (self.config.aws_access_key_id, self.config.aws_secret_access_key):
            if secret is not None and secret.get_secret_value():
                text = text.replace(secret.get_secret_value(), "***")
        return text

    def _client_error(self, operation: str, where: str, exc: ClientError) -> SinkError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        head = f"s3 sink {self.name!r}: {operation} {where}: {code} (HTTP {status})"
        if code in _PERMANENT_CODES:
            return SinkPermanentError(f"{head}: {_PERMANENT_CODES[code]}")
        if code in _TRANSIENT_CODES or status is None or status >= 500 or status in (408, 429):
            return SinkTransientError(f"{head}: the store may accept it later")
        remote = self._scrub(str(error.get("Message", "")))[:_MAX_REMOTE_MESSAGE]
        return SinkPermanentError(f"{head}: {remote}" if remote else head)


@hookimpl
def collector_register_sinks() -> list[type[Sink]]:
    """Register the ``s3`` sink type."""
    return [S3Sink]


# --- tenant purge (``zencoder-collector tenant purge``) ----------------------------------------


@hookimpl
def collector_sink_purge(sink: Sink, tenant: str) -> Awaitable[int] | None:
    """Delete every object under the tenant's partitions of an s3 sink; None for other sinks."""
    if not isinstance(sink, S3Sink):
        return None
    return _purge_tenant_objects(sink, tenant)


async def _purge_tenant_objects(sink: S3Sink, tenant: str) -> int:
    """List and delete ``{prefix}{table}/tenant={tenant}/`` for each table, 1,000 keys per request
    (the DeleteObjects limit); returns the number of objects deleted."""
    await sink.open()
    client, bucket = sink._client, sink.config.bucket
    deleted = 0
    for table in ser.TABLES:
        prefix = f"{sink.config.prefix}{table}/tenant={partition_value(tenant)}/"
        token: str | None = None
        while True:
            paging = {"ContinuationToken": token} if token else {}
            page = await sink._call(
                "ListObjectsV2",
                prefix,
                partial(
                    client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1000, **paging
                ),
            )
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                answer = await sink._call(
                    "DeleteObjects",
                    prefix,
                    partial(client.delete_objects, Bucket=bucket, Delete={"Objects": keys}),
                )
                errors = answer.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise SinkTransientError(
                        f"s3 sink {sink.name!r}: DeleteObjects s3://{bucket}/{prefix}: "
                        f"{len(errors)} object(s) not deleted, e.g. {first.get('Code')}"
                    )
                deleted += len(keys)
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
    return deleted
