"""The errors mmgen raises on purpose: each message names the problem (the field, file or input, its
value, what is allowed) and the fix.

Every class derives from `MMGenError`, so `except MMGenError` catches all of them, and also from the
built-in type callers already expect (`ValueError` for bad values, `OSError` for files that cannot
be written, `RuntimeError` for a run that cannot go on). The command line prints these as one
paragraph and exits with status 2; anything else is a bug and keeps its traceback. `docs/errors.md`
lists them with what to do about each. This module imports nothing.
"""

from __future__ import annotations

import math
from typing import Any


class MMGenError(Exception):
    """Base of every error mmgen raises on purpose."""


class OptionError(MMGenError, ValueError):
    """A generation or sampling option is out of range, of the wrong type, or does not apply."""


class InputError(MMGenError, ValueError):
    """A prompt, message or image given to a model cannot be used (wrong type, invalid text, bad image)."""


class ChatError(InputError):
    """A conversation the chat template cannot render; the message names the message and the fix."""


class UnreadableImage(InputError):
    """An image that cannot be used (missing, corrupt, unsupported mode, dtype, range or size)."""


class ModelFileError(MMGenError, ValueError):
    """A model or tokenizer directory, or one of its files, is missing, corrupt or does not belong to the model."""


class ConfigError(MMGenError, ValueError):
    """A training config value or key is wrong; the message names it and says what would be right."""


class DataError(MMGenError, ValueError):
    """A training data source cannot be used at all (missing path, no items)."""


class CheckpointError(MMGenError, ValueError):
    """A checkpoint cannot be resumed from; the message says why and what to do."""


class OutputError(MMGenError, OSError):
    """An output cannot be written (its parent is a file, it is a directory, the name is too long, the disk is full)."""


class TrainingError(MMGenError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says what to try."""


def _bound(x: float | None, default: str) -> str:
    """A range bound as written in messages: integers in full (4294967295, not 4.29497e+09)."""
    if x is None:
        return default
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 error: type[MMGenError] = OptionError) -> None:
    """Raise `error` unless `value` is a finite real (an int when `integer`) within [low, high].

    `low_open` / `high_open` exclude the bound itself. bool is not a number here. The message names
    `name`, the value and the allowed range, e.g. "top_p = 1.5: must be a number in (0, 1]"."""
    kind = "an integer" if integer else "a number"
    allowed = (f"must be {kind} in {'(' if low_open else '['}{_bound(low, '-inf')}, "
               f"{_bound(high, 'inf')}{')' if high_open else ']'}")
    numeric = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise error(f"{name} = {value!r:.80} ({type(value).__name__}): {allowed}")
    if isinstance(value, float) and not math.isfinite(value):  # ints are exact: no float conversion (10**400)
        raise error(f"{name} = {value!r}: {allowed}")
    if (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high)):
        raise error(f"{name} = {value!r:.80}: {allowed}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...], error: type[MMGenError] = OptionError) -> None:
    """Raise `error` unless `value` is one of `choices` (an instance of its type, and equal)."""
    if not any(isinstance(value, type(c)) and value == c for c in choices):
        raise error(f"{name} = {value!r:.80}: must be one of {', '.join(map(repr, choices))}")
