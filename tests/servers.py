"""Real servers for sink tests, all on 127.0.0.1 with an ephemeral port.

- :func:`running_moto_s3`: moto's standalone S3 server (werkzeug, in a thread), plus
  :func:`s3_admin_client`, a plain boto3 client for creating buckets and reading objects back
  through a different client than the sink's;
- :class:`WebhookReceiver`: an aiohttp server that checks every request's Standard Webhooks
  signature with the reference ``standardwebhooks`` library, records what arrived, and can be
  scripted to answer an error status, redirect, or hang for the next requests, or to answer an
  error whose body echoes the whole request;
- :class:`EchoingApi`: a usage API and token endpoint whose errors repeat the credentials they
  were sent, for the canary tests;
- :class:`SlowConnectRelay`: a TCP relay in front of a server whose new connections pass no byte
  for a while (a distant API's handshakes), for the rate limiter's arrival tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Self

import boto3  # type: ignore[import-untyped]  # no stubs; test-only setup client
from aiohttp import web
from moto.server import ThreadedMotoServer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from collector.models import TenantDay, tenant_day_from_body
from tests.client_helpers import closed_port

# --- S3 -------------------------------------------------------------------------------------------

MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Environment for code under test that uses the AWS credential chain against moto."""


@contextlib.contextmanager
def running_moto_s3() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (ephemeral port); yield its endpoint URL."""
    # werkzeug logs every request at INFO; test output only needs failures.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_admin_client(endpoint_url: str) -> Any:
    """A synchronous boto3 S3 client for test setup and inspection (not the code under test)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def list_keys(client: Any, bucket: str) -> list[str]:
    """Every key in ``bucket``, sorted."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


# --- webhooks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    signature_valid: bool
    status: int | None  # what the receiver answered (None: it hung until the client gave up)

    @property
    def webhook_id(self) -> str:
        """The ``webhook-id`` header."""
        return self.headers.get("webhook-id", "")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class _Plan:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    hang: float = 0.0
    echo: bool = False


class WebhookReceiver:
    """A Standard Webhooks receiver that verifies every signature.

    ``secret`` is what the sink is configured with: a ``whsec_`` secret is handed to the reference
    library as is; any other secret as its UTF-8 bytes (the raw-key convention the sink documents).
    A request with a missing or wrong signature is counted in ``bad_signatures`` and answered 401.
    """

    def __init__(self, secret: str) -> None:
        self._verifier = Webhook(secret if secret.startswith("whsec_") else secret.encode())
        self.requests: list[ReceivedRequest] = []
        self.bad_signatures = 0
        self._plans: deque[_Plan] = deque()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- scripting --------------------------------------------------------------------------------

    def answer(
        self, status: int, *, times: int = 1, headers: dict[str, str] | None = None, body: str = ""
    ) -> None:
        """Answer the next ``times`` validly signed requests with ``status`` (then 200 again)."""
        for _ in range(times):
            self._plans.append(_Plan(status=status, headers=dict(headers or {}), body=body))

    def answer_echoing(self, status: int, *, times: int = 1) -> None:
        """Answer the next ``times`` signed requests with ``status`` and a body that repeats the
        request (every header and the body), as careless receivers do."""
        for _ in range(times):
            self._plans.append(_Plan(status=status, echo=True))

    def hang(self, seconds: float, *, times: int = 1) -> None:
        """Hold the next ``times`` requests for ``seconds`` (or until stop) before answering 200."""
        for _ in range(times):
            self._plans.append(_Plan(hang=seconds))

    def clear_answers(self) -> None:
        """Drop every scripted answer not used yet: answer 200 from now on (an outage ends)."""
        self._plans.clear()

    # --- what arrived -----------------------------------------------------------------------------

    @property
    def accepted(self) -> list[ReceivedRequest]:
        """Validly signed requests answered 2xx: the deliveries a real receiver would keep."""
        return [r for r in self.requests if r.signature_valid and r.status and r.status < 300]

    def payloads(self) -> list[Any]:
        """The JSON bodies of the accepted requests, in arrival order."""
        return [r.json() for r in self.accepted]

    # --- server -----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            self._verifier.verify(body, headers, json_parse=False)
            valid = True
        except (WebhookVerificationError, ValueError):
            valid = False
        if not valid:
            self.bad_signatures += 1
            self.requests.append(ReceivedRequest(request.path, headers, body, False, 401))
            return web.Response(status=401, text="bad signature")
        plan = self._plans.popleft() if self._plans else _Plan()
        if plan.hang:
            self.requests.append(ReceivedRequest(request.path, headers, body, True, None))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), plan.hang)
            return web.Response(status=200)
        self.requests.append(ReceivedRequest(request.path, headers, body, True, plan.status))
        text = plan.body
        if plan.echo:
            lines = [f"{request.method} {request.path_qs}"]
            lines += [f"{name}: {value}" for name, value in request.headers.items()]
            text = "bad request:\n" + "\n".join(lines) + "\n\n" + body.decode(errors="replace")
        return web.Response(status=plan.status, headers=plan.headers, text=text)

    async def start(self) -> str:
        """Serve on 127.0.0.1 (ephemeral port); returns and sets ``url`` (path ``/hook``)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self.url

    async def stop(self) -> None:
        """Release hanging requests and shut the server down."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


# --- an API that echoes credentials ---------------------------------------------------------------


class EchoingApi:
    """A usage API and OAuth token endpoint whose every error repeats what the request carried.

    ``modes`` maps a ``client_id`` (OAuth) or an API key to what its usage requests get:

    - ``ok``: 200 with a valid one-user payload for the requested day;
    - ``401``, ``403``: that status, ``{"message": <echo>}``;
    - ``500``: ``{"error": {"message": <echo>}}`` (the other envelope), ``429`` likewise;
    - ``envelope``: 200 with ``{"status": "error", "message": <echo>}``;
    - ``token``: the token request itself fails 401, ``{"errors": [<the request body>]}``.

    ``<echo>`` repeats the ``Authorization`` and ``zencoder-api-key`` headers and the bare token.
    Tokens are ``CANARY-token-<client_id>-<n>``; every one issued is in ``issued``.
    """

    def __init__(self, modes: dict[str, str]) -> None:
        self.modes = modes
        self.issued: list[str] = []
        self._token_owner: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.token_url = ""

    async def _token(self, request: web.Request) -> web.Response:
        raw = await request.read()
        client_id = str(json.loads(raw).get("client_id", ""))
        if self.modes.get(client_id) == "token":
            return web.json_response({"errors": [f"invalid request {raw.decode()}"]}, status=401)
        token = f"CANARY-token-{client_id}-{len(self.issued)}"
        self.issued.append(token)
        self._token_owner[token] = client_id
        return web.json_response({"access_token": token, "expires_in": 3600})

    async def _usage(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        key = request.headers.get("zencoder-api-key", "")
        token = authorization.removeprefix("Bearer ")
        mode = self.modes.get(key) if key else self.modes.get(self._token_owner.get(token, ""))
        echo = f"not allowed: Authorization={authorization}, zencoder-api-key={key}, token {token}"
        day = request.query.get("day", "")
        if mode == "ok":
            return web.json_response(_one_user_body(day))
        if mode == "envelope":
            return web.json_response({"status": "error", "message": echo})
        if mode in ("500", "429"):
            return web.json_response({"error": {"message": echo}}, status=int(mode))
        status = int(mode) if mode in ("401", "403") else 404
        return web.json_response({"message": echo}, status=status)

    async def __aenter__(self) -> EchoingApi:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/api/v1/data/usage", self._usage)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self.token_url = self.base_url + "/oauth/token"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _one_user_body(day: str) -> dict[str, Any]:
    user = {"email": "ada@example.com", "messages": 3, "last_active": day,
            "ides": ["vscode"], "languages": ["python"]}  # fmt: skip
    daily = {"day": day, "active_users": 1, "messages": 3,
             "ides": [{"ide_name": "vscode", "engaged_users": 1}],
             "languages": [{"language_name": "python", "engaged_users": 1}]}  # fmt: skip
    data = {
        "period": {"start": day, "end": day, "days": 1},
        "summary": {"total_active_users": 1, "total_messages": 3},
        "users": [user],
        "daily": [daily],
    }
    return {"status": "success", "data": data}


class S3ErrorServer:
    """An S3-compatible endpoint that answers every request with one S3 XML error.

    Lets tests see how a sink classifies throttling, server errors and credential errors that
    moto does not produce on demand.
    """

    def __init__(self, status: int, code: str, message: str = "scripted failure") -> None:
        self.status = status
        self.code = code
        self.message = message
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        if request.method == "HEAD":  # S3 answers HEAD errors without a body
            return web.Response(status=self.status)
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{self.message}</Message>"
            "<RequestId>test</RequestId></Error>"
        )
        return web.Response(status=self.status, text=xml, content_type="application/xml")

    async def __aenter__(self) -> S3ErrorServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (the port was just released)."""
    return f"http://127.0.0.1:{closed_port()}"


