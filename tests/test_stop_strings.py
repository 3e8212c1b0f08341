"""Stop strings in the incremental detokenizer: the Aho-Corasick matcher finds
exactly what the old str.find loop found, and its work per token does not grow
with the number of stop strings."""
import random
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orca_serve.engine.detokenizer import IncrementalDetokenizer
from orca_serve.sampling_params import SamplingParams


class ChunkTokenizer:
    """Token i decodes to chunks[i], so each token's delta is its chunk."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chunks[i] for i in ids)


class FindLoopDetokenizer(IncrementalDetokenizer):
    """The detokenizer as it was before the matcher: str.find for every stop
    string on every delta. The reference the matcher must agree with."""

    def _find_stop(self, search_from, read_from):
        best = None
        for stop in self.params.stop:
            idx = self._full.find(stop, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        return best


def stream(detok_class, chunks, calls, params):
    """Feed the tokens of ``calls`` (lists of chunk ids) one call at a time, the
    last one final; every call's (delta, stop string) and the text after it."""
    tok = ChunkTokenizer(chunks)
    detok = detok_class(tok, [], params)
    seen = []
    for n, ids in enumerate(calls):
        seen.append((*detok.add_tokens(ids, final=n == len(calls) - 1), detok.text))
    return seen


@st.composite
def stop_cases(draw):
    alphabet = draw(st.sampled_from(["ab", "abc", "xé"]))
    word = st.text(alphabet=alphabet, min_size=1, max_size=5)
    stops = draw(st.lists(word, min_size=1, max_size=6))
    # Prefixes of one another and duplicates, which small alphabets make
    # often anyway, on purpose too: they decide ties and the longest match.
    stops += [s[:draw(st.integers(1, len(s)))] for s in draw(st.lists(st.sampled_from(stops), max_size=2))]
    stops = draw(st.permutations(stops))
    text = draw(st.text(alphabet=alphabet, max_size=40))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))  # repeated cuts: empty deltas
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    # Calls of one or two tokens, as a batch that carried two tokens would.
    sizes = draw(st.lists(st.integers(1, 2), min_size=len(chunks), max_size=len(chunks)))
    calls, i = [], 0
    for size in sizes:
        if i < len(chunks):
            calls.append(list(range(i, min(i + size, len(chunks)))))
            i += size
    params = SamplingParams(stop=stops, min_tokens=draw(st.integers(0, 5)), max_tokens=64,
                            include_stop_str_in_output=draw(st.booleans()))
    return chunks, calls, params


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=stop_cases())
def test_the_matcher_finds_what_the_find_loop_found(case):
    """Every delta, stop string and text the same as the str.find loop's, over
    random stop lists and random cuttings of the text into tokens; the calls go
    on past a match, so a cut and a restart are checked too."""
    chunks, calls, params = case
    assert stream(IncrementalDetokenizer, chunks, calls, params) == stream(FindLoopDetokenizer, chunks, calls, params)


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


def test_work_per_token_does_not_grow_with_the_number_of_stop_strings():
    """The find loop called str.find once per stop string per token: 10,000
    stop strings cost it 1,000 times the work of 10. The matcher reads each
    character once. The first time, it also works out the moves the text
    takes; more stop strings make a denser trie that the text reaches deeper
    into, so that part grows, but slowly (about with the log of the count)."""
    rng = random.Random(0)
    letters = "abcdefgh"
    chunks = ["".join(rng.choice(letters) for _ in range(4)) for _ in range(100)]  # 4 characters a token
    calls = [[i] for i in range(len(chunks))]

    def work(num_stops):
        # Strings of the text's letters, so the text keeps beginning them, but
        # each ends in a letter the text lacks, so none is found.
        stops = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) + "z" for _ in range(num_stops)]
        detok = IncrementalDetokenizer(ChunkTokenizer(chunks), [], SamplingParams(stop=stops, max_tokens=200))
        first = count_calls(lambda: [detok.add_tokens(ids) for ids in calls])
        again = count_calls(lambda: [detok.add_tokens(ids) for ids in calls])  # the same text once more
        return first, again

    few, many = work(10), work(10_000)
    assert many[1] < 1.2 * few[1], (few, many)
    assert many[0] < 4 * few[0], (few, many)
