"""Typed configs from YAML/JSON files and `--key.sub=value` overrides; unknown keys are errors.

`build(klass, data)` maps nested dicts onto dataclasses, converting and checking every value
against the field's type hint (a YAML `1e-3` or a command-line "3e-4" becomes a float); an unknown
key is a `ConfigError` that names the closest valid key(s) (`lrr`: "did you mean 'lr'?").
Dotted overrides (`optim.lr=3e-4`, `data.sources.0.path=...`) are applied to the raw dict first, so
a file and the command line go through one validation. `describe(klass)` renders `--help` from each field's `help` metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from mmgen.errors import ConfigError


def opt(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    meta = {"help": help, **metadata}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def closest(word: str, candidates: list[str], cutoff: float = 0.6) -> list[str]:
    """The candidates nearest to `word` (difflib's ratio ≥ cutoff): the best one and any as good, at most 3."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    return [c for r, c in scored if r >= cutoff and r >= scored[0][0] - 0.02][:3]


def suggest(key: str, valid: list[str], deeper: list[str] = (), what: str = "key") -> str:
    """The end of an "unknown `what`" message: "; did you mean 'x'?" naming the closest of `valid` (the
    keys at this level), else of `deeper` (dotted keys below it, matched on their last part), else the
    list of `valid` (for keys, with a pointer to `mmgen train --help`)."""
    close = closest(key, valid)
    if not close and deeper:
        close = [d for d in deeper if d.rsplit(".", 1)[-1] in closest(key, [d.rsplit(".", 1)[-1] for d in deeper],
                                                                        cutoff=0.8)][:3]
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    if what == "key":
        return f"; no {what} is close: the keys here are {', '.join(sorted(valid))} (`mmgen train --help` lists all)"
    return f"; no {what} is close: choose from {', '.join(sorted(valid))}"


def dotted_keys(klass: type, prefix: str = "") -> list[str]:
    """Every key below dataclass `klass` as "section.key" (sections recursed into; lists of sections not)."""
    hints, out = get_type_hints(klass), []
    for f in dataclasses.fields(klass):
        tp = hints[f.name]
        out += dotted_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [prefix + f.name]
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON (.json) config file -> dict; errors name the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse {p}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of config sections, got a {type(data).__name__}")
    return data


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.0.c = value` in nested dicts/lists, creating dicts on the way (validation comes later)."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--{key}: {'.'.join(parts[:i])} is a list of {len(node)}; {part!r} is not an "
                                  "index in it")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--{key}: {'.'.join(parts[:i])} is a value, not a section")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        f = float(value) if isinstance(value, (str, float)) else None
    except ValueError:
        f = None
    if f is not None and f.is_integer():
        return int(f)
    raise ConfigError(f"{where} must be an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where} must be a number, got {value!r}")


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where} must be a string, got {value!r}")


SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}  # type -> checked conversion


def convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp`, converting strings from the command line; raise ConfigError."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} is a section: give a mapping of its keys, got {value!r}")
        return build(tp, value, where + ".")
    if tp in SCALARS:
        return SCALARS[tp](value, where)
    if origin in (list, tuple):
        if isinstance(value, str):  # from the command line: YAML flow syntax, e.g. "[a, b]"
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(convert(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [convert(v, item, f"{where}.{i}") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")  # a bug in a config class, not in the input


def build(klass: type, data: dict[str, Any], where: str = "") -> Any:
    """A dataclass instance from a (nested) dict: every key must be a field; every value is type-checked."""
    hints = get_type_hints(klass)
    fields = {f.name: f for f in dataclasses.fields(klass) if f.init}
    for key in data:
        if key not in fields:
            deeper = [k for k in dotted_keys(klass) if "." in k]
            raise ConfigError(f"unknown config key '{where}{key}'{suggest(str(key), list(fields), deeper)}")
    kwargs = {k: convert(v, hints[k], f"{where}{k}") for k, v in data.items()}
    try:
        return klass(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where.rstrip('.') or klass.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A config dataclass -> plain dicts/lists (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def type_name(tp: Any) -> str:
    if _is_optional(tp):
        return type_name(next(a for a in get_args(tp) if a is not type(None))) + "|null"
    origin = get_origin(tp)
    if origin in (list, tuple):
        return "LIST"
    if origin is dict:
        return "MAP"
    return getattr(tp, "__name__", str(tp)).upper()


def describe(klass: type, prefix: str = "", defaults: Any = None,
             extra_help: dict[str, str] | None = None) -> list[str]:
    """`--help` lines for every field of `klass` (recursively), with its type, default and help text."""
    lines = []
    hints = get_type_hints(klass)
    obj = defaults if defaults is not None else klass()
    for f in dataclasses.fields(klass):
        name, value, tp = prefix + f.name, getattr(obj, f.name), hints[f.name]
        helptext = f.metadata.get("help") or (extra_help or {}).get(name, "")
        if dataclasses.is_dataclass(tp) and not f.metadata.get("leaf"):
            lines.append(f"  [{name}]  {helptext}".rstrip())
            lines += describe(tp, name + ".", value, extra_help)
            continue
        item = (get_args(tp) or [None])[0]
        if get_origin(tp) is list and dataclasses.is_dataclass(item):  # a list of sections: describe one item
            lines.append(f"  --{name}=LIST  (default: {len(value)} item(s); set one key with --{name}.N.KEY=VALUE)")
            lines.append(f"        {helptext}")
            lines += describe(item, f"{name}.N.", value[0] if value else None, extra_help)
            continue
        shown = json.dumps(to_dict(value)) if not isinstance(value, str) else value
        lines.append(f"  --{name}={type_name(tp)}  (default: {shown})")
        if helptext:
            lines.append(f"        {helptext}")
    return lines
