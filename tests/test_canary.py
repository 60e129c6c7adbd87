"""Canary: distinctive secrets in the config never show up in logs, output, files or errors."""

from __future__ import annotations

from pathlib import Path

from collector.simulator import SimTenant, SimulatorSettings, running_simulator
from tests.e2e import run_cli, write_config
from tests.servers import WebhookReceiver

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
