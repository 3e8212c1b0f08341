"""Finding a request's stop strings in its text as the text streams in.

The detokenizer used to call ``str.find`` for every stop string on every
token, on the engine thread. A request may list any number of stop strings
(vLLM sets no cap): one with 95,000 of them (940 KB, under the server's 1 MiB
body limit) made every other running request about 7x slower while it ran.

``StopStringMatcher`` is an Aho-Corasick automaton: its state is the longest
end of the text read so far that begins some stop string, so each new
character is one move, whatever the number of stop strings, and the state
carries over from one delta to the next (a stop string that begins in an
earlier delta and ends in this one is found without reading the old text
again).

The automaton is built lazily, a move at a time, the first time the text
needs it. Built up front in Python it would visit every character of every
stop string: 1.3 s and 100 MB for 95,000 strings of 4 to 10 characters (on a
shared 2-core machine), on the engine thread, stalling every other request
at once. Lazily, the only work up front is one stable sort of the list, in C
(about 50 ms there for the same list); a trie node is a slice of the sorted
list (the strings that start with the node's text), and a move not yet known
is found by bisecting that slice on one character, then kept. Per character
the cost is a dict look-up once the moves the text takes are known. The
first time, a new state also needs its failure chain built: more stop
strings make a denser trie that the text reaches deeper into, so that part
grows, slowly (about with the log of their number); the states built are the
trie nodes the text reaches, never more than building it all up front would
make.

Grouping stop strings by length and looking each window up in a set would be
simpler, but it costs every character one look-up (and one hash of the
window) per distinct length: up to ~1,450 lengths fit in 1 MiB.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import itemgetter

_ROOT = 0  # the state of no text: no stop string is begun


class StopStringMatcher:
    """Reads text a piece at a time and reports the stop string that starts
    first among those that end in the piece (the one listed first on a tie).

    States are numbered; per state it keeps the slice of the sorted list that
    shares its text, the moves worked out so far, its failure state (the
    longest proper end of its text that is also a state) and the longest stop
    string that ends its text.
    """

    def __init__(self, stops: list[str]) -> None:
        # Stable, so equal strings keep the order they were listed in: a
        # node's first string in the sorted list is its first-listed one.
        self._order = sorted(range(len(stops)), key=stops.__getitem__)
        self._sorted = [stops[i] for i in self._order]
        self.max_len = max(map(len, stops), default=0)
        self._slices: list[tuple[int, int, int]] = [(0, len(stops), 0)]  # (lo, hi, depth): _sorted[lo:hi]
        self._moves: list[dict[str, int]] = [{}]
        self._fail: list[int] = [_ROOT]
        self._longest_stop: list[tuple[int, int] | None] = [None]  # (length, index in stops)
        self._state = _ROOT

    def restart(self) -> None:
        """Forget the text read so far: matches found next start in the next text read."""
        self._state = _ROOT

    def feed(self, text: str, start: int) -> tuple[int, int] | None:
        """Read ``text[start:]``, which follows the text read before (unless
        restarted). Returns (position in ``text``, index in the stop list) of
        the stop string that starts first among those ending in the characters
        read, the first listed on a tie; None if none ends there."""
        state, moves, longest_stop = self._state, self._moves, self._longest_stop
        best = None
        for pos in range(start, len(text)):
            char = text[pos]
            move = moves[state].get(char)
            state = self._work_out_move(state, char) if move is None else move
            hit = longest_stop[state]
            # Only the longest stop string ending here can start first: a
            # shorter one ending here starts later than it.
            if hit is not None and (best is None or (pos + 1 - hit[0], hit[1]) < best):
                best = (pos + 1 - hit[0], hit[1])
        self._state = state
        return best

    def _work_out_move(self, state: int, char: str) -> int:
        """The move from ``state`` on ``char``: the trie child if there is one,
        else the failure state's move. Walks down the failure chain to a state
        whose move is known (or the root), then fills in the moves on the way
        back up, building the children it meets; a loop, not recursion, as a
        chain can be longer than Python's recursion limit."""
        pending: list[tuple[int, tuple[int, int, int] | None]] = []
        while True:
            known = self._moves[state].get(char)
            if known is not None:
                move = known
                break
            pending.append((state, self._child(state, char)))
            if state == _ROOT:
                move = _ROOT  # what the root's own move falls back to: no text begun
                break
            state = self._fail[state]
        # Here ``move`` is the move on ``char`` of the failure state of each
        # pending state in turn, which is also its child's failure state.
        for state, child in reversed(pending):
            if child is not None:
                move = self._add_state(child, fail=move)
            self._moves[state][char] = move
        return move

    def _child(self, state: int, char: str) -> tuple[int, int, int] | None:
        """The slice of the trie child of ``state`` by ``char``, or None."""
        lo, hi, depth = self._slices[state]
        # The strings of a node are sorted by their next character ("" for
        # the one that ends at the node, which sorts first).
        next_char = itemgetter(slice(depth, depth + 1))  # s[depth:depth + 1], called from C
        lo = bisect_left(self._sorted, char, lo, hi, key=next_char)
        if lo == hi or self._sorted[lo][depth] != char:
            return None
        return lo, bisect_right(self._sorted, char, lo, hi, key=next_char), depth + 1

    def _add_state(self, slice_: tuple[int, int, int], fail: int) -> int:
        lo, _, depth = slice_
        self._slices.append(slice_)
        self._moves.append({})
        self._fail.append(fail)
        ends_here = len(self._sorted[lo]) == depth  # it would sort first among its node's strings
        self._longest_stop.append((depth, self._order[lo]) if ends_here else self._longest_stop[fail])
        return len(self._slices) - 1