class TcpServer:
    """A raw TCP server on 127.0.0.1 for tests that script the bytes; subclasses define ``_serve``.

    ``async with`` starts it on an ephemeral port (``url``) and closes it on exit.
    """

    url: str

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


# --- sample data ----------------------------------------------------------------------------------


def sample_day(
    tenant: str = "acme",
    day: dt.date = dt.date(2024, 5, 6),
    *,
    users: list[dict[str, Any]] | None = None,
    ides: list[dict[str, Any]] | None = None,
    languages: list[dict[str, Any]] | None = None,
    messages: int = 42,
    final: bool = True,
    fetched_at: dt.datetime | None = None,
) -> TenantDay:
    """A tenant-day built the way the collector builds one: an API body parsed and normalized."""
    if users is None:
        users = [
            {"email": "ada@acme.example", "messages": 30, "last_active": day.isoformat(),
             "ides": ["vscode", "jetbrains"], "languages": ["python", "go"]},
            {"email": "bob@acme.example", "messages": 12, "last_active": None,
             "ides": ["vscode"], "languages": []},
        ]  # fmt: skip
    if ides is None:
        ides = [
            {"ide_name": "vscode", "engaged_users": 2},
            {"ide_name": "jetbrains", "engaged_users": 1},
        ]
    if languages is None:
        languages = [{"language_name": "python", "engaged_users": 1}]
    data = {
        "period": {"start": day.isoformat(), "end": day.isoformat(), "days": 1},
        "summary": {"total_active_users": len(users), "total_messages": messages},
        "users": users,
        "daily": [
            {"day": day.isoformat(), "active_users": len(users), "messages": messages,
             "ides": ides, "languages": languages}
        ],
    }  # fmt: skip
    body = json.dumps({"status": "success", "data": data}).encode()
    fetched = fetched_at or dt.datetime(2024, 5, 7, 3, 0, tzinfo=dt.UTC)
    return tenant_day_from_body(tenant, day, body, fetched_at=fetched, final=final)


# --- a relay whose new connections are slow -------------------------------------------------------


class SlowConnectRelay:
    """A TCP relay to ``target_url``'s host and port whose new connections pass nothing for
    ``delay`` seconds, as the TCP and TLS handshakes to a distant API would; requests on a
    connection kept alive afterwards pass at once. ``base_url`` is the relay's own address."""

    def __init__(self, target_url: str, delay: float) -> None:
        host_port = target_url.split("://", 1)[1].split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        self._target = (host, int(port))
        self._scheme = target_url.split("://", 1)[0]
        self.delay = delay
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.base_url = ""

    async def __aenter__(self) -> SlowConnectRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"{self._scheme}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await asyncio.sleep(self.delay)
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        except OSError:
            pass  # a side closed: the relay ends this connection too
        finally:
            self._tasks.discard(task)
            for stream in (writer, upstream_writer):
                if stream is not None:
                    stream.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()
