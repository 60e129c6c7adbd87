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
from collections.abc import Callable, Mapping, Sequence
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


StoredPayload = Mapping[str, Any] | str
"""What the state store keeps per day: the response body as text, or its ``data`` object."""
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
    body: dict[str, Any] = (
        json.loads(payload) if isinstance(payload, str) else {"status": "success", "data": payload}
    )
    data = dict(body["data"])
    data["users"] = [
        {
            "email": user.user,
            "messages": user.messages,
            "last_active": user.last_active.isoformat() if user.last_active else None,
            "ides": list(user.ides),
            "languages": list(user.languages),
        }
        for user in private.users
    ]
    body["data"] = data
    return private, json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def raw_payload_policy(mode: str, key: bytes | None) -> PayloadPolicy | None:
    """The state store's ``state.raw_pii`` policy: None for ``keep`` (nothing to do), else the
    function applied to each fetched day before it is stored."""
    if mode == "keep":
        return None
    if mode != "pseudonymize":
        raise ValueError(f"unknown raw_pii mode {mode!r}")
    if not key:
        raise ValueError("state.raw_pii: pseudonymize needs a non-empty key")
    pseudonymizer = Pseudonymizer(key)
    return lambda tenant_day, payload: pseudonymize_payload(pseudonymizer, tenant_day, payload)
