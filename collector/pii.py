"""Per-sink PII policy: keep emails, replace them with keyed pseudonyms, or drop per-user rows.

The API identifies users by email, and the email appears only in the per-user rows
(:class:`~collector.models.UserDayRecord.user`). The host applies a sink's policy to every batch
before that sink sees it, so a sink never receives what its policy forbids:

- ``keep``: rows as collected;
- ``pseudonymize``: each email becomes ``u_`` + the first 32 hex digits of
  HMAC-SHA256(key, lower-cased, trimmed email). The same key gives the same pseudonym on every
  day, in every run and in every sink, so per-user history still joins; without the key the
  pseudonym cannot be reversed by hashing candidate emails;
- ``drop``: no per-user rows at all (daily, IDE and language totals stay).

The state store has a policy of its own, ``state.raw_pii`` (:func:`raw_payload_policy`): ``keep``
stores the API's body as received; ``pseudonymize`` replaces each email in the stored body and in
the records handed to the sinks by its keyed pseudonym before anything is written, so no email
reaches the disk at all. Sinks then receive those pseudonyms as user ids (a sink's own
``pseudonymize`` hashes them once more, again stable; its ``drop`` still drops the rows).

Two emails that differ only in case are one mailbox, so under ``pseudonymize`` their rows for one
day are merged into a single row (messages summed, the later ``last_active``, IDEs and languages
united) rather than written twice under one key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from collector.models import Batch, TenantDay, UserDayRecord
from collector.sink import PiiMode, SinkConfig

PSEUDONYM_PREFIX = "u_"
PSEUDONYM_HEX_DIGITS = 32


class Pseudonymizer:
    """Keyed email pseudonyms; build one per key and reuse it (the keyed HMAC state is cached)."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a pseudonymization key must not be empty")
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "Pseudonymizer(key=***)"

    def pseudonym(self, email: str) -> str:
        mac = self._base.copy()
        mac.update(email.strip().lower().encode("utf-8"))
        return PSEUDONYM_PREFIX + mac.hexdigest()[:PSEUDONYM_HEX_DIGITS]

    def apply(self, tenant_day: TenantDay) -> TenantDay:
        merged: dict[str, UserDayRecord] = {}
        for user in tenant_day.users:
            alias = self.pseudonym(user.user)
            earlier = merged.get(alias)
            if earlier is None:
                merged[alias] = UserDayRecord(
                    tenant=user.tenant,
                    day=user.day,
                    user=alias,
                    messages=user.messages,
                    last_active=user.last_active,
                    ides=user.ides,
                    languages=user.languages,
                    last_active_at=user.last_active_at,
                )
            else:
                merged[alias] = _merge(earlier, user)
        return tenant_day.with_users(list(merged.values()))


def _merge(kept: UserDayRecord, other: UserDayRecord) -> UserDayRecord:
    last_active = max(
        (d for d in (kept.last_active, other.last_active) if d is not None), default=None
    )
    return UserDayRecord(
        tenant=kept.tenant,
        day=kept.day,
        user=kept.user,
        messages=kept.messages + other.messages,
        last_active=last_active,
        ides=_union(kept.ides, other.ides),
        languages=_union(kept.languages, other.languages),
        last_active_at=max(
            (t for t in (kept.last_active_at, other.last_active_at) if t is not None), default=None
        ),
    )


def _union(first: Sequence[str], second: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*first, *second]))


def apply_pii(batch: Batch, mode: PiiMode, key: bytes | None) -> list[TenantDay]:
    """The batch as a sink with policy ``mode`` may see it.

    ``key`` is required (non-empty) for ``pseudonymize`` and ignored otherwise. The input is not
    modified; tenant-days are frozen, and unchanged ones are returned as they are.
    """
    if mode == "keep":
        return list(batch)
    if mode == "drop":
        return [td.with_users(()) if td.users else td for td in batch]
    if mode == "pseudonymize":
        if not key:
            raise ValueError("pii: pseudonymize needs a non-empty key")
        pseudonymizer = Pseudonymizer(key)
        return [pseudonymizer.apply(td) if td.users else td for td in batch]
    raise ValueError(f"unknown PII mode {mode!r}")


