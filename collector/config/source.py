"""Reading a config file into plain data while remembering the line every value came from.

pydantic reports a problem by location (``("tenants", 0, "id")``) but knows nothing about lines, so
this module walks the YAML node tree itself (``yaml.compose`` keeps a mark on every node) and
records the line of each key and list item. While walking it also does the two things users write
into any string of the file:

- **interpolation**: ``${VAR}``, ``${VAR:-default}`` (unset or empty -> default),
  ``${VAR:?message}`` (unset or empty -> error with that message), ``$$`` for a literal dollar;
  a ``$`` followed by anything else stays as written. Defaults are taken literally (no nesting).
- **secret files**: next to a secret key (:func:`is_secret_key`), ``<key>_file: PATH`` reads the
  value from a file (Docker and Kubernetes secrets), stripping one trailing newline.

Hostile input is bounded before anything is built: a file larger than :data:`MAX_CONFIG_BYTES`
is not parsed, and one whose anchors, aliases and merge keys would expand to more than
:data:`MAX_CONFIG_VALUES` values (a "billion laughs" of nested ``x-`` anchors) or nest deeper
than :data:`MAX_CONFIG_DEPTH` is one problem, found by counting the node graph (each node once)
instead of expanding it.

Every problem is collected (never raised) as a :class:`~collector.errors.ConfigProblem`, so the
loader can report all of them at once. Where a value could not be produced, a placeholder (an empty
string) keeps the key present and the spot is remembered in ``Source.placeholders``: the loader
drops validation errors about that spot, so one mistake gives one message. Messages name
variables and paths, never a value read from the environment or a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from collector.errors import ConfigProblem

ConfigPath = tuple[str | int, ...]

SECRET_KEYS = frozenset(
    {"client_secret", "api_key", "client_id", "secret", "pii_key", "password", "token", "url"}
)
"""Keys whose value may come from a sibling ``<key>_file`` (besides :data:`SECRET_SUFFIXES`)."""
SECRET_SUFFIXES = ("_secret", "_password", "_key", "_token")

FILE_SUFFIX = "_file"

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""A config larger than this is refused unread (ten thousand tenants take about 2 MiB)."""
MAX_CONFIG_VALUES = 1_000_000
"""Values (mappings, lists, scalars) the file may expand to once every alias is resolved."""
MAX_CONFIG_DEPTH = 200
"""Mappings and lists nested in each other; a real config needs fewer than ten."""

# libyaml's parser is ~15x faster (it matters when a SIGHUP reloads thousands of tenants) and keeps
# the same marks; the pure-Python one is the fallback where PyYAML was built without it.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_REFERENCE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<expr>[^}]*)\}|(?P<open>\{))")
_EXPRESSION = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>.*))?", re.S)


class InterpolationError(ValueError):
    """A string referenced an environment variable that is not set, or had a malformed ``${``."""


class SecretFileError(ValueError):
    """A secret file could not be read; the message names the path and the OS reason only."""


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}`` and ``$$`` in ``text``."""
    if "$" not in text:
        return text
    errors: list[str] = []

    def expand(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        if match["open"]:
            errors.append("unterminated '${' (write '$$' for a literal dollar sign)")
            return ""
        expr = _EXPRESSION.fullmatch(match["expr"])
        if expr is None:
            errors.append(
                f"invalid reference '${{{match['expr']}}}': "
                "expected ${NAME}, ${NAME:-default} or ${NAME:?message}"
            )
            return ""
        name, op, arg = expr["name"], expr["op"], expr["arg"]
        value = environ.get(name)
        if op == ":-":
            return value if value else arg
        if op == ":?":
            if not value:
                errors.append(f"environment variable {name} is not set: {arg or 'required'}")
                return ""
            return value
        if value is None:
            errors.append(f"environment variable {name} is not set")
            return ""
        return value

    result = _REFERENCE.sub(expand, text)
    if errors:
        raise InterpolationError("; ".join(errors))
    return result


def is_secret_key(key: str) -> bool:
    """Whether ``<key>_file`` may stand in for ``key`` (client_secret, api_key, *_password, ...)."""
    return key in SECRET_KEYS or key.endswith(SECRET_SUFFIXES)


def read_secret_file(path: str) -> str:
    """A secret file's content minus one trailing newline; raises :class:`SecretFileError`."""
    try:
        raw = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SecretFileError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"secret file {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    if not text:
        raise SecretFileError(f"secret file {path} is empty")
    return text


