"""The native CPU kernels (orca_serve/kernels) against plain PyTorch.

The paged decode kernel must give what SDPA gives on each request's gathered
context, for scattered block tables, partial last blocks, GQA groups and the
head sizes it compiles; RMSNorm, SiLU-and-mul and RoPE must give what the
layers' PyTorch code gives; bad inputs must raise, not read out of bounds;
and the engine must produce the same greedy tokens with and without them.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orca_serve import kernels
from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.layers.activation import SiluAndMul
from orca_serve.layers.norm import RMSNorm
from orca_serve.layers.rotary import RotaryEmbedding
from orca_serve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None, f"native CPU kernels failed to build: {kernels.load_error()}"
    return module


def make_case(seed, n, kv_heads, group, head_dim, block_size, max_len, num_blocks=1300):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    lens = rng.integers(1, max_len + 1, n)
    lens[0] = block_size  # one exactly full last block
    max_blocks = int(-(-lens.max() // block_size)) + 1  # one spare column: padding must be ignored
    table = np.full((n, max_blocks), num_blocks - 1, dtype=np.int64)
    free = rng.permutation(num_blocks - 1)
    used = 0
    for i, length in enumerate(lens):
        k = -(-int(length) // block_size)
        table[i, :k] = free[used:used + k]
        used += k
    assert used <= num_blocks - 1
    q = torch.randn(n, kv_heads, group, head_dim, generator=g)
    return q, k_cache, v_cache, torch.from_numpy(table), torch.from_numpy(lens)


def reference(q, k_cache, v_cache, table, lens, scale):
    n, kv_heads, group, d = q.shape
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    for i in range(n):
        pos = torch.arange(int(lens[i]))
        slots = table[i, pos // bs] * bs + pos % bs
        ks = k_cache.reshape(-1, kv_heads, d)[slots].transpose(0, 1)  # [kv_heads, L, d]
        vs = v_cache.reshape(-1, kv_heads, d)[slots].transpose(0, 1)
        out[i] = F.scaled_dot_product_attention(q[i], ks, vs, scale=scale)  # q[i]: [kv_heads, group, d]
    return out


@pytest.mark.parametrize("kv_heads,group,head_dim,block_size", [
    (3, 3, 64, 16),   # SmolLM2's shape
    (1, 4, 128, 16),  # MQA, wide heads
    (2, 1, 32, 5),    # MHA, a block size that is no power of two
    (4, 2, 96, 1),    # one token per block
    (2, 2, 256, 8),
    (3, 2, 16, 4),    # the tiny test models' heads
    (2, 3, 20, 3),    # a head size with no specialization: the generic loop
])
def test_decode_kernel_matches_sdpa(ops, kv_heads, group, head_dim, block_size):
    q, kc, vc, table, lens = make_case(head_dim + block_size, 13, kv_heads, group, head_dim, block_size, 90)
    out = torch.full_like(q, float("nan"))
    ops.paged_decode_attention(out, q, kc, vc, table, lens, head_dim ** -0.5)
    torch.testing.assert_close(out, reference(q, kc, vc, table, lens, head_dim ** -0.5), rtol=1e-5, atol=1e-5)


def test_decode_kernel_large_scores_do_not_overflow(ops):
    # Softmax subtracts the max: scores of several hundred must not give inf/NaN.
    q, kc, vc, table, lens = make_case(7, 4, 3, 3, 64, 16, 200)
    q = q * 40
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, kc, vc, table, lens, 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, kc, vc, table, lens, 0.125), rtol=1e-4, atol=1e-4)


def test_decode_kernel_rejects_bad_inputs(ops):
    q, kc, vc, table, lens = make_case(3, 4, 3, 3, 64, 16, 40)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="float32"):
        ops.paged_decode_attention(out.double(), q.double(), kc.double(), vc.double(), table, lens, 0.125)
    bad = table.clone()
    bad[0, 0] = kc.shape[0]
    with pytest.raises(RuntimeError, match="block id out of range"):
        ops.paged_decode_attention(out, q, kc, vc, bad, lens, 0.125)
    too_long = lens.clone()
    too_long[1] = table.shape[1] * kc.shape[1] + 1
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        ops.paged_decode_attention(out, q, kc, vc, table, too_long, 0.125)
    wide = (4, 1, 1, 600)
    with pytest.raises(RuntimeError, match="unsupported head_dim"):
        ops.paged_decode_attention(torch.empty(wide), torch.zeros(wide), torch.zeros(kc.shape[0], 16, 1, 600),
                                   torch.zeros(kc.shape[0], 16, 1, 600), table, lens, 0.125)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (37, 64), (300, 100)])
def test_rms_norm_matches_layer(ops, rows, hidden):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.copy_(torch.randn(hidden, generator=g))
    x = torch.randn(rows, hidden, generator=g) * 3
    expected = norm(x)
    norm.cpu_ops = ops
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    # A strided row view (a slice of a wider buffer) is read correctly.
    wide = torch.randn(rows, hidden + 7, generator=g)
    norm.cpu_ops = None
    expected = norm(wide[:, :hidden])
    norm.cpu_ops = ops
    torch.testing.assert_close(norm(wide[:, :hidden]), expected, rtol=1e-5, atol=1e-5)


def test_silu_and_mul_matches_layer_including_extremes(ops):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2 * 96, generator=g) * 6
    x[0, :6] = torch.tensor([-200.0, -90.0, -20.0, 0.0, 40.0, 200.0])  # exp must neither overflow nor NaN
    act = SiluAndMul()
    expected = act(x)
    act.cpu_ops = ops
    got = act(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


def test_rotary_embedding_matches_layer_and_checks_positions(ops):
    g = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(32, 128, {"rope_theta": 10000.0, "rope_type": "default"})
    heads, kv_heads = 4, 2
    qkv = torch.randn(20, (heads + 2 * kv_heads) * 32, generator=g)
    positions = torch.randint(0, 128, (20,), generator=g)
    expected = rope.rotate_qkv(positions, qkv.clone(), heads, kv_heads)
    rope.cpu_ops = ops
    got = rope.rotate_qkv(positions, qkv.clone(), heads, kv_heads)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        rope.rotate_qkv(torch.full((20,), 128), qkv.clone(), heads, kv_heads)


def test_kernel_selection_modes():
    assert kernels.paged_decode_kernel("off", "cpu", torch.float32, 64) is None
    assert kernels.paged_decode_kernel("auto", "cpu", torch.bfloat16, 64) is None
    assert kernels.paged_decode_kernel("auto", "cpu", torch.float32, 600) is None
    assert kernels.paged_decode_kernel("auto", "cpu", torch.float32, 64) is not None
    with pytest.raises(ValueError, match="float32 only"):
        kernels.paged_decode_kernel("on", "cpu", torch.bfloat16, 64)
    with pytest.raises(ValueError, match="head_dim 600"):
        kernels.paged_decode_kernel("on", "cpu", torch.float32, 600)
    assert kernels.cpu_ops_for("off", "cpu", torch.float32) is None
    assert kernels.cpu_ops_for("auto", "cpu", torch.float16) is None
    assert kernels.cpu_ops_for("auto", "cpu", torch.float32) is not None
    with pytest.raises(ValueError, match="float32 only"):
        kernels.cpu_ops_for("on", "cpu", torch.float16)
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        EngineConfig.from_kwargs(cpu_kernels="fast")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_engine_same_tokens_with_and_without_kernel(tiny_model_dir, kind):
    """Staggered arrivals and a preempting pool; the kernel only changes how decodes attend."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 384, int(rng.integers(3, 60))).tolist() for _ in range(10)]
    outs = {}
    for mode in ("on", "off"):
        engine = LLMEngine(EngineConfig.from_kwargs(
            model=tiny_model_dir(kind), num_kv_blocks=30, block_size=4, max_num_batched_tokens=40,
            max_num_seqs=8, enable_prefix_caching=False, cpu_kernels=mode))
        assert engine.executor.runner.uses_decode_kernel == (mode == "on")
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=6 + 2 * i, temperature=0, ignore_eos=True))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        assert engine.stats().num_preemptions_total > 0
        assert engine.stats().num_kv_blocks_free == 30
        outs[mode] = done
    assert outs["on"] == outs["off"]
