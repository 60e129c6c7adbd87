"""Logging: structlog to stderr, JSON off a terminal, and no secret on any line.

::

    configure_logging("info", secrets=cfg.secret_values())
    log = structlog.get_logger(__name__)
    with structlog.contextvars.bound_contextvars(tenant="acme"):
        log.info("fetched", day="2024-05-01")   # every line inside carries tenant=acme

The processor chain is the usual one (contextvars, level, ISO timestamp, exception text) followed by
two layers of redaction:

- :func:`redact_secrets`, a processor: every string in the event (nested dicts and lists included,
  and the traceback text that ``format_exc_info`` put there) has each registered secret, each
  ``Bearer`` token and each ``zak_...`` API key replaced by ``***``; values of
  keys named like credentials (``authorization``, ``client_secret``, ...) are dropped whole;
- the renderer's output is redacted once more, which catches secrets inside the ``repr`` of
  arbitrary objects and their JSON-escaped forms.

Third-party libraries that log through stdlib ``logging`` (aiohttp, botocore) go through the same
chain, so their lines are redacted and carry the tenant too. The secret registry is global and only
grows: a rotated-out secret must stay hidden as well. Access tokens are registered the moment they
are obtained (:func:`register_token`) and the last few per tenant are kept, so an hourly token per
tenant does not grow the registry for ever. :func:`redact` is also what scrubs every text that
comes from a remote server (:func:`scrub`). Secrets shorter than
:data:`MIN_SECRET_LENGTH` are not registered (masking every "ab" would garble logs; no real
credential is that short).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any, TextIO


def _import_structlog_without_rich() -> None:
    """Import structlog with ``rich`` hidden from it, unless structlog or rich is loaded already
    (the CLI imports this module before any command module, which import structlog too).

    structlog imports rich, when installed, at import time for two features we do not use: its
    console renderer's rich tracebacks (we pass ``plain_traceback``) and the locals of its dict
    tracebacks (we use ``format_exc_info``). That import (rich, pygments, attrs) was about 0.1 s
    of every start. A ``None`` in ``sys.modules`` makes ``import rich`` fail inside structlog,
    which falls back as if rich were absent; the entry is removed at once, so our progress bars
    (:mod:`collector.progress`) import rich as usual when a terminal shows them.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]  # None: "not importable"
    try:
        import structlog  # noqa: F401 - the import this function is for
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()

import structlog  # noqa: E402 - after the import above, which already loaded it
from structlog.typing import EventDict, Processor, WrappedLogger  # noqa: E402

__all__ = [
    "MIN_SECRET_LENGTH",
    "configure_logging",
    "redact",
    "redact_secrets",
    "register_secrets",
    "register_token",
    "scrub",
]

MIN_SECRET_LENGTH = 4
MASK = "***"

_SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "zencoder-api-key",
        "api_key",
        "client_secret",
        "access_token",
        "refresh_token",
        "password",
        "secret",
        "pii_key",
        "token",
    }
)
# Credential shapes recognisable without knowing the value: bearer tokens, Zencoder API keys,
# and key=value / "key": "value" pairs of well-known credential names (token endpoint bodies).
_CREDENTIAL_SHAPES = re.compile(
    r"(?P<scheme>\bBearer\s+)[A-Za-z0-9\-._~+/]+=*"
    r"|\bzak_[A-Za-z0-9_\-]+"
    r"|(?P<pair>[\"']?\b(?:access_token|refresh_token|client_secret|api_key|zencoder-api-key)"
    r"[\"']?\s*[:=]\s*[\"']?)[^\"'\s&,;}]+",
    re.IGNORECASE,
)

_lock = threading.Lock()
_secrets: set[str] = set()
_tokens: dict[str, deque[str]] = {}
_token_set: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None
_pattern_stale = False
_HANDLER_MARK = "_collector_handler"
TOKENS_KEPT_PER_OWNER = 4
"""Short-lived secrets (access tokens) hidden per owner: the current one and a few before it."""
TOKEN_MIN_LENGTH = 16
_TOKEN_RUN = re.compile(rf"[A-Za-z0-9\-._~+/]{{{TOKEN_MIN_LENGTH},}}=*")
"""A run of the characters bearer tokens are made of (RFC 6750 ``b64token``), long enough to be
one: each is looked up in a set, so a thousand tenants' tokens cost no regex rebuild."""


def register_secrets(values: Iterable[str]) -> None:
    """Hide these strings (and their JSON/repr-escaped forms) on every future log line."""
    global _pattern_stale
    with _lock:
        fresh = set()
        for value in values:
            if len(value) >= MIN_SECRET_LENGTH:
                fresh |= _forms(value)
        if fresh <= _secrets:
            return
        _secrets.update(fresh)
        _pattern_stale = True


