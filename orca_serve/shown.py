"""How an error message shows a value a user gave: ``f"got {shown(value)}"``.

``f"{value}"`` and ``repr(value)`` of an int past 4300 digits raise ValueError
(Python's limit on int -> str conversion), so a message built that way
reports the limit instead of the field it is about; a long string or list
would bury the message. ``shown`` is the repr for everything short and names
the rest by its size.
"""
from __future__ import annotations

import math
import reprlib

MAX_CHARS = 200  # a repr longer than this is abbreviated


def shown(value) -> str:
    """``repr(value)``, or for a huge int ``an integer of 5001 digits``, for a
    long string its ends and its length; never raises."""
    return _SHOWN.repr(value)


def num_digits(value: int) -> int:
    """Decimal digits of ``abs(value)``, without converting it to a string."""
    value = abs(value)
    if value == 0:
        return 1
    # value >= 2**(bit_length - 1): a lower bound, then corrected exactly.
    digits = max(1, math.floor((value.bit_length() - 1) * math.log10(2)) + 1)
    while value >= 10 ** digits:
        digits += 1
    while digits > 1 and value < 10 ** (digits - 1):
        digits -= 1
    return digits


class _Shown(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = MAX_CHARS

    def repr_int(self, x: int, level: int) -> str:
        digits = num_digits(x)
        if digits <= MAX_CHARS:
            return repr(x)
        return f"{'a negative' if x < 0 else 'an'} integer of {digits} digits"

    def repr_str(self, x: str, level: int) -> str:
        text = super().repr_str(x, level)
        return text if len(x) <= MAX_CHARS else f"{text} (a string of {len(x)} characters)"


_SHOWN = _Shown()
