"""argparse types that refuse a bad value while the command line is parsed,
before any model loads: argparse then prints one line, ``error: argument
--flag: <why>``, and exits with status 2."""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable

from orca_serve.shown import shown

_DIGITS = re.compile(r"\s*[+-]?(\d[\d_]*)\s*")


def integer(text: str) -> int:
    """An integer; one too long for Python to read (``sys.get_int_max_str_digits``)
    is named by its size: echoing it would bury the message."""
    try:
        return int(text)
    except ValueError:
        m = _DIGITS.fullmatch(text)
        limit = sys.get_int_max_str_digits()
        digits = len(m.group(1).replace("_", "")) if m else 0
        if limit and digits > limit:
            raise argparse.ArgumentTypeError(f"expected an integer of at most {limit} digits, "
                                             f"got one of {digits}") from None
        raise argparse.ArgumentTypeError(f"expected an integer, got {shown(text)}") from None


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        value = integer(text)
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {shown(value)}")
        return value
    return parse


def float_in(low: float, *, strict: bool = False, allow_inf: bool = False) -> Callable[[str], float]:
    """A number above ``low`` (``strict``) or at least ``low``; NaN is refused,
    and infinity unless ``allow_inf``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {shown(text)}") from None
        if math.isnan(value) or (value == math.inf and not allow_inf) or not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"must be a {'' if allow_inf else 'finite '}number "
                                             f"{'>' if strict else '>='} {low:g}{' or inf' if allow_inf else ''}, "
                                             f"got {shown(value)}")
        return value
    return parse


def list_of(item: Callable[[str], object]) -> Callable[[str], list]:
    """A comma-separated list of at least one ``item``."""
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not any(parts) or not all(parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list with no empty entries, "
                                             f"got {shown(text)}")
        return [item(p) for p in parts]
    return parse


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """The text itself, once ``parse`` accepts it (its ValueError's message becomes argparse's)."""
    def check(text: str) -> str:
        try:
            parse(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    return check
