"""The s3 sink against moto's standalone S3 server and a scripted S3 error endpoint."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from collector.errors import SinkPermanentError, SinkTransientError
from collector.plugin_manager import SinkRegistry, make_plugin_manager
from collector.sink import Sink
from collector.testing import SinkConformance, make_tenant_day
from collector_sinks import s3 as s3_module
from collector_sinks.csv import render_tables
from collector_sinks.s3 import S3Sink, S3SinkConfig, partition_value
from tests.e2e import run_python
from tests.servers import (
    MOTO_CREDENTIALS,
    S3ErrorServer,
    closed_port_url,
    list_keys,
    running_moto_s3,
    s3_admin_client,
    sample_day,
)

DAY = dt.date(2024, 5, 6)
TABLES = ("usage_daily", "usage_daily_ide", "usage_daily_language", "usage_user_daily")


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with running_moto_s3() as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The standard credential chain finds moto's fake keys in the environment, nothing else."""
    for name, value in MOTO_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def admin(moto_endpoint: str) -> Any:
    return s3_admin_client(moto_endpoint)


@pytest.fixture
def bucket(admin: Any) -> str:
    name = f"usage-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=name)
    return name


def make_config(endpoint: str, bucket: str, **settings: Any) -> S3SinkConfig:
    return S3SinkConfig.model_validate(
        {"type": "s3", "bucket": bucket, "endpoint_url": endpoint, "region": "us-east-1"} | settings
    )


@pytest.fixture
async def sink_factory(moto_endpoint: str, bucket: str) -> AsyncIterator[Any]:
    opened: list[S3Sink] = []

    async def make(**settings: Any) -> S3Sink:
        sink = S3Sink("lake", make_config(moto_endpoint, bucket, **settings))
        await sink.open()
        opened.append(sink)
        return sink

    yield make
    for sink in opened:
        await sink.aclose()


