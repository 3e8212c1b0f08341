"""Paged decode attention for GPUs, in Triton: each decode's K/V read in place
in the pool, with no gather.

The PyTorch path attends a batch's decodes with one SDPA over K/V gathered
out of the pool into a padded tensor: every step each layer reads its KV,
writes a copy and reads the copy again, three times the bytes a decode's
attention needs. At a large batch those bytes are what a GPU decode step
spends its time on (the weights are read once for all rows; every request's
context is read for itself), so here one program per (request, KV head)
walks the request's block table and reads each key and value once.

A program takes all G query heads that share its KV head as the rows of one
tile (GQA without repeating K/V), and ``TILE`` consecutive positions of the
context at a time, whatever the block size (each position's block comes
from the table), with an online softmax over the tiles. Positions at or past
a request's context length are masked, so a padded block table and padding
rows (context length 1, as the decode graphs use) are fine. When requests x
KV heads are too few programs to fill the GPU (a few users with long
contexts), each context is also cut into parts attended in parallel, whose
partial softmax sums a second kernel merges (flash-decoding).

Float32 inputs are multiplied in full float32 (``ieee``), not TF32, so the
engine's float32 greedy parity with transformers holds on a GPU too.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the kernel
on the CPU through Triton's interpreter: that is how CI checks it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 32  # context positions per step of the loop; tl.dot wants every dimension >= 16
# Splitting a context (flash-decoding): each split at least this many positions,
# and no more than this many splits.
MIN_SPLIT_POSITIONS = 4 * TILE
MAX_SPLITS = 16


@triton.jit
def _paged_decode_kernel(out_ptr, part_ptr, stats_ptr, q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, scale,
                         table_stride, split_len,
                         NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         TILE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + req)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)  # this split's positions [lo, hi); empty past the context
    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    # q and out [R, Hkv, G, D], contiguous: this program's G rows.
    rows = (req * NUM_KV_HEADS + kv_head) * GROUP + heads
    row_ok = (heads < GROUP)[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=row_ok, other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    offsets = tl.arange(0, TILE_SIZE)
    for start in range(lo, hi, TILE_SIZE):
        pos = start + offsets
        pos_ok = pos < hi
        block = tl.load(table_ptr + req * table_stride + pos // BLOCK_SIZE, mask=pos_ok, other=0)
        # The pool [blocks, block_size, Hkv, D]: slot block * block_size + offset.
        kv_rows = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * NUM_KV_HEADS + kv_head
        kv_ok = pos_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_rows[:, None] * HEAD_DIM + dims[None, :], mask=kv_ok, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, TILE]
        scores = tl.where(pos_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_rows[:, None] * HEAD_DIM + dims[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        # Unnormalized partials [R, Hkv, S, G, D] and their (max, sum) [R, Hkv, S, G, 2], for _merge_splits.
        part_rows = ((req * NUM_KV_HEADS + kv_head) * NUM_SPLITS + split) * GROUP + heads
        tl.store(part_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok)
        tl.store(stats_ptr + part_rows * 2, m_i, mask=heads < GROUP)
        tl.store(stats_ptr + part_rows * 2 + 1, l_i, mask=heads < GROUP)


@triton.jit
def _merge_splits(out_ptr, part_ptr, stats_ptr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                  GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
                  NUM_SPLITS: tl.constexpr):
    """One (request, KV head): the splits' partial softmax sums rescaled to
    their common max and added, one split at a time (a [G, D] tile live)."""
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    head_ok = heads < GROUP
    row_ok = head_ok[:, None] & (dims < HEAD_DIM)[None, :]
    first_part = (req * NUM_KV_HEADS + kv_head) * NUM_SPLITS * GROUP + heads  # split 0's rows
    # An empty split (past its request's context) has max -inf and sum 0: weight 0.
    m_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    for split in range(NUM_SPLITS):
        m = tl.load(stats_ptr + (first_part + split * GROUP) * 2, mask=head_ok, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # padding rows: no split has data
    denominator = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    for split in range(NUM_SPLITS):
        part_rows = first_part + split * GROUP
        m = tl.load(stats_ptr + part_rows * 2, mask=head_ok, other=float("-inf"))
        w = tl.exp(m - m_max)
        denominator += w * tl.load(stats_ptr + part_rows * 2 + 1, mask=head_ok, other=0.0)
        acc += w[:, None] * tl.load(part_ptr + part_rows[:, None] * HEAD_DIM + dims[None, :], mask=row_ok, other=0.0)
    denominator = tl.where(denominator == 0.0, 1.0, denominator)  # padding rows only (not stored)
    rows = (req * NUM_KV_HEADS + kv_head) * GROUP + heads
    out = acc / denominator[:, None]
    tl.store(out_ptr + rows[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok)


_SM_COUNT: dict = {}


def num_splits_for(num_programs: int, max_context: int, device: torch.device) -> int:
    """How many parts to cut each context into: enough for two programs per
    streaming multiprocessor when requests x KV heads alone fall short (one
    user's decode: a few dozen programs on a GPU with over a hundred SMs,
    each walking the whole context), but each part at least
    MIN_SPLIT_POSITIONS long, and at most MAX_SPLITS. 1 off a GPU."""
    if device.type != "cuda":
        return 1
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    target = 2 * _SM_COUNT[device]
    if num_programs >= target:
        return 1
    return max(1, min(-(-target // num_programs), -(-max_context // MIN_SPLIT_POSITIONS), MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Attention of one query token per request over its paged context.

    q [R, Hkv, G, D] (G query heads per KV head); k_cache, v_cache [blocks,
    block_size, Hkv, D], contiguous; block_table [R, max_blocks] (columns past
    a request's blocks may hold anything); seq_lens [R] (>= 1, at most
    max_blocks x block_size). Returns (or fills ``out``, contiguous)
    [R, Hkv, G, D]. ``num_splits``: cut each context into that many parts
    attended in parallel and merged (default: ``num_splits_for``, from the
    table's width, so no host sync and a CUDA graph keeps its shapes)."""
    n, num_kv_heads, group, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    if n == 0:
        return out
    q = q.contiguous()
    block_size = k_cache.shape[1]
    max_context = block_table.shape[1] * block_size
    if num_splits is None:
        num_splits = num_splits_for(n * num_kv_heads, max_context, q.device)
    split_len = -(-max_context // (num_splits * TILE)) * TILE
    shapes = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
                  HEAD_DIM=head_dim, DIM_PAD=max(16, triton.next_power_of_2(head_dim)))
    part = stats = out  # unused with one split
    if num_splits > 1:
        part = torch.empty(n, num_kv_heads, num_splits, group, head_dim, dtype=torch.float32, device=q.device)
        stats = torch.empty(n, num_kv_heads, num_splits, group, 2, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only applies to float32 inputs
    _paged_decode_kernel[(n, num_kv_heads, num_splits)](
        out, part, stats, q, k_cache, v_cache, block_table, seq_lens, scale, block_table.stride(0), split_len,
        BLOCK_SIZE=block_size, TILE_SIZE=TILE, NUM_SPLITS=num_splits, PRECISION=precision, **shapes)
    if num_splits > 1:
        _merge_splits[(n, num_kv_heads)](out, part, stats, NUM_SPLITS=num_splits, **shapes)
    return out


def reference_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same attention in float64 PyTorch, one request at a time (checks and tests)."""
    n, num_kv_heads, group, head_dim = q.shape
    block_size = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for r in range(n):
        pos = torch.arange(int(seq_lens[r]), device=q.device)
        slots = block_table[r, pos // block_size] * block_size + pos % block_size
        k, v = (c.reshape(-1, num_kv_heads, head_dim)[slots].double() for c in (k_cache, v_cache))
        weights = (torch.einsum("hgd,lhd->hgl", q[r].double(), k) * scale).softmax(-1)
        out[r] = torch.einsum("hgl,lhd->hgd", weights, v)
    return out


def self_check(device: torch.device, dtype: torch.dtype, num_kv_heads: int, group: int, head_dim: int,
               block_size: int) -> None:
    """Compile the kernel for the model's shapes and compare it with the
    reference on a small random case; RuntimeError if it disagrees."""
    gen = torch.Generator().manual_seed(0)
    blocks, lens = 12, torch.tensor([1, 17, 3 * TILE + 5])
    k_cache, v_cache = (torch.randn(blocks, block_size, num_kv_heads, head_dim, generator=gen).to(device, dtype)
                        for _ in range(2))
    q = torch.randn(len(lens), num_kv_heads, group, head_dim, generator=gen).to(device, dtype)
    width = -(-int(lens.max()) // block_size)
    table = torch.randint(0, blocks, (len(lens), width), generator=gen).to(device)
    lens = lens.to(device)
    got = paged_decode_attention(q, k_cache, v_cache, table, lens, head_dim ** -0.5)
    want = reference_decode_attention(q, k_cache, v_cache, table, lens, head_dim ** -0.5)
    err = (got.double() - want).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise RuntimeError(f"paged decode kernel differs from the reference by {err:.3g} (tolerance {tol:g}) "
                           f"for {dtype} on {device}")
