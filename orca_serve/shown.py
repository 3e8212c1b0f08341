"""How an error message shows a value a user gave: ``f"got {shown(value)}"``.

``f"{value}"`` and ``repr(value)`` of an int past 4300 digits raise ValueError
(Python's limit on int -> str conversion), so a message built that way
reports the limit instead of the field it is about; a long string or list
would bury the message. ``shown`` is the repr for everything short and names
the rest by its size.

Within ``json_values()`` (every request to the server) values are shown as
JSON, as the client sent them: ``null``, ``true``, ``"text"``, not Python's
``None``, ``True``, ``'text'``.
"""
from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

MAX_CHARS = 200  # a repr longer than this is abbreviated


def shown(value) -> str:
    """``repr(value)``, or for a huge int ``an integer of 5001 digits``, for a
    long string its ends and its length; never raises. As JSON within ``json_values()``."""
    return (_SHOWN_JSON if _AS_JSON.get() else _SHOWN).repr(value)


@contextmanager
def json_values() -> Iterator[None]:
    """While it lasts, in this context (an asyncio task has its own), ``shown``
    writes values as JSON: for errors answered to a client that sent JSON."""
    token = _AS_JSON.set(True)
    try:
        yield
    finally:
        _AS_JSON.reset(token)


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
        text = self._quoted(x, level)
        return text if len(x) <= MAX_CHARS else f"{text} (a string of {len(x)} characters)"

    def _quoted(self, x: str, level: int) -> str:
        """``x`` in quotes, its middle cut past ``MAX_CHARS``."""
        return super().repr_str(x, level)


_SHOWN = _Shown()


class _ShownJSON(_Shown):
    """``_Shown`` in JSON's words. A body decoded from JSON holds no tuples or
    sets; lists and objects are reprlib's, with their items in JSON's words.
    It may hold non-finite floats: Python's json reads NaN and Infinity."""

    def repr_NoneType(self, x: None, level: int) -> str:
        return "null"

    def repr_bool(self, x: bool, level: int) -> str:
        return "true" if x else "false"

    def repr_float(self, x: float, level: int) -> str:
        return json.dumps(x)  # NaN, Infinity, -Infinity, as sent; Python says nan, inf

    def _quoted(self, x: str, level: int) -> str:
        if len(x) <= MAX_CHARS:
            return json.dumps(x, ensure_ascii=False)
        half = MAX_CHARS // 2
        return f"{json.dumps(x[:half], ensure_ascii=False)[:-1]}...{json.dumps(x[-half:], ensure_ascii=False)[1:]}"


_SHOWN_JSON = _ShownJSON()
_AS_JSON: ContextVar[bool] = ContextVar("orca_serve_shown_as_json", default=False)
