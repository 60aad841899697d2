"""Declarative config fields: each dataclass field carries its valid range or choices, checked when loaded.

    lr: float = option(3e-4, above=0)           # a number > 0
    order: str = option("random", choices=ORDERS)
    crop_scale: tuple[float, float] = option((0.35, 1.0), above=0, max=1, check=ascending)

The type comes from the annotation (bool, int, float, str, `str | None`, `tuple[float, ...]`); bool is never
accepted as a number. `build(cls, values)` turns a dict of TOML values into the dataclass or raises a one-line
CapfastError naming the key, the valid values and what it got; `validated(obj)` checks an instance made in code
the same way, and `checked_field` one value (a command-line option's).
"""

import dataclasses
import json
import math
import types
import typing

from capfast.errors import CapfastError


def option(default, *, min=None, max=None, above=None, below=None, choices=None, check=None) -> dataclasses.Field:
    """A dataclass field with its valid values: min/max inclusive, above/below exclusive (for numbers, and for
    each number of a tuple), choices (for strings), check(value) -> error text or None (anything else)."""
    rules = {"min": min, "max": max, "above": above, "below": below, "choices": choices, "check": check}
    return dataclasses.field(default=default, metadata={"rules": {k: v for k, v in rules.items() if v is not None}})


def ascending(values) -> str | None:
    return None if list(values) == sorted(values) else "(low, high) with low <= high"


def build(cls, values: dict, prefix: str = "", unknown_key=None, flags: bool = False):
    """cls(**values) after checking every key (given ones and defaults) against its field's type and rules.
    Errors name a key `prefix + name`, or with flags=True the command-line flag `--name-with-dashes`."""
    def key(name: str) -> str:
        return "--" + name.replace("_", "-") if flags else prefix + name

    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        if name not in fields:
            message = unknown_key(key(name)) if unknown_key else f"unknown config key {key(name)!r}"
            raise CapfastError(message)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in values:
            kwargs[name] = checked(key(name), hints[name], f, values[name])
        elif "rules" in f.metadata:  # a default must satisfy its own rules too
            checked(key(name), hints[name], f, f.default)
    return cls(**kwargs)


def validated(obj, prefix: str = ""):
    """A copy of the dataclass instance `obj` whose fields passed `build`'s checks: one made in code gets the
    same one-line error as a TOML value (and the same conversions: int -> float, list -> tuple)."""
    return build(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, prefix)


def checked_field(cls, name: str, value, key: str):
    """`value` checked against field `name` of `cls` (converted as `build` converts it); errors name `key`."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return checked(key, typing.get_type_hints(cls)[name], f, value)


def default(cls, name: str):
    """The default value of dataclass field `name` (for a command-line option that sets it)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def checked(key: str, hint, f: dataclasses.Field, value):
    """`value` converted to the field's type (int -> float, list -> tuple), or CapfastError."""
    rules = f.metadata.get("rules", {})
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        raise CapfastError(f"config key {key!r} must be a section, e.g. [{key}]")
    value = _typed(key, hint, rules, value)
    problem = rules["check"](value) if "check" in rules else None
    if problem:
        raise CapfastError(f"{key} must be {problem}, got {_show(value)}")
    return value


def _typed(key: str, hint, rules: dict, value):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(key, hint, rules, value)
    if origin is tuple:
        return _tuple(key, args, rules, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise CapfastError(f"{key} must be true or false, got {_show(value)}")
        return value
    if hint in (int, float):
        return _number(key, hint, rules, value, what=f"{_noun(hint)} {_bounds(rules)}".strip())
    if hint is str:
        return _string(key, rules, value)
    raise TypeError(f"{key}: unsupported config field type {hint!r}")  # a programming error, not bad input


def _number(key: str, hint, rules: dict, value, what: str):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int and not isinstance(value, int):
        is_number = False
    if not is_number or (isinstance(value, float) and not math.isfinite(value)) or not _in_range(value, rules):
        raise CapfastError(f"{key} must be {what}, got {_show(value)}")
    return hint(value)


def _in_range(value, rules: dict) -> bool:
    return not (("min" in rules and value < rules["min"]) or ("max" in rules and value > rules["max"])
                or ("above" in rules and value <= rules["above"]) or ("below" in rules and value >= rules["below"]))


def _noun(hint) -> str:
    return "an integer" if hint is int else "a number"


def _bounds(rules: dict) -> str:
    """e.g. '> 0 and <= 1'"""
    names = (("min", ">="), ("above", ">"), ("max", "<="), ("below", "<"))
    return " and ".join(f"{op} {rules[name]}" for name, op in names if name in rules)


def _string(key: str, rules: dict, value):
    if "choices" in rules:
        if value not in rules["choices"]:
            raise CapfastError(f"{key} must be one of {', '.join(rules['choices'])}, got {_show(value)}")
        return value
    if not isinstance(value, str):
        raise CapfastError(f"{key} must be a string, got {_show(value)}")
    return value


def _tuple(key: str, args: tuple, rules: dict, value):
    element = args[0]
    length = None if len(args) == 2 and args[1] is Ellipsis else len(args)
    bounds = _bounds(rules)
    count = f"{length} " if length else ""
    each = f", each {bounds}" if bounds else ""
    described = f"a list of {count}{'numbers' if element is float else 'integers'}{each}"
    what = f"{_noun(element)} {bounds}".strip()
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise CapfastError(f"{key} must be {described}, got {_show(value)}")
    try:
        return tuple(_number(key, element, rules, v, what) for v in value)
    except CapfastError:
        raise CapfastError(f"{key} must be {described}, got {_show(value)}") from None


def _show(value) -> str:
    """The value as it would be written in TOML / on the command line."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
