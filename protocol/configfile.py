"""Config documents: TOML tables validated into frozen msgspec Structs, and TOML written back.

One way for every config in fedbus (director, envoy, broker, fault plans): decode the TOML,
convert it into the Struct in one validating pass, and on failure raise `ConfigError` naming
the source file and the field (msgspec's path, e.g. ``$.deadlines.share_keys``). Pure
functions: the file is read by the caller (see broker.files.read_toml).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from protocol.errors import ProtocolError

__all__ = ["ConfigError", "convert_config", "dump_toml", "parse_toml"]

T = TypeVar("T")


class ConfigError(ProtocolError):
    """A config that cannot be used; the message names the file and the field."""


def parse_toml(text: str, *, source: str) -> dict[str, Any]:
    """The table a TOML document holds; ConfigError names `source` if it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def convert_config(data: Mapping[str, Any], kind: type[T], *, source: str) -> T:
    """Validate a decoded table as `kind`; errors name `source` and the field.

    ValueError raised by a Struct's __post_init__ (checks across fields) is reported the same
    way as a schema violation.
    """
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text for a table of scalars, lists, nested tables and arrays of tables.

    Nested mappings become [a.b] tables; a list of mappings becomes [[a]] array-of-tables
    entries; None values are left out (TOML has no null). Round-trips through tomllib.
    """
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    subtables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            subtables.append((key, value))
        elif _is_table_array(value):
            arrays.append((key, list(value)))
        elif value is not None:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, sub in subtables:
        lines.append("")
        lines.append("[" + ".".join(_key(p) for p in [*path, key]) + "]")
        _dump_table(sub, [*path, key], lines)
    for key, items in arrays:
        for item in items:
            lines.append("")
            lines.append("[[" + ".".join(_key(p) for p in [*path, key]) + "]]")
            _dump_table(item, [*path, key], lines)


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(v, Mapping) for v in value)
    )


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "")
    return key if bare.isascii() and bare.isalnum() else _value(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
