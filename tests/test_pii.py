"""PII policies: keyed pseudonyms, dropping user rows, and no raw email reaching a sink."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from pathlib import Path

import msgspec
import pytest
from pydantic import SecretStr, ValidationError

from collector.config import load_config
from collector.errors import ConfigError
from collector.pii import Pseudonymizer, apply_pii, apply_sink_policy, raw_payload_policy
from collector.plugin_manager import SinkRegistry, make_plugin_manager
from collector.sink import SinkConfig
from collector.testing import UNICODE_EMAILS, make_batch, make_tenant_day
from collector_sinks.csv import CsvSink, CsvSinkConfig
from collector_sinks.sqlite import SqliteSink, SqliteSinkConfig

KEY = b"a-test-key-of-reasonable-length!"


def reference_pseudonym(key: bytes, email: str) -> str:
    """The documented formula, computed independently of collector.pii."""
    return "u_" + hmac.new(key, email.lower().encode(), hashlib.sha256).hexdigest()[:32]


def test_pseudonyms_follow_the_documented_formula() -> None:
    """Every email becomes u_ + the first 32 hex digits of HMAC-SHA256(key, lower-cased email)."""
    batch = make_batch(("acme",), 1, users=4, unicode=True)
    result = apply_pii(batch, "pseudonymize", KEY)
    assert [u.user for u in result[0].users] == [
        reference_pseudonym(KEY, u.user) for u in batch[0].users
    ]
    assert result[0].users[0].user.startswith("u_")
    assert len(result[0].users[0].user) == 34


def test_pseudonyms_are_stable_across_days_and_runs_and_keyed() -> None:
    """The same email gets the same pseudonym on every day and call; another key gives another."""
    day1 = make_tenant_day("acme", dt.date(2025, 1, 1), ["Joe.Doe@Example.ai"])
    day2 = make_tenant_day("acme", dt.date(2025, 2, 1), ["joe.doe@example.ai "])
    first = apply_pii([day1], "pseudonymize", KEY)[0].users[0].user
    again = apply_pii([day2], "pseudonymize", KEY)[0].users[0].user
    other = apply_pii([day1], "pseudonymize", b"another key")[0].users[0].user
    assert first == again == Pseudonymizer(KEY).pseudonym("JOE.DOE@EXAMPLE.AI")
    assert other != first


def test_case_variants_of_one_mailbox_are_merged() -> None:
    """Two rows whose emails differ only in case become one row with combined activity."""
    td = make_tenant_day("acme", users=["ann@example.com", "Ann@Example.com", "bob@example.com"])
    ann, ann_upper, _bob = td.users
    td = td.with_users(
        [
            msgspec.structs.replace(
                ann, ides=("VS Code",), languages=("Go",), last_active=dt.date(2025, 1, 14)
            ),
            msgspec.structs.replace(ann_upper, ides=("PyCharm", "VS Code"), languages=("Python",)),
            _bob,
        ]
    )
    users = apply_pii([td], "pseudonymize", KEY)[0].users
    assert len(users) == 2
    merged = users[0]
    assert merged.user == reference_pseudonym(KEY, "ann@example.com")
    assert merged.messages == ann.messages + ann_upper.messages
    assert merged.ides == ("VS Code", "PyCharm")
    assert merged.languages == ("Go", "Python")
    assert merged.last_active == td.day


def test_drop_removes_user_rows_only() -> None:
    """drop leaves daily, IDE and language figures and removes every per-user row."""
    batch = make_batch(("acme", "globex"), 2, users=5)
    result = apply_pii(batch, "drop", None)
    assert all(td.users == () for td in result)
    assert [(td.daily, td.ides, td.languages) for td in result] == [
        (td.daily, td.ides, td.languages) for td in batch
    ]


def test_keep_changes_nothing() -> None:
    """keep hands the very same tenant-days through."""
    batch = make_batch(("acme",), 2)
    assert all(a is b for a, b in zip(apply_pii(batch, "keep", None), batch, strict=True))


def test_pseudonymize_without_key_is_refused() -> None:
    """apply_pii refuses to pseudonymize without a key, and a Pseudonymizer hides its key."""
    with pytest.raises(ValueError, match="key"):
        apply_pii(make_batch(("acme",), 1), "pseudonymize", None)
    with pytest.raises(ValueError, match="empty"):
        Pseudonymizer(b"")
    assert "a-test-key" not in repr(Pseudonymizer(KEY))


def test_sink_config_requires_and_hides_the_key() -> None:
    """pii: pseudonymize needs a non-empty pii_key, which never shows in repr or errors."""
    with pytest.raises(ValidationError, match="pii_key"):
        SinkConfig(type="x", pii="pseudonymize")
    with pytest.raises(ValidationError, match="pii_key"):
        SinkConfig(type="x", pii="pseudonymize", pii_key=SecretStr(""))
    config = SinkConfig(type="x", pii="pseudonymize", pii_key=SecretStr("canary-pii-key"))
    assert "canary-pii-key" not in repr(config)
    with pytest.raises(ValidationError) as caught:
        SinkConfig.model_validate({"type": "x", "pii": "bogus", "pii_key": "canary-pii-key"})
    assert "canary-pii-key" not in str(caught.value)
    result = apply_sink_policy(make_batch(("acme",), 1), config)
    assert result[0].users[0].user == reference_pseudonym(
        b"canary-pii-key", make_batch(("acme",), 1)[0].users[0].user
    )


def test_config_file_reads_the_key_from_a_file(tmp_path: Path) -> None:
    """A sink's pii_key_file is read by the config loader; a missing key is a located error."""
    key_file = tmp_path / "pii.key"
    key_file.write_text("file-key-canary\n", encoding="utf-8")
    registry = SinkRegistry.from_plugin_manager(make_plugin_manager())
    good = tmp_path / "good.yaml"
    good.write_text(
        f"sinks:\n  lake: {{type: csv, path: '{tmp_path}/csv', pii: pseudonymize, "
        f"pii_key_file: '{key_file}'}}\ntenants:\n  - id: acme\n    api_key: zak_test\n",
        encoding="utf-8",
    )
    config = load_config(good, sink_types=registry.config_types())
    lake = config.sinks["lake"]
    assert lake.pii_key is not None
    assert lake.pii_key.get_secret_value() == "file-key-canary"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"sinks:\n  lake: {{type: csv, path: '{tmp_path}/csv', pii: pseudonymize}}\n"
        "tenants:\n  - id: acme\n    api_key: zak_test\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(bad, sink_types=registry.config_types())
    assert "bad.yaml:2: sinks.lake" in str(caught.value)
    assert "pii_key" in str(caught.value)


