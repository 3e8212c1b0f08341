"""Stop strings in the incremental detokenizer: the length-indexed look-up finds
exactly what the old str.find loop found, and its work per token does not grow
with the number of stop strings."""
import gc
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers_work import count_calls, count_items_checked
from orca_serve.engine.detokenizer import IncrementalDetokenizer
from orca_serve.engine.output_processor import OutputProcessor
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


def test_work_per_token_does_not_grow_with_the_number_of_stop_strings():
    """The find loop called str.find once per stop string per token: 10,000
    stop strings cost it 1,000 times the work of 10. Now each new character
    costs a look-up per distinct length of the list, however many strings
    share those lengths."""
    rng = random.Random(0)
    letters = "abcdefgh"
    chunks = ["".join(rng.choice(letters) for _ in range(4)) for _ in range(100)]  # 4 characters a token
    calls = [[i] for i in range(len(chunks))]

    def work(num_stops):
        # Strings of the text's letters, 2 to 7 of them, the first six one of
        # each length; each ends in a letter the text lacks, so none is found.
        lengths = [*range(2, 8), *(rng.randint(2, 7) for _ in range(num_stops - 6))]
        stops = ["".join(rng.choice(letters) for _ in range(n)) + "z" for n in lengths]
        detok = IncrementalDetokenizer(ChunkTokenizer(chunks), [], SamplingParams(stop=stops, max_tokens=200))
        return count_calls(lambda: [detok.add_tokens(ids) for ids in calls])

    few, many = work(10), work(10_000)
    assert many < 1.05 * few, (few, many)


def test_requests_with_the_same_stop_list_share_one_index():
    """An HTTP request of 1,024 prompts with 95,000 stop strings sorted them
    1,024 times on the engine thread (about 50 ms each, in the Aho-Corasick
    matcher); the sequences of one request, and running requests with an
    equal list, now share one index, kept while a request uses it."""
    processor = OutputProcessor(scheduler=None, tokenizer=ChunkTokenizer(["ab"]))
    held = {}  # what each request holds while it runs (Request.held in the engine)

    def index(request_id, stop):
        held[request_id] = processor.add_request(request_id, "", [0], SamplingParams(stop=stop, max_tokens=8))
        return processor._detok[request_id]._stops

    first = index("a", ["x", "yz"])
    assert index("b", ["x", "yz"]) is first  # an equal list, not the same one
    assert index("c", ["yz", "x"]) is not first  # another order ties differently
    assert processor._detok["a"].add_tokens([0], final=True) == ("ab", None)
    # Once no request uses it, it goes: they finished (the scheduler clears
    # Request.held) and their outputs were made (the processor forgets them).
    for rid in ("a", "b"):
        del held[rid]
        processor._forget(rid)
    del first
    gc.collect()
    assert ("x", "yz") not in processor._stops_by_content and ("yz", "x") in processor._stops_by_content
    assert len(processor._stop_lists) == 1


class CountedStr(str):
    """A stop string whose hashing is a call, so that count_calls sees its list hashed."""

    def __hash__(self):
        return str.__hash__(self)


def test_the_sequences_of_a_request_find_its_stop_index_without_hashing_the_list():
    """The index was looked up by the list's content: a tuple of it and its
    hash for every sequence, the list's length each time. Now a request with
    the same list as a running one finds its index by the list's identity."""
    processor = OutputProcessor(scheduler=None, tokenizer=ChunkTokenizer(["ab"]))

    held = []  # the requests run meanwhile: each holds its index (Request.held in the engine)

    def work(num_stops):
        params = SamplingParams(stop=[CountedStr(f"s{i}") for i in range(num_stops)], max_tokens=8)
        held.append(processor.add_request(f"{num_stops}-0", "", [0], params))  # indexes the list: its length, once
        return count_calls(lambda: held.extend(processor.add_request(f"{num_stops}-{i}", "", [0], params)
                                               for i in (1, 2, 3)))

    few, many = work(10), work(10_000)
    assert many < 1.05 * few, (few, many)
    assert processor._detok["10000-3"]._stops is processor._detok["10000-1"]._stops


def test_checked_stop_lists_and_token_ids_are_kept_not_copied():
    """The engine validates a request's parameters again when it adds it, and
    the sequences of one HTTP request share their lists: each copy cost every
    sequence the whole list again (1,024 sequences of a 1 MiB list)."""
    stop, ids, bias = ["a", "bc"], [3, 4], {5: 1.5}
    params = SamplingParams(stop=stop, stop_token_ids=ids, logit_bias=bias)
    params.validate()
    assert params.stop is stop and params.stop_token_ids is ids and params.logit_bias is bias
    # What is not yet in its checked form is still converted, or refused.
    converted = SamplingParams(stop=("a",), stop_token_ids=[np.int64(3)], logit_bias={np.int64(5): 1, 6: 0.0})
    assert (converted.stop, converted.stop_token_ids, converted.logit_bias) == (["a"], [3], {5: 1.0})
    assert type(converted.stop_token_ids[0]) is int and type(converted.logit_bias[5]) is float
    for bad, message in [({"stop": ["a", ""]}, "stop strings must be non-empty strings, got ''"),
                         ({"stop": ["a", 5]}, "stop strings must be non-empty strings, got 5"),
                         ({"stop_token_ids": [3, -1]}, "stop_token_ids must be >= 0, got -1"),
                         ({"logit_bias": {5: float("nan")}}, "logit_bias[5] must be a finite number"),
                         ({"logit_bias": {5: 101.0}}, "logit_bias[5] must be in [-100, 100]"),
                         ({"logit_bias": {-5: 1.0}}, "logit_bias: keys must be token ids")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            SamplingParams(**bad)


def test_the_sequences_of_one_http_request_share_its_lists():
    from orca_serve.entrypoints.openai.protocol import CompletionRequest
    from orca_serve.entrypoints.openai.serving import choice_params

    req = CompletionRequest(model="m", prompt=[[1]] * 3, n=2, stop="x", stop_token_ids=[1, 2],
                            logit_bias={"5": 1, "6": 0})  # a zero is dropped once, not by each sequence
    a, b = choice_params(req, [4] * 6, None)[::5]
    assert (a.stop, a.stop_token_ids, a.logit_bias) == (["x"], [1, 2], {5: 1.0})
    assert a.stop is b.stop and a.stop_token_ids is b.stop_token_ids and a.logit_bias is b.logit_bias


def test_the_choices_of_one_http_request_check_its_lists_once(monkeypatch):
    """Each choice's SamplingParams checked the request's lists again: 1,024
    choices of a 1 MiB list checked it 1,024 times. The first checks them and
    the others are its copies; what differs per choice is still checked."""
    from orca_serve.entrypoints.openai.protocol import ApiError, CompletionRequest
    from orca_serve.entrypoints.openai.serving import choice_params

    req = CompletionRequest(model="m", prompt=[[1]], n=16, seed=7, min_tokens=3, stop=[f"s{i}" for i in range(500)],
                            stop_token_ids=list(range(500)))
    checked = count_items_checked(monkeypatch)
    params = choice_params(req, [4] * 15 + [5], None)
    assert sum(checked) < 2 * 1000 and len(params) == 16
    assert [p.seed for p in params] == list(range(7, 23)) and params[-1].max_tokens == 5
    assert all(p.stop is params[0].stop and p.stop_token_ids is params[0].stop_token_ids for p in params)
    with pytest.raises(ApiError, match=re.escape("min_tokens (3) must be <= max_tokens (2)")):
        choice_params(req, [4, 2], None)
