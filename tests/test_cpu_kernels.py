"""The native CPU kernels (orca_serve/kernels) against plain PyTorch.

The paged attention kernel must give what SDPA gives on each request's
gathered context, for decodes, whole prompts and prompt chunks in one batch,
scattered block tables, partial last blocks, GQA groups and the head sizes it
compiles; RMSNorm, SiLU-and-mul and RoPE must give what the
layers' PyTorch code gives; bad inputs must raise, not read out of bounds;
linear layers with prepacked weights (oneDNN's layout, and the panels of the
native small-batch matmul) must give what ``F.linear`` gives;
and the engine must produce the same greedy tokens with and without them.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_models import make_runner, torch_threads
from orca_serve import kernels
from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.kernels import packed_gemm
from orca_serve.layers.activation import SiluAndMul
from orca_serve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from orca_serve.layers.linear import GateUpSiluAndMul, MergedColumnParallelLinear, RowParallelLinear
from orca_serve.layers.norm import RMSNorm
from orca_serve.layers.rotary import RotaryEmbedding
from orca_serve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None, f"native CPU kernels failed to build: {kernels.load_error()}"
    return module


@pytest.fixture(scope="module", params=kernels.available_isas())
def ops_by_isa(request):
    """The kernels built for each ISA this CPU can run (AVX-512's register
    tiles are twice AVX2's rows; "generic" is the compiler's own loops)."""
    module = kernels.load(request.param)
    assert module is not None, f"the {request.param} kernels failed to build: {kernels.load_error()}"
    assert module.isa == request.param
    return module


def test_build_name_follows_every_source_and_header(tmp_path):
    """A changed header must give a new build: torch's own versioning hashes
    only the .cpp files it compiles, so the build's name hashes them all."""
    import shutil
    sources = tmp_path / "csrc"
    shutil.copytree(kernels._SOURCES, sources)
    assert {p.suffix for p in sources.iterdir()} == {".cpp", ".h"}
    base = kernels.build_name(sources, ["2.13.0", "-O3"])
    assert base == kernels.build_name(sources, ["2.13.0", "-O3"])
    assert base != kernels.build_name(sources, ["2.13.0", "-O2"])
    header = sources / "attention_common.h"
    original = header.read_text()
    header.write_text(original + "\n// a comment\n")
    assert kernels.build_name(sources, ["2.13.0", "-O3"]) != base
    header.write_text(original)
    assert kernels.build_name(sources, ["2.13.0", "-O3"]) == base
    (sources / "extra.h").write_text("#pragma once\n")
    assert kernels.build_name(sources, ["2.13.0", "-O3"]) != base


