"""Loading a config file: source -> sinks by their own models -> cross checks -> AppConfig.

Every step adds problems to the same :class:`~collector.config.source.Source` instead of stopping,
so one :class:`~collector.errors.ConfigError` lists them all, sorted by line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

from pydantic import BaseModel, Field, SecretStr, TypeAdapter, ValidationError, create_model
from pydantic_core import ErrorDetails

from collector.config.durations import DURATION_JSON_SCHEMA, format_duration, parse_duration
from collector.config.models import NAME_PATTERN, AppConfig, GenericSinkConfig
from collector.config.source import (
    FILE_SUFFIX,
    MAX_CONFIG_BYTES,
    ConfigPath,
    Source,
    format_path,
    is_secret_key,
    parse_source,
)
from collector.errors import ConfigError, ConfigProblem
from collector.sink import SinkConfig

SinkTypes = Mapping[str, type[SinkConfig]]

_DURATION_HINT = "expected a duration such as 30s, 5m, 1h or a number of seconds"
_FRIENDLY = {
    "missing": "missing required key",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "time_delta_type": _DURATION_HINT,
    "time_delta_parsing": _DURATION_HINT,
}


def load_config(
    path: str | Path,
    *,
    environ: Mapping[str, str] | None = None,
    sink_types: SinkTypes | None = None,
) -> AppConfig:
    """Load and validate the config file at ``path``; raise ConfigError listing every problem.

    ``environ`` (default ``os.environ``) feeds ``${VAR}`` interpolation. ``sink_types`` maps each
    sink type name to its ``Config`` model; None validates sinks as :class:`GenericSinkConfig`.
    """
    file = str(path)
    try:
        with Path(path).open("rb") as handle:
            # One byte past the bound is enough to know; a huge file is never read whole.
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            limit = f"{MAX_CONFIG_BYTES // (1024 * 1024)} MiB"
            raise ConfigError([ConfigProblem(file, None, "", f"the file is larger than {limit}")])
        text = raw.decode("utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [ConfigProblem(file, None, "", f"cannot read the file: {reason}")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(file, None, "", "the file is not UTF-8 text")]) from None
    return parse_config(text, source_name=file, environ=environ, sink_types=sink_types)


def parse_config(
    text: str,
    *,
    source_name: str = "<config>",
    environ: Mapping[str, str] | None = None,
    sink_types: SinkTypes | None = None,
) -> AppConfig:
    """Like :func:`load_config` for YAML text; ``source_name`` is the file named in problems."""
    source = parse_source(text, source_name, os.environ if environ is None else environ)
    if not isinstance(source.data, dict):
        raise ConfigError(_sorted(source.problems))
    _forgive_idle_secrets(source)
    # top-level x-* keys hold YAML anchors for reuse (as in docker compose); they are not settings
    data = {k: v for k, v in source.data.items() if not k.startswith("x-")}
    raw_sinks = data.pop("sinks", None)
    if raw_sinks is None:
        raw_sinks = {}
    elif not isinstance(raw_sinks, dict):
        source.add(("sinks",), "expected a mapping of sink names to their settings")
        raw_sinks = {}
    sinks = _validate_sinks(raw_sinks, source, sink_types)
    _check_tenants(data.get("tenants"), raw_sinks, source)
    _settle_file_keys(data, (), AppConfig, source)
    config: AppConfig | None = None
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        _report(exc, (), AppConfig, source)
    if source.problems or config is None:
        raise ConfigError(_sorted(source.problems))
    config.sinks = sinks
    config.warnings.extend(_shared_credentials(config, source))
    return config


_CREDENTIALS = ("client_id", "client_secret", "api_key")


def _forgive_idle_secrets(source: Source) -> None:
    """A tenant with ``enabled: false`` needs no secrets: drop the problems about values that
    could not be produced for its credentials (an unset variable, a missing secret file), so the
    tenant can wait for them. Mistakes in how they are written are still reported."""
    tenants = source.data.get("tenants")
    if not isinstance(tenants, list):
        return
    idle = {
        index
        for index, tenant in enumerate(tenants)
        if isinstance(tenant, dict) and tenant.get("enabled") is False
    }
    forgiven: set[str] = set()
    for spot in source.placeholders:
        if len(spot) == 3 and spot[0] == "tenants" and spot[1] in idle and spot[2] in _CREDENTIALS:
            forgiven |= {format_path(spot), format_path(source.file_keys.get(spot, spot))}
    source.problems = [p for p in source.problems if p.path not in forgiven]


def _shared_credentials(config: AppConfig, source: Source) -> list[ConfigProblem]:
    """Warnings for tenants whose credentials equal an earlier tenant's: both would fetch one
    organization's data twice (and share its rate budget) under two ids."""
    first: dict[str, str] = {}
    warnings: list[ConfigProblem] = []
    for index, tenant in enumerate(config.tenants):
        if tenant.client_id is None and tenant.api_key is None:
            continue  # a disabled tenant without credentials
        fingerprint = tenant.credentials_fingerprint
        if fingerprint not in first:
            first[fingerprint] = tenant.id
            continue
        path: ConfigPath = ("tenants", index, "id")
        warnings.append(
            ConfigProblem(
                source.file,
                source.line_of(path),
                f"tenants[{index}]",
                f"tenant {tenant.id!r} has the same credentials as tenant "
                f"{first[fingerprint]!r}: both would collect the same organization",
            )
        )
    return warnings


