"""A request body's bytes to Python values: JSON, or a 400 that says where in
the body the problem is."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from orca_serve.entrypoints.openai.protocol import bad_request


def decode_json(data: bytes) -> Any:
    """The body's JSON value; an ApiError (400) for a body that is not JSON,
    holds an integer too long for Python to read, or a lone surrogate."""
    reread = False
    try:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
                raise
            # Valid JSON, but an integer past Python's limit for int() from text
            # (sys.get_int_max_str_digits): its error names neither the field nor
            # the body. Read it again with such integers kept aside, to name the field.
            payload, reread = json.loads(data, parse_int=_int_or_too_long), True
    except RecursionError:
        raise bad_request("request body is not valid JSON: it is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    found = _first(payload, lambda v: isinstance(v, _TooLong)) if reread else None
    if found is not None:
        where, too_long = found
        raise bad_request(f"{where or 'body'}: got an integer of {too_long.digits} digits; integers in a request "
                          f"may have at most {sys.get_int_max_str_digits()}", param=where or None,
                          code="invalid_value")
    # JSON may spell a lone UTF-16 surrogate as an escape; no tokenizer or
    # reply can encode one. Only a body with such an escape is walked (JSON
    # writes the u lower case; the hex digits either way).
    if b"\\ud" in data or b"\\uD" in data:
        found = _first(payload, _unpaired_surrogate)
        if found is not None:
            where = found[0]
            raise bad_request(f"{where or 'body'}: text holds an unpaired UTF-16 surrogate escape "
                              f"(\\ud800-\\udfff without its pair); send valid Unicode",
                              param=where or None, code="invalid_unicode")
    return payload


class _TooLong:
    """Stands in for an integer too long to read."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _int_or_too_long(text: str) -> int | _TooLong:
    try:
        return int(text)
    except ValueError:
        return _TooLong(len(text.lstrip("-")))


def _unpaired_surrogate(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _first(payload, bad: Callable[[Any], bool]) -> tuple[str, Any] | None:
    """The path (``messages[0].content``, ``prompt[1]``; '' for the top level)
    and the value of the first value in ``payload``, an object's keys
    included, that is ``bad``; None if there is none."""
    stack = [("", payload)]
    while stack:  # no recursion: the body may be nested as deep as json allows
        path, value = stack.pop()
        if bad(value):
            return path, value
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(list(value.items())))
            stack.extend((path, k) for k in value)  # keys are text too
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None
