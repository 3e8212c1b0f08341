"""Counting work instead of timing it: tests that a cost does not grow with a
list's length compare the calls made with a short list and a long one."""
from __future__ import annotations

import sys


def count_calls(fn):
    """How many Python and C functions ``fn`` called: the work it did, counted
    the same way whatever does it, without a clock."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def count_items_checked(monkeypatch) -> list[int]:
    """The lengths of the lists and maps SamplingParams.validate checks from now on."""
    from orca_serve import sampling_params

    lengths, check = [], sampling_params._all_exactly
    monkeypatch.setattr(sampling_params, "_all_exactly", lambda items, kind: lengths.append(len(items)) or
                        check(items, kind))
    return lengths
