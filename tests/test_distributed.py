"""Tensor and pipeline parallel workers (gloo on CPU) against one process.

Greedy outputs must be token-identical to the single-process engine under
continuous batching with staggered arrivals and preemption; each rank holds
(and reads from the checkpoint) only its share of the model; with two stages
the pipeline really overlaps batches. Worker processes take a few seconds to
start on a small machine, so each layout starts one engine.
"""
import random

import pytest

from helpers_models import torch_threads
from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from test_engine_correctness import make_prompts, run_staggered

NUM_BLOCKS = 26  # small enough to force preemption


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The driver-side reference shares 2 cores with the workers: no thread oversubscription."""
    with torch_threads(1):
        yield


def make_engine(path, tp=1, pp=1, **kw):
    return LLMEngine(EngineConfig.from_kwargs(
        model=path, num_kv_blocks=NUM_BLOCKS, block_size=4, max_num_batched_tokens=48, max_num_seqs=10,
        enable_prefix_caching=False, tensor_parallel_size=tp, pipeline_parallel_size=pp, worker_timeout_s=60, **kw))


def workload(kind):
    prompts = make_prompts(10, 384, seed=7 if kind == "llama" else 8, hi=50)
    rng = random.Random(2)
    return prompts, [rng.randint(4, 16) for _ in prompts]


_reference: dict = {}


def reference(path, kind):
    """Single-process outputs, stats and parameter bytes (computed once per model)."""
    if kind not in _reference:
        engine = make_engine(path)
        prompts, max_tokens = workload(kind)
        outs = run_staggered(engine, prompts, max_tokens)
        _reference[kind] = ([o.token_ids for o in outs], engine.executor.runner.param_bytes)
        engine.shutdown()
    return _reference[kind]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_single_process(tiny_model_dir, kind, tp, pp):
    path = tiny_model_dir(kind)
    expected, model_bytes = reference(path, kind)
    engine = make_engine(path, tp, pp)
    try:
        prompts, max_tokens = workload(kind)
        outs = run_staggered(engine, prompts, max_tokens)
        assert engine.stats().num_preemptions_total > 0, "the small pool should force preemption"
        for i, (o, want) in enumerate(zip(outs, expected)):
            assert o.finish_reason == "length" and not o.error
            assert o.token_ids == want, f"prompt {i} differs at T={tp} P={pp}"
        assert engine.stats().num_kv_blocks_free == NUM_BLOCKS
        check_rank_shares(engine.executor.worker_info, model_bytes, tp * pp)
        if pp == 2:
            check_pipeline_overlap(engine.executor.batch_trace(), tp)
    finally:
        engine.shutdown()
    assert not any(p.is_alive() for p in engine.executor.procs)


def check_rank_shares(info, model_bytes, world):
    params = [info[r]["param_bytes"] for r in range(world)]
    # Every byte a rank read from the checkpoint went into one of its parameters: no full tensors.
    assert [info[r]["bytes_read"] for r in range(world)] == params
    # About 1/(T x P) each. Not exact on these tiny models: embeddings are a big
    # part of them, every TP rank keeps the norms and GPT-2's position table
    # (1/8 of the tiny GPT-2), and a tied embedding is held by the first and the
    # last stage; 3 Llama layers split 2 + 1.
    assert sum(params) <= 1.35 * model_bytes
    for b in params:
        assert 0.6 * model_bytes / world <= b <= 1.6 * model_bytes / world, (params, model_bytes)


def check_pipeline_overlap(trace, tp):
    """Stage 0 starts batch i+1 before stage 1 has finished batch i (batches in flight)."""
    stage0 = {rec[0]: rec for rec in trace[0]}
    stage1 = {rec[0]: rec for rec in trace[tp]}
    assert stage0.keys() == stage1.keys()
    seqs = sorted(stage0)
    overlapped = [s for s in seqs[:-1] if stage0.get(s + 1, (0, 0, float("inf")))[2] < stage1[s][4]]
    assert len(overlapped) >= len(seqs) // 3, (len(overlapped), len(seqs))


def test_a_budget_gives_every_stage_the_most_loaded_stages_blocks(tiny_model_dir):
    """Llama's 3 layers over 2 stages: a KV budget buys stage 1 (one layer)
    twice the blocks stage 0 (two layers) can hold; every rank takes stage 0's
    count, which the scheduler hands out. The host pool for swap-mode
    preemption follows the same rule."""
    from orca_serve.models.loader import get_model_facts

    path = tiny_model_dir("llama")
    expected, _ = reference(path, "llama")
    engine = LLMEngine(EngineConfig.from_kwargs(
        model=path, kv_cache_memory_gb=0.001, block_size=4, max_num_batched_tokens=48, max_num_seqs=10,
        enable_prefix_caching=False, pipeline_parallel_size=2, worker_timeout_s=60,
        preemption_mode="swap", swap_space_gb=0.0005))
    try:
        facts = get_model_facts(engine.config.model)
        stage0_block_bytes = 2 * 2 * 4 * facts.num_kv_heads * facts.head_dim * 4  # 2 layers, K and V, float32
        assert engine.stats().num_kv_blocks_total == int(0.001 * 2**30) // stage0_block_bytes
        swap_slots = engine.scheduler.swap.num_free_slots
        assert swap_slots == int(0.0005 * 2**30) // stage0_block_bytes
        assert {i["num_cpu_blocks"] for i in engine.executor.worker_info.values()} == {swap_slots}
        per_rank = {r: i["kv_cache_bytes"] for r, i in engine.executor.worker_info.items()}
        assert per_rank[0] == 2 * per_rank[1]  # same blocks (and scratch block), twice the layers
        prompts, max_tokens = workload("llama")
        assert [o.token_ids for o in run_staggered(engine, prompts, max_tokens)] == expected
    finally:
        engine.shutdown()
