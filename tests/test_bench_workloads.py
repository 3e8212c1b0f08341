"""Benchmark workload generators: distributions, seeds, arrival processes."""
import json

import numpy as np
import pytest

from orca_serve.bench import workloads as wl

VOCAB = wl.allowed_token_ids(1000, special_ids=[0, 1, 2])


def test_allowed_ids_skip_special_tokens():
    ids = wl.allowed_token_ids(10, special_ids=[0, 9, None, 42])
    assert ids.tolist() == list(range(1, 9))


def test_orca_lengths_uniform_in_paper_ranges():
    specs = wl.generate("orca", 4000, VOCAB, seed=1)
    ins = np.array([s.prompt_len for s in specs])
    outs = np.array([s.output_len for s in specs])
    assert ins.min() >= 32 and ins.max() <= 512 and outs.min() >= 1 and outs.max() <= 128
    # Uniform: mean at the midpoint, both ends reached.
    assert abs(ins.mean() - 272) < 6 and abs(outs.mean() - 64.5) < 2
    assert ins.min() < 40 and ins.max() > 505 and outs.min() == 1 and outs.max() == 128
    assert all(s.ignore_eos for s in specs)
    assert all(t not in (0, 1, 2) for s in specs[:50] for t in s.prompt_token_ids)


def test_ranges_are_parameters():
    p = wl.WorkloadParams(input_len=wl.parse_range("10:20"), output_len=wl.parse_range("5"))
    specs = wl.generate("orca", 200, VOCAB, params=p)
    assert {s.output_len for s in specs} == {5}
    assert min(s.prompt_len for s in specs) >= 10 and max(s.prompt_len for s in specs) <= 20
    with pytest.raises(ValueError):
        wl.parse_range("20:10")


def test_same_seed_same_trace_other_seed_other_trace():
    a = wl.generate("orca", 50, VOCAB, seed=7)
    b = wl.generate("orca", 50, VOCAB, seed=7)
    c = wl.generate("orca", 50, VOCAB, seed=8)
    assert [(s.prompt_token_ids, s.output_len) for s in a] == [(s.prompt_token_ids, s.output_len) for s in b]
    assert [s.prompt_token_ids for s in a] != [s.prompt_token_ids for s in c]


def test_salt_changes_contents_not_lengths():
    a = wl.generate("orca", 30, VOCAB, seed=3)
    b = wl.generate("orca", 30, VOCAB, seed=3, salt=1)
    assert [(s.prompt_len, s.output_len) for s in a] == [(s.prompt_len, s.output_len) for s in b]
    assert [s.prompt_token_ids for s in a] != [s.prompt_token_ids for s in b]


def test_random_default_fixed_lengths():
    specs = wl.generate("random", 10, VOCAB)
    assert {(s.prompt_len, s.output_len) for s in specs} == {(256, 128)}


def test_sharegpt_like_is_lognormal_and_clipped():
    p = wl.WorkloadParams(input_median=100, output_median=50, sigma=0.8, input_len=(4, 2000), output_len=(4, 300))
    specs = wl.generate("sharegpt-like", 5000, VOCAB, seed=2, params=p)
    ins = np.array([s.prompt_len for s in specs])
    outs = np.array([s.output_len for s in specs])
    assert abs(np.median(ins) - 100) < 6 and abs(np.median(outs) - 50) < 4
    assert abs(np.log(ins).std() - 0.8) < 0.05  # log-normal: log lengths have the given sigma
    assert ins.mean() > np.median(ins)  # long right tail
    assert outs.min() >= 4 and outs.max() == 300  # clipped at the top


def test_shared_prefix_shares_exact_prefixes():
    p = wl.WorkloadParams(num_prefixes=3, prefix_len=20, input_len=(5, 10))
    specs = wl.generate("shared-prefix", 12, VOCAB, params=p)
    heads = {tuple(s.prompt_token_ids[:20]) for s in specs}
    assert len(heads) == 3
    assert all(specs[i].prompt_token_ids[:20] == specs[i + 3].prompt_token_ids[:20] for i in range(9))
    assert all(25 <= s.prompt_len <= 30 for s in specs)


def test_jsonl_rows(tmp_path):
    f = tmp_path / "w.jsonl"
    rows = [{"prompt": "hello", "output_len": 4}, {"prompt_token_ids": [5, 6, 7], "max_tokens": 9},
            {"prompt": "x", "ignore_eos": False}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    specs = wl.load_jsonl(f, default_output_len=3)
    assert [(s.prompt_text, s.prompt_token_ids, s.output_len, s.ignore_eos) for s in specs] == [
        ("hello", None, 4, True), (None, [5, 6, 7], 9, True), ("x", None, 3, False)]
    assert len(wl.load_jsonl(f, num_requests=2)) == 2

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    wl.attach_text(specs, Tok())
    assert specs[0].prompt_token_ids == [104, 101, 108, 108, 111] and specs[1].prompt_text == "\x05\x06\x07"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"output_len": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        wl.load_jsonl(bad)
    # Each of these said what was wrong but not where ("Expecting value: line 1
    # column 1", "invalid literal for int()"), or crashed ('list' object has no attribute 'get').
    for line, match in [("notjson", "bad.jsonl:2: not a JSON line"), ("[1]", "bad.jsonl:2: needs a JSON object"),
                        ('{"prompt": "x", "output_len": "y"}', "bad.jsonl:2: output_len and prompt_token_ids "
                                                               "must be integers"),
                        ('{"prompt_token_ids": [1, "a"]}', "bad.jsonl:2: output_len and prompt_token_ids")]:
        bad.write_text('{"prompt": "fine"}\n' + line + "\n")
        with pytest.raises(ValueError, match=match):
            wl.load_jsonl(bad)


def test_offline_arrivals_all_at_zero():
    assert wl.arrival_times(5, float("inf")) == [0.0] * 5


def test_poisson_arrivals_mean_rate_and_exponential_gaps():
    t = np.array(wl.arrival_times(20000, 4.0, burstiness=1.0, seed=5))
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert abs(len(gaps) / t[-1] - 4.0) < 0.1
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03  # exponential: coefficient of variation 1


def test_gamma_burstiness_sets_gap_variance_not_rate():
    for burstiness in (0.25, 4.0):
        gaps = np.diff(wl.arrival_times(20000, 2.0, burstiness=burstiness, seed=1))
        assert abs(gaps.mean() - 0.5) < 0.02
        # gamma with shape k: CV = 1/sqrt(k)
        assert abs(gaps.std() / gaps.mean() - burstiness ** -0.5) < 0.05


def test_arrivals_reproducible_and_scale_with_rate():
    a = wl.arrival_times(100, 2.0, seed=9)
    assert a == wl.arrival_times(100, 2.0, seed=9)
    b = wl.arrival_times(100, 4.0, seed=9)
    assert np.allclose(np.array(a) / 2, b)  # same pattern, twice as fast
    with pytest.raises(ValueError):
        wl.arrival_times(3, 0.0)