@pytest.mark.parametrize("mode", ["pseudonymize", "drop"])
async def test_no_raw_email_reaches_real_sinks(tmp_path: Path, mode: str) -> None:
    """Under pseudonymize and drop, no email appears anywhere in the SQLite or CSV output."""
    batch = make_batch(("acme", "globex"), 3, users=6) + make_batch(
        ("initech",), 1, users=4, unicode=True
    )
    emails = {u.user for td in batch for u in td.users}
    assert set(UNICODE_EMAILS) <= emails
    protected = apply_pii(batch, mode, KEY)  # type: ignore[arg-type]
    sqlite = SqliteSink("db", SqliteSinkConfig(type="sqlite", path=tmp_path / "out" / "u.db"))
    csv = CsvSink("files", CsvSinkConfig(type="csv", path=tmp_path / "out" / "csv"))
    for sink in (sqlite, csv):
        await sink.write(protected)
        await sink.aclose()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) > 10
    blob = b"".join(p.read_bytes() for p in files)
    leaked = [e for e in emails if e.encode() in blob or e.split("@")[0].encode() in blob]
    assert leaked == []
    if mode == "pseudonymize":
        assert reference_pseudonym(KEY, batch[0].users[0].user).encode() in blob


def test_the_state_policy_rewrites_records_and_payload_alike() -> None:
    """state.raw_pii: pseudonymize replaces each email in the records and in the stored body by
    the same pseudonym, merges case twins in both, and leaves the rest of the body as sent."""
    day = make_tenant_day(users=["Ann@x.example", "ann@x.example", "bob@x.example"])
    body = json.dumps(
        {
            "status": "success",
            "data": {
                "period": {"start": "2026-01-05", "end": "2026-01-05", "days": 1},
                "users": [{"email": u.user, "messages": u.messages} for u in day.users],
                "lines_of_code": 7,
            },
        }
    )
    policy = raw_payload_policy("pseudonymize", b"k")
    assert policy is not None
    private, stored = policy(day, body)
    alias = Pseudonymizer(b"k").pseudonym
    assert [u.user for u in private.users] == [alias("ann@x.example"), alias("bob@x.example")]
    assert isinstance(stored, str)
    data = json.loads(stored)["data"]
    assert [u["email"] for u in data["users"]] == [u.user for u in private.users]
    assert data["users"][0]["messages"] == day.users[0].messages + day.users[1].messages
    assert data["lines_of_code"] == 7
    assert "@x.example" not in stored


def test_the_state_policy_needs_a_known_mode_and_a_key() -> None:
    """keep is no policy at all; pseudonymize without a key and unknown modes are refused."""
    assert raw_payload_policy("keep", None) is None
    with pytest.raises(ValueError, match="non-empty key"):
        raw_payload_policy("pseudonymize", b"")
    with pytest.raises(ValueError, match="unknown raw_pii mode"):
        raw_payload_policy("drop", b"k")
