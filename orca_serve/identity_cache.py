"""Values made once per distinct list or map, found by the object's identity.

The sequences of one HTTP request (prompts × n, up to 1,024) share its
``stop``, ``stop_token_ids`` and ``logit_bias`` objects, and the prompts of
one ``generate()`` their SamplingParams. What is made from such an object
(its checks, a set to look tokens up in, its tensors) is made once for all
of them, instead of once per sequence or per iteration: a list may hold
49,000 stop token ids.

Found by content, a look-up would hash the whole list, its length again for
each use; and lists and dicts cannot be weakly referenced. So the key is
``id()``, and an entry holds its object: no other object can have that id
while the entry is in the cache. An entry stays only while someone holds it
(each request that uses it, while it runs). SamplingParams' lists must not
change while a request that uses them runs, so what was made from one still
holds for the next request that comes with the same object; once none of
them runs, the list may change, and the next request's value is made anew.
"""
from __future__ import annotations

import weakref
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Shared(Generic[T]):
    """``value``, made from ``source``; it stays in its cache while held."""

    __slots__ = ("source", "value", "__weakref__")

    def __init__(self, source, value: T) -> None:
        self.source = source
        self.value = value


class IdentityCache(Generic[T]):
    def __init__(self, make: Callable[[object], T]) -> None:
        self._make = make
        self._entries: weakref.WeakValueDictionary[int, Shared[T]] = weakref.WeakValueDictionary()

    def get(self, source) -> Shared[T]:
        """``source``'s entry (this very object's): the one a holder keeps,
        else made now. Hold it while ``source`` is in use. If ``make`` raises,
        nothing is cached."""
        entry = self._entries.get(id(source))
        if entry is None:
            entry = self._entries[id(source)] = Shared(source, self._make(source))
        return entry

    def holds(self, source) -> bool:
        """Whether ``source`` (this very object) has an entry someone holds."""
        return self._entries.get(id(source)) is not None

    def __len__(self) -> int:
        return len(self._entries)
