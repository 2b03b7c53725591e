"""Typed dataclass configs from JSON: every key must be a field and every value must fit its annotation.

`build(klass, data)` checks `data` (a dict read from a `config.json`) against the type hints of the
dataclass `klass` before its `__post_init__` runs: int (not bool; 4.0 is not an int; within int64),
float (an int is accepted; NaN and infinities are not), bool, str, `X | None`, tuples/lists and
nested dataclass sections. Each error is a `ConfigError` naming the dotted field path, the value and what is allowed,
e.g. "backbone.num_hidden_layers = 4.0 (float): must be an integer". Nothing is converted: a JSON
file that says "4" where an int belongs is wrong, not guessed at.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from mmgen.errors import ConfigError, MMGenError


def show(value: Any) -> str:
    """`value` as JSON (at most 60 characters) with its Python type: '4.0 (float)', 'null'."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if value is None else f"{text} ({type(value).__name__})"


def suggest(key: str, valid: list[str]) -> str:
    """The fix for the unknown key `key`: "did you mean 'x'?" for a near valid key, else the valid keys."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"remove it (the valid keys here are {', '.join(valid)})"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def build(klass: type, data: Any, where: str = "") -> Any:
    """A `klass` instance from a JSON object, every key a field and every value checked against its type.

    Args:
        where: the dotted path of this section in the file ("" for the top level), used in messages.
    Raises:
        ConfigError: naming the field path; errors of `klass.__post_init__` are re-raised with `where`.
    """
    if not isinstance(data, dict):
        what = f"{where} is a section" if where else f"a {klass.__name__} is an object"
        raise ConfigError(f"{what}: give a JSON object of its fields, not {show(data)}")
    hints = get_type_hints(klass)
    fields = [f.name for f in dataclasses.fields(klass) if f.init]
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {_join(where, str(key))!r}: {suggest(str(key), fields)}")
    kwargs = {k: check(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return klass(**kwargs)
    except (MMGenError, ValueError) as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def check(value: Any, tp: Any, where: str) -> Any:
    """`value` if it fits the annotation `tp` (a nested dataclass section is built); else ConfigError."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check(value, options[0], where)
        raise TypeError(f"{where}: unsupported union {tp} in a config class")  # a bug in mmgen, not in the file
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {show(value)}: must be a list")
        item = args[0] if args else Any
        items = [v if item is Any else check(v, item, f"{where}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _scalar(value, tp, where)


def _scalar(value: Any, tp: Any, where: str) -> Any:
    """`value` if it is a `tp` (bool, int, float or str), with the rules of this module's docstring."""
    if tp not in _NAMES:
        raise TypeError(f"{where}: unsupported field type {tp} in a config class")  # a bug in mmgen
    if value is None:
        raise ConfigError(f"{where} = null: must be {_NAMES[tp]} (the field is not optional)")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, int) and abs(value) < 2**1023:
            value = float(value)
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise ConfigError(f"{where} = {show(value)}: must be a finite number")
    if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
        raise ConfigError(f"{where} = {show(value)}: must be {_NAMES[tp]}")
    if tp is int and abs(value) >= 2**63:  # torch sizes are int64
        raise ConfigError(f"{where} = {show(value)}: must be an integer in (-2**63, 2**63)")
    return value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
