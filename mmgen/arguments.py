"""argparse pieces every command shares: a parser whose errors are one line, and typed arguments
whose messages name the allowed range (`-n: must be ≥ 1, got 0`)."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error, `error: PROG: MESSAGE (see `PROG --help`)`, and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound when None), e.g. "-n: must be ≥ 1, got 0"."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'≥ {low}' if high is None else f'in {low}..{high}'}, "
                                             f"got {value}")
        return value

    return parse


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def shift(value: str) -> str | float:
    """An argparse type: 'auto' or a number."""
    try:
        return value if value == "auto" else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number or 'auto', got {value!r}") from None


def text(value: str) -> str:
    """An argparse type: text that is valid UTF-8 (undecodable bytes in argv arrive as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 (an undecodable byte at character {e.start + 1}); "
                                         "check the terminal's or the script's encoding") from None
    return value


def seconds(value: str) -> float:
    """An argparse type: a finite number of seconds ≥ 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {value}")
    return number
