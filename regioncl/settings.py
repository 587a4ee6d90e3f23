"""Typed settings from plain config dicts, written once for every stage.

A stage's settings are a frozen dataclass that mixes in ``Settings``: ``from_dict`` rejects
unknown keys by name, checks types (nested dataclasses, Optional, Literal, tuples), and
prefixes every message with where the value came from (e.g. ``benchmarks.coco.solver.lr``);
``to_dict`` gives plain JSON-able values that ``from_dict`` accepts back.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self


def from_dict_strict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types; errors start with ``where``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {names}")
    missing = [
        f.name
        for f in fields
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(data[name], hints[name], f"{where}.{name}") for name in names if name in data}
    return cls(**values)


def _coerce(value: Any, expected: Any, where: str) -> Any:
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if dataclasses.is_dataclass(expected):
        return from_dict_strict(expected, value, where)
    if expected is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise TypeError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if expected in (int, str, bool) and type(value) is not expected:
        raise TypeError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def to_plain_dict(settings: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-able values (tuples as lists), accepted back by ``from_dict_strict``."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(dataclasses.asdict(settings))


class Settings:
    """Mixin for frozen settings dataclasses: strict ``from_dict`` and plain ``to_dict``."""

    section: ClassVar[str] = ""  # the config key errors name by default, e.g. "proposals.filter"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        return from_dict_strict(cls, data, where or cls.section or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        return to_plain_dict(self)
