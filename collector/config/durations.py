"""Durations as the config writes them (``500ms``, ``30s``, ``5m``, ``1h``, ``1d``, ``1h30m``, a
number of seconds, or ISO 8601), parsed into :class:`datetime.timedelta` and written back so."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> object:
    """``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"1d"`` or seconds -> timedelta.

    ISO 8601 strings (``PT30S``) and other types pass through for pydantic to judge.
    """
    if isinstance(value, bool):
        raise ValueError(  # noqa: TRY004 - pydantic turns only ValueError into a located problem
            "expected a duration such as 30s, 5m, 1h or a number of seconds"
        )
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return dt.timedelta(seconds=value)
    if isinstance(value, str) and not value.startswith("P"):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            return dt.timedelta(seconds=float(text))
        if text and re.fullmatch(f"(?:{_DURATION_PART.pattern})+", text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
            return dt.timedelta(seconds=seconds)
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 30s, 5m, 1h, 1d, 1h30m")
    return value


def format_duration(value: dt.timedelta) -> str:
    """The shortest exact spelling in the config's own units: ``30s``, ``5m``, ``500ms``."""
    millis = round(value.total_seconds() * 1000)
    for unit in ("d", "h", "m", "s"):
        size = round(_UNIT_SECONDS[unit] * 1000)
        if millis and millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"


DURATION_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "string",
            "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d))+$|^\d+(\.\d+)?$|^P[0-9.YMWDTHS]+$",
        },
        {"type": "number", "minimum": 0},
    ],
}
"""Durations as the config accepts them: 500ms, 30s, 5m, 1h, 1d, 1h30m, seconds, or ISO 8601."""

Duration = Annotated[
    dt.timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(DURATION_JSON_SCHEMA),
]