def apply_sink_policy(batch: Batch, config: SinkConfig) -> list[TenantDay]:
    """Apply the PII policy of one sink instance's config (``pii`` and ``pii_key``)."""
    key = config.pii_key.get_secret_value().encode("utf-8") if config.pii_key else None
    return apply_pii(batch, config.pii, key)


StoredPayload = str
"""What the state store keeps per day: the response body as text."""
PayloadPolicy = Callable[[TenantDay, StoredPayload], tuple[TenantDay, StoredPayload]]


def pseudonymize_payload(
    pseudonymizer: Pseudonymizer, tenant_day: TenantDay, payload: StoredPayload
) -> tuple[TenantDay, StoredPayload]:
    """The tenant-day and its stored payload with every email replaced by its pseudonym.

    The payload's ``users`` are rewritten from the pseudonymized rows, so rows merged because
    their emails differed only in case are merged in the payload too (it still parses, with
    unique users). Everything else in the payload is kept as received.
    """
    if not tenant_day.users:
        return tenant_day, payload
    private = pseudonymizer.apply(tenant_day)
    body: dict[str, Any] = json.loads(payload)
    data = dict(body["data"])
    data["users"] = [
        {
            "email": user.user,
            "messages": user.messages,
            "last_active": _last_active(user),
            "ides": list(user.ides),
            "languages": list(user.languages),
        }
        for user in private.users
    ]
    body["data"] = data
    return private, json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _last_active(user: UserDayRecord) -> str | None:
    """The user's ``last_active`` as the payload gives it back: the instant when the API gave
    one (so ``last_active_at`` survives a re-parse), else the day."""
    if user.last_active_at is not None:
        return user.last_active_at.isoformat()
    return user.last_active.isoformat() if user.last_active else None


_PSEUDONYM = re.compile(rf"{PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX_DIGITS}}}")
# Email-shaped text anywhere in a body: what a quarantined body (one the parser could not read,
# so its users cannot be found field by field) may hold. Deliberately broad: a false positive
# only pseudonymizes a string that was not an email.
_EMAIL = re.compile(rb"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")


class _StatePseudonymizer(Pseudonymizer):
    """The state store's pseudonymizer: idempotent, so a payload stored with pseudonyms and
    parsed again (``reprocess``) keeps them instead of hashing them a second time."""

    __slots__ = ()

    def pseudonym(self, email: str) -> str:
        if _PSEUDONYM.fullmatch(email):
            return email
        return super().pseudonym(email)


def pseudonymize_body(pseudonymizer: Pseudonymizer, body: bytes) -> bytes:
    """``body`` with every email-shaped string replaced by its pseudonym (for bodies that could
    not be parsed, which are kept as received otherwise)."""
    return _EMAIL.sub(
        lambda match: pseudonymizer.pseudonym(match.group().decode("ascii")).encode("ascii"), body
    )


def raw_payload_policy(mode: str, key: bytes | None) -> PayloadPolicy | None:
    """The state store's ``state.raw_pii`` policy: None for ``keep`` (nothing to do), else the
    function applied to each fetched day before it is stored."""
    pseudonymizer = _state_pseudonymizer(mode, key)
    if pseudonymizer is None:
        return None
    return lambda tenant_day, payload: pseudonymize_payload(pseudonymizer, tenant_day, payload)


def raw_body_policy(mode: str, key: bytes | None) -> Callable[[bytes], bytes] | None:
    """``state.raw_pii`` for bodies kept unparsed (quarantined days): None for ``keep``, else a
    function replacing every email in the body by the pseudonym a parsed day would get."""
    pseudonymizer = _state_pseudonymizer(mode, key)
    if pseudonymizer is None:
        return None
    return lambda body: pseudonymize_body(pseudonymizer, body)


def _state_pseudonymizer(mode: str, key: bytes | None) -> Pseudonymizer | None:
    if mode == "keep":
        return None
    if mode != "pseudonymize":
        raise ValueError(f"unknown raw_pii mode {mode!r}")
    if not key:
        raise ValueError("state.raw_pii: pseudonymize needs a non-empty key")
    return _StatePseudonymizer(key)