def format_path(path: ConfigPath) -> str:
    """``("tenants", 0, "client_id")`` -> ``tenants[0].client_id``; the root is ``""``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class Source:
    """A config file as plain data, with the line of every key and the problems found reading it."""

    file: str
    data: Any = None
    lines: dict[ConfigPath, int] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)
    placeholders: list[ConfigPath] = field(default_factory=list)
    """Paths whose value is a stand-in for one that could not be produced (already reported)."""
    secret_files: dict[ConfigPath, str] = field(default_factory=dict)
    """Path of a value read from a file -> the file's path as written."""
    file_keys: dict[ConfigPath, ConfigPath] = field(default_factory=dict)
    """Path of a value read from a file -> path of the ``<key>_file`` key the user wrote."""

    def line_of(self, path: ConfigPath) -> int | None:
        """The line of ``path``, or of its nearest ancestor the file mentions."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def add(self, path: ConfigPath, message: str, *, line: int | None = None) -> None:
        """Record one problem at ``path`` (on ``line``, or the line the file gives ``path``)."""
        where = self.line_of(path) if line is None else line
        self.problems.append(ConfigProblem(self.file, where, format_path(path), message))

    def near_placeholder(self, path: ConfigPath) -> bool:
        """Whether ``path`` is a placeholder, or contains one, or lies inside one."""
        return any(
            known[: len(path)] == path or path[: len(known)] == known for known in self.placeholders
        )


def parse_source(text: str, file: str, environ: Mapping[str, str]) -> Source:
    """Parse YAML ``text`` into a :class:`Source`; YAML syntax errors become a single problem."""
    source = Source(file=file)
    if len(text) > MAX_CONFIG_BYTES:
        source.add((), f"the file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB")
        return source
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except RecursionError:
        source.add((), f"nested more than {MAX_CONFIG_DEPTH} levels deep")
        return source
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        reason = " ".join(part for part in (exc.context, exc.problem) if part)
        source.add((), f"invalid YAML: {reason or 'cannot parse'}", line=line)
        return source
    except yaml.YAMLError as exc:
        source.add((), f"invalid YAML: {exc}", line=None)
        return source
    if root is None:
        source.add((), "the file is empty; expected a mapping with api, collection, sinks, tenants")
        return source
    expanded = _expanded_size(root)
    if expanded is None:
        source.add((), f"nested more than {MAX_CONFIG_DEPTH} levels deep")
        return source
    if expanded > MAX_CONFIG_VALUES:
        source.add(
            (),
            f"the file expands to more than {MAX_CONFIG_VALUES:,} values once its anchors, "
            "aliases (*name) and merge keys (<<) are resolved; reuse fewer nested anchors",
        )
        return source
    builder = _Builder(source, environ)
    source.data = builder.build(root, ())
    if not isinstance(source.data, dict):
        source.add((), "expected a mapping at the top level (api, collection, sinks, tenants, ...)")
        source.data = None
    return source


def _expanded_size(root: Node) -> int | None:
    """How many values ``root`` stands for with every alias expanded, counting each distinct node
    once (memoized), so a billion laughs is counted in microseconds, not expanded. None if the
    nesting is deeper than :data:`MAX_CONFIG_DEPTH`. A merge key counts the mapping it merges;
    a recursive alias counts once (the builder reports it)."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: Node, depth: int) -> int:
        if depth > MAX_CONFIG_DEPTH:
            raise _TooDeep
        known = sizes.get(id(node))
        if known is not None:
            return known
        if id(node) in visiting:
            return 1
        visiting.add(id(node))
        total = 1
        if isinstance(node, MappingNode):
            for key, value in node.value:
                total += size(key, depth + 1) + size(value, depth + 1)
                if total > MAX_CONFIG_VALUES:
                    break
        elif isinstance(node, SequenceNode):
            for item in node.value:
                total += size(item, depth + 1)
                if total > MAX_CONFIG_VALUES:
                    break
        visiting.discard(id(node))
        sizes[id(node)] = total = min(total, MAX_CONFIG_VALUES + 1)
        return total

    try:
        return size(root, 0)
    except _TooDeep:
        return None


