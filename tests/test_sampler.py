"""Sampler: greedy, top-k/top-p, seeded reproducibility, logprobs, logit bias."""
from __future__ import annotations

import torch

from orca_serve.layers.sampler import (Sampler, SamplingMetadata, SamplingTensors, apply_top_k_top_p,
                                       argmax_rows, seed_for_position)
from orca_serve.sampling_params import SamplingParams

V = 300


def sample(params, logits, positions=None, seed=0):
    md = SamplingMetadata.build(params, positions or [0] * len(params), V)
    return Sampler(seed=seed)(logits, md)


def rand_logits(n, seed=0, scale=3.0):
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_batch_is_argmax():
    logits = rand_logits(8)
    out = sample([SamplingParams(temperature=0)] * 8, logits)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8


def test_argmax_rows_is_argmax_with_ties_nans_and_infinities():
    """The first largest index of each row, a NaN counting as largest, on a
    vocabulary-sized row (torch's reduction splits such rows into chunks)."""
    x = torch.randint(0, 4, (40, 49152), generator=torch.Generator().manual_seed(0)).float()  # ties everywhere
    x[1, 900], x[1, 30000] = float("nan"), float("nan")
    x[2] = float("-inf")
    x[3, 40000], x[3, 7] = float("inf"), float("inf")
    x[4, 49151] = 9.0
    x[5, 0] = 9.0
    got = argmax_rows(x)
    assert torch.equal(got, x.argmax(dim=-1))
    assert got[:6].tolist() == [int((x[0] == 3).nonzero()[0]), 900, 0, 7, 49151, 0]


def test_seeded_rows_do_not_depend_on_batch():
    logits = rand_logits(6, seed=1)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    for pos in range(20):
        alone = sample([seeded], logits[2:3], [pos]).token_ids[0]
        mixed = [SamplingParams(temperature=1.0), SamplingParams(temperature=0),
                 seeded, SamplingParams(temperature=0.5, seed=7), SamplingParams(), SamplingParams(top_k=3)]
        in_batch = sample(mixed, logits, [5, 0, pos, 2, 9, 1], seed=99).token_ids[2]
        assert alone == in_batch


def test_seed_and_position_change_the_draw():
    logits = torch.zeros(1, V)  # uniform: every draw shows the noise
    draws = {sample([SamplingParams(seed=s)], logits, [p]).token_ids[0] for s in range(3) for p in range(10)}
    assert len(draws) > 20
    assert seed_for_position(1, 2) != seed_for_position(2, 1)
    assert 0 <= seed_for_position(-5, 0) < 2 ** 63


def test_unseeded_rows_use_the_shared_generator():
    logits = torch.zeros(1, V)
    sampler = Sampler(seed=0)
    md = SamplingMetadata.build([SamplingParams()], [0], V)
    draws = [sampler(logits, md).token_ids[0] for _ in range(10)]
    assert len(set(draws)) > 1
    again = Sampler(seed=0)
    assert draws == [again(logits, md).token_ids[0] for _ in range(10)]


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = rand_logits(16, seed=2, scale=0.5)
    greedy = logits.argmax(-1).tolist()
    params_k = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(16)]
    params_p = [SamplingParams(temperature=1.3, top_p=1e-6) for _ in range(16)]
    assert sample(params_k, logits).token_ids == greedy
    assert sample(params_p, logits).token_ids == greedy
    # A top_p that is 0 in float32 dropped every token, and a temperature near
    # float32's smallest overflowed the logits to inf: NaN, token 0 every time.
    params_p = [SamplingParams(temperature=1.3, top_p=1e-300, seed=i) for i in range(16)]
    assert sample(params_p, logits).token_ids == greedy
    for temperature in (1e-40, 1e-30, 1e-6):
        params_t = [SamplingParams(temperature=temperature, seed=i) for i in range(16)]
        assert sample(params_t, logits).token_ids == greedy


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    kept = apply_top_k_top_p(logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.5])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, False, False]]
    # top_p 0.8: mass before the 3rd token is 0.8 -> dropped; 2nd (0.5 before it) kept.
    kept = apply_top_k_top_p(logits[:1], None, torch.tensor([0.8])).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (V - 3))
    logits = torch.log(probs).repeat(4000, 1)
    md = SamplingMetadata.build([SamplingParams()] * 4000, [0] * 4000, V)
    counts = torch.bincount(torch.tensor(Sampler(seed=5)(logits, md).token_ids), minlength=V)
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3] / 4000.0, probs[:3], atol=0.03)


