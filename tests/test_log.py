"""Logging: tenant context on every line, secrets never printed, JSON off a terminal."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from collector.log import (
    TOKENS_KEPT_PER_OWNER,
    configure_logging,
    redact,
    register_secrets,
    register_token,
    scrub,
)
from tests.e2e import run_python


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Leave structlog and the root logger as they were before the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def fail(exc: Exception) -> None:
    """Raise ``exc`` from one frame down, like the code under test would."""
    raise exc


class Leaky:
    """An object whose repr carries a secret, as careless library objects do."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __repr__(self) -> str:
        return f"Leaky(secret={self.secret})"


def test_tenant_context_tags_every_line() -> None:
    """Inside bound_contextvars(tenant=...) every line carries the tenant, stdlib lines too."""
    out = io.StringIO()
    configure_logging("debug", stream=out)
    log = structlog.get_logger("collector.test")
    with structlog.contextvars.bound_contextvars(tenant="acme"):
        log.info("fetching", day="2024-05-01")
        log.debug("token cached")
        logging.getLogger("aiohttp.client").warning("connection reset")
        try:
            fail(RuntimeError("boom"))
        except RuntimeError:
            log.exception("fetch failed")
    log.info("cycle done")
    lines = json_lines(out)
    assert [line["event"] for line in lines] == [
        "fetching",
        "token cached",
        "connection reset",
        "fetch failed",
        "cycle done",
    ]
    assert [line.get("tenant") for line in lines] == ["acme"] * 4 + [None]
    assert [line["logger"] for line in lines] == ["collector.test"] * 2 + ["aiohttp.client"] + [
        "collector.test"
    ] * 2
    assert lines[3]["level"] == "error"
    assert "RuntimeError: boom" in lines[3]["exception"]
    assert all(line["timestamp"].endswith("Z") for line in lines)


@pytest.mark.parametrize("as_json", [True, False])
def test_secrets_and_tokens_never_reach_the_output(as_json: bool) -> None:
    """Registered secrets, bearer tokens and API keys are masked everywhere, tracebacks included."""
    secret = 'canary-4b1d-"quoted"-secret'
    other = "second-canary-0c2e"
    bearer = "eyJhbGciOiJIUzI1NiJ9.payload.sig"
    api_key = "zak_live_7d8e9f00"
    out = io.StringIO()
    configure_logging("info", json=as_json, secrets=[secret], stream=out)
    register_secrets([other])
    log = structlog.get_logger("collector.test")
    log.info(f"secret in the event {secret}", header=f"Authorization: Bearer {bearer}")
    log.info("nested", data={"list": [other, {"deep": secret}]}, key=api_key)
    log.info("object repr", obj=Leaky(other))
    log.info("named fields", client_secret="unregistered-1", authorization="Basic dXNlcjpwYXNz")
    log.info("token body", body='{"access_token": "unregistered-2", "expires_in": 3600}')
    logging.getLogger("aiohttp.client").error("request with %s failed", secret)
    try:
        fail(ValueError(f"API said no to {other} with Bearer {bearer} and {api_key}"))
    except ValueError:
        log.exception("failed")
    text = out.getvalue()
    for leaked in (
        secret,
        other,
        bearer,
        api_key,
        "unregistered-1",
        "unregistered-2",
        "dXNlcjpwYXNz",
    ):
        assert leaked not in text
        assert json.dumps(leaked)[1:-1] not in text
    assert "Bearer ***" in text
    assert "ValueError: API said no to *** with Bearer *** and ***" in text
    assert len(text.splitlines()) >= 7
    if as_json:
        assert len(json_lines(out)) == len(text.splitlines())


def test_json_when_not_a_tty_and_console_on_a_tty() -> None:
    """json=None picks JSON lines for a pipe or file and key=value text for a terminal."""
    piped = io.StringIO()
    configure_logging(stream=piped)
    structlog.get_logger("t").info("to a pipe", n=1)
    assert json.loads(piped.getvalue())["event"] == "to a pipe"

    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        assert terminal.isatty()
        configure_logging(stream=terminal)
        structlog.get_logger("t").info("to a terminal", n=1)
        terminal.flush()
        shown = re.sub(r"\x1b\[[0-9;]*m", "", os.read(leader, 65536).decode())
    os.close(leader)
    assert "to a terminal" in shown
    assert "n=1" in shown
    assert not shown.lstrip().startswith("{")