def register_token(owner: str, value: str) -> None:
    """Hide a short-lived secret (a tenant's access token) from now on, like a configured one.

    Unlike :func:`register_secrets`, only the last :data:`TOKENS_KEPT_PER_OWNER` values per
    ``owner`` are kept: a daemon obtains a token per tenant every hour, and a registry that only
    grew would grow for ever. Text is scrubbed when it arrives, while its token is current.
    Tokens of :data:`TOKEN_MIN_LENGTH` characters or more, made of the bearer-token alphabet, are
    matched as whole runs of that alphabet (punctuation around them aside) by a set lookup;
    others join the configured secrets' pattern.
    """
    if len(value) < MIN_SECRET_LENGTH:
        return
    if not _TOKEN_RUN.fullmatch(value):
        register_secrets([value])
        return
    with _lock:
        kept = _tokens.setdefault(owner, deque(maxlen=TOKENS_KEPT_PER_OWNER))
        if value in kept:
            return
        if len(kept) == kept.maxlen:
            _token_set.discard(kept[0])
        kept.append(value)
        _token_set.add(value)


def _forms(value: str) -> set[str]:
    return {value, json.dumps(value)[1:-1], repr(value)[1:-1]}


def _current_pattern() -> re.Pattern[str] | None:
    """The pattern of every configured secret, rebuilt on first use after one was added."""
    global _secret_pattern, _pattern_stale
    if not _pattern_stale:
        return _secret_pattern
    with _lock:
        if _pattern_stale:
            _secret_pattern = re.compile(_alternation(_secrets)) if _secrets else None
            _pattern_stale = False
        return _secret_pattern


def _mask_token(match: re.Match[str]) -> str:
    run = match.group()
    if run in _token_set:
        return MASK
    core = run.strip("-._~+/")  # a token at the end of a sentence, or between dots
    return run.replace(core, MASK) if core in _token_set else run


def _alternation(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, as a trie so thousands of secrets stay fast."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        # Follow single-child chains iteratively: secrets can be long (PEM keys, JWTs).
        prefix = ""
        while len(node) == 1 and "" not in node:
            ((char, node),) = node.items()
            prefix += re.escape(char)
        branches = [
            re.escape(char) + pattern(child) for char, child in sorted(node.items()) if char
        ]
        if not branches:
            return prefix
        group = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
        if "" in node:
            return f"{prefix}(?:{group})?"
        return prefix + group

    return pattern(trie)


def redact(text: str) -> str:
    """``text`` with every registered secret and recognisable credential replaced by ``***``."""
    pattern = _current_pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    if _token_set:
        text = _TOKEN_RUN.sub(_mask_token, text)
    return _CREDENTIAL_SHAPES.sub(_mask_credential, text)


def scrub(text: str, secrets: Iterable[str] = (), *, limit: int = 300) -> str:
    """``text`` from a remote server, made safe to log, store, show and raise.

    Every one of ``secrets`` and every secret the log redactor knows (configured secrets, access
    tokens, see :func:`collector.log.register_token`) becomes ``***``, and so does anything shaped
    like a credential (``Bearer ...``, ``zak_...``, ``"client_secret": ...``); whitespace runs
    collapse to one space and the text is cut to ``limit`` characters.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = redact(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mask_credential(match: re.Match[str]) -> str:
    return (match["scheme"] or match["pair"] or "") + MASK


def _redact_value(key: str, value: Any) -> Any:
    if key.lower() in _SENSITIVE_KEYS and value is not None:
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value("", item) for item in value]
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact every string value of the event, recursively."""
    return {key: _redact_value(key, value) for key, value in event_dict.items()}


class _RedactRendered:
    """Wraps a renderer so its final text is redacted too (object reprs, escaped forms)."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        rendered = self._renderer(logger, method, event_dict)
        return redact(rendered) if isinstance(rendered, str) else rendered


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(
            f"unknown log level {level!r}: use debug, info, warning, error or critical"
        )
    return number


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(
    level: str | int = "info",
    json: bool | None = None,
    secrets: Iterable[str] = (),
    *,
    stream: TextIO | None = None,
) -> None:
    """Send structlog and stdlib logging to ``stream`` (stderr), redacted, at ``level``.

    ``json=None`` picks JSON lines when the stream is not a terminal and colourful key=value
    lines when it is. Safe to call again (e.g. on SIGHUP); the previous setup is replaced.
    """
    out = sys.stderr if stream is None else stream
    tty = _is_tty(out)
    as_json = not tty if json is None else json
    threshold = _level_number(level)
    register_secrets(secrets)
    renderer = _RedactRendered(
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(
            # NO_COLOR (no-color.org): set and not empty means no ANSI colours, even on a terminal.
            colors=tty and not os.environ.get("NO_COLOR"),
            exception_formatter=structlog.dev.plain_traceback,
        )
    )
    common: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    finish: list[Processor] = [structlog.processors.format_exc_info, redact_secrets, renderer]
    structlog.configure(
        processors=[*common, _add_logger_name, structlog.processors.StackInfoRenderer(), *finish],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=_NamedWriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*common, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish],
        )
    )
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


class _NamedWriteLogger(structlog.WriteLogger):
    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedWriteLoggerFactory:
    """Like ``structlog.WriteLoggerFactory``, keeping the name given to ``structlog.get_logger``."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(self._file, str(args[0]) if args else "")


def _add_logger_name(logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", "")
    if name:
        event_dict.setdefault("logger", name)
    return event_dict