def test_logprobs_match_log_softmax():
    logits = rand_logits(3, seed=4)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.7, logprobs=0),
              SamplingParams(temperature=0)]
    out = sample(params, logits)
    ref = torch.log_softmax(logits, -1)
    lp0, lp1 = out.logprobs[0], out.logprobs[1]
    assert out.logprobs[2] is None
    assert abs(lp0.sampled_logprob - ref[0, out.token_ids[0]].item()) < 1e-5
    top_vals, top_ids = ref[0].topk(5)
    assert [t for t, _ in lp0.top] == top_ids.tolist()
    assert torch.allclose(torch.tensor([v for _, v in lp0.top]), top_vals, atol=1e-5)
    assert lp1.top == [] and abs(lp1.sampled_logprob - ref[1, out.token_ids[1]].item()) < 1e-5


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # EOS is by far the best token
    logits[:, 7] = 9.0  # then a stop token
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7], logprobs=1)] * 3
    md = SamplingMetadata.build(params, [2, 3, 0], V, eos_token_ids=(2,))
    out = Sampler()(logits, md)
    assert out.token_ids[0] not in (2, 7) and out.token_ids[1] == 2 and out.token_ids[2] not in (2, 7)
    assert out.logprobs[0].top[0][0] == 2  # logprobs still describe the raw distribution


def test_logit_bias_steers_greedy_and_sampled_rows_alone():
    logits = rand_logits(4, seed=6, scale=1.0)
    best = logits.argmax(-1).tolist()
    second = logits.topk(2).indices[:, 1].tolist()
    params = [SamplingParams(temperature=0, logit_bias={7: 100.0}, logprobs=1),  # +100: token 7 wins
              SamplingParams(temperature=0, logit_bias={best[1]: -100.0}),  # -100: the runner-up wins
              SamplingParams(temperature=1.0, seed=3, logit_bias={9: 100.0}),  # a sampled row too
              SamplingParams(temperature=0)]  # no bias: untouched by its neighbours'
    out = sample(params, logits)
    assert out.token_ids == [7, second[1], 9, best[3]]
    # Logprobs describe the model's distribution, not the biased one.
    assert abs(out.logprobs[0].sampled_logprob - torch.log_softmax(logits[0], -1)[7].item()) < 1e-5


def test_rows_sharing_a_logit_bias_map_each_get_it():
    # The sequences of one request share one map, turned into tensors once.
    logits = rand_logits(4, seed=7, scale=1.0)
    shared = {7: 100.0, 8: 50.0}
    params = [SamplingParams(temperature=0, logit_bias=shared), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias=shared), SamplingParams(temperature=0, logit_bias={9: 100.0})]
    assert params[0].logit_bias is params[2].logit_bias  # kept as given, not copied
    [(rows, cols, values)] = SamplingMetadata.build(params, [0] * 4, V).logit_bias  # short maps: one scatter
    assert (rows.tolist(), cols.tolist(), values.tolist()) == ([0, 0, 2, 2, 3], [7, 8, 7, 8, 9],
                                                              [100.0, 50.0, 100.0, 50.0, 100.0])
    assert sample(params, logits).token_ids == [7, logits[1].argmax().item(), 7, 9]


def test_a_zero_logit_bias_is_no_bias():
    params = SamplingParams(temperature=0, logit_bias={5: 0, 6: 0.0, 7: -0.0})
    assert params.logit_bias == {}
    assert SamplingMetadata.build([params], [0], V).logit_bias == []


