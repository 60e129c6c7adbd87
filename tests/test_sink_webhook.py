"""The webhook sink against an aiohttp receiver that checks every Standard Webhooks signature."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from collector.errors import SinkPermanentError, SinkTransientError
from collector.plugin_manager import SinkRegistry, make_plugin_manager
from collector.sink import Sink
from collector.testing import SinkConformance
from collector_sinks import webhook as webhook_module
from collector_sinks.webhook import (
    WebhookSink,
    WebhookSinkConfig,
    message_id,
    parse_retry_after,
    sign,
    signing_key,
)
from tests.servers import WebhookReceiver, closed_port_url, sample_day

SECRET = "whsec_" + base64.b64encode(b"canary-key-0123456789-abcdefghij").decode()
DAY = dt.date(2024, 5, 6)


@pytest.fixture(autouse=True)
def no_backoff_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff and Retry-After waits are skipped (the collector's documented testing switch)."""
    monkeypatch.setenv("COLLECTOR_TESTING_NO_WAIT", "1")


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    async with WebhookReceiver(SECRET) as server:
        yield server
    assert server.bad_signatures == 0


def make_config(target: str, **settings: Any) -> WebhookSinkConfig:
    return WebhookSinkConfig.model_validate(
        {"type": "webhook", "url": target, "secret": SECRET} | settings
    )


@pytest.fixture
async def sink_factory(receiver: WebhookReceiver) -> AsyncIterator[Any]:
    opened: list[WebhookSink] = []

    async def make(**settings: Any) -> WebhookSink:
        sink = WebhookSink("hook", make_config(receiver.url, **settings))
        await sink.open()
        opened.append(sink)
        return sink

    yield make
    for sink in opened:
        await sink.aclose()


def three_days() -> list[Any]:
    return [sample_day(day=DAY + dt.timedelta(days=n)) for n in range(3)]


