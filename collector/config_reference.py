"""docs/config-reference.md, generated from the config models (``schema --markdown``).

Every key of the config file, section by section, with its type, default, limits and the
``description`` its pydantic field carries, so the reference cannot drift from what the loader
accepts: tests/test_config_reference.py fails when the file in the repository is stale.
Regenerate it with::

    zencoder-collector schema --markdown -o docs/config-reference.md

The sinks section covers the first-party sink types; a plugin's sink documents itself through
``zencoder-collector plugins --schemas``.
"""

from __future__ import annotations

import datetime as dt
import enum
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from collector.config.models import AppConfig

HEADER = """\
# Configuration reference

<!-- Generated from the config models by `zencoder-collector schema --markdown -o
docs/config-reference.md`; tests/test_config_reference.py fails when it is stale. Edit the
models' field descriptions, not this file. -->

Every key the config file accepts, section by section. [configuration.md](configuration.md)
explains how the pieces fit together (secrets, `${VAR}`, `*_file:` keys, reload); this page is
the list. Durations are written `30s`, `5m`, `1h`, `1d` (or seconds as a number); secrets are
never shown by any command.
"""

FIRST_PARTY = "zencoder-collector"


def _type_name(annotation: Any) -> str:
    """A reader's name for a field's type: ``integer``, ``list of string``, ``duration``..."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in get_args(annotation) if a is not type(None)]
        nullable = type(None) in get_args(annotation)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type_name(get_args(annotation)[0])}"
    if origin is dict:
        return f"map of string to {_type_name(get_args(annotation)[1])}"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "object"
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(f"`{m.value}`" for m in annotation)
        simple = {
            bool: "boolean",
            int: "integer",
            float: "number",
            str: "string",
            SecretStr: "secret string",
            dt.timedelta: "duration",
            Path: "path",
        }
        for kind, name in simple.items():
            if issubclass(annotation, kind):
                return name
        return annotation.__name__
    return str(annotation)


def _models_in(annotation: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """Nested models of a field, with the suffix their keys take (``[]`` for list items)."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield "", annotation
    elif origin in (Union, types.UnionType, Annotated):
        for arg in get_args(annotation):
            yield from _models_in(arg)
    elif origin is list:
        for suffix, model in _models_in(get_args(annotation)[0]):
            yield "[]" + suffix, model


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(see below)"
    else:
        value = info.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
        return f"`{seconds:g}s`"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value in ([], {}, ""):
        return f"`{value!r}`" if value != "" else '`""`'
    return f"`{value}`"


def _limits(info: FieldInfo) -> str:
    words = []
    for item in info.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            bound = getattr(item, attr, None)
            if bound is not None and isinstance(item, annotated_types.BaseMetadata):
                if isinstance(bound, dt.timedelta):
                    bound = f"{bound.total_seconds():g}s"
                words.append(f"{symbol} {bound}")
    return ", ".join(words)


def _cell(text: str) -> str:
    # Docstrings use reStructuredText's ``literal``; Markdown wants `literal`.
    return " ".join(text.replace("``", "`").replace("|", "\\|").split())


def _section(
    title: str, model: type[BaseModel], lines: list[str]
) -> list[tuple[str, type[BaseModel]]]:
    """Append the table of ``model``'s keys; return the nested models still to document."""
    nested: list[tuple[str, type[BaseModel]]] = []
    doc = (model.__doc__ or "").strip().split("\n\n")[0]
    lines += ["", f"## `{title}`", ""]
    if doc:
        lines += [_cell(doc), ""]
    lines += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        limits = _limits(info)
        description = _cell(info.description or "")
        if limits:
            description = f"{description} ({limits})" if description else f"({limits})"
        lines.append(
            f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {description} |"
        )
        for suffix, child in _models_in(info.annotation):
            nested.append((f"{title}.{name}{suffix}", child))
    return nested


def render_reference(sink_types: Mapping[str, type[BaseModel]] | None = None) -> str:
    """The whole reference; ``sink_types`` defaults to the first-party sinks."""
    if sink_types is None:
        sink_types = first_party_sink_types()
    lines = [HEADER.rstrip("\n")]
    queue: list[tuple[str, type[BaseModel]]] = []
    for name, info in AppConfig.model_fields.items():
        for suffix, model in _models_in(info.annotation):
            queue.append((f"{name}{suffix}", model))
    seen: set[str] = set()
    while queue:
        title, model = queue.pop(0)
        if title in seen or title.startswith("sinks"):
            continue
        seen.add(title)
        queue[:0] = _section(title, model, lines)
    lines += [
        "",
        "## `sinks.<name>`",
        "",
        "Sink instances by name; tenants route to them by that name (`tenants[].sinks`). Every "
        "sink takes the common keys (`type`, `pii`, `pii_key`, `timeout`, `batch_size`, "
        "`max_attempts`) and those of its type below. Sink types from plugins: "
        "`zencoder-collector plugins --schemas`.",
    ]
    by_model: dict[type[BaseModel], list[str]] = {}
    for type_name in sorted(sink_types):
        by_model.setdefault(sink_types[type_name], []).append(type_name)
    for model, names in by_model.items():  # sqlite and sql share one model: one section
        _section(f"sinks.<name> (type: {', '.join(names)})", model, lines)
    return "\n".join(lines) + "\n"


def first_party_sink_types() -> dict[str, type[BaseModel]]:
    """The config models of the sink types this distribution ships (not other plugins')."""
    from collector.app import load_plugins

    registry = load_plugins().registry
    own = {i.type_name for i in registry.describe() if i.distribution == FIRST_PARTY}
    return {name: model for name, model in registry.config_types().items() if name in own}