def test_min_tokens_masks_eos_even_when_biased_up():
    logits = torch.zeros(1, V)
    params = [SamplingParams(temperature=0, min_tokens=2, logit_bias={2: 100.0, 4: 50.0})]
    assert Sampler()(logits, SamplingMetadata.build(params, [0], V, eos_token_ids=(2,))).token_ids == [4]


def test_long_and_short_lists_mask_and_bias_exactly_their_rows():
    """A stop list or bias map of _OWN_SCATTER ids or more gets a scatter of
    its own, broadcast over the rows that share it; shorter ones share one
    scatter of per-row copies. Either way each row gets exactly its own."""
    logits = rand_logits(6, seed=8)
    long_ids = list(range(20, 20 + 270))  # the greedy token of most rows is in here
    long_bias = {i: float(i % 7 - 3) or 0.5 for i in range(5, 295)}
    params = [SamplingParams(temperature=0, min_tokens=4, stop_token_ids=long_ids, logit_bias=long_bias),
              SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[9, 11], logit_bias={12: 5.0, 13: -2.0}),
              SamplingParams(temperature=0, min_tokens=4, stop_token_ids=long_ids),
              SamplingParams(temperature=0, logit_bias=long_bias),
              SamplingParams(temperature=0, min_tokens=1, stop_token_ids=long_ids),  # past its min_tokens
              SamplingParams(temperature=0, min_tokens=4)]  # EOS only
    positions = [0, 1, 2, 3, 1, 0]
    expected = logits.clone()
    for row, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            expected[row, token] += bias
        if positions[row] < p.min_tokens:
            expected[row, [2, *p.stop_token_ids]] = float("-inf")
    md = SamplingMetadata.build(params, positions, V, eos_token_ids=(2,))
    assert len(md.suppressed) == 2 and len(md.logit_bias) == 2  # the long list's, the short ones'
    assert Sampler()(logits, md).token_ids == expected.argmax(-1).tolist()


def test_sampling_tensors_are_made_once_per_list_and_kept_while_a_row_holds_them():
    """Each row under min_tokens sorted its EOS and stop ids and copied them
    into index tensors one int at a time, every iteration, and each bias map
    became tensors every iteration. The runner's SamplingTensors makes them
    once per distinct list; each request holds its row's while it runs."""
    tensors = SamplingTensors("cpu", eos_token_ids=(2,))
    ids, bias = list(range(3, 300)), {i: 1.0 for i in range(3, 300)}
    params = [SamplingParams(temperature=0, min_tokens=5, stop_token_ids=ids, logit_bias=bias) for _ in range(3)]
    rows = [tensors.row(p) for p in params]
    assert rows[0].suppressed is rows[1].suppressed is rows[2].suppressed
    assert rows[0].bias is rows[2].bias and len(tensors) == 2
    made = [SamplingMetadata.build(params, [i, i, i], V, rows=rows) for i in range(2)]  # two iterations
    for md in made:
        [(on, cols, _)] = md.suppressed
        assert on.tolist() == [[0], [1], [2]] and cols is rows[0].suppressed.value.ids
        [(on, cols, values)] = md.logit_bias
        assert cols is rows[0].bias.value.ids and values is rows[0].bias.value.values
    assert tensors.row(SamplingParams(stop_token_ids=ids)).suppressed is None  # no min_tokens: nothing to mask
    del rows, made, md, on, cols, values
    assert len(tensors) == 0  # the requests are gone: their lists may change