class _TooDeep(Exception):
    """Raised inside :func:`_expanded_size` to stop at :data:`MAX_CONFIG_DEPTH`."""


class _Builder:
    """Turns YAML nodes into dicts, lists and scalars, filling the :class:`Source` as it goes."""

    def __init__(self, source: Source, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.constructor = SafeConstructor()
        self.active: set[int] = set()

    def build(self, node: Node, path: ConfigPath) -> Any:
        self.source.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self.active:
            self.source.add(path, "recursive YAML alias")
            self.source.placeholders.append(path)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]
            return self._scalar(node, path)
        finally:
            self.active.discard(id(node))

    def _scalar(self, node: Node, path: ConfigPath) -> Any:
        try:
            value = self.constructor.construct_object(node)
        except yaml.YAMLError:
            self.source.add(path, f"unsupported YAML value (tag {node.tag})")
            self.source.placeholders.append(path)
            return ""
        if isinstance(value, str):
            try:
                return interpolate(value, self.environ)
            except InterpolationError as exc:
                self.source.add(path, str(exc))
                self.source.placeholders.append(path)
                return ""
        return value

    def _mapping(self, node: MappingNode, path: ConfigPath) -> dict[str, Any]:
        own = {id(key) for key, _ in node.value}
        try:
            # "<<: *anchor" merge keys: merged pairs come first, so the mapping's own keys win
            self.constructor.flatten_mapping(node)
        except yaml.YAMLError as exc:
            self.source.add(path, f"invalid YAML merge: {getattr(exc, 'problem', exc)}")
            return {}
        out: dict[str, Any] = {}
        written_at: dict[str, int] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                self.source.add(path, "keys must be plain strings", line=key_line)
                continue
            key = str(key_node.value)
            child = (*path, key)
            if id(key_node) in own:
                if key in written_at:
                    self.source.add(
                        child, f"duplicate key (first at line {written_at[key]})", line=key_line
                    )
                    continue
                written_at[key] = key_line
            self.source.lines[child] = key_line
            out[key] = self.build(value_node, child)
        self._read_secret_files(out, path)
        return out

    def _read_secret_files(self, mapping: dict[str, Any], path: ConfigPath) -> None:
        for key in list(mapping):
            base = key.removesuffix(FILE_SUFFIX)
            if base == key or not is_secret_key(base):
                continue
            file_key, target = (*path, key), (*path, base)
            if base in mapping:
                self.source.add(file_key, f"give either {base} or {key}, not both")
                continue
            self.source.lines[target] = self.source.lines[file_key]
            self.source.file_keys[target] = file_key
            file_path = mapping[key]
            mapping[base] = ""  # placeholder, so the value is not also reported as missing
            if not isinstance(file_path, str) or not file_path:
                self.source.add(file_key, "expected the path of a file")
                self.source.placeholders.append(target)
                continue
            self.source.secret_files[target] = file_path
            try:
                mapping[base] = read_secret_file(file_path)
            except SecretFileError as exc:
                self.source.add(file_key, str(exc))
                self.source.placeholders.append(target)  # its placeholder must not be reported too