def read_object(admin: Any, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
    obj = admin.get_object(Bucket=bucket, Key=key)
    return obj["Body"].read(), obj


def ndjson(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def expected_user_rows(tenant: str = "acme") -> list[dict[str, Any]]:
    """The user rows sample_day's default users should produce, written out by hand."""
    return [
        {"tenant": tenant, "day": "2024-05-06", "user": "ada@acme.example", "messages": 30,
         "last_active": "2024-05-06", "ides": ["vscode", "jetbrains"],
         "languages": ["python", "go"], "last_active_at": None},
        {"tenant": tenant, "day": "2024-05-06", "user": "bob@acme.example", "messages": 12,
         "last_active": None, "ides": ["vscode"], "languages": [], "last_active_at": None},
    ]  # fmt: skip


async def test_writes_one_object_per_table_under_hive_keys(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """One tenant-day becomes exactly four objects at deterministic Hive-style keys."""
    sink = await sink_factory(prefix="zencoder")
    await sink.write([sample_day()])
    assert list_keys(admin, bucket) == sorted(
        f"zencoder/{table}/tenant=acme/day=2024-05-06/part-0.ndjson" for table in TABLES
    )


async def test_ndjson_objects_hold_the_rows(sink_factory: Any, admin: Any, bucket: str) -> None:
    """Each NDJSON object holds its table's rows with every column, and the right content type."""
    sink = await sink_factory()
    await sink.write([sample_day()])
    prefix = "{}/tenant=acme/day=2024-05-06/part-0.ndjson"
    daily, obj = read_object(admin, bucket, prefix.format("usage_daily"))
    assert obj["ContentType"].startswith("application/x-ndjson")
    assert ndjson(daily) == [
        {"tenant": "acme", "day": "2024-05-06", "active_users": 2, "messages": 42,
         "fetched_at": "2024-05-07T03:00:00+00:00", "final": True}
    ]  # fmt: skip
    ides, _ = read_object(admin, bucket, prefix.format("usage_daily_ide"))
    assert ndjson(ides) == [
        {"tenant": "acme", "day": "2024-05-06", "ide_name": "vscode", "engaged_users": 2},
        {"tenant": "acme", "day": "2024-05-06", "ide_name": "jetbrains", "engaged_users": 1},
    ]
    languages, _ = read_object(admin, bucket, prefix.format("usage_daily_language"))
    assert ndjson(languages) == [
        {"tenant": "acme", "day": "2024-05-06", "language_name": "python", "engaged_users": 1}
    ]
    users, _ = read_object(admin, bucket, prefix.format("usage_user_daily"))
    assert ndjson(users) == expected_user_rows()
    assert obj["Metadata"]["final"] == "true"
    assert obj["Metadata"]["content-hash"] == sample_day().content_hash


async def test_csv_gzip_objects_round_trip(sink_factory: Any, admin: Any, bucket: str) -> None:
    """With format csv and gzip, objects are gzipped CSV with a header and .csv.gz keys."""
    sink = await sink_factory(format="csv", gzip=True)
    await sink.write([sample_day()])
    keys = list_keys(admin, bucket)
    assert len(keys) == 4
    assert all(key.endswith("/part-0.csv.gz") for key in keys)
    data, obj = read_object(
        admin, bucket, "usage_user_daily/tenant=acme/day=2024-05-06/part-0.csv.gz"
    )
    assert obj["ContentType"] == "application/gzip"
    rows = list(csv.DictReader(io.StringIO(gzip.decompress(data).decode("utf-8"))))
    assert rows == [
        {"tenant": "acme", "day": "2024-05-06", "user": "ada@acme.example", "messages": "30",
         "last_active": "2024-05-06", "ides": '["vscode", "jetbrains"]',
         "languages": '["python", "go"]', "last_active_at": ""},
        {"tenant": "acme", "day": "2024-05-06", "user": "bob@acme.example", "messages": "12",
         "last_active": "", "ides": '["vscode"]', "languages": "[]", "last_active_at": ""},
    ]  # fmt: skip
    daily, _ = read_object(admin, bucket, "usage_daily/tenant=acme/day=2024-05-06/part-0.csv.gz")
    assert gzip.decompress(daily).decode() == (
        "tenant,day,active_users,messages,fetched_at,final\r\n"
        "acme,2024-05-06,2,42,2024-05-07T03:00:00+00:00,true\r\n"
    )


async def test_plain_csv_objects(sink_factory: Any, admin: Any, bucket: str) -> None:
    """Without gzip, CSV objects are plain UTF-8 text with a text/csv content type."""
    sink = await sink_factory(format="csv")
    await sink.write([sample_day()])
    data, obj = read_object(admin, bucket, "usage_daily_ide/tenant=acme/day=2024-05-06/part-0.csv")
    assert obj["ContentType"].startswith("text/csv")
    assert data.decode().splitlines() == [
        "tenant,day,ide_name,engaged_users",
        "acme,2024-05-06,vscode,2",
        "acme,2024-05-06,jetbrains,1",
    ]


async def test_csv_objects_match_the_csv_sink_byte_for_byte(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """S3 CSV objects are identical to the csv sink's files, so both can be mixed and joined."""
    day = sample_day(
        "café", users=[{"email": "zoë@x.example", "messages": 1, "ides": ["a,b", 'say "hi"']}]
    )
    sink = await sink_factory(format="csv")
    await sink.write([day])
    for table, expected in render_tables(day).items():
        data, _ = read_object(admin, bucket, f"{table}/tenant=café/day=2024-05-06/part-0.csv")
        assert data == expected


async def test_redelivery_overwrites_each_partition(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """Redelivering a tenant-day leaves exactly one object per key, holding the new content."""
    sink = await sink_factory()
    await sink.write([sample_day(), sample_day(day=DAY + dt.timedelta(days=1))])
    first_keys = list_keys(admin, bucket)
    changed = sample_day(
        messages=7, users=[{"email": "cy@acme.example", "messages": 7}], final=False
    )
    await sink.write([changed])
    await sink.write([changed])
    assert list_keys(admin, bucket) == first_keys
    assert len(first_keys) == 8
    versions = admin.list_object_versions(Bucket=bucket).get("Versions", [])
    assert len(versions) == 8
    users, _ = read_object(
        admin, bucket, "usage_user_daily/tenant=acme/day=2024-05-06/part-0.ndjson"
    )
    assert [row["user"] for row in ndjson(users)] == ["cy@acme.example"]
    daily, _ = read_object(admin, bucket, "usage_daily/tenant=acme/day=2024-05-06/part-0.ndjson")
    assert ndjson(daily)[0]["messages"] == 7
    assert ndjson(daily)[0]["final"] is False


async def test_one_batch_with_a_day_twice_keeps_the_later(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """If a batch carries one tenant-day twice, the later version is the one stored."""
    sink = await sink_factory()
    await sink.write([sample_day(messages=1), sample_day(messages=2)])
    daily, _ = read_object(admin, bucket, "usage_daily/tenant=acme/day=2024-05-06/part-0.ndjson")
    assert ndjson(daily)[0]["messages"] == 2
    assert len(list_keys(admin, bucket)) == 4


async def test_empty_batch_writes_nothing(sink_factory: Any, admin: Any, bucket: str) -> None:
    """An empty batch is accepted and creates no objects."""
    sink = await sink_factory()
    await sink.write([])
    assert list_keys(admin, bucket) == []


async def test_pii_drop_writes_no_user_table(sink_factory: Any, admin: Any, bucket: str) -> None:
    """Under pii: drop the per-user table gets no objects at all."""
    sink = await sink_factory(pii="drop")
    await sink.write([sample_day().with_users([])])
    keys = list_keys(admin, bucket)
    assert len(keys) == 3
    assert not any(key.startswith("usage_user_daily/") for key in keys)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"sse": "AES256"}, {"ServerSideEncryption": "AES256"}),
        (
            {"sse": "aws:kms", "sse_kms_key_id": "alias/usage"},
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/usage"},
        ),
    ],
)
async def test_server_side_encryption_is_requested(
    sink_factory: Any, admin: Any, bucket: str, settings: dict[str, str], expected: dict[str, str]
) -> None:
    """The configured server-side encryption is sent with every PUT (moto records it)."""
    sink = await sink_factory(**settings)
    await sink.write([sample_day()])
    for key in list_keys(admin, bucket):
        head = admin.head_object(Bucket=bucket, Key=key)
        assert {name: head.get(name) for name in expected} == expected


async def test_no_encryption_header_by_default(sink_factory: Any, admin: Any, bucket: str) -> None:
    """With sse: none the sink asks for no particular encryption (the bucket default applies)."""
    sink = await sink_factory()
    await sink.write([sample_day()])
    head = admin.head_object(
        Bucket=bucket, Key="usage_daily/tenant=acme/day=2024-05-06/part-0.ndjson"
    )
    assert head.get("SSEKMSKeyId") is None
    assert head.get("ServerSideEncryption") is None


async def test_unicode_tenants_and_values_round_trip(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """Non-ASCII tenant ids, emails and IDE names survive keys and contents unchanged."""
    sink = await sink_factory()
    users = [{"email": "zoë@bücher.example", "messages": 3, "ides": ["Visual Studio ✨"]}]
    ides = [{"ide_name": "Visual Studio ✨", "engaged_users": 1}]
    await sink.write([sample_day("café-東京", users=users, ides=ides)])
    key = "usage_user_daily/tenant=café-東京/day=2024-05-06/part-0.ndjson"
    assert key in list_keys(admin, bucket)
    data, _ = read_object(admin, bucket, key)
    assert "zoë@bücher.example" in data.decode("utf-8")  # UTF-8, not \u escapes
    assert ndjson(data)[0]["ides"] == ["Visual Studio ✨"]


async def test_tenant_with_path_characters_stays_one_partition(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """A tenant id containing / or = is escaped Hive-style and cannot add a path level."""
    sink = await sink_factory()
    await sink.write([sample_day("a/b=c")])
    keys = list_keys(admin, bucket)
    assert "usage_daily/tenant=a%2Fb%3Dc/day=2024-05-06/part-0.ndjson" in keys
    assert partition_value("50%") == "50%25"


async def test_missing_bucket_is_permanent(moto_endpoint: str) -> None:
    """Writing to a bucket that does not exist raises a permanent error naming the problem."""
    sink = S3Sink("lake", make_config(moto_endpoint, "no-such-bucket-here"))
    await sink.open()
    try:
        with pytest.raises(SinkPermanentError, match="bucket does not exist") as caught:
            await sink.write([sample_day()])
        with pytest.raises(SinkPermanentError, match="bucket does not exist"):
            await sink.ping()
    finally:
        await sink.aclose()
    assert "NoSuchBucket" in str(caught.value) or "404" in str(caught.value)


async def test_ping_succeeds_on_existing_bucket(sink_factory: Any) -> None:
    """ping() passes when the bucket exists and the credentials may use it."""
    sink = await sink_factory()
    await sink.ping()


async def test_static_keys_never_appear_in_errors_or_reprs(moto_endpoint: str) -> None:
    """Configured static keys are used but never shown in reprs or error messages."""
    key_id, secret = "AKIACANARY0000000001", "canary-secret-Zq81/xx"
    config = make_config(
        moto_endpoint,
        "no-such-bucket-here",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )
    sink = S3Sink("lake", config)
    await sink.open()
    try:
        with pytest.raises(SinkPermanentError) as caught:
            await sink.write([sample_day()])
    finally:
        await sink.aclose()
    for text in (str(caught.value), repr(caught.value), repr(config), str(config)):
        assert key_id not in text
        assert secret not in text


async def test_unusable_region_is_permanent_at_open() -> None:
    """A region botocore cannot use fails open() with a permanent error that says why."""
    sink = S3Sink("lake", S3SinkConfig(type="s3", bucket="usage", region="not a region!"))
    try:
        with pytest.raises(SinkPermanentError, match="InvalidRegionError"):
            await sink.open()
    finally:
        await sink.aclose()


async def test_unreachable_endpoint_is_transient() -> None:
    """A refused connection is a transient error (the store may come back)."""
    config = make_config(closed_port_url(), "usage", request_attempts=1)
    sink = S3Sink("lake", config)
    await sink.open()
    try:
        with pytest.raises(SinkTransientError, match="connection failed"):
            await sink.write([sample_day()])
    finally:
        await sink.aclose()


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (503, "SlowDown", SinkTransientError),
        (500, "InternalError", SinkTransientError),
        (429, "TooManyRequests", SinkTransientError),
        (403, "AccessDenied", SinkPermanentError),
        (403, "InvalidAccessKeyId", SinkPermanentError),
        (403, "SignatureDoesNotMatch", SinkPermanentError),
        (400, "InvalidArgument", SinkPermanentError),
    ],
)
async def test_store_errors_are_classified(status: int, code: str, expected: type) -> None:
    """Throttling and 5xx answers are transient; credential and request errors are permanent."""
    async with S3ErrorServer(status, code) as server:
        sink = S3Sink("lake", make_config(server.url, "usage", request_attempts=1))
        await sink.open()
        try:
            with pytest.raises(expected) as caught:
                await sink.write([sample_day()])
        finally:
            await sink.aclose()
    assert code in str(caught.value)
    assert f"HTTP {status}" in str(caught.value)
    assert server.requests >= 1


async def test_botocore_retries_are_bounded_by_request_attempts() -> None:
    """request_attempts bounds how often one PUT is sent before the write gives up."""
    async with S3ErrorServer(503, "SlowDown") as server:
        sink = S3Sink("lake", make_config(server.url, "usage", request_attempts=2, pii="drop"))
        await sink.open()
        try:
            with pytest.raises(SinkTransientError):
                await sink.write([sample_day().with_users([])])
        finally:
            await sink.aclose()
    assert server.requests == 3 * 2  # three tables (pii drop), two attempts each


async def test_forbidden_head_bucket_is_permanent_for_ping() -> None:
    """ping() reports a 403 from HeadBucket as a permanent access problem."""
    async with S3ErrorServer(403, "AccessDenied") as server:
        sink = S3Sink("lake", make_config(server.url, "usage", request_attempts=1))
        await sink.open()
        try:
            with pytest.raises(SinkPermanentError, match="access denied"):
                await sink.ping()
        finally:
            await sink.aclose()


async def test_close_is_idempotent_and_reopens(sink_factory: Any, admin: Any, bucket: str) -> None:
    """aclose() may be called twice, and a closed sink opens again on the next write."""
    sink = await sink_factory()
    await sink.aclose()
    await sink.aclose()
    await sink.write([sample_day()])
    assert len(list_keys(admin, bucket)) == 4


def test_prefix_is_treated_as_a_folder() -> None:
    """A prefix without a trailing slash gets one; a leading slash is dropped."""
    assert S3SinkConfig(type="s3", bucket="b", prefix="/zencoder").prefix == "zencoder/"
    assert S3SinkConfig(type="s3", bucket="b", prefix="a/b/").prefix == "a/b/"
    assert S3SinkConfig(type="s3", bucket="b").prefix == ""


@pytest.mark.parametrize(
    "settings",
    [
        {"aws_access_key_id": "AKIAONLYHALF"},
        {"sse": "AES256", "sse_kms_key_id": "alias/x"},
        {"endpoint_url": "minio:9000"},
        {"bucket": "usage/zencoder"},
        {"format": "parquet"},
        {"unknown_key": 1},
    ],
)
def test_invalid_settings_are_rejected(settings: dict[str, Any]) -> None:
    """Inconsistent or unknown settings fail validation before any network call."""
    with pytest.raises(ValidationError):
        S3SinkConfig.model_validate({"type": "s3", "bucket": "usage"} | settings)


def test_validation_errors_do_not_echo_secrets() -> None:
    """A rejected config does not print the access key it was given."""
    with pytest.raises(ValidationError) as caught:
        S3SinkConfig.model_validate(
            {"type": "s3", "bucket": "usage", "aws_access_key_id": "AKIACANARYHALF"}
        )
    assert "AKIACANARYHALF" not in str(caught.value)


def test_registers_through_the_plugin_hook() -> None:
    """The module's collector_register_sinks hookimpl registers the 's3' sink type."""
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(s3_module)
    pm.check_pending()
    assert SinkRegistry.from_plugin_manager(pm).types() == {"s3": S3Sink}


def test_loading_the_plugin_leaves_the_aws_client_libraries_unimported() -> None:
    """Loading every sink plugin registers 's3' without importing aiobotocore or botocore's
    client machinery (a quarter second of start-up for collectors without an s3 sink)."""
    out = run_python(
        "import sys\n"
        "from collector.app import load_plugins\n"
        "registry = load_plugins().registry\n"
        "heavy = ('aiobotocore', 'botocore.client', 'botocore.session')\n"
        "print('s3' in registry.types(), sorted(m for m in heavy if m in sys.modules))"
    ).stdout
    assert out.splitlines()[-1] == "True []"


def test_without_aiobotocore_the_sink_is_unavailable_naming_the_extra() -> None:
    """With aiobotocore not installed, 's3' is a broken sink type whose message names the missing
    module and the `s3` extra that installs it, as before the import became lazy."""
    out = run_python(
        "import sys\n"
        "sys.modules['aiobotocore'] = None  # import fails as if not installed\n"
        "from collector.app import load_plugins\n"
        "registry = load_plugins().registry\n"
        "print('s3' in registry.types())\n"
        "print(*[b.message() for b in registry.broken() if b.name == 's3'])"
    ).stdout
    available, message = out.splitlines()[-2:]
    assert available == "False"
    assert "No module named 'aiobotocore'" in message
    assert "pip install 'zencoder-collector[s3]'" in message


def test_config_is_refused_when_aiobotocore_is_present_but_broken() -> None:
    """An s3 sink's config is refused, naming the error and the extra, when aiobotocore is
    installed but cannot be imported, so the collector does not start with a sink it cannot open."""
    out = run_python(
        "import sys\n"
        "sys.modules['aiobotocore.session'] = None  # importing it fails\n"
        "from pydantic import ValidationError\n"
        "from collector_sinks.s3 import S3SinkConfig\n"
        "try:\n"
        "    S3SinkConfig.model_validate({'type': 's3', 'bucket': 'usage'})\n"
        "except ValidationError as exc:\n"
        "    print(exc.errors()[0]['msg'])"
    ).stdout
    message = out.splitlines()[-1]
    assert "sink type 's3' is not available: ModuleNotFoundError" in message
    assert message.endswith("to fix: pip install 'zencoder-collector[s3]'")


def decode_object(key: str, data: bytes) -> list[Any]:
    """An object's rows as plain values, whatever its format."""
    if key.endswith(".gz"):
        data = gzip.decompress(data)
    if ".csv" in key:
        return [tuple(row) for row in csv.reader(io.StringIO(data.decode("utf-8")))]
    return ndjson(data)


class TestS3Conformance(SinkConformance):
    """The plugin-author conformance kit, run against the s3 sink with NDJSON objects."""

    settings: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    def sink_factory(self, moto_endpoint: str, admin: Any) -> Any:
        def make() -> S3Sink:
            bucket = f"conformance-{uuid.uuid4().hex[:12]}"
            admin.create_bucket(Bucket=bucket)
            return S3Sink("lake", make_config(moto_endpoint, bucket, **self.settings))

        return make

    @pytest.fixture
    def broken_sink_factory(self, moto_endpoint: str) -> Any:
        return lambda: S3Sink("lake", make_config(moto_endpoint, "no-such-bucket-conformance"))

    def read_back(self, sink: Sink) -> Any:
        assert isinstance(sink, S3Sink)
        admin = s3_admin_client(sink.config.endpoint_url or "")
        bucket = sink.config.bucket
        return {
            key: decode_object(key, read_object(admin, bucket, key)[0])
            for key in list_keys(admin, bucket)
        }


class TestS3GzipCsvConformance(TestS3Conformance):
    """The conformance kit against the s3 sink writing gzipped CSV objects."""

    settings: ClassVar[dict[str, Any]] = {"format": "csv", "gzip": True}


FORMULAS = ('=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1+1)", "-2+3+cmd", "\t=1+1")
"""Cells a spreadsheet would run as formulas (the OWASP CSV-injection triggers)."""


def csv_cells(data: bytes, column: str) -> list[str]:
    """One column of a CSV object's data rows."""
    return [row[column] for row in csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))]


async def test_csv_objects_neutralize_formula_cells(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """format: csv prefixes a quote to formula-like emails and names, exactly as the csv sink
    does; numbers stay numbers."""
    day = make_tenant_day("acme", users=list(FORMULAS), ides=FORMULAS, languages=FORMULAS)
    sink = await sink_factory(format="csv")
    await sink.write([day])
    prefix = f"tenant=acme/day={day.day.isoformat()}/part-0.csv"
    users, _ = read_object(admin, bucket, f"usage_user_daily/{prefix}")
    assert sorted(csv_cells(users, "user")) == sorted("'" + f for f in FORMULAS)
    assert csv_cells(users, "messages") == [str(u.messages) for u in day.users]
    ides, _ = read_object(admin, bucket, f"usage_daily_ide/{prefix}")
    assert sorted(csv_cells(ides, "ide_name")) == sorted("'" + f for f in FORMULAS)
    for table, expected in render_tables(day).items():
        data, _ = read_object(admin, bucket, f"{table}/{prefix}")
        assert data == expected


async def test_csv_formula_guard_off_and_ndjson_keep_the_text(
    sink_factory: Any, admin: Any, bucket: str
) -> None:
    """csv_formula_guard: false writes CSV text as sent; NDJSON is never altered."""
    day = make_tenant_day("acme", users=list(FORMULAS))
    prefix = f"tenant=acme/day={day.day.isoformat()}"
    raw = await sink_factory(format="csv", csv_formula_guard=False, prefix="raw")
    await raw.write([day])
    users, _ = read_object(admin, bucket, f"raw/usage_user_daily/{prefix}/part-0.csv")
    assert sorted(csv_cells(users, "user")) == sorted(FORMULAS)
    lake = await sink_factory(prefix="lake")
    await lake.write([day])
    users, _ = read_object(admin, bucket, f"lake/usage_user_daily/{prefix}/part-0.ndjson")
    assert sorted(row["user"] for row in ndjson(users)) == sorted(FORMULAS)