def make_case(seed, n, kv_heads, group, head_dim, block_size, max_len, num_blocks=1300, rows=None, lens=None):
    """A batch of n requests over a scattered pool. ``rows[i]``: query rows of
    request i (default 1: decodes); they are the last rows of its context.
    ``lens``: the context lengths (default: random up to max_len)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    if lens is None:
        lens = rng.integers(1, max_len + 1, n)
        lens[0] = block_size  # one exactly full last block
    lens = np.asarray(lens, dtype=np.int64)
    rows = np.ones(n, dtype=np.int64) if rows is None else np.minimum(np.asarray(rows), lens)
    max_blocks = int(-(-lens.max() // block_size)) + 1  # one spare column: padding must be ignored
    table = np.full((n, max_blocks), num_blocks - 1, dtype=np.int64)
    free = rng.permutation(num_blocks - 1)
    used = 0
    for i, length in enumerate(lens):
        k = -(-int(length) // block_size)
        table[i, :k] = free[used:used + k]
        used += k
    assert used <= num_blocks - 1
    q = torch.randn(int(rows.sum()), kv_heads, group, head_dim, generator=g)
    query_start = torch.from_numpy(np.concatenate(([0], np.cumsum(rows))))
    return q, k_cache, v_cache, torch.from_numpy(table), query_start, torch.from_numpy(lens)


def reference(q, k_cache, v_cache, table, query_start, lens, scale):
    """Per request: gather its context, causal SDPA for its last query rows."""
    _, kv_heads, group, d = q.shape
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    for i in range(len(lens)):
        length, s, e = int(lens[i]), int(query_start[i]), int(query_start[i + 1])
        pos = torch.arange(length)
        slots = table[i, pos // bs] * bs + pos % bs
        ks = k_cache.reshape(-1, kv_heads, d)[slots].transpose(0, 1)[:, None]  # [kv_heads, 1, L, d]
        vs = v_cache.reshape(-1, kv_heads, d)[slots].transpose(0, 1)[:, None]
        qi = q[s:e].permute(1, 2, 0, 3)  # [kv_heads, group, rows, d]
        mask = pos[None, :] <= torch.arange(length - (e - s), length)[:, None]
        out[s:e] = F.scaled_dot_product_attention(qi, ks, vs, attn_mask=mask, scale=scale).permute(2, 0, 1, 3)
    return out


def run_kernel(ops, q, kc, vc, table, qs, lens, scale):
    out = torch.full_like(q, float("nan"))
    ops.paged_attention(out, q, kc, vc, table, qs, lens, scale)
    return out


@pytest.mark.parametrize("kv_heads,group,head_dim,block_size", [
    (3, 3, 64, 16),   # SmolLM2's shape
    (1, 4, 128, 16),  # MQA, wide heads
    (2, 1, 32, 5),    # MHA, a block size that is no power of two
    (4, 2, 96, 1),    # one token per block
    (2, 2, 256, 8),
    (3, 2, 16, 4),    # the tiny test models' heads
    (2, 3, 20, 3),    # a head size with no specialization: the generic loop
    (1, 5, 64, 32),   # AVX-512: a set of four query heads, then one; two 16-key score chunks a block
    (2, 3, 128, 16),  # AVX-512: 128-dim heads in sets of two, then one
])
def test_decodes_match_sdpa(ops_by_isa, kv_heads, group, head_dim, block_size):
    case = make_case(head_dim + block_size, 13, kv_heads, group, head_dim, block_size, 90)
    scale = head_dim ** -0.5
    torch.testing.assert_close(run_kernel(ops_by_isa, *case, scale), reference(*case, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads,group,head_dim,block_size", [
    (3, 3, 64, 16),   # SmolLM2's shape
    (3, 3, 16, 4),
    (1, 4, 128, 16),  # MQA: query vectors fill whole 16-wide columns
    (2, 1, 32, 5),    # MHA: a 7-row chunk has 7 query vectors, padded to 16
    (2, 7, 16, 4),    # an odd group: 112 query vectors per 16-row task
    (1, 2, 80, 16),   # a head of five 16-dim tiles
    (2, 2, 96, 8),    # AVX-512's P.V: a 64-dim chunk and a 32-dim one
    (1, 3, 256, 16),  # four 64-dim chunks
    (3, 3, 20, 3),    # a head size with no specialization: the generic loop
])
def test_mixed_batch_of_decodes_prompts_and_chunks_matches_sdpa(ops_by_isa, kv_heads, group, head_dim, block_size):
    # Decodes (1 row), whole prompts (rows == context), chunks continuing a
    # context (1 < rows < context), and a prompt longer than a task's rows.
    rows = [1, 1, 200, 7, 1, 40, 3, 300, 1, 17]
    case = make_case(head_dim, len(rows), kv_heads, group, head_dim, block_size, 300, rows=rows)
    qs = case[4]
    assert (qs[1:] - qs[:-1]).max() > 16  # some request spans several tasks
    # Rows may be strided, as a view of the fused QKV output is.
    q = case[0]
    wide = torch.randn(q.shape[0], q[0].numel() + 24)
    wide[:, :q[0].numel()] = q.reshape(q.shape[0], -1)
    strided = wide[:, :q[0].numel()].view(q.shape)
    assert not strided.is_contiguous()
    scale = head_dim ** -0.5
    expected = reference(*case, scale)
    torch.testing.assert_close(run_kernel(ops_by_isa, *case, scale), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run_kernel(ops_by_isa, strided, *case[1:], scale), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads,group,head_dim", [
    (3, 3, 64),    # SmolLM2's shape: 48 query vectors per task, one 48-wide zmm score tile
    (2, 7, 16),    # 112 per task: two 48-wide tiles and a 16-wide one
    (2, 1, 32),    # 16 or fewer: one 16-wide tile; a 32-dim head: one 2-zmm P.V chunk
    (1, 2, 80),    # 32 per task: a 32-wide tile; P.V 64 dims and then 16
    (2, 2, 96),    # P.V 64 dims and then 32
    (1, 4, 256),   # P.V four 64-dim chunks
])
def test_prompt_attention_is_the_same_in_the_avx512_and_avx2_builds(kv_heads, group, head_dim):
    """The AVX-512 build's prompt tiles (8 keys x 48 queries, 6 queries x 64
    dims) are wider than AVX2's (6 x 16, 6 x 16), but each score and output
    element is one FMA chain in the same order in both: the two builds must
    agree bit for bit on prompts and chunks. (Decodes, one row, take the
    decode kernel, whose sums' order follows the vector width.)"""
    if "avx512" not in kernels.available_isas():
        pytest.skip("this CPU has no AVX-512 build to compare with the AVX2 one")
    rows = [2, 200, 7, 40, 3, 131, 16, 17]
    lens = [5, 200, 146, 116, 134, 161, 78, 190]  # whole prompts and chunks continuing a context
    case = make_case(head_dim + group, len(rows), kv_heads, group, head_dim, 16, 260, rows=rows, lens=lens)
    assert (case[4][1:] - case[4][:-1]).min() > 1  # no request is a decode
    scale = head_dim ** -0.5
    wide, narrow = (run_kernel(kernels.load(isa), *case, scale) for isa in ("avx512", "avx2"))
    assert torch.isfinite(wide).all()
    assert torch.equal(wide, narrow)


@pytest.mark.parametrize("block_size", [16, 5])
def test_a_lone_decode_cut_into_parts_matches_sdpa(ops_by_isa, block_size):
    # A batch with fewer tasks than threads (one user's decode) cuts the
    # decode's context into parts of whole blocks, run as separate tasks and
    # merged. Lengths: many parts with a short last block, exactly 32 blocks,
    # one block past a part, 8 blocks (two parts of the fewest blocks), 7
    # blocks (too short to cut) and a single token.
    lens = [57 * block_size + 3, 32 * block_size, 17 * block_size, 8 * block_size, 7 * block_size, 1]
    q, kc, vc, table, qs, lens = make_case(block_size, len(lens), 3, 3, 64, block_size, max(lens),
                                           num_blocks=2 * sum(lens), lens=lens)
    # One key per request, near its end, scores far above the rest: the merge
    # must rescale each part from its own max to the largest, or the early
    # parts' weights would swamp it (or underflow to 0/0).
    for i, length in enumerate(lens.tolist()):
        pos = max(length - 2, 0)
        kc[table[i, pos // block_size], pos % block_size] = q[i].mean(1) * 60
    scale = 0.125
    expected = reference(q, kc, vc, table, qs, lens, scale)
    for n in (2, 3):
        with torch_threads(n):
            for i in range(len(lens)):  # one decode: fewer tasks than threads
                alone = run_kernel(ops_by_isa, q[i:i + 1], kc, vc, table[i:i + 1], torch.tensor([0, 1]), lens[i:i + 1], scale)
                assert torch.isfinite(alone).all()
                torch.testing.assert_close(alone, expected[i:i + 1], rtol=1e-5, atol=1e-5)


def test_large_scores_do_not_overflow(ops_by_isa):
    # Softmax subtracts the max: scores of several hundred must not give inf/NaN.
    q, kc, vc, table, qs, lens = make_case(7, 4, 3, 3, 64, 16, 200, rows=[1, 30, 1, 5])
    q = q * 40
    out = run_kernel(ops_by_isa, q, kc, vc, table, qs, lens, 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, kc, vc, table, qs, lens, 0.125), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,future", [(64, 9), (64, 17), (64, 34), (64, 63), (61, 60)])
def test_a_future_keys_huge_score_leaves_earlier_rows_alone(ops_by_isa, length, future):
    # One prompt whose queries all point one way, and one key at position
    # `future` that scores ~1000 above the rest with every query. The rows
    # before it must not see it at all: were it counted in their softmax
    # max, every weight they do see would underflow to zero (0/0 = NaN). With
    # 16-row tasks and score tiles of 6 keys (AVX2) or 8 (AVX-512), 17 and 34
    # sit just past a task's first row, in the tile after the last one every
    # row of it sees; 63 is in AVX2's single-key tail and AVX-512's last
    # tile; 60 of 61 keys is in both builds' single-key tail.
    # One request in one 64-token block.
    q, kc, vc, table, qs, lens = make_case(11, 1, 3, 3, 64, 64, 64, rows=[length], lens=[length])
    assert int(lens[0]) == length and len(q) == length
    q[:] = F.normalize(torch.randn(3, 3, 64), dim=-1)  # every row: the same query per head
    block, offset = table[0, 0], future
    kc[block, offset] = q[0].mean(1) * 8000  # [kv_heads, head_dim], along each head's queries
    out = run_kernel(ops_by_isa, q, kc, vc, table, qs, lens, 0.125)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, kc, vc, table, qs, lens, 0.125), rtol=1e-4, atol=1e-4)
    # The rows from `future` on take that key's value row alone.
    torch.testing.assert_close(out[future:], vc[block, offset][None, :, None].expand_as(out[future:]),
                               rtol=1e-5, atol=1e-5)


def test_attention_kernel_rejects_bad_inputs(ops):
    q, kc, vc, table, qs, lens = make_case(3, 4, 3, 3, 64, 16, 40)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="float32"):
        ops.paged_attention(out.double(), q.double(), kc.double(), vc.double(), table, qs, lens, 0.125)
    bad = table.clone()
    bad[0, 0] = kc.shape[0]
    with pytest.raises(RuntimeError, match="block id out of range"):
        ops.paged_attention(out, q, kc, vc, bad, qs, lens, 0.125)
    too_long = lens.clone()
    too_long[1] = table.shape[1] * kc.shape[1] + 1
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        ops.paged_attention(out, q, kc, vc, table, qs, too_long, 0.125)
    short = lens.clone()
    short[2] = 0  # one query row cannot sit in an empty context
    with pytest.raises(RuntimeError, match="query rows for a context of 0"):
        ops.paged_attention(out, q, kc, vc, table, qs, short, 0.125)
    with pytest.raises(RuntimeError, match="query_start must run from 0"):
        ops.paged_attention(out, q, kc, vc, table, qs + 1, lens, 0.125)
    wide = (4, 1, 1, 600)
    with pytest.raises(RuntimeError, match="unsupported head_dim"):
        ops.paged_attention(torch.empty(wide), torch.zeros(wide), torch.zeros(kc.shape[0], 16, 1, 600),
                            torch.zeros(kc.shape[0], 16, 1, 600), table, qs, lens, 0.125)


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


