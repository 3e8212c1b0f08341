"""Finding a request's stop strings in its text as the text streams in.

The detokenizer used to call ``str.find`` for every stop string on every
token, on the engine thread. A request may list any number of stop strings
(vLLM sets no cap): one with 95,000 of them (940 KB, under the server's 1 MiB
body limit) made every other running request about 7x slower while it ran.

``StopStrings`` keys the list by each string's text and keeps its distinct
lengths. A stop string that ends at a new character is one of the text's
windows ending there, one per distinct length, each looked up in the dict: the
work per character is the number of distinct lengths (a handful for any
list people write; 95,000 strings of 4 to 10 characters have 7), whatever the
number of strings. Longest first, the first window found at an end is the
match that starts earliest there.

Its worst case is bounded by the list's size: the window lengths of one
character sum to at most the list's characters, as the ``str.find`` loop's
work per token was (an adversarial list, one string of every length up to
1,400, in 1 MiB: 0.28 ms a token of 4 characters, the loop 0.19 ms; 95,000
strings of 4 to 10 characters: 0.014 ms a token, the loop 13.4 ms). Nothing grows with
the text. An Aho-Corasick automaton (in this module before) reads each
character once, but holds a state per trie node the text reaches; a list
built so that every end of the text begins a stop string drove it to a
million states, 356 MiB, for one request.

One ``StopStrings`` serves every request with an equal list (the engine's
``OutputProcessor`` shares it while they run): an HTTP request of 1,024
prompts would otherwise index its list 1,024 times on the engine thread.
"""
from __future__ import annotations


class StopStrings:
    """A stop list, indexed for ``find``; read-only once made."""

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self.stops = tuple(stops)
        # Each text's first index in the list (on a tie the first listed
        # wins): reversed, so an earlier duplicate overwrites a later one.
        self._index = dict(zip(reversed(self.stops), range(len(self.stops) - 1, -1, -1)))
        self._lengths = sorted(set(map(len, self._index)), reverse=True)
        self.max_len = self._lengths[0] if self._lengths else 0

    def find(self, text: str, search_from: int, read_from: int) -> tuple[int, int] | None:
        """(start, index in the list) of the stop string that starts first in
        ``text[search_from:]`` among those ending after ``read_from`` (the
        first listed on a tie); None if there is none."""
        index, lengths = self._index, self._lengths
        best = None
        for end in range(max(read_from, search_from) + 1, len(text) + 1):
            for length in lengths:  # longest first: the earliest start at this end
                start = end - length
                if start < search_from:
                    continue
                found = index.get(text[start:end])
                if found is not None:
                    if best is None or (start, found) < best:
                        best = (start, found)
                    break
        return best