# ---- differential: the masking and bias of 90cf348 (made every iteration) ----
def _old_masked_logits(raw: torch.Tensor, params: list[SamplingParams], positions: list[int],
                       eos_token_ids) -> torch.Tensor:
    """What Sampler.sample of 90cf348 handed on to sampling: SamplingMetadata.build's
    ``suppressed`` and ``_logit_bias``, and the two scatters of Sampler.sample, as they were."""
    suppressed = [(i, sorted(set(eos_token_ids) | set(p.stop_token_ids)))
                  for i, p in enumerate(params) if positions[i] < p.min_tokens]
    suppressed = [(i, ids) for i, ids in suppressed if ids]
    rows, cols, values = [], [], []
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, p in enumerate(params):
        if not p.logit_bias:
            continue
        pair = made.get(id(p.logit_bias))
        if pair is None:
            pair = made[id(p.logit_bias)] = (torch.tensor(list(p.logit_bias), dtype=torch.int64),
                                             torch.tensor(list(p.logit_bias.values()), dtype=torch.float32))
        rows.append(torch.full((len(p.logit_bias),), i, dtype=torch.int64))
        cols.append(pair[0])
        values.append(pair[1])
    logits = raw.float().clone()
    if rows:
        logits.index_put_((torch.cat(rows), torch.cat(cols)), torch.cat(values), accumulate=True)
    if suppressed:
        r = torch.tensor([row for row, ids in suppressed for _ in ids], dtype=torch.int64)
        c = torch.tensor([i for _, ids in suppressed for i in ids], dtype=torch.int64)
        logits.index_put_((r, c), logits.new_full((), float("-inf")))
    return logits


class _HandedOn(Sampler):
    """A Sampler that records the logits it samples from, after bias and masking."""

    def __init__(self):
        super().__init__()
        self.logits = None

    def _sample(self, logits, md):
        self.logits = logits.clone()
        return super()._sample(logits, md)


def _random_batch(rng, vocab: int, eos: tuple[int, ...]):
    """Rows with and without min_tokens, lists shared and their own, short and
    past _OWN_SCATTER, empty, with duplicates and EOS ids; bias maps of either sign."""
    def stop_list():
        n = rng.choice([0, 1, 3, 40, 254, 255, 256, 257, 300, 600])
        ids = [rng.randrange(vocab) for _ in range(n)]
        if ids and rng.random() < 0.5:
            ids += rng.sample(ids, k=min(len(ids), rng.randint(1, 5)))  # duplicates
        if rng.random() < 0.3:
            ids.append(rng.choice(eos or (0,)))  # an EOS id among them
        rng.shuffle(ids)
        return ids

    def bias_map():
        n = rng.choice([1, 2, 30, 255, 256, 257, 400])
        return {t: rng.choice([-100.0, 100.0, rng.uniform(-100, 100), rng.uniform(-1, 1)])
                for t in rng.sample(range(vocab), n)}

    shared_stops = [stop_list() for _ in range(3)]
    shared_biases = [bias_map() for _ in range(2)]
    params, positions = [], []
    for _ in range(rng.randint(1, 9)):
        stops = rng.choice(shared_stops) if rng.random() < 0.6 else stop_list()
        bias = rng.choice([None, rng.choice(shared_biases), bias_map()])
        min_tokens = rng.choice([0, 0, 1, 2, 3, 5])
        params.append(SamplingParams(temperature=1.0, max_tokens=8, min_tokens=min_tokens,
                                     stop_token_ids=stops, logit_bias=bias))
        positions.append(rng.randint(0, 4))
    return params, positions


def test_masking_and_bias_are_those_of_the_code_made_every_iteration():
    """Differential: 400 random batches, each run for three iterations (rows
    passing their min_tokens in between) with the runner's SamplingTensors
    kept across them, and once without it; the logits handed to sampling are
    exactly those of 90cf348's per-iteration code."""
    import random

    rng = random.Random(2024)
    vocab = 700
    for case in range(400):
        eos = tuple(rng.sample(range(vocab), rng.choice([0, 1, 2])))
        params, positions = _random_batch(rng, vocab, eos)
        tensors = SamplingTensors("cpu", eos)
        rows = [tensors.row(p) for p in params]  # as each RequestState keeps its row's
        for it in range(3):
            at = [pos + it for pos in positions]
            raw = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(case * 3 + it))
            expected = _old_masked_logits(raw, params, at, eos)
            for kept in (rows, None):
                sampler = _HandedOn()
                sampler.sample(raw, SamplingMetadata.build(params, at, vocab, eos_token_ids=eos, rows=kept))
                assert torch.equal(sampler.logits, expected), (case, it, kept is None)