def test_logs_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """By default lines go to stderr, never stdout (stdout is for command output)."""
    configure_logging("info")
    structlog.get_logger("t").warning("on stderr")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["event"] == "on stderr"


def test_level_filters_and_bad_level_is_rejected() -> None:
    """Lines below the level are dropped; an unknown level name is an error."""
    out = io.StringIO()
    configure_logging("warning", stream=out)
    log = structlog.get_logger("t")
    log.info("dropped")
    logging.getLogger("lib").info("dropped too")
    log.warning("kept")
    assert [line["event"] for line in json_lines(out)] == ["kept"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("chatty", stream=out)


def test_redact_masks_overlapping_and_many_secrets() -> None:
    """With thousands of secrets, overlapping ones are masked whole; short ones are ignored."""
    many = [f"tenant-{i:04d}-secret-value" for i in range(3000)]
    register_secrets([*many, "overlap-abcd", "overlap-abcdefgh", "ab"])
    text = f"a {many[0]} b {many[2999]} c overlap-abcdefgh d overlap-abcdXY e ab"
    assert redact(text) == "a *** b *** c *** d ***XY e ab"


def test_registered_tokens_are_hidden_at_once_however_many() -> None:
    """A token is masked from the moment it is registered, among a thousand others, also at
    the end of a sentence; a short token is hidden too."""
    for i in range(1000):
        register_token(f"tenant-{i}", f"tok-many-{i:04d}-abcdefgh")
    register_token("acme", "tok-first-0a1b2c3d")
    register_token("short", "tok5x")
    text = "a tok-first-0a1b2c3d b tok-many-0003-abcdefgh. c=tok-many-0999-abcdefgh d tok5x"
    assert redact(text) == "a *** b ***. c=*** d ***"


def test_only_the_last_few_tokens_per_tenant_are_kept() -> None:
    """An hourly token per tenant does not grow the registry for ever: old ones are dropped."""
    tokens = [f"tok-rotating-{i:03d}-qwertyuiop" for i in range(TOKENS_KEPT_PER_OWNER + 2)]
    for token in tokens:
        register_token("rotating", token)
    assert redact(tokens[-1]) == "***"
    assert redact(tokens[-TOKENS_KEPT_PER_OWNER]) == "***"
    assert redact(tokens[0]) == tokens[0]


def test_scrub_removes_secrets_and_bounds_length() -> None:
    """scrub() masks each secret and cuts long text."""
    assert scrub("bad secret s3cr3t here", ["s3cr3t"]) == "bad secret *** here"
    assert len(scrub("x" * 1000, [])) == 300


def test_scrub_hides_registered_tokens_and_credential_shapes() -> None:
    """Text from a server loses tokens the collector obtained and anything shaped like a
    credential, even when the caller passes no secrets."""
    register_token("acme", "opaque-token-9f8e7d")
    text = "you sent opaque-token-9f8e7d as Authorization: Bearer abc.def and zak_live_123"
    assert scrub(text) == "you sent *** as Authorization: Bearer *** and ***"


def test_importing_the_logging_module_leaves_rich_unloaded_but_importable() -> None:
    """structlog is imported without rich (start-up time), and rich still imports afterwards."""
    code = (
        "import sys\n"
        "import collector.log, structlog.dev\n"
        "print('loaded', 'rich' in sys.modules, structlog.dev.rich is None)\n"
        "import rich.console\n"
        "print('importable', rich.console.Console is not None)"
    )
    lines = run_python(code).stdout.splitlines()
    assert lines == ["loaded False True", "importable True"]


def test_console_lines_keep_plain_tracebacks_without_rich() -> None:
    """On a terminal-style renderer an exception still prints its plain traceback."""
    stream = io.StringIO()
    configure_logging("info", json=False, stream=stream)
    try:
        int("boom")
    except ValueError:
        structlog.get_logger("t").exception("failed")
    assert "Traceback (most recent call last)" in stream.getvalue()
    assert "ValueError: invalid literal for int() with base 10: 'boom'" in stream.getvalue()
