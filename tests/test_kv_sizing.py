"""Sizing the KV pool: fixed budgets, and on a GPU what a profile run leaves of
--gpu-memory-utilization (worker/kv_sizing.py). On a CPU the runner's profile
path runs with a stand-in for torch.cuda's memory counters."""
from __future__ import annotations

import pytest
import torch

from helpers_models import hf_greedy, load_hf
from orca_serve.config import CacheConfig, EngineConfig, SchedulerConfig
from orca_serve.distributed.plan import DeviceInfo, resolve_parallel
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.sampling_params import SamplingParams
from orca_serve.worker import kv_sizing
from orca_serve.worker.kv_pool import KVPool
from orca_serve.worker.kv_sizing import (MemorySnapshot, blocks_from_profile, fixed_kv_blocks, profile_batches,
                                         swap_blocks)
from orca_serve.worker.model_runner import ModelRunner

GiB = 2**30
MiB = 2**20


def test_blocks_from_profile_arithmetic():
    # 80 GiB device; torch reserved 68 GiB and the driver says 10 GiB free, so 2 GiB
    # is outside torch; the peak of 6 GiB held the profile's 0.5 GiB pool.
    snap = MemorySnapshot(total=80 * GiB, free=10 * GiB, reserved=68 * GiB, peak_allocated=6 * GiB)
    blocks, how = blocks_from_profile(snap, 0.9, 1 * MiB, profile_pool_bytes=GiB // 2)
    budget = 0.9 * 80 * GiB - 5.5 * GiB - 2 * GiB
    assert blocks == int(budget // MiB) - 1  # one block of the budget is the scratch block
    assert f"{blocks} blocks" in how and "outside torch" in how
    # A lower share leaves fewer blocks; memory other processes hold counts against it.
    fewer, _ = blocks_from_profile(MemorySnapshot(80 * GiB, 5 * GiB, 68 * GiB, 6 * GiB), 0.9, MiB, GiB // 2)
    assert fewer == blocks - 5 * 1024


def test_blocks_from_profile_without_room_says_what_to_change():
    snap = MemorySnapshot(total=16 * GiB, free=1 * GiB, reserved=14 * GiB, peak_allocated=14 * GiB)
    with pytest.raises(ValueError, match="no room for the KV cache.*gpu-memory-utilization"):
        blocks_from_profile(snap, 0.9, MiB, profile_pool_bytes=0)
    # Room for the scratch block alone is still no room.
    snap = MemorySnapshot(total=10 * GiB, free=0, reserved=10 * GiB, peak_allocated=9 * GiB - MiB)
    with pytest.raises(ValueError, match="less than one block"):
        blocks_from_profile(snap, 0.9, 2 * MiB, profile_pool_bytes=0)


def test_fixed_kv_blocks():
    assert fixed_kv_blocks(CacheConfig(num_kv_blocks=7, kv_cache_memory_gb=1.0), MiB, True) == 7
    assert fixed_kv_blocks(CacheConfig(kv_cache_memory_gb=1.5), MiB, True) == 1536
    assert fixed_kv_blocks(CacheConfig(), MiB, on_gpu=True) is None
    assert fixed_kv_blocks(CacheConfig(), MiB, on_gpu=False) == 2048  # the CPU's 2 GiB
    assert fixed_kv_blocks(CacheConfig(kv_cache_memory_gb=0.0001), MiB, False) == 1


def test_swap_blocks():
    assert swap_blocks(CacheConfig(preemption_mode="swap", swap_space_gb=0.5), MiB) == 512
    assert swap_blocks(CacheConfig(preemption_mode="swap", swap_space_gb=0), MiB) == 0
    assert swap_blocks(CacheConfig(preemption_mode="recompute", swap_space_gb=0.5), MiB) == 0


class Layer:
    def __init__(self):
        self.num_kv_heads, self.head_dim, self.kv_cache = 2, 8, None


def test_kv_pool_binds_every_layer_and_swaps_blocks():
    layers = [Layer() for _ in range(3)]
    pool = KVPool(layers, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert pool.block_bytes == 3 * 2 * 4 * 2 * 8 * 4  # layers, K and V, tokens, heads, dims, float32
    assert KVPool(layers[:2], 4, torch.bfloat16, torch.device("cpu")).block_bytes == 2 * 2 * 4 * 2 * 8 * 2
    assert (pool.num_blocks, pool.num_host_blocks, pool.nbytes) == (0, 0, 0)
    pool.allocate(5)
    assert pool.cache.shape == (3, 2, 6, 4, 2, 8) and not pool.cache.any()  # and the scratch block
    assert pool.nbytes == 6 * pool.block_bytes
    assert all(layer.kv_cache.data_ptr() == pool.cache[i].data_ptr() for i, layer in enumerate(layers))
    with pytest.raises(RuntimeError, match="no CPU blocks"):
        pool.swap_out([(0, 1)])
    pool.allocate_host(2)
    pool.cache[:, :, 3] = 7.0
    pool.swap_out([(1, 3)])
    pool.cache[:, :, 3] = 0.0
    pool.swap_in([(1, 4)])
    assert (pool.cache[:, :, 4] == 7.0).all() and not pool.cache[:, :, 3].any()
    assert not pool.host_cache[:, :, 0].any()
    with pytest.raises(ValueError, match="at least one block"):
        pool.allocate(0)
    pool.release()
    assert pool.cache is None and all(layer.kv_cache is None for layer in layers)


def test_a_pool_too_large_to_allocate_is_a_settings_error():
    # --kv-cache-memory-gb 1000 (or 1e30, or --block-size 2**40) crashed with a
    # traceback from mmap or torch; --swap-space-gb likewise for the host pool.
    pool = KVPool([Layer()], block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"cannot allocate the KV pool \(10{30} blocks \+ 1 scratch of .* GiB\) "
                                         r"on cpu: .*; lower --num-kv-blocks, --kv-cache-memory-gb or --block-size"):
        pool.allocate(10**30)
    with pytest.raises(ValueError, match=r"cannot allocate the swap space \(10{30} blocks .*; lower --swap-space-gb"):
        pool.allocate_host(10**30)
    assert pool.cache is None and pool.num_host_blocks == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization"),
    (dict(kv_cache_memory_gb=0), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb=-1.0), "kv_cache_memory_gb"),
    (dict(kv_cache_memory_gb=float("inf")), "kv_cache_memory_gb"),
    (dict(swap_space_gb=-1.0), "swap_space_gb"),
    (dict(swap_space_gb=float("inf")), "swap_space_gb"),
    (dict(swap_space_gb=float("nan")), "swap_space_gb"),
    # Wrong types say which setting is wrong (not "'<' not supported between ..."),
    # and a bool is neither a size nor a share.
    (dict(kv_cache_memory_gb="2"), "kv_cache_memory_gb must be a finite number > 0"),
    (dict(kv_cache_memory_gb=True), "kv_cache_memory_gb"),
    (dict(gpu_memory_utilization="0.9"), "gpu_memory_utilization must be a number in"),
    (dict(gpu_memory_utilization=None), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=True), "gpu_memory_utilization"),
    (dict(swap_space_gb=None), "swap_space_gb must be a finite number >= 0"),
    # A string is always true: "no" would have left prefix caching on.
    (dict(enable_prefix_caching="no"), "enable_prefix_caching must be True or False"),
    (dict(enable_prefix_caching=None), "enable_prefix_caching"),
])
def test_bad_cache_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("seqs,budget,max_len,block", [(256, 2048, 4096, 16), (3, 100, 30, 4), (1, 64, 512, 16),
                                                       (200, 50, 1000, 8), (4, 64, 2, 4)])
