"""The Triton paged decode kernel against a float64 reference, and how the
runner picks it. Without a GPU (CI) the kernel runs through Triton's
interpreter (conftest sets TRITON_INTERPRET); on a GPU (scripts/gpu_check.sh)
it is compiled, and bfloat16 runs too (the interpreter cannot multiply it)."""
import pytest
import torch

from orca_serve.kernels import gpu_decode_kernel
from orca_serve.kernels.triton_decode import (_SM_COUNT, MAX_SPLITS, MIN_SPLIT_POSITIONS, TILE, num_splits_for,
                                              paged_decode_attention, reference_decode_attention, self_check)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if DEVICE.type == "cuda" else [])]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_case(num_kv_heads, group, head_dim, block_size, lens, dtype, blocks=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(blocks, block_size, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
                        for _ in range(2))
    q = torch.randn(len(lens), num_kv_heads, group, head_dim, generator=gen).to(DEVICE, dtype)
    width = -(-max(lens) // block_size) + 3  # wider than any request needs, as a padded table is
    # Each request's blocks distinct and scattered over the pool, as the KV manager hands them out.
    table = torch.stack([torch.randperm(blocks, generator=gen)[:width] for _ in lens]).to(DEVICE)
    return q, k_cache, v_cache, table, torch.tensor(lens, device=DEVICE)


@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,group,head_dim,block_size", [
    (2, 2, 64, 4),    # the tiny test models' GQA, block size 4 (a tile spans 8 blocks)
    (4, 1, 32, 16),   # MHA (GPT-2, GPT-3): one query head per KV head
    (1, 3, 80, 32),   # a group and a head size that are not powers of two
    (3, 4, 64, 64),   # a block wider than a tile
])
def test_kernel_matches_the_reference(dtype, num_kv_heads, group, head_dim, block_size, num_splits):
    """Split or not: with 16 splits of the table's width most parts of the
    short contexts are empty, which the merge must weigh as nothing."""
    # Lengths: one token, inside one tile, exactly one and two tiles, ragged past several.
    lens = [1, 7, TILE, 2 * TILE, 3 * TILE + 5, 100]
    q, k_cache, v_cache, table, seq_lens = make_case(num_kv_heads, group, head_dim, block_size, lens, dtype)
    scale = head_dim ** -0.5
    got = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, scale, num_splits=num_splits)
    want = reference_decode_attention(q, k_cache, v_cache, table, seq_lens, scale)
    assert got.shape == q.shape and got.dtype == dtype
    err = (got.double() - want).abs().max().item()
    assert err <= TOLERANCE[dtype], err


def test_contexts_are_split_only_when_requests_alone_cannot_fill_the_gpu():
    gpu = torch.device("cuda", 0)
    _SM_COUNT[gpu] = 132  # an H100/H200: 264 programs make two waves
    try:
        assert num_splits_for(128 * 16, 2048, gpu) == 1  # the 128-request trace, 16 KV heads
        assert num_splits_for(16, 2048, gpu) == MAX_SPLITS  # one user of GPT-3 1.3B
        assert num_splits_for(16, 300, gpu) == 3  # ... whose table holds 300 positions: parts of >= 128
        assert num_splits_for(100, 4096, gpu) == 3
    finally:
        del _SM_COUNT[gpu]
    assert num_splits_for(1, 4096, torch.device("cpu")) == 1
    assert MIN_SPLIT_POSITIONS == 128


def test_kernel_reads_only_each_requests_context():
    """Keys past a request's length, and blocks of its table past them, must
    not count: poison them and the result must not change."""
    q, k_cache, v_cache, _, _ = make_case(2, 2, 64, 4, [5, 9], torch.float32)
    # Contexts of 5 and 9 tokens in blocks of 4: request 0 holds blocks 3, 17
    # (one token in 17), request 1 blocks 8, 30, 2 (one token in 2); the last
    # column of each table is padding.
    table = torch.tensor([[3, 17, 25, 0], [8, 30, 2, 11]], device=DEVICE)
    seq_lens = torch.tensor([5, 9], device=DEVICE)
    before = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125)
    split = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, num_splits=4)
    for block in set(range(k_cache.shape[0])) - {3, 17, 8, 30, 2}:
        k_cache[block] = float("nan")
        v_cache[block] = float("nan")
    for block in (17, 2):
        k_cache[block, 1:] = float("nan")
        v_cache[block, 1:] = float("nan")
    after = paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125)
    assert torch.equal(before, after)
    assert torch.equal(split, paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, num_splits=4))


def test_kernel_fills_out_and_takes_an_empty_batch():
    q, k_cache, v_cache, table, seq_lens = make_case(2, 2, 64, 4, [3, 40], torch.float32)
    out = torch.full_like(q, float("nan"))
    assert paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125, out=out) is out
    assert torch.equal(out, paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 0.125))
    empty = paged_decode_attention(q[:0], k_cache, v_cache, table[:0], seq_lens[:0], 0.125)
    assert empty.shape == (0, 2, 2, 64)


def test_self_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    self_check(DEVICE, torch.float32, num_kv_heads=2, group=2, head_dim=64, block_size=4)
    from orca_serve.kernels import triton_decode

    wrong = lambda q, *args, **kw: torch.zeros_like(q)  # noqa: E731
    monkeypatch.setattr(triton_decode, "paged_decode_attention", wrong)
    with pytest.raises(RuntimeError, match="paged decode kernel differs from the reference"):
        self_check(DEVICE, torch.float32, num_kv_heads=2, group=2, head_dim=64, block_size=4)


def test_the_runner_takes_the_kernel_only_on_a_gpu():
    args = (DEVICE, torch.bfloat16 if DEVICE.type == "cuda" else torch.float32, 2, 2, 64, 16)
    assert gpu_decode_kernel("off", *args) is None
    if DEVICE.type == "cuda":
        assert gpu_decode_kernel("auto", *args) is paged_decode_attention
        assert gpu_decode_kernel("on", *args) is paged_decode_attention
    else:
        assert gpu_decode_kernel("auto", *args) is None
        with pytest.raises(ValueError, match="triton_decode='on' but .* the model is on cpu, not a CUDA GPU"):
            gpu_decode_kernel("on", *args)
