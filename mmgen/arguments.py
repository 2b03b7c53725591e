"""argparse pieces every command shares: a parser whose errors are one line, and typed arguments
whose messages name the allowed range (`-n: must be ≥ 1, got 0`)."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error, `error: PROG: MESSAGE (see `PROG --help`)`, and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def number(kind: type = float, low: float = 0, high: float | None = None, low_open: bool = False):
    """An argparse type: a finite `kind` (int or float) in [low, high] ((low, high] when `low_open`; no
    upper bound when None), e.g. "-n: must be ≥ 1, got 0", "--scale: must be in 1..64, got 65"."""
    noun = "an integer" if kind is int else "a number"
    bound = f"> {low:g}" if low_open else f"≥ {low:g}"
    allowed = f"in {low}..{high}" if high is not None else bound if kind is int else f"a finite number {bound}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not (low < value if low_open else low <= value) or not value < float("inf") or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (no upper bound when None)."""
    return number(int, low, high)


positive = number(float, 0, low_open=True)  # a finite number > 0 (a time budget, a learning rate)
seconds = number(float, 0)  # a finite number of seconds ≥ 0


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