@pytest.mark.parametrize("rows,hidden", [(1, 576), (37, 64), (300, 100)])
def test_add_and_norm_is_the_add_then_the_norm(ops, rows, hidden):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.copy_(torch.randn(hidden, generator=g))
    # x a strided row view (a slice of a wider buffer), as layer outputs can be.
    x = torch.randn(rows, hidden + 5, generator=g)[:, :hidden] * 3
    residual = torch.randn(rows, hidden, generator=g)
    norm.cpu_ops = ops
    total, out = norm.add_and_norm(x, residual)
    # The sum is the float32 sum, and the norm the native norm of it, bit for bit.
    assert torch.equal(total, x + residual)
    assert torch.equal(out, norm(x + residual))
    norm.cpu_ops = None
    ref_total, ref_out = norm.add_and_norm(x, residual)
    assert torch.equal(ref_total, total)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="same shape"):
        ops.add_rms_norm(torch.empty(rows, hidden), torch.empty(rows, hidden), x, residual[:, :hidden - 1],
                         norm.weight, 1e-5)


@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_matches_index_copy_and_checks_slots(ops, block_size):
    g = torch.Generator().manual_seed(block_size)
    kv_heads, head_dim, blocks, tokens = 3, 16, 12, 9
    qkv = torch.randn(tokens, (2 + 2 * kv_heads) * head_dim, generator=g)
    k = qkv[:, 2 * head_dim:(2 + kv_heads) * head_dim]  # strided views, as the layer passes them
    v = qkv[:, (2 + kv_heads) * head_dim:]
    slots = torch.randperm(blocks * block_size, generator=g)[:tokens]
    kc, vc = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g), torch.zeros(blocks, block_size,
                                                                                           kv_heads, head_dim)
    ref_k, ref_v = kc.clone(), vc.clone()
    ref_k.view(-1, kv_heads, head_dim).index_copy_(0, slots, k.reshape(tokens, kv_heads, head_dim))
    ref_v.view(-1, kv_heads, head_dim).index_copy_(0, slots, v.reshape(tokens, kv_heads, head_dim))
    ops.write_kv(kc, vc, k, v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
    before = kc.clone()
    bad = slots.clone()
    bad[4] = blocks * block_size
    with pytest.raises(RuntimeError, match=f"slot {blocks * block_size} of token 4 is outside"):
        ops.write_kv(kc, vc, k, v, bad)
    assert torch.equal(kc, before)  # checked before anything is written
    with pytest.raises(RuntimeError, match="k and v must be"):
        ops.write_kv(kc, vc, k[:, :-1], v, slots)


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
    assert kernels.paged_attention_kernel("off", kernels.cpu_ops_for("off", "cpu", torch.float32), 64) is None
    assert kernels.paged_attention_kernel("auto", kernels.cpu_ops_for("auto", "cpu", torch.bfloat16), 64) is None
    assert kernels.paged_attention_kernel("auto", kernels.cpu_ops_for("auto", "cpu", torch.float32), 600) is None
    assert kernels.paged_attention_kernel("auto", kernels.cpu_ops_for("auto", "cpu", torch.float32), 64) is not None
    with pytest.raises(ValueError, match="float32 only"):
        kernels.paged_attention_kernel("on", kernels.cpu_ops_for("on", "cpu", torch.bfloat16), 64)
    with pytest.raises(ValueError, match="head_dim 600"):
        kernels.paged_attention_kernel("on", kernels.cpu_ops_for("on", "cpu", torch.float32), 600)
    assert kernels.cpu_ops_for("off", "cpu", torch.float32) is None
    assert kernels.cpu_ops_for("auto", "cpu", torch.float16) is None
    assert kernels.cpu_ops_for("auto", "cpu", torch.float32) is not None
    with pytest.raises(ValueError, match="float32 only"):
        kernels.cpu_ops_for("on", "cpu", torch.float16)
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        EngineConfig.from_kwargs(cpu_kernels="fast")


def test_the_isa_is_the_best_the_cpu_has_unless_capped(monkeypatch):
    this_cpu = kernels._cpu_flags
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: frozenset({"sse2", "avx2", "fma"}))
    monkeypatch.delenv(kernels.ISA_ENV, raising=False)
    assert kernels.available_isas() == ["avx2", "generic"]
    assert kernels.cpu_isa() == "avx2"
    monkeypatch.setenv(kernels.ISA_ENV, "generic")
    assert kernels.cpu_isa() == "generic"
    monkeypatch.setenv(kernels.ISA_ENV, "avx512")
    with pytest.raises(ValueError, match=r"ORCA_SERVE_CPU_ISA=avx512 but this CPU lacks avx512f \(its ISAs: avx2, generic\)"):
        kernels.cpu_isa()
    assert kernels.load("avx512") is None
    assert kernels.load_error() == "load's isa=avx512 but this CPU lacks avx512f (its ISAs: avx2, generic)"
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert kernels.cpu_isa() == "avx512"
    monkeypatch.setenv(kernels.ISA_ENV, "avx-512")
    with pytest.raises(ValueError, match=r"ORCA_SERVE_CPU_ISA must be one of avx512, avx2, generic; got 'avx-512'"):
        kernels.cpu_isa()
    # A bad setting is the operator's mistake: load() says so, and a runner
    # stops with it whatever its mode (under "auto" it used to take the slow
    # PyTorch path with a warning); without it, this CPU's best build again.
    assert kernels.load() is None and "must be one of" in kernels.load_error()
    for mode in ("auto", "on"):
        with pytest.raises(ValueError, match="ORCA_SERVE_CPU_ISA must be one of"):
            kernels.cpu_ops_for(mode, "cpu", torch.float32)
    assert kernels.cpu_ops_for("off", "cpu", torch.float32) is None
    monkeypatch.setenv(kernels.ISA_ENV, " AVX512 ")  # as an operator might write it
    assert kernels.cpu_isa() == "avx512"
    monkeypatch.setattr(kernels, "_cpu_flags", this_cpu)
    monkeypatch.delenv(kernels.ISA_ENV)
    module = kernels.load()
    assert module is not None and kernels.load_error() is None and module.isa == kernels.available_isas()[0]


