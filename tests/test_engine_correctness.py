"""Greedy parity with Hugging Face transformers under continuous batching.

Our engine runs many prompts together with staggered arrivals, so prefills,
chunked prefills and decodes share iterations (and, with a small pool,
preemption happens); each output must equal HF ``generate`` on that prompt
alone, token for token.
"""
import functools
import random

import pytest
import torch

from helpers_models import fail_next_forward, load_hf, torch_threads
from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.sampling_params import SamplingParams


def hf_generate(model, prompt, n):
    model.generation_config.eos_token_id = None  # run the full length, like ignore_eos
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def make_prompts(num, vocab, seed=0, lo=3, hi=70):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def run_staggered(engine, prompts, max_tokens, every=2, first=4):
    """Add `first` prompts, then one more every `every` iterations; run to the end."""
    pending = list(enumerate(prompts))
    outs, it = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and (it == 0 or it % every == 0):
            for _ in range(first if it == 0 else 1):
                if pending:
                    i, p = pending.pop(0)
                    engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens[i], temperature=0,
                                                                 ignore_eos=True))
        for o in engine.step():
            if o.finished:
                outs[int(o.request_id)] = o
        it += 1
    return [outs[i] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "llama-bias"])
@pytest.mark.parametrize("mode,num_blocks", [("paged", 400), ("paged", 26), ("reserve", 60)])
def test_greedy_matches_hf_with_staggered_arrivals(tiny_model_dir, kind, mode, num_blocks):
    path = tiny_model_dir(kind)
    hf = load_hf(path)
    prompts = make_prompts(14, 384, seed=hash(kind) % 100)
    rng = random.Random(1)
    max_tokens = [rng.randint(4, 24) for _ in prompts]
    engine = LLMEngine(EngineConfig.from_kwargs(
        model=path, kv_allocation=mode, num_kv_blocks=num_blocks, block_size=4,
        max_num_batched_tokens=48, max_num_seqs=10, enable_prefix_caching=False))
    outs = run_staggered(engine, prompts, max_tokens)
    stats = engine.stats()
    if num_blocks == 26:
        assert stats.num_preemptions_total > 0, "the small pool should force preemption"
        assert sum(o.metrics.num_preemptions for o in outs) == stats.num_preemptions_total
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.token_ids == hf_generate(hf, p, max_tokens[i]), f"prompt {i} ({len(p)} tokens) differs"
        assert o.finish_reason == "length"
    assert stats.num_kv_blocks_free == num_blocks


