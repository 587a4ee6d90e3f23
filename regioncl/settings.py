"""Typed settings from plain config dicts, written once for every stage.

A stage's settings are a frozen dataclass that mixes in ``Settings``: ``from_dict`` rejects
unknown keys by name, checks types (nested dataclasses, Optional, Literal, tuples), and
prefixes every message with where the value came from (e.g. ``benchmarks.coco.solver.lr``);
``to_dict`` gives plain JSON-able values that ``from_dict`` accepts back. A field whose type
depends on another value (a method's ``Params``) is typed by the ``field_types`` hook.

Numeric ranges are declared on the field (``bounded``) and checked by the same parse, so a
value out of range fails when the config is read, naming the key and the range, not later
inside a job (a temperature of 0 would train on NaN losses).
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

RANGE_METADATA = "regioncl.range"


# Range bound name -> (symbol for messages, comparison that must hold).
_COMPARISONS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric setting: ``ge``/``gt`` below, ``le``/``lt`` above (None: unbounded)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: float, where: str) -> None:
        bounds = [(getattr(self, name), symbol, holds) for name, (symbol, holds) in _COMPARISONS.items()]
        if not all(holds(value, bound) for bound, _, holds in bounds if bound is not None):
            described = " and ".join(f"{symbol} {bound}" for bound, symbol, _ in bounds if bound is not None)
            raise ValueError(f"{where}: expected a value {described}, got {value!r}")


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:  # fmt: skip
    """A dataclass field with ``default`` whose parsed value must lie in the given range."""
    return dataclasses.field(default=default, metadata={RANGE_METADATA: Range(ge=ge, gt=gt, le=le, lt=lt)})


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
    if issubclass(cls, Settings):
        hints |= cls.field_types(data)
    values = {name: _coerce(data[name], hints[name], f"{where}.{name}") for name in names if name in data}
    check_ranges(cls, values, where)
    return cls(**values)


def check_ranges(cls: type, values: Mapping[str, Any], where: str) -> None:
    """Check ``values`` of dataclass ``cls`` against the ranges its fields declare (``bounded``)."""
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get(RANGE_METADATA)
        if bounds is not None and f.name in values and values[f.name] is not None:
            bounds.check(values[f.name], f"{where}.{f.name}")


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
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"{where}: expected a number, got {value!r}{_yaml_number_hint(value)}")
    if expected in (int, str, bool) and type(value) is not expected:
        raise TypeError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def _yaml_number_hint(value: Any) -> str:
    # YAML 1.1 (PyYAML, Snakemake's loader) reads `1e-4` as a string: say how to write it.
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (a string: write the number without quotes; YAML reads 1e-4 as text, 1.0e-4 as a number)"
    return ""


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
    def field_types(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """Types of the fields whose type depends on other values of ``data`` (e.g. the
        ``Params`` of the pretraining ``method`` it names), parsed strictly like any field;
        ``data``'s keys are checked and its required keys present when this is called."""
        return {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        return from_dict_strict(cls, data, where or cls.section or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        return to_plain_dict(self)