@pytest.mark.parametrize("out_features,in_features",
                         [(5, 3), (37, 24), (20, 24), (50, 600), (96, 13), (48, 600), (960, 576), (576, 1536),
                          (20, 1601)])
def test_panel_linear_matches_float64_reference(ops_by_isa, out_features, in_features):
    """Ragged last panel, K not a multiple of the vector width, and, from 128
    rows on (the K-blocked loop), K in slices of up to 768: one (576), two
    (1,536) and three with a shorter last one (1,601: 534, 534, 533); row
    counts around the 6-row (AVX2) and 12-row (AVX-512) tiles, the 128-row
    switch and the 192-row blocks; strided x rows, with and without bias.
    AVX-512 tiles take two panels: with an even number of panels the ragged
    last one is a tile's second (20, 50), with an odd number a one-panel
    tile of its own (5, 37)."""
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g)
    panels = ops_by_isa.pack_panels(w)
    assert panels.shape == (-(-out_features // 16), in_features, 16)
    for rows in (0, 1, 5, 6, 7, 11, 12, 13, 25, 127, 128, 200, 389):
        wide = torch.randn(rows, in_features + 3, generator=g)
        x = wide[:, 1:in_features + 1]  # rows 3 floats apart: a strided view
        for b in (bias, None):
            out = torch.full((rows, out_features), float("nan"))
            ops_by_isa.panel_linear(out, x, panels, b)
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)


def test_panel_linear_is_the_same_whatever_thread_runs_what(ops_by_isa):
    """The threads take units of work as they come free (OpenMP's dynamic
    schedule), and each calling thread packs x into a buffer of its own:
    every output element must come out bit for bit the same on one thread
    or two, and while another thread runs a matmul of a different shape at
    the same time."""
    import threading

    g = torch.Generator().manual_seed(3)
    cases = []
    for rows, n, k in ((7, 200, 96), (200, 960, 576), (389, 576, 600), (130, 3072, 64)):
        w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
        cases.append((x, ops_by_isa.pack_panels(w), torch.randn(n, generator=g)))

    def run(case):
        x, panels, bias = case
        out = torch.empty(x.shape[0], bias.numel())
        ops_by_isa.panel_linear(out, x, panels, bias)
        return out

    with torch_threads(1):
        expected = [run(c) for c in cases]
    with torch_threads(2):
        for _ in range(3):
            for case, want in zip(cases, expected):
                assert torch.equal(run(case), want)
    got, errors = {}, []

    def caller(i):
        try:
            for _ in range(5):
                for j in (i, 3 - i):
                    got.setdefault(j, []).append(run(cases[j]))
        except Exception as exc:  # surfaced below; a thread's exception would be lost
            errors.append(exc)

    callers = [threading.Thread(target=caller, args=(i,)) for i in (0, 1)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert not errors
    for j, outs in got.items():
        assert len(outs) == 5 and all(torch.equal(o, expected[j]) for o in outs)


def test_a_weight_of_no_rows_gives_an_output_of_no_columns(ops_by_isa):
    """A [0, K] weight has no panels; the matmul has nothing to write (it
    divided by its zero-length run of panels before, killing the process)."""
    panels = ops_by_isa.pack_panels(torch.randn(0, 24))
    assert panels.shape == (0, 24, 16)
    for rows in (3, 200):
        out = torch.empty(rows, 0)
        ops_by_isa.panel_linear(out, torch.randn(rows, 24), panels, None)
        ops_by_isa.panel_linear_silu_mul(out, torch.randn(rows, 24), panels, None)


def test_panel_linear_rejects_bad_inputs(ops):
    w = torch.randn(40, 24)
    panels = ops.pack_panels(w)
    x, out = torch.randn(3, 24), torch.empty(3, 40)
    with pytest.raises(RuntimeError, match="x has 20 features but the weight takes 24"):
        ops.panel_linear(out, torch.randn(3, 20), panels, None)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.panel_linear(torch.empty(3, 60), x, panels, None)
    with pytest.raises(RuntimeError, match="out must be"):
        ops.panel_linear(torch.empty(4, 40), x, panels, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.panel_linear(out, x, panels, torch.randn(41))
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        ops.panel_linear(out, x.double(), panels, None)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        ops.panel_linear(out, x.t().contiguous().t(), panels, None)
    with pytest.raises(RuntimeError, match="panels must be a contiguous"):
        ops.panel_linear(out, x, w, None)
    shifted = torch.empty(panels.numel() + 1)[1:].view(panels.shape)
    shifted.copy_(panels)
    with pytest.raises(RuntimeError, match="32-byte aligned"):
        ops.panel_linear(out, x, shifted, None)


@pytest.mark.parametrize("intermediate", [48, 112, 160, 1040])
def test_panel_linear_silu_mul_is_panel_linear_then_silu_and_mul(ops_by_isa, intermediate):
    """The gated matmul gives, bit for bit, what the plain one followed by
    silu_and_mul gives: each gate/up product is summed the same way, only
    where it lands differs; the plain product matches a float64 reference.
    Rows cover one tile, a partial tile, the streaming loop's largest size
    and the K-blocked loop (with a partial row block); K = 769 takes two K
    slices there, the second a float shorter. The threads' runs of panels
    must hold whole gate/up pairs: 112 features make 14 panels, which would
    otherwise be cut into runs of 5. Prefill-sized runs are capped at 32
    panels (so a unit's output block stays in L2 across the K slices): with
    1,500 rows (8 row blocks) and 1,040 features (130 panels) a run would
    otherwise be 130, 66 or 44 panels on 1, 2 or 3 threads; capped, the runs
    are 32, 32, 32, 32 and a last one of one gate/up pair (an odd cap,
    splitting a pair, fails this). Whether the cap is in place at all is a
    matter of speed, which tests do not time."""
    g = torch.Generator().manual_seed(3)
    w, bias = torch.randn(2 * intermediate, 769, generator=g) * 0.3, torch.randn(2 * intermediate, generator=g)
    plain = ops_by_isa.pack_panels(w)
    gated = ops_by_isa.pack_panels(packed_gemm.interleave_gate_up(w, ops_by_isa.panel_width))
    for n_threads in (1, 2, 3):
        with torch_threads(n_threads):
            for rows in (1, 5, 7, 64, 127, 128, 300, 1500):
                x = torch.randn(rows, 769, generator=g) * 3
                for b in (None, bias):
                    product = torch.empty(rows, 2 * intermediate)
                    ops_by_isa.panel_linear(product, x, plain, b)
                    torch.testing.assert_close(product.double(), F.linear(x.double(), w.double(), None if b is None
                                                                          else b.double()), rtol=1e-5, atol=1e-3)
                    expected = torch.empty(rows, intermediate)
                    ops_by_isa.silu_and_mul(expected, product)
                    got = torch.full((rows, intermediate), float("nan"))
                    gated_bias = None if b is None else packed_gemm.interleave_gate_up(b, ops_by_isa.panel_width)
                    ops_by_isa.panel_linear_silu_mul(got, x, gated, gated_bias)
                    assert torch.equal(got, expected), (n_threads, rows, b is not None)


def test_panel_linear_silu_mul_rejects_bad_inputs(ops):
    panels = ops.pack_panels(torch.randn(64, 24))  # 4 panels: 2 gate/up pairs, 32 output features
    x = torch.randn(3, 24)
    with pytest.raises(RuntimeError, match=r"out must be \[3, 32\]: half the 64 features of the panels"):
        ops.panel_linear_silu_mul(torch.empty(3, 64), x, panels, None)
    with pytest.raises(RuntimeError, match=r"out must be \[3, 32\]"):
        ops.panel_linear_silu_mul(torch.empty(4, 32), x, panels, None)
    with pytest.raises(RuntimeError, match=r"gate/up pairs of panels, an even number; got 3 panels"):
        ops.panel_linear_silu_mul(torch.empty(3, 24), x, ops.pack_panels(torch.randn(48, 24)), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.panel_linear_silu_mul(torch.empty(3, 32), x, panels, torch.randn(32))
    with pytest.raises(RuntimeError, match="x has 20 features but the weight takes 24"):
        ops.panel_linear_silu_mul(torch.empty(3, 32), torch.randn(3, 20), panels, None)
    with pytest.raises(ValueError, match="gate/up of 40 rows cannot be interleaved 16 at a time"):
        packed_gemm.interleave_gate_up(torch.randn(40, 24), 16)


@pytest.mark.parametrize("intermediate,fused", [(48, True), (40, False)])
@pytest.mark.parametrize("with_panels", [True, False])
def test_gate_up_layer_fuses_silu_and_mul_where_the_panels_pair_up(ops, intermediate, fused, with_panels):
    """silu(gate) * up from the layer, fused into its matmul when packed into
    panels with whole gate/up pairs, else the matmul then SiluAndMul; the
    same values either way, with and without a bias, and in every layout."""
    torch.manual_seed(0)
    layers = [GateUpSiluAndMul(24, intermediate, bias=b) for b in (False, True)]
    for layer in layers:
        for param in layer.parameters():
            param.data.normal_()
    x = torch.randn(200, 24)
    inputs = [x, x[:9], x[::2]]  # the K-blocked loop, the streaming one, a strided view
    expected = [[layer(t) for t in inputs] for layer in layers]
    assert expected[0][0].shape == (200, intermediate)
    for layer, want in zip(layers, expected):
        layer.pack_weight(ops if with_panels else None)
        assert layer.fused == (fused and with_panels) and layer.weight is None
        for t, e in zip(inputs, want):
            torch.testing.assert_close(layer(t), e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("out_features,in_features", [(37, 24), (48, 600), (5, 3)])
def test_pack_panels_into_a_given_tensor_is_the_same_packing(ops, out_features, in_features):
    """The runner packs every weight into its slice of one arena; what lands
    there must be the packing itself, the last panel's padding zeroed
    whatever the slice held before."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1))
    expected = ops.pack_panels(w)
    out = torch.full(expected.shape, float("nan"))
    assert ops.pack_panels(w, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)
    assert not out[-1, :, out_features % 16 or 16:].any()


def test_pack_panels_rejects_a_bad_destination(ops):
    w = torch.randn(37, 24)
    with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 CPU tensor of shape \[3, 24, 16\] "
                                           r"for a \[37, 24\] weight, got \[2, 24, 16\]"):
        ops.pack_panels(w, torch.empty(2, 24, 16))
    with pytest.raises(RuntimeError, match="out must be a contiguous float32"):
        ops.pack_panels(w, torch.empty(3, 24, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="out must be a contiguous float32"):
        ops.pack_panels(w, torch.empty(3, 16, 24).transpose(1, 2))
    with pytest.raises(RuntimeError, match="32-byte aligned"):
        ops.pack_panels(w, torch.empty(3 * 24 * 16 + 1)[1:].view(3, 24, 16))


def test_packed_linears_share_one_arena_and_match_their_own_packing(ops):
    """Layers packed into a PanelArena compute bit for bit what layers packed
    each on its own do, and their panels lie in the arena, disjoint, each on
    a 64-byte line; an arena asked for more than it was sized for says so."""
    def layers():
        torch.manual_seed(0)
        made = [MergedColumnParallelLinear(48, [40, 40], bias=True), RowParallelLinear(80, 48),
                ParallelLMHead(300, 48, bias=True)]
        for layer in made:
            for param in layer.parameters():
                param.data.normal_()
        return made

    alone, in_arena = layers(), layers()
    arena = packed_gemm.PanelArena([tuple(layer.weight.shape) for layer in in_arena], ops)
    for a, b in zip(alone, in_arena):
        a.pack_weight(ops)
        b.pack_weight(ops, arena)
    x, h = torch.randn(300, 48), torch.randn(7, 80)
    for a, b, t in zip(alone, in_arena, (x[:9], h, x)):
        assert torch.equal(a(t), b(t))
    base, end = arena.buffer.data_ptr(), arena.buffer.data_ptr() + arena.buffer.numel() * 4
    spans = sorted((layer.packed_weight.panels.data_ptr(),
                    layer.packed_weight.panels.data_ptr() + layer.packed_weight.panels.numel() * 4)
                   for layer in in_arena)
    assert all(base <= lo and hi <= end and lo % 64 == 0 for lo, hi in spans)
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match=r"the panel arena has \d+ floats left, a \[16, 48\] weight needs 768"):
        arena.take(16, 48)


@pytest.mark.parametrize("with_panels", [True, False])
def test_packed_linears_match_dense_and_release_untied_weights(ops, with_panels):
    torch.manual_seed(0)
    col = MergedColumnParallelLinear(48, [40, 40], bias=True)
    row = RowParallelLinear(80, 48, bias=False)
    embed = VocabParallelEmbedding(300, 48)
    tied, untied = ParallelLMHead(300, 48), ParallelLMHead(300, 48, bias=True)
    tied.tie_to(embed)
    for layer in (col, row, embed, untied):
        for param in layer.parameters():
            param.data.normal_()
    x, h = torch.randn(300, 48), torch.randn(300, 80)
    # The third input is a strided view, as a slice of a fused projection is;
    # 300 and 150 rows take the panels' K-blocked loop, 37 and 3 the streaming one.
    inputs = [(col, x), (row, h), (row, h[::2]), (row, h[:37]), (tied, x), (untied, x), (untied, x[:3])]
    expected = [layer(t) for layer, t in inputs]
    for layer in (col, row, tied, untied):
        layer.pack_weight(ops if with_panels else None)
        # One layout per weight: the panels when the module built, else oneDNN's.
        assert (layer.packed_weight.panels is not None) == with_panels
        assert (layer.packed_weight.onednn is None) == with_panels
    got = [layer(t) for layer, t in inputs]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)
    # Dense copies are released, except the tied one the embedding still looks up.
    assert col.weight is None and row.weight is None and untied.weight is None
    assert tied.weight is embed.weight
    assert col(torch.randn(0, 48)).shape == (0, 80)
    assert row.packed_weight.checkpoint_bytes == 48 * 80 * 4


def test_packed_gemm_selection_modes(ops, monkeypatch):
    assert kernels.packed_gemm_for("auto", "cpu", torch.float32)
    assert not kernels.packed_gemm_for("off", "cpu", torch.float32)
    assert not kernels.packed_gemm_for("auto", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="prepacked matmuls: .*float32 only"):
        kernels.packed_gemm_for("on", "cpu", torch.bfloat16)
    # With the built module the weights become its panels, which need no oneDNN.
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(ValueError, match="prepacked matmuls: .*no oneDNN"):
        kernels.packed_gemm_for("on", "cpu", torch.float32)
    assert kernels.packed_gemm_for("on", "cpu", torch.float32, ops)
    assert not kernels.packed_gemm_for("off", "cpu", torch.float32, ops)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_engine_same_tokens_with_and_without_kernel(tiny_model_dir, kind):
    """Staggered arrivals, chunked prefills and a preempting pool; only the arithmetic's order differs."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 384, int(rng.integers(3, 60))).tolist() for _ in range(10)]
    outs = {}
    for mode in ("on", "off"):
        engine = LLMEngine(EngineConfig.from_kwargs(
            model=tiny_model_dir(kind), num_kv_blocks=30, block_size=4, max_num_batched_tokens=40,
            max_num_seqs=8, enable_prefix_caching=False, cpu_kernels=mode))
        runner = engine.executor.runner
        assert runner.uses_attention_kernel == (mode == "on")
        packed = [m for m in runner.model.modules() if getattr(m, "packed_weight", None) is not None]
        assert bool(packed) == (mode == "on")
        if mode == "on":  # a packed weight in place of a released dense one counts once
            assert runner.param_bytes == sum(p.numel() * 4 for p in runner.model.parameters()) + sum(
                m.packed_weight.checkpoint_bytes for m in packed if m.weight is None)
            held_on = runner.param_bytes
        else:
            assert runner.param_bytes == held_on  # the same weights, packed or not
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=6 + 2 * i, temperature=0, ignore_eos=True))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        assert engine.stats().num_preemptions_total > 0
        assert engine.stats().num_kv_blocks_free == 30
        outs[mode] = done
    assert outs["on"] == outs["off"]


class _CountingStack:
    """A DecoderStack whose forward calls are counted."""

    def __init__(self, stack) -> None:
        self.stack, self.calls = stack, 0

    def forward(self, *args):
        self.calls += 1
        return self.stack.forward(*args)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-tied-llama3rope", "llama-bias"])
def test_decoder_stack_gives_the_layers_hidden_states_bit_for_bit(tiny_model_dir, kind, monkeypatch):
    """Every iteration (chunked prompts, decodes, the last layer on the sampled
    rows only) runs through the native stack and again, from the same KV
    pool, layer by layer: the hidden states and the K/V written must be
    equal, not close."""
    from helpers_models import MiniScheduler

    runner = make_runner(tiny_model_dir(kind), model_options={"cpu_kernels": "on"})
    model = runner.model.model
    assert model.native_stack is not None and model.native_stack.num_layers == model.end - model.start
    stack = _CountingStack(model.native_stack)
    model.native_stack = stack
    caches = [model.layers[i].self_attn.attn.kv_cache for i in range(model.start, model.end)]
    forward, compared = model.forward, []

    def both(input_ids, positions, meta, hidden_states=None):
        before = [c.clone() for c in caches]
        native = forward(input_ids, positions, meta, hidden_states)
        written = [c.clone() for c in caches]
        for c, b in zip(caches, before):
            c.copy_(b)
        model.native_stack = None
        try:
            layered = forward(input_ids, positions, meta, hidden_states)
        finally:
            model.native_stack = stack
        assert torch.equal(native, layered)
        assert all(torch.equal(c, w) for c, w in zip(caches, written))
        compared.append((len(input_ids), meta.sample_rows is not None))
        return native

    monkeypatch.setattr(model, "forward", both)
    sched = MiniScheduler(num_blocks=64, budget=13)
    rng = np.random.default_rng(3)
    for i, n in enumerate((5, 23, 40, 9, 2)):
        sched.add(f"r{i}", rng.integers(3, 384, n).tolist(), SamplingParams(temperature=0, max_tokens=6))
    while sched.reqs:
        sched.step(runner)
    assert len(compared) > 10 and any(n > 5 for n, _ in compared) and all(s for _, s in compared)
    assert stack.calls == len(compared)


def test_decoder_stack_is_bound_only_where_every_piece_is_native(tiny_model_dir):
    assert make_runner(tiny_model_dir("llama"), model_options={"cpu_kernels": "on"}).model.model.native_stack is not None
    assert make_runner(tiny_model_dir("llama"), model_options={"cpu_kernels": "off"}).model.model.native_stack is None
    runner = make_runner(tiny_model_dir("llama"), model_options={"cpu_kernels": "on"})
    model, ops = runner.model.model, runner.model.model.layers[0].input_layernorm.cpu_ops
    # One piece on its PyTorch path (say, a norm the kernels did not take): the layers run one by one.
    model.layers[1].post_attention_layernorm.cpu_ops = None
    assert not model.bind_native_stack(ops) and model.native_stack is None
    model.layers[1].post_attention_layernorm.cpu_ops = ops
    model.layers[0].mlp.gate_up_proj.fused = False
    assert not model.bind_native_stack(ops)
    model.layers[0].mlp.gate_up_proj.fused = True
    assert model.bind_native_stack(ops) and model.native_stack is not None


def test_decoder_stack_refuses_bad_layers_and_inputs(ops):
    with pytest.raises(RuntimeError, match="num_heads must be a positive multiple of num_kv_heads; got 6 and 4"):
        ops.DecoderStack(6, 4, 16, 1e-5, 0.25)
    with pytest.raises(RuntimeError, match="unsupported head_dim 600"):
        ops.DecoderStack(4, 2, 600, 1e-5, 0.25)
    stack = ops.DecoderStack(4, 2, 16, 1e-5, 0.25)
    hidden, inter = 64, 128
    panels = {name: ops.pack_panels(torch.randn(n, k)) for name, (n, k) in
              dict(qkv=(128, hidden), o=(hidden, 64), gate_up=(2 * inter, hidden), down=(hidden, inter)).items()}
    norm, cos_sin = torch.ones(hidden), torch.randn(32, 2, 16)
    args = dict(input_norm=norm, post_norm=norm, qkv_bias=None, o_bias=None, gate_up_bias=None, down_bias=None,
                cos_sin=cos_sin, **panels)
    with pytest.raises(RuntimeError, match=r"qkv panels must hold \[128, 64\]"):
        stack.add_layer(**{**args, "qkv": ops.pack_panels(torch.randn(96, hidden))})
    with pytest.raises(RuntimeError, match=r"down panels must hold \[64, 128\]"):
        stack.add_layer(**{**args, "down": ops.pack_panels(torch.randn(hidden, 64))})
    with pytest.raises(RuntimeError, match="cos_sin must be"):
        stack.add_layer(**{**args, "cos_sin": torch.randn(32, 2, 8)})
    with pytest.raises(RuntimeError, match="o_bias must be a contiguous float32 vector of 64 values"):
        stack.add_layer(**{**args, "o_bias": torch.zeros(128)})
    with pytest.raises(RuntimeError, match="gate_up_bias must be a contiguous float32 vector of 256 values"):
        stack.add_layer(**{**args, "gate_up_bias": torch.zeros(128)})
    with pytest.raises(RuntimeError, match="post_norm must be a contiguous float32 vector of 64 values"):
        stack.add_layer(**{**args, "post_norm": torch.ones(hidden, dtype=torch.float64)})
    assert stack.num_layers == 0
    stack.add_layer(**args)
    stack.add_layer(**args)
    assert stack.num_layers == 2
    x, zeros = torch.randn(3, hidden), torch.zeros(3, dtype=torch.long)
    meta = (torch.tensor([0, 1, 2]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([0, 3]), torch.tensor([3]))
    cache = torch.zeros(2, 4, 4, 2, 16)
    with pytest.raises(RuntimeError, match="one KV cache per layer: 2 layers, 1 caches"):
        stack.forward(x, zeros, [cache], *meta, None, None, -1)
    with pytest.raises(RuntimeError, match="a sampled-only layer needs sample_rows"):
        stack.forward(x, zeros, [cache, cache.clone()], *meta, None, None, 1)
    with pytest.raises(RuntimeError, match="sampled_only_layer must be -1 .none. or a layer below 2; got -2"):
        stack.forward(x, zeros, [cache, cache.clone()], *meta, None, None, -2)
    # A bad cache is refused before any layer writes its K/V.
    with pytest.raises(RuntimeError, match=r"layer 1's KV cache must be a contiguous float32 CPU tensor "
                                           r"\[2, blocks, block_size, 2, 16\]"):
        stack.forward(x, zeros, [cache, torch.zeros(2, 4, 4, 2, 8)], *meta, None, None, -1)
    assert not cache.any()
    out, residual = stack.forward(x, zeros, [cache, cache.clone()], *meta, None, None, -1)
    assert out.shape == residual.shape == (3, hidden) and cache.any()