async def test_per_day_posts_one_signed_request_per_tenant_day(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """In per_day mode each tenant-day is one POST with a verified signature and the full body."""
    sink = await sink_factory()
    await sink.write(three_days())
    assert len(receiver.accepted) == 3
    first = receiver.accepted[0]
    assert first.headers["content-type"] == "application/json"
    assert first.webhook_id.startswith("msg_")
    assert len({r.webhook_id for r in receiver.accepted}) == 3
    assert abs(int(first.headers["webhook-timestamp"]) - time.time()) < 60
    body = first.json()
    assert body["type"] == "zencoder.usage.day"
    assert body["tenant"] == "acme"
    assert body["day"] == "2024-05-06"
    assert body["content_hash"] == sample_day().content_hash
    assert body["fetched_at"] == "2024-05-07T03:00:00+00:00"
    assert body["final"] is True
    assert body["usage_daily"] == {
        "tenant": "acme", "day": "2024-05-06", "active_users": 2, "messages": 42,
        "fetched_at": "2024-05-07T03:00:00+00:00", "final": True,
    }  # fmt: skip
    assert [row["ide_name"] for row in body["usage_daily_ide"]] == ["vscode", "jetbrains"]
    assert body["usage_daily_language"] == [
        {"tenant": "acme", "day": "2024-05-06", "language_name": "python", "engaged_users": 1}
    ]
    assert body["usage_user_daily"][0] == {
        "tenant": "acme", "day": "2024-05-06", "user": "ada@acme.example", "messages": 30,
        "last_active": "2024-05-06", "ides": ["vscode", "jetbrains"],
        "languages": ["python", "go"], "last_active_at": None,
    }  # fmt: skip
    assert [p["day"] for p in receiver.payloads()] == ["2024-05-06", "2024-05-07", "2024-05-08"]


async def test_batch_mode_posts_one_request_with_every_day(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """In batch mode one write call is one POST carrying a list of the tenant-days."""
    sink = await sink_factory(mode="batch")
    await sink.write(three_days())
    assert len(receiver.requests) == 1
    body = receiver.accepted[0].json()
    assert body["type"] == "zencoder.usage.batch"
    assert [d["day"] for d in body["days"]] == ["2024-05-06", "2024-05-07", "2024-05-08"]
    assert all(d["type"] == "zencoder.usage.day" for d in body["days"])


async def test_server_errors_are_retried_with_the_same_id(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """A 503 is retried inside the write, every attempt signed afresh under the same webhook-id."""
    receiver.answer(503, times=2)
    sink = await sink_factory(max_retries=3)
    await sink.write([sample_day()])
    assert [r.status for r in receiver.requests] == [503, 503, 200]
    assert len({r.webhook_id for r in receiver.requests}) == 1
    assert len(receiver.accepted) == 1


async def test_exhausted_retries_raise_a_transient_error(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """After max_retries failed retries the write raises SinkTransientError for a later retry."""
    receiver.answer(500, times=10)
    sink = await sink_factory(max_retries=2)
    with pytest.raises(SinkTransientError, match=r"HTTP 500; gave up after 3 attempt"):
        await sink.write([sample_day()])
    assert len(receiver.requests) == 3


async def test_retry_after_seconds_is_honoured(
    sink_factory: Any, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 with Retry-After: 1 makes the sink wait about one second, not its tiny backoff."""
    monkeypatch.delenv("COLLECTOR_TESTING_NO_WAIT")
    receiver.answer(429, headers={"Retry-After": "1"})
    sink = await sink_factory(backoff_initial="PT0.01S", backoff_max="PT0.01S")
    started = time.monotonic()
    await sink.write([sample_day()])
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 5
    assert [r.status for r in receiver.requests] == [429, 200]


async def test_retry_after_beyond_the_write_timeout_is_handed_back(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """A Retry-After longer than the write may take raises at once, carrying the wait."""
    receiver.answer(429, headers={"Retry-After": "120"})
    sink = await sink_factory(timeout="PT60S")
    with pytest.raises(SinkTransientError) as caught:
        await sink.write([sample_day()])
    assert caught.value.retry_after == 120
    assert len(receiver.requests) == 1


async def test_client_errors_are_permanent_with_the_response_body(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """A 400 is not retried; the error carries the status and the body's first 500 characters."""
    body = "bad payload: " + "x" * 487 + "TAIL-NOT-KEPT" + "y" * 100
    receiver.answer(400, body=body)
    sink = await sink_factory()
    with pytest.raises(SinkPermanentError) as caught:
        await sink.write([sample_day()])
    message = str(caught.value)
    assert "HTTP 400: bad payload: " in message
    assert body[:500] in message
    assert "TAIL-NOT-KEPT" not in message
    assert len(receiver.requests) == 1


async def test_rejected_day_does_not_stop_the_others(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """In per_day mode a day the receiver rejects is reported while the other days still arrive."""
    receiver.answer(200)
    receiver.answer(422, body="day rejected")
    sink = await sink_factory()
    with pytest.raises(SinkPermanentError, match=r"acme 2024-05-07.*HTTP 422: day rejected"):
        await sink.write(three_days())
    assert [p["day"] for p in receiver.payloads()] == ["2024-05-06", "2024-05-08"]


async def test_redirects_are_not_followed(sink_factory: Any, receiver: WebhookReceiver) -> None:
    """A 3xx answer is a permanent error and the Location is never requested."""
    elsewhere = receiver.url.replace("/hook", "/moved")
    receiver.answer(307, headers={"Location": elsewhere})
    sink = await sink_factory()
    with pytest.raises(SinkPermanentError, match="redirects are not followed"):
        await sink.write([sample_day()])
    assert [r.path for r in receiver.requests] == ["/hook"]


async def test_hanging_receiver_times_out_as_transient(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """A receiver slower than request_timeout gives a transient error after the retries."""
    receiver.hang(5, times=2)
    sink = await sink_factory(request_timeout="PT0.2S", max_retries=1)
    started = time.monotonic()
    with pytest.raises(SinkTransientError, match=r"no answer within 0\.2s"):
        await sink.write([sample_day()])
    assert time.monotonic() - started < 3
    assert len(receiver.requests) == 2
    assert len({r.webhook_id for r in receiver.requests}) == 1


async def test_unreachable_receiver_is_transient() -> None:
    """A refused connection is retried and then reported as transient."""
    sink = WebhookSink("hook", make_config(closed_port_url() + "/hook", max_retries=1))
    await sink.open()
    try:
        with pytest.raises(SinkTransientError, match="connection failed"):
            await sink.write([sample_day()])
    finally:
        await sink.aclose()


async def test_redelivery_reuses_the_webhook_id(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """The same content redelivered later keeps its webhook-id; changed content gets a new one."""
    sink = await sink_factory()
    await sink.write([sample_day()])
    refetched = sample_day(fetched_at=dt.datetime(2024, 5, 8, tzinfo=dt.UTC))
    await sink.write([refetched])
    await sink.write([sample_day(messages=43)])
    await sink.write([sample_day(final=False)])
    ids = [r.webhook_id for r in receiver.accepted]
    assert ids[0] == ids[1]
    assert len(set(ids)) == 3
    assert ids[0] == message_id([sample_day()])


async def test_secret_never_leaves_the_sink(sink_factory: Any, receiver: WebhookReceiver) -> None:
    """The secret (and its key) appears in no body, header, error message or repr."""
    key_b64 = SECRET.removeprefix("whsec_")
    key_text = base64.b64decode(key_b64).decode()
    sink = await sink_factory(max_retries=0)
    await sink.write([sample_day()])
    receiver.answer(400, body="nope")
    with pytest.raises(SinkPermanentError) as rejected:
        await sink.write([sample_day(messages=1)])
    receiver.hang(5)
    short = await sink_factory(max_retries=0, request_timeout="PT0.1S")
    with pytest.raises(SinkTransientError) as timed_out:
        await short.write([sample_day(messages=2)])
    seen = [str(rejected.value), str(timed_out.value), repr(sink), repr(sink.config)]
    for request in receiver.requests:
        seen.append(request.body.decode())
        seen.extend(f"{name}: {value}" for name, value in request.headers.items())
    for text in seen:
        for needle in (SECRET, key_b64, key_text):
            assert needle not in text


async def test_unicode_is_sent_as_utf8_and_verifies(
    sink_factory: Any, receiver: WebhookReceiver
) -> None:
    """Non-ASCII tenants, emails and names arrive as UTF-8 JSON whose signature verifies."""
    users = [{"email": "zoë@bücher.example", "messages": 3, "languages": ["日本語"]}]
    sink = await sink_factory()
    await sink.write([sample_day("café-東京", users=users)])
    request = receiver.accepted[0]
    assert "zoë@bücher.example".encode() in request.body
    body = request.json()
    assert body["tenant"] == "café-東京"
    assert body["usage_user_daily"][0]["languages"] == ["日本語"]


async def test_plain_secret_signs_with_its_utf8_bytes() -> None:
    """A secret without whsec_ is used as raw UTF-8 bytes, and such receivers verify it."""
    secret = "plain shared sécret"
    async with WebhookReceiver(secret) as plain:
        sink = WebhookSink("hook", WebhookSinkConfig(type="webhook", url=plain.url, secret=secret))
        try:
            await sink.write([sample_day()])
        finally:
            await sink.aclose()
    assert plain.bad_signatures == 0
    assert len(plain.accepted) == 1


async def test_wrong_secret_is_caught_by_the_receiver() -> None:
    """The receiver really checks signatures: a sink with another secret is rejected."""
    async with WebhookReceiver(SECRET) as strict:
        sink = WebhookSink(
            "hook", make_config(strict.url, secret="whsec_" + base64.b64encode(b"x" * 24).decode())
        )
        try:
            with pytest.raises(SinkPermanentError, match="HTTP 401"):
                await sink.write([sample_day()])
        finally:
            await sink.aclose()
    assert strict.bad_signatures == 1


async def test_extra_headers_are_sent(sink_factory: Any, receiver: WebhookReceiver) -> None:
    """Configured extra headers ride on every request."""
    # Header values are registered with the process-wide redactor (they may be credentials), so
    # a value that is also a common word would be masked in every later test's messages.
    sink = await sink_factory(headers={"X-Team": "team-7f3a", "Authorization": "Bearer t0k"})
    await sink.write([sample_day()])
    assert receiver.accepted[0].headers["x-team"] == "team-7f3a"
    assert receiver.accepted[0].headers["authorization"] == "Bearer t0k"
    assert "t0k" not in repr(sink.config)


async def test_empty_batch_sends_nothing(sink_factory: Any, receiver: WebhookReceiver) -> None:
    """An empty batch is accepted without a request."""
    sink = await sink_factory()
    await sink.write([])
    assert receiver.requests == []


def test_signature_matches_the_standard_webhooks_example() -> None:
    """sign() reproduces the HMAC the Standard Webhooks scheme defines, for a hand-built input."""
    key = signing_key(SECRET)
    assert key == b"canary-key-0123456789-abcdefghij"
    expected = hmac.new(key, b"msg_1.1700000000.{}", hashlib.sha256).digest()
    assert sign(key, "msg_1", 1700000000, b"{}") == "v1," + base64.b64encode(expected).decode()
    assert signing_key("not-prefixed") == b"not-prefixed"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("Tue, 07 May 2024 12:00:30 GMT", 30.0),
        ("Tue, 07 May 2024 11:00:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_parsing(value: str | None, expected: float | None) -> None:
    """Retry-After is read as delta-seconds or an HTTP date; past dates give 0, junk gives None."""
    now = dt.datetime(2024, 5, 7, 12, 0, 0, tzinfo=dt.UTC)
    assert parse_retry_after(value, now) == expected


@pytest.mark.parametrize(
    "settings",
    [
        {"url": "ftp://hooks.example.com/x"},
        {"url": "/relative"},
        {"secret": "whsec_not*base64!"},
        {"secret": ""},
        {"headers": {"Webhook-Signature": "forged"}},
        {"mode": "stream"},
        {"max_retries": -1},
        {"unknown": True},
    ],
)
def test_invalid_settings_are_rejected(settings: dict[str, Any]) -> None:
    """Invalid URLs, secrets, reserved headers and unknown keys fail validation up front."""
    with pytest.raises(ValidationError):
        make_config("https://hooks.example.com/zc", **settings)


def test_validation_error_does_not_echo_the_secret() -> None:
    """A malformed whsec_ secret is rejected without printing it."""
    with pytest.raises(ValidationError) as caught:
        make_config("https://hooks.example.com/zc", secret="whsec_CANARY*SECRET")
    assert "CANARY" not in str(caught.value)
    assert "base64" in str(caught.value)


def test_errors_name_only_the_url_origin() -> None:
    """Error messages and reprs show the receiver's origin, never a token in its path or query."""
    sink = WebhookSink("hook", make_config("https://user:pw@hooks.example.com/T0/B1/tok3n?k=v"))
    assert "hooks.example.com" in repr(sink)
    for hidden in ("tok3n", "k=v", "pw"):
        assert hidden not in repr(sink)


def test_registers_through_the_plugin_hook() -> None:
    """The module's collector_register_sinks hookimpl registers the 'webhook' sink type."""
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(webhook_module)
    pm.check_pending()
    assert SinkRegistry.from_plugin_manager(pm).types() == {"webhook": WebhookSink}


class TestWebhookConformance(SinkConformance):
    """The plugin-author conformance kit, run against the webhook sink in per_day mode.

    Each sink gets its own receiver; read_back is what an idempotent receiver keeps: the latest
    payload per (tenant, day).
    """

    settings: ClassVar[dict[str, Any]] = {}

    @pytest.fixture
    async def sink_factory(self) -> AsyncIterator[Any]:
        self.receivers: dict[int, WebhookReceiver] = {}

        async def make() -> WebhookSink:
            receiver = WebhookReceiver(SECRET)
            await receiver.start()
            sink = WebhookSink("hook", make_config(receiver.url, **self.settings))
            self.receivers[id(sink)] = receiver
            return sink

        yield make
        for receiver in self.receivers.values():
            await receiver.stop()
            assert receiver.bad_signatures == 0

    @pytest.fixture
    def broken_sink_factory(self) -> Any:
        return lambda: WebhookSink("hook", make_config(closed_port_url() + "/hook", max_retries=0))

    def read_back(self, sink: Sink) -> Any:
        latest: dict[tuple[str, str], Any] = {}
        for payload in self.receivers[id(sink)].payloads():
            for day in payload.get("days", [payload]):
                latest[(day["tenant"], day["day"])] = day
        return latest


class TestWebhookBatchConformance(TestWebhookConformance):
    """The conformance kit against the webhook sink in batch mode."""

    settings: ClassVar[dict[str, Any]] = {"mode": "batch"}