def test_profile_batches_cover_the_largest_iterations(seqs, budget, max_len, block):
    batches, most = profile_batches(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget),
                                    max_len, block, vocab_size=100)
    longest = max(1, max_len - 1)
    fresh, *late, many = batches
    assert [len(r.prompt_token_ids) for r in fresh.scheduled_new_reqs] == [min(budget, longest)]
    # A chunk as long as the budget allows at the end of the longest context
    # (none when the model's length leaves no context before a chunk).
    assert len(late) == (longest > 1)
    for so in late:
        (chunk,) = so.scheduled_new_reqs
        n = so.num_scheduled_tokens[chunk.req_id]
        assert (n, chunk.num_computed_tokens, len(chunk.prompt_token_ids)) == (min(budget, longest - 1),
                                                                              longest - n, longest)
    lengths = [len(r.prompt_token_ids) for r in many.scheduled_new_reqs]
    assert len(lengths) == min(seqs, budget) and max(lengths) - min(lengths) <= 1
    assert sum(lengths) == min(budget, len(lengths) * longest)
    for so in batches:
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        written = []  # the blocks this batch's tokens go to: one request's each
        for r in so.scheduled_new_reqs:
            assert r.num_computed_tokens + so.num_scheduled_tokens[r.req_id] == len(r.prompt_token_ids)
            assert len(r.block_ids) * block >= len(r.prompt_token_ids) > (len(r.block_ids) - 1) * block
            written += r.block_ids[r.num_computed_tokens // block:]
            assert all(0 <= t < 100 for t in r.prompt_token_ids)
            sp = r.sampling_params
            assert sp.seed is not None and sp.temperature > 0 and sp.logprobs and sp.min_tokens
        assert len(written) == len(set(written)) and max(written) < most
    assert most == max(len({b for r in so.scheduled_new_reqs for b in r.block_ids}) for so in batches)


class FakeMemory:
    """torch.cuda's counters as a GPU would report them after the profile run."""

    def __init__(self, snap: MemorySnapshot, events: list) -> None:
        self.snap, self.events = snap, events

    def reset_peak(self) -> None:
        self.events.append("reset")

    def snapshot(self) -> MemorySnapshot:
        self.events.append("snapshot")
        return self.snap


@pytest.fixture
def fake_gpu_memory(monkeypatch):
    """Make the CPU runner size its pool as on a GPU; returns (snapshot setter, events)."""
    events: list = []
    # 32 MiB outside torch; 0.9 of the device leaves ~229 MiB for the pool, 0.5 ~24 MiB.
    state = {"snap": MemorySnapshot(total=512 * MiB, free=256 * MiB, reserved=224 * MiB,
                                    peak_allocated=200 * MiB)}
    monkeypatch.setattr(kv_sizing, "device_memory", lambda device: FakeMemory(state["snap"], events))
    real = ModelRunner.execute_model

    def counted(self, so):
        events.append(("batch", so.iteration, so.num_reqs))
        return real(self, so)

    monkeypatch.setattr(ModelRunner, "execute_model", counted)
    return state, events


def engine_config(path: str, **kw) -> EngineConfig:
    return EngineConfig.from_kwargs(model=path, block_size=4, max_num_batched_tokens=48, max_num_seqs=6,
                                    cpu_kernels="off", **kw)


def test_runner_sizes_its_pool_from_a_profile_run(tiny_model_dir, fake_gpu_memory):
    state, events = fake_gpu_memory
    config = engine_config(tiny_model_dir("llama"), gpu_memory_utilization=0.5)
    runner = ModelRunner(config)
    batches, most = profile_batches(config.scheduler, runner.hf_config.max_position_embeddings, 4,
                                    runner.vocab_size)
    # The counters were reset, both profile batches ran, and only then were they read.
    assert events == ["reset", ("batch", -1, 1), ("batch", -2, 1), ("batch", -3, 6), "snapshot"]
    expected, _ = blocks_from_profile(state["snap"], 0.5, runner.kv_pool.block_bytes,
                                     (most + 1) * runner.kv_pool.block_bytes)
    assert runner.num_kv_blocks == expected > most
    assert runner.kv_pool.cache.shape[2] == expected + 1
    assert not runner.requests  # the profile's requests are forgotten
    assert not runner.kv_pool.cache.any()  # and the pool the requests get is a fresh one
    layer_pools = [m.kv_cache for m in runner.model.modules() if hasattr(m, "kv_cache")]
    assert all(p.data_ptr() == runner.kv_pool.cache[i].data_ptr() for i, p in enumerate(layer_pools))
    # A fixed size skips the profile run.
    events.clear()
    ModelRunner(engine_config(tiny_model_dir("llama"), kv_cache_memory_gb=0.01))
    assert events == []


def test_profile_attends_a_chunk_over_the_longest_context(tiny_model_dir, fake_gpu_memory, monkeypatch):
    """In the GPU's batched layout a fresh prompt attends its own K/V with no
    mask; a later chunk gathers its whole context and masks it, the larger
    transient. The profile must run one (run here on the CPU in that layout)."""
    import orca_serve.layers.attention as attention
    import orca_serve.worker.model_runner as model_runner

    calls, sdpa, prepare = [], attention.F.scaled_dot_product_attention, model_runner.prepare_inputs

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((k.shape[-2], attn_mask is not None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(model_runner, "prepare_inputs",
                        lambda *a, **kw: prepare(*a, **{**kw, "batched_attention": True}))
    runner = ModelRunner(engine_config(tiny_model_dir("llama")))
    longest = runner.hf_config.max_position_embeddings - 1
    assert (longest, True) in calls and max(keys for keys, _ in calls) == longest


def test_engine_on_a_profiled_pool_serves_as_on_a_fixed_one(tiny_model_dir, fake_gpu_memory):
    """Greedy parity with HF, and random sampling from the shared generator
    unchanged: the profile run leaves no state behind."""
    path = tiny_model_dir("llama")
    prompts = [[5, 6, 7, 8, 9], [3] * 30, list(range(10, 50))]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    outs = {}
    for name, kw in (("fixed", dict(num_kv_blocks=64)), ("profiled", {})):
        engine = LLMEngine(engine_config(path, **kw))
        outs[name] = [generate(engine, prompts, greedy), generate(engine, prompts, sampled),
                      engine.stats().num_kv_blocks_total]
        assert engine.stats().num_kv_blocks_free == engine.stats().num_kv_blocks_total
    hf = load_hf(path)
    assert outs["profiled"][0] == [hf_greedy(hf, p, 12) for p in prompts]
    assert outs["profiled"][:2] == outs["fixed"][:2]
    assert outs["profiled"][2] == engine.executor.runner.num_kv_blocks > 64


def test_out_of_memory_in_the_profile_run_says_what_to_change(tiny_model_dir, fake_gpu_memory, monkeypatch):
    def out_of_memory(self, so):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.75 GiB")

    monkeypatch.setattr(ModelRunner, "execute_model", out_of_memory)
    with pytest.raises(ValueError, match="out of memory in the KV profile run.*2.75 GiB.*--max-model-len"):
        LLMEngine(engine_config(tiny_model_dir("llama")))


def test_engine_refuses_to_start_without_room(tiny_model_dir, fake_gpu_memory):
    state, _ = fake_gpu_memory
    state["snap"] = MemorySnapshot(total=4 * GiB, free=0, reserved=GiB, peak_allocated=3 * GiB)
    with pytest.raises(ValueError, match="no room for the KV cache on the GPU"):
        LLMEngine(engine_config(tiny_model_dir("llama"), gpu_memory_utilization=0.5))


def generate(engine: LLMEngine, prompts, params) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    return [done[f"r{i}"] for i in range(len(prompts))]


def test_parallel_plan_leaves_room_for_one_sequence_on_a_gpu():
    """Without a budget, --parallel auto on GPUs plans for the weights and one
    full-length sequence (the pool then takes what is left); on a CPU for the
    2 GiB default."""
    class Facts:
        dtype, num_layers, num_kv_heads, head_dim, num_heads = torch.float16, 40, 40, 128, 40
        num_params, max_model_len, intermediate_size = 13 * 10**9, 2048, 13824

    config = EngineConfig.from_kwargs(parallel="auto")
    # 24.2 GiB of weights; 1.56 GiB of KV for 2,048 tokens, 2 GiB for the CPU's default.
    # 0.9 of 28.9 GiB (26.0 GiB) holds the first and not the second.
    memory = int(28.9 * GiB)
    assert resolve_parallel(config, Facts, [DeviceInfo("H100", memory)]).parallel.world_size == 1
    with pytest.raises(ValueError, match="does not fit"):
        resolve_parallel(config, Facts, [DeviceInfo("cpu", memory)])
    # A budget given is planned for as it is: 60 GiB needs two GPUs.
    big = EngineConfig.from_kwargs(parallel="auto", kv_cache_memory_gb=60.0)
    assert resolve_parallel(big, Facts, [DeviceInfo("H100", 80 * GiB)] * 8).parallel.world_size == 2
    # The share of each GPU is the operator's: 0.3 of 80 GiB (24 GiB) does not hold the weights.
    low = EngineConfig.from_kwargs(parallel="auto", gpu_memory_utilization=0.3)
    assert resolve_parallel(config, Facts, [DeviceInfo("H100", 80 * GiB)] * 8).parallel.world_size == 1
    assert resolve_parallel(low, Facts, [DeviceInfo("H100", 80 * GiB)] * 8).parallel.world_size == 2
    # A fixed pool does not read the share, so neither does the plan.
    for fixed in (dict(kv_cache_memory_gb=4.0), dict(num_kv_blocks=1000)):
        low_fixed = EngineConfig.from_kwargs(parallel="auto", gpu_memory_utilization=0.3, **fixed)
        assert resolve_parallel(low_fixed, Facts, [DeviceInfo("H100", 80 * GiB)] * 8).parallel.world_size == 1


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_pool_size_on_the_real_device(tiny_model_dir, device):
    """Without a budget: on a CPU the fixed 2 GiB whatever the share; on a GPU
    the pool and everything else stay within the share asked for."""
    path = tiny_model_dir("llama")
    for share in (0.3, 0.5):
        engine = LLMEngine(engine_config(path, device=device, gpu_memory_utilization=share))
        out = generate(engine, [[5, 6, 7, 8, 9]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        assert out == [hf_greedy(load_hf(path), [5, 6, 7, 8, 9], 8)]
        runner = engine.executor.runner
        pool_bytes = runner.kv_pool.nbytes
        if device == "cpu":
            assert runner.num_kv_blocks == 2 * GiB // runner.kv_pool.block_bytes
        else:
            free, total = torch.cuda.mem_get_info()
            used = total - free
            outside_torch = used - torch.cuda.memory_reserved()
            assert pool_bytes > 0.5 * (share * total - outside_torch)
            assert used <= share * total + 256 * MiB, f"{used / GiB:.2f} GiB in use, share {share}"
        del engine, runner
        if device == "cuda":
            torch.cuda.empty_cache()