# CI has no GPU: there the CPU cases run alone. On a GPU machine (scripts/gpu_check.sh)
# the same test runs the engine on CUDA against HF on the CPU.
DEVICE_LAYOUTS = [("cpu", "grouped"), ("cpu", "batched"), *([("cuda", "batched")] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("device,layout", DEVICE_LAYOUTS)
def test_greedy_matches_hf_on_each_device(tiny_model_dir, kind, device, layout):
    """The PyTorch path (the one a GPU takes: no native CPU kernels) on the
    device asked for, in float32, against HF on the CPU. Its attention layout
    is the device's own (a GPU's is batched: all decodes in one SDPA, all
    prefill chunks padded into another); the CPU runs both."""
    path = tiny_model_dir(kind)
    prompts = make_prompts(10, 384, seed=21)
    max_tokens = [16] * len(prompts)
    engine = LLMEngine(EngineConfig.from_kwargs(
        model=path, device=device, cpu_kernels="off", num_kv_blocks=120, block_size=4,
        max_num_batched_tokens=48, max_num_seqs=6, enable_prefix_caching=False))
    runner = engine.executor.runner
    assert runner.kv_pool.cache.device.type == device
    assert {p.device.type for p in runner.model.parameters()} == {device}
    assert runner.batched_attention == (device == "cuda")
    runner.batched_attention = layout == "batched"
    outs = run_staggered(engine, prompts, max_tokens)
    hf = load_hf(path)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.token_ids == hf_generate(hf, p, max_tokens[i]), f"prompt {i} ({len(p)} tokens) differs"
    assert engine.stats().num_kv_blocks_free == 120


GRAPH_DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


# Without a GPU the paged kernel runs in Triton's interpreter, ~40 s a model here, so
# only under Llama (GQA; the kernel's own tests cover one query head per KV head). With
# a GPU the interpreter is off and the kernel runs on CUDA tensors only.
GRAPH_CASES = [(kind, device, attention) for kind in ("llama", "gpt2") for device in GRAPH_DEVICES
               for attention in ("gather", "paged")
               if not (device == "cpu" and attention == "paged" and (kind == "gpt2" or torch.cuda.is_available()))]


@pytest.mark.parametrize("kind,device,decode_attention", GRAPH_CASES)
def test_decode_graphs_match_hf(tiny_model_dir, kind, device, decode_attention):
    """Decode-only iterations through the decode graphs' static path: each
    batch padded up to its bucket (padding rows writing to the scratch block),
    every context padded up to its bucket's blocks and masked ("gather"), or
    read in place up to its length by the Triton paged decode kernel
    ("paged"; on the CPU through Triton's interpreter, each context in two
    parts merged after). On CUDA the graphs are
    captured and replayed; CI, with no GPU, runs the same static path eagerly.
    Mixed iterations stay eager, so the two paths alternate on the same
    requests."""
    path = tiny_model_dir(kind)
    prompts = make_prompts(9, 384, seed=31, lo=3, hi=40)
    rng = random.Random(5)
    max_tokens = [rng.randint(10, 40) for _ in prompts]
    paged = decode_attention == "paged"
    engine = LLMEngine(EngineConfig.from_kwargs(
        model=path, device=device, cpu_kernels="off", cuda_graphs=device == "cuda", num_kv_blocks=160,
        block_size=4, max_num_batched_tokens=48, max_num_seqs=7, enable_prefix_caching=False,
        triton_decode="on" if paged and device == "cuda" else "off"))
    runner = engine.executor.runner
    if device == "cpu":
        if paged:
            from orca_serve.kernels.triton_decode import paged_decode_attention

            # Each context in two parts merged after (on a GPU the kernel splits by itself
            # when requests alone are too few programs; off one it never would).
            runner.bind_decode_kernel(functools.partial(paged_decode_attention, num_splits=2))
        runner.use_decode_graphs(capture=False)
    assert runner.paged_decodes == paged and runner.decode_graphs.paged == paged
    graphs = runner.decode_graphs
    assert runner.kv_pool.cache.shape[2] == 161 and graphs.scratch_block == 160
    served = []
    logits = graphs.logits

    def recording(token_ids, positions, requests, bucket, **kw):
        served.append((len(token_ids), int(positions.max()) + 1, bucket))
        return logits(token_ids, positions, requests, bucket, **kw)
    graphs.logits = recording
    outs = run_staggered(engine, prompts, max_tokens, every=3, first=3)
    hf = load_hf(path)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.token_ids == hf_generate(hf, p, max_tokens[i]), f"prompt {i} ({len(p)} tokens) differs"
    assert engine.stats().num_kv_blocks_free == 160
    # The static path served steps, with padded rows and padded blocks among them.
    assert graphs.num_steps == len(served) >= 20
    assert any(n < b for n, _, (b, _) in served), served
    assert any(-(-longest // 4) < m for _, longest, (_, m) in served), served
    assert graphs.disabled_reason is None
    assert len(graphs.graphs) == (len({bucket for *_, bucket in served}) if device == "cuda" else 0)

@pytest.mark.parametrize("stack", [True, False])
def test_one_users_long_decodes_match_hf(tiny_model_dir, stack):
    """One request alone, its context tens of KV blocks long: with fewer
    attention tasks than threads the native kernel cuts each decode's context
    into parts, run on both threads and merged. The tokens must still be HF's,
    with the layers in one native call (stack) and one by one; the latter
    lets the test watch the attention op's calls."""
    path = tiny_model_dir("llama")
    prompt = make_prompts(1, 384, seed=3, lo=150, hi=150)[0]
    with torch_threads(2):
        engine = LLMEngine(EngineConfig.from_kwargs(model=path, block_size=4, num_kv_blocks=100,
                                                    enable_prefix_caching=False, cpu_kernels="on"))
        runner = engine.executor.runner
        assert runner.model.model.native_stack is not None
        lone_decodes = []
        if not stack:
            runner.model.model.native_stack = None
            attn = [m for m in runner.model.modules() if getattr(m, "attention_kernel", None) is not None]
            kernel = attn[0].attention_kernel

            def recording(out, q, k_cache, v_cache, block_table, query_start, seq_lens, scale):
                if q.shape[0] == 1:
                    lone_decodes.append(int(seq_lens[0]))
                return kernel(out, q, k_cache, v_cache, block_table, query_start, seq_lens, scale)
            for m in attn:
                m.attention_kernel = recording
        engine.add_request("0", prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
        done = []
        while engine.has_unfinished_requests():
            done += [o for o in engine.step() if o.finished]
    if not stack:
        # The case under test happened: one query row over 150-173 tokens (38-44
        # blocks of 4): the 23 decodes, and the prompt's last layer, which runs
        # only the sampled row.
        assert set(lone_decodes) == set(range(150, 174))
    assert done[0].token_ids == hf_generate(load_hf(path), prompt, 24)


def test_prefix_caching_same_outputs_and_counts_cached_tokens(tiny_model_dir):
    path = tiny_model_dir("llama")
    system = make_prompts(1, 384, seed=5, lo=40, hi=40)[0]
    prompts = [system + tail for tail in make_prompts(6, 384, seed=6, lo=2, hi=12)]
    results = {}
    for caching in (False, True):
        engine = LLMEngine(EngineConfig.from_kwargs(model=path, num_kv_blocks=200, block_size=8,
                                                    enable_prefix_caching=caching))
        results[caching] = run_staggered(engine, prompts, [8] * len(prompts), every=3, first=1)
    for a, b in zip(results[False], results[True]):
        assert a.token_ids == b.token_ids
        assert a.num_cached_tokens == 0
    # The first request computes the shared 40-token system prompt (5 full blocks of 8);
    # later ones find those blocks cached.
    assert results[True][0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == 40 for o in results[True][1:])


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_failed_batch_leaves_no_unfilled_blocks_in_the_prefix_cache(tiny_model_dir, monkeypatch, asynchronous):
    """The prefix cache makes a block findable when its batch is scheduled; if
    that batch fails, the block holds no K/V. A later prompt with the same
    prefix must compute it, not read it; a request that already took it (a
    batch in flight behind the failed one, under async scheduling) fails."""
    path = tiny_model_dir("llama")
    engine = LLMEngine(EngineConfig.from_kwargs(model=path, num_kv_blocks=200, block_size=4,
                                                async_scheduling=asynchronous))
    faults = fail_next_forward(monkeypatch, engine.executor.runner)
    prompt = make_prompts(1, 384, seed=40, lo=20, hi=20)[0]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs, it = {}, 0
    engine.add_request("a", prompt, greedy)
    while it < 2 or engine.has_unfinished_requests():
        if it == 1:
            engine.add_request("b", prompt, greedy)  # same prompt, one iteration later
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
        it += 1
    expected = hf_generate(load_hf(path), prompt, 6)
    assert outs["a"].error == "RuntimeError: injected fault"
    if asynchronous:
        assert "prefix-cache hit was on blocks a failed batch was to fill" in outs["b"].error
    else:
        assert (outs["b"].token_ids, outs["b"].num_cached_tokens) == (expected, 0)
    engine.add_request("c", prompt, greedy)
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert outs["c"].token_ids == expected
    assert engine.stats().num_kv_blocks_free == 200
    # A request aborted while its failing batch is in flight (under async scheduling
    # there always is one): its blocks are free, and must not stay findable.
    faults.clear()
    engine.add_request("d", prompt[::-1], greedy)
    engine.step()
    engine.abort_request("d")
    while engine.has_unfinished_requests():
        engine.step()
    assert faults  # the failure happened
    engine.add_request("e", prompt[::-1], greedy)
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert outs["e"].token_ids == hf_generate(load_hf(path), prompt[::-1], 6)


def test_swap_and_recompute_preemption_give_same_outputs(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = make_prompts(10, 384, seed=9)
    outs = {}
    for mode in ("recompute", "swap"):
        engine = LLMEngine(EngineConfig.from_kwargs(
            model=path, num_kv_blocks=26, block_size=4, max_num_batched_tokens=48, preemption_mode=mode,
            swap_space_gb=0.01, enable_prefix_caching=False))
        outs[mode] = run_staggered(engine, prompts, [20] * len(prompts))
        if mode == "swap":
            assert engine.stats().num_swaps_total > 0
    assert [o.token_ids for o in outs["recompute"]] == [o.token_ids for o in outs["swap"]]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_priority_preemption_keeps_greedy_parity(tiny_model_dir, asynchronous):
    """With async scheduling too: there a victim in the batch in flight is
    held out of the next one and preempted after it."""
    path = tiny_model_dir("llama")
    hf = load_hf(path)
    prompts = make_prompts(8, 384, seed=11, lo=10, hi=30)
    engine = LLMEngine(EngineConfig.from_kwargs(model=path, num_kv_blocks=30, block_size=4,
                                                scheduling_policy="priority", enable_prefix_caching=False,
                                                async_scheduling=asynchronous))
    for i, p in enumerate(prompts[:6]):
        engine.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), priority=5)
    for _ in range(4):
        engine.step()
    for i, p in enumerate(prompts[6:], start=6):
        engine.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), priority=0)
    outs, first_urgent_iter = {}, None
    it = 0
    while engine.has_unfinished_requests():
        it += 1
        for o in engine.step():
            if o.request_id in ("6", "7") and first_urgent_iter is None:
                first_urgent_iter = it
            if o.finished:
                outs[o.request_id] = o
    # Synchronous: the urgent requests' first tokens come from the very next
    # iteration; async: each token comes back one iteration later, and the
    # victims, all in flight, go one iteration later still.
    assert first_urgent_iter == (3 if asynchronous else 1)
    assert engine.stats().num_preemptions_total > 0
    assert engine.stats().num_kv_blocks_free == 30
    for i, p in enumerate(prompts):
        assert outs[str(i)].token_ids == hf_generate(hf, p, 20)


def test_smollm2_greedy_matches_hf(default_model_dir):
    from orca_serve import LLM

    llm = LLM(model=None, num_kv_blocks=64)
    hf = load_hf(default_model_dir)
    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea."]
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_generate(hf, p, 16)
    assert "Paris" in outs[0].text
