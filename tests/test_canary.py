"""Canary: distinctive secrets in the config never show up in logs, output, files or errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from collector.simulator import SimTenant, SimulatorSettings, running_simulator
from tests.daemon_process import DaemonProcess, eventually
from tests.e2e import run_cli, write_config
from tests.servers import EchoingApi, WebhookReceiver

CANARY_SECRET = "CANARY-oauth-secret-7f3a9c"
CANARY_WRONG = "CANARY-wrong-secret-51be02"
CANARY_KEY = "zak_CANARY_api_key_0d4e"
CANARY_HOOK = "CANARY-webhook-secret-88aa"
CANARY_PII = "CANARY-pii-key-3c3c3c"
CANARIES = [CANARY_SECRET, CANARY_WRONG, CANARY_KEY, CANARY_HOOK, CANARY_PII]


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_secrets_never_leak(tmp_path: Path) -> None:
    """OAuth secrets, API keys, the webhook and PII keys (and the tokens) appear in no log line,
    no command output, no SQLite/CSV/state file and no webhook body, even on the error paths."""
    tenants = [
        SimTenant(id="canary-ok", client_id="canary-ok-client", client_secret=CANARY_SECRET),
        SimTenant(id="canary-bad", client_id="canary-bad-client", client_secret="the-real-one"),
        SimTenant(id="canary-key5", client_id="unused", client_secret="unused", api_key=CANARY_KEY),
    ]
    receiver = WebhookReceiver(secret=CANARY_HOOK)
    async with receiver, running_simulator(SimulatorSettings(tenants=tenants)) as sim:
        config = write_config(
            tmp_path / "config.yaml",
            sim,
            tenants,
            workdir=tmp_path,
            lookback_days=3,
            sinks={
                "warehouse": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
                "sheets": {
                    "type": "csv",
                    "path": str(tmp_path / "csv"),
                    "pii": "pseudonymize",
                    "pii_key": CANARY_PII,
                },
                "hook": {"type": "webhook", "url": receiver.url, "secret": CANARY_HOOK},
            },
        )
        # Give the bad tenant a secret that is itself a canary: its error path must not echo it.
        text = config.read_text(encoding="utf-8").replace("the-real-one", CANARY_WRONG)
        config.write_text(text, encoding="utf-8")
        runs = [
            await run_cli("--log-level", "debug", "run", "--once", "-c", str(config)),
            await run_cli(
                "--log-level", "debug", "validate", "--check-credentials", "-c", str(config)
            ),
            await run_cli("status", "-c", str(config)),
            await run_cli("status", "--json", "-c", str(config)),
        ]
        tokens = sim.issued_tokens()
        bodies = [r.body for r in receiver.requests]
    assert runs[0].returncode == 1  # the bad tenant
    assert "canary-bad" in runs[0].stdout
    assert tokens, "no token was issued: the test would prove nothing"
    assert bodies, "the webhook received nothing: the test would prove nothing"
    for canary in [*CANARIES, *tokens]:
        for run in runs:
            assert canary not in run.stdout, canary
            assert canary not in run.stderr, canary
        stored = _files_containing(tmp_path, canary.encode())
        assert stored == [tmp_path / "config.yaml"] or stored == [], (canary, stored)
        assert all(canary.encode() not in body for body in bodies), canary


# --- servers that echo what they were sent --------------------------------------------------------

ECHO_KEYS = {
    "403": "CANARYKEY-403-a1b2c3d4",
    "500": "CANARYKEY-500-e5f6a7b8",
    "envelope": "CANARYKEY-env-c9d0e1f2",
}
ECHO_CLIENTS = ["ok", "401", "403", "500", "429", "envelope", "token"]
ECHO_SECRET = "CANARY-echo-oauth-secret-{}"
HOOK_SECRET = "CANARY-echo-webhook-secret-5e5e"
HOOK_HEADER = "CANARY-echo-hook-header-6f6f"
HOOK_URL_TOKEN = "CANARYurltoken7a7a7a"


def _echo_config(path: Path, api: EchoingApi, hook_url: str, workdir: Path) -> Path:
    tenants: list[dict[str, Any]] = [
        {"id": f"oauth-{mode}", "client_id": mode, "client_secret": ECHO_SECRET.format(mode)}
        for mode in ECHO_CLIENTS
    ]
    tenants += [{"id": f"key-{mode}", "api_key": key} for mode, key in ECHO_KEYS.items()]
    config = {
        "api": {
            "base_url": api.base_url,
            "token_url": api.token_url,
            "timeout": "5s",
            "retry": {"max_attempts": 2, "max_time": "5s", "backoff_initial": "10ms"},
        },
        "collection": {"lookback_days": 2, "settle_days": 1},
        "state": {"url": f"sqlite:///{workdir / 'state.db'}"},
        "server": {"listen": "127.0.0.1:0"},
        "sinks": {
            "hook": {
                "type": "webhook",
                "url": hook_url,
                "secret": HOOK_SECRET,
                "headers": {"X-Hook-Token": HOOK_HEADER},
                "max_retries": 0,
            }
        },
        "tenants": tenants,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


async def test_echoed_credentials_never_leave_the_collector(tmp_path: Path) -> None:
    """An API whose 401/403/429/500 bodies and 200 error envelopes repeat the Authorization and
    zencoder-api-key headers, a token endpoint that repeats the request body, and a webhook
    receiver whose 400 repeats the whole request: no token, key, secret, webhook header value or
    URL token appears in the run summary, status --json, /status, /metrics, any log line or any
    file (the state database included)."""
    modes = {mode: mode for mode in ECHO_CLIENTS} | {k: m for m, k in ECHO_KEYS.items()}
    receiver = WebhookReceiver(secret=HOOK_SECRET)
    async with EchoingApi(modes) as api, receiver:
        receiver.answer_echoing(400, times=100)
        hook_url = f"{receiver.url}/{HOOK_URL_TOKEN}?token={HOOK_URL_TOKEN}"
        config = _echo_config(tmp_path / "config.yaml", api, hook_url, tmp_path)
        once = await run_cli("--log-level", "debug", "run", "--once", "-c", str(config))
        status = await run_cli("status", "--json", "-c", str(config))
        async with DaemonProcess(config) as daemon:
            await eventually(
                lambda: daemon.listen is not None, within=60, what="the ops server", daemon=daemon
            )
            _, live_status = await daemon.get("/status")
            _, metrics = await daemon.get("/metrics")
            await daemon.stop()
            daemon_log = daemon.output()
        echoed = [r.status for r in receiver.requests if r.signature_valid]
    canaries = [
        *api.issued,
        *ECHO_KEYS.values(),
        *(ECHO_SECRET.format(mode) for mode in ECHO_CLIENTS),
        HOOK_SECRET,
        HOOK_HEADER,
        HOOK_URL_TOKEN,
    ]
    assert api.issued, "no token was issued: the test would prove nothing"
    assert 400 in echoed, "the webhook never answered its echo: the test would prove nothing"
    summary = json.loads(status.stdout)
    assert "oauth-403" in once.stdout
    assert summary
    outputs = [once.stdout, once.stderr, status.stdout, status.stderr, live_status, metrics]
    for canary in canaries:
        for text in [*outputs, daemon_log]:
            assert canary not in text, canary
        stored = _files_containing(tmp_path, canary.encode())
        assert stored in ([tmp_path / "config.yaml"], []), (canary, stored)