def _sorted(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


def _validate_sinks(
    raw_sinks: dict[str, Any], source: Source, sink_types: SinkTypes | None
) -> dict[str, SinkConfig]:
    sinks: dict[str, SinkConfig] = {}
    for name, raw in raw_sinks.items():
        path: ConfigPath = ("sinks", name)
        if not NAME_PATTERN.fullmatch(name):
            source.add(path, f"invalid sink name {name!r}: 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(raw, dict):
            source.add(path, "expected a mapping with at least a type (e.g. type: sqlite)")
            continue
        if "type" not in raw:
            source.add((*path, "type"), "missing required key (the sink type, e.g. sqlite)")
            continue
        type_name = raw["type"]
        if not isinstance(type_name, str):
            source.add((*path, "type"), "expected a string")
            continue
        model: type[SinkConfig] = GenericSinkConfig
        known = sink_types is None or type_name in sink_types
        if sink_types is not None:
            if known:
                model = sink_types[type_name]
            else:
                installed = ", ".join(sorted(sink_types)) or "none"
                source.add(
                    (*path, "type"), f"unknown sink type {type_name!r}; installed: {installed}"
                )
                # Still check the keys every sink has (batch_size, pii, ...), so installing the
                # plugin does not reveal a second round of problems.
        values = _coerce_durations(dict(raw), model)
        _settle_file_keys(values, path, model, source)
        if model is GenericSinkConfig:
            values = {k: _maybe_secret(k, v) for k, v in values.items()}
        try:
            validated = model.model_validate(values)
        except ValidationError as exc:
            _report(exc, path, model, source)
            continue
        if known:
            sinks[name] = validated
    return sinks


def _coerce_durations(values: dict[str, Any], model: type[SinkConfig]) -> dict[str, Any]:
    """Let "30s"-style durations work in every sink's timedelta fields, as everywhere else."""
    for name, field in model.model_fields.items():
        value = values.get(name)
        if isinstance(value, str) and _unwrap(field.annotation) is dt.timedelta:
            with contextlib.suppress(ValueError):  # pydantic then reports it in its own words
                values[name] = parse_duration(value)
    return values


def _maybe_secret(key: str, value: Any) -> Any:
    looks_secret = key != "url" and (is_secret_key(key) or key.endswith(("secret", "password")))
    if looks_secret and key not in SinkConfig.model_fields and isinstance(value, str):
        return SecretStr(value)
    return value


def _check_tenants(raw_tenants: Any, raw_sinks: dict[str, Any], source: Source) -> None:
    """Cross checks pydantic cannot do per tenant: unique ids, routes to configured sinks."""
    if not isinstance(raw_tenants, list):
        return
    # Keyed by the lower-cased id: "Acme" and "acme" would share one directory of the csv sink
    # on a case-insensitive file system (macOS, Windows), so they count as the same id.
    first: dict[str, tuple[str, int | None]] = {}
    for index, tenant in enumerate(raw_tenants):
        if not isinstance(tenant, dict):
            continue
        tenant_id = tenant.get("id")
        if isinstance(tenant_id, str | int) and not isinstance(tenant_id, bool):
            _check_unique_id(str(tenant_id), ("tenants", index, "id"), first, source)
        routes = tenant.get("sinks")
        for position, name in enumerate(routes if isinstance(routes, list) else []):
            if isinstance(name, str) and name not in raw_sinks:
                source.add(("tenants", index, "sinks", position), _unknown_sink(name, raw_sinks))


def _check_unique_id(
    key: str, path: ConfigPath, first: dict[str, tuple[str, int | None]], source: Source
) -> None:
    """Report ``key`` if an earlier tenant has it, or has it in another case (``first`` maps each
    lower-cased id seen to its spelling and line)."""
    earlier = first.get(key.lower())
    if earlier is None:
        first[key.lower()] = (key, source.line_of(path))
    elif earlier[0] == key:
        source.add(path, f"duplicate tenant id {key!r} (first at line {earlier[1]})")
    else:
        source.add(
            path,
            f"tenant id {key!r} differs only in case from {earlier[0]!r} (line {earlier[1]}); "
            "ids name directories, which some file systems do not tell apart by case",
        )


def _unknown_sink(name: str, raw_sinks: Mapping[str, Any]) -> str:
    guess = difflib.get_close_matches(name, list(raw_sinks), n=1)
    if guess:
        return f"unknown sink {name!r}; did you mean {guess[0]!r}?"
    return f"unknown sink {name!r}; configured sinks: {', '.join(raw_sinks) or 'none'}"


def _settle_file_keys(
    values: dict[str, Any], prefix: ConfigPath, model: type[BaseModel], source: Source
) -> None:
    """Drop each resolved ``<key>_file`` key unless the model at its place declares it."""
    for file_key in source.file_keys.values():
        if file_key[: len(prefix)] != prefix:
            continue
        relative = file_key[len(prefix) :]
        owner = _model_at(model, relative[:-1])
        if owner is not None and relative[-1] in owner.model_fields:
            continue
        container = _lookup(values, relative[:-1])
        if isinstance(container, dict):
            container.pop(str(relative[-1]), None)


def _lookup(data: Any, path: ConfigPath) -> Any:
    for part in path:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _report(
    exc: ValidationError, prefix: ConfigPath, model: type[BaseModel], source: Source
) -> None:
    """Turn pydantic's errors into problems, located by line, minus those about placeholders."""
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error["loc"])
        path = (*prefix, *loc)
        if source.near_placeholder(path):
            continue
        # an error about a value read from a file is reported at the <key>_file key the user wrote
        source.add(source.file_keys.get(path, path), _message(error, model, loc))


def _message(error: ErrorDetails, model: type[BaseModel], loc: ConfigPath) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        allowed = _key_names(owner) if owner is not None else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        if guess:
            return f"unknown key; did you mean {guess[0]!r}?"
        return f"unknown key; expected one of: {', '.join(allowed)}"
    if kind in ("value_error", "assertion_error"):
        message = error["msg"]
        for noise in ("Value error, ", "Assertion failed, "):
            message = message.removeprefix(noise)
        return message
    return _FRIENDLY.get(kind, error["msg"])


def _key_names(model: type[BaseModel]) -> list[str]:
    names = list(model.model_fields)
    return names + [
        n + FILE_SUFFIX for n in names if is_secret_key(n) and n + FILE_SUFFIX not in names
    ]


def _model_at(root: type[BaseModel], loc: ConfigPath) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``loc`` below ``root``, if any."""
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def json_schema(sink_types: SinkTypes | None = None) -> dict[str, Any]:
    """The JSON Schema of the config file; with ``sink_types``, sinks are a union on ``type``."""
    item: Any = GenericSinkConfig
    if sink_types:
        variants = [
            create_model(
                f"{_class_name(name)}SinkConfig",
                __base__=sink_types[name],
                type=(cast(Any, Literal)[name], Field(description=f"The sink type: {name}.")),
            )
            for name in sorted(sink_types)
        ]
        union: Any = variants[0] if len(variants) == 1 else cast(Any, Union)[tuple(variants)]
        item = union if len(variants) == 1 else Annotated[union, Field(discriminator="type")]
    schema_model = create_model(
        "AppConfig",
        __base__=AppConfig,
        sinks=(
            dict[str, item],
            Field(default_factory=dict, description="Sink instances by name; the routing key."),
        ),
    )
    schema = schema_model.model_json_schema()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    schema["title"] = "zencoder-collector configuration"
    for node in [schema, *schema.get("$defs", {}).values()]:
        _allow_file_keys(node)
    _widen_durations(schema)
    return schema


def _widen_durations(node: Any) -> None:
    """Sinks' plain timedelta fields accept "30s" too (the loader converts them); say so."""
    if isinstance(node, list):
        for item in node:
            _widen_durations(item)
    elif isinstance(node, dict):
        if node.get("format") == "duration" and node.get("type") == "string":
            del node["format"], node["type"]
            node.update(DURATION_JSON_SCHEMA)
        default = node.get("default")
        if isinstance(default, str) and _accepts_duration(node):
            # pydantic writes defaults in ISO 8601 (PT30S); show them as users write them
            node["default"] = format_duration(TypeAdapter(dt.timedelta).validate_python(default))
        for value in node.values():
            _widen_durations(value)


def _accepts_duration(node: dict[str, Any]) -> bool:
    members = node.get("anyOf", [])
    return all(member in members for member in DURATION_JSON_SCHEMA["anyOf"])


def _class_name(type_name: str) -> str:
    return "".join(part.capitalize() for part in type_name.replace("-", "_").split("_"))


def _allow_file_keys(node: dict[str, Any]) -> None:
    properties = node.get("properties", {})
    for key in sorted(k for k in properties if is_secret_key(k)):
        properties.setdefault(
            key + FILE_SUFFIX,
            {
                "type": "string",
                "description": f"Read {key} from this file (one trailing newline dropped).",
            },
        )
        if key in node.get("required", []):
            node["required"].remove(key)


def summarize(config: AppConfig) -> str:
    """One line for ``validate``: tenants by auth mode, sinks by name and type."""
    tenants = config.tenants
    # by the credentials given: a disabled tenant may have none
    oauth = sum(1 for t in tenants if t.client_id is not None)
    api_key = sum(1 for t in tenants if t.api_key is not None)
    disabled = len(tenants) - len(config.enabled_tenants)
    modes = f"{oauth} oauth, {api_key} api_key"
    if disabled:
        modes += f", {disabled} disabled"
    sinks = ", ".join(f"{name} ({sink.type})" for name, sink in config.sinks.items())
    text = f"ok: {_plural(len(tenants), 'tenant')} ({modes}), {_plural(len(config.sinks), 'sink')}"
    return f"{text}: {sinks}" if sinks else text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
