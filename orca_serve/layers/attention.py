"""Paged attention over a block-structured KV cache, in plain PyTorch.

Each attention layer owns a view of the KV pool shaped
``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (bound by the model
runner). A token's cache slot is ``block_id * block_size + offset``.

One forward does two things:

1. Write the K/V of this iteration's tokens into the cache at ``slot_mapping``.
2. Attend. On CPU in float32 the whole batch goes to one native kernel
   (``orca_serve/kernels``) that reads each request's K/V in place in the pool,
   with no copy and no Python loop. Otherwise (the PyTorch path) the runner
   orders the batch decodes first, sorted by context length and split into
   a few groups of similar length: per group, one
   gather of their blocks (index_select over whole blocks) and one masked
   SDPA, so padding to the longest context stays small. Query heads sharing a KV head
   are folded into the query-length axis, so GQA needs no K/V repetition and
   a decode needs no causal mask beyond its context length. Prefill chunks
   (query length > 1) attend causally to their own context one by one; their
   gather indices and masks are built once per iteration, not per layer.
   On a GPU, where each kernel launch costs more than padded arithmetic, the
   runner asks for the batched layout instead: decodes in one group unless
   padding would more than double what they gather, and every prefill chunk
   padded into one ``PrefillBatch``, so a layer's attention is usually two
   SDPA calls however many requests the batch holds (prefill chunks of very
   unequal sizes keep a call each: padded, they would cost far more).
   Where the runner bound a paged decode kernel (a GPU with Triton, see
   ``kernels/triton_decode.py``), the decodes skip the gather: one kernel
   call reads each one's K/V in place through its block table
   (``PagedDecodes``).

The model's last layer calls it with ``sampled_only``: every row's K/V is
written, but only the rows that sample come back (the native kernel attends
just those, as decode rows at the end of their context), so its o_proj and
MLP skip a prompt's other rows, whose final hidden states nobody reads.

Everything position-dependent lives in ``AttentionMetadata``, which the
runner builds once per iteration and passes down explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    """One request's query tokens ``[start, end)`` of the flattened batch."""

    start: int
    end: int
    # Cache slots of all its tokens so far (context + this chunk), in position
    # order, and the causal mask [query_len, context_len + query_len]; both
    # None when there is no earlier context, so the fresh K/V are used directly.
    kv_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class DecodeGroup:
    """Decode requests ``[start, end)`` of the batch with similar context lengths.

    Their blocks are gathered together (``block_ids``: each request's table,
    padded to ``num_blocks``, flattened) and attended in one SDPA. Grouping by
    length keeps the padding, which is gathered memory, small.
    """

    start: int
    end: int
    num_blocks: int
    block_ids: torch.Tensor  # [(end - start) * num_blocks]
    mask: torch.Tensor | None  # [end - start, 1, 1, num_blocks * block_size] bool; None: no padding


@dataclass
class PagedDecodes:
    """The batch's decode rows [0, n), attended by the paged decode kernel in
    place in the pool: each request's block table [n, max_blocks] and context
    length after this step [n]."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor


@dataclass
class PrefillBatch:
    """Every prefill chunk of the batch, padded to P chunks x ``max_query`` query
    rows x ``max_context`` keys for one SDPA (the batched layout).

    Chunk p's query rows are taken from q by ``query_index`` [P * max_query]
    and its keys (context and chunk) from the cache by ``kv_slots``
    [P * max_context]; padding points at a real row or cache slot. ``mask`` [P, 1,
    max_query, max_context] lets query i of a chunk starting at position s see
    keys 0..s+i; a padding row sees key 0 only, so no row is fully masked (that
    would be NaN). ``valid`` [prefill rows] picks the real rows back out of the
    padded output, in batch order, starting at batch row ``start``. When every
    chunk starts a prompt (no context before it), ``kv_slots`` and ``mask`` are
    None: the keys are the chunks' own new rows, taken by ``query_index``, and
    SDPA's causal mask is the mask.
    """

    start: int
    num_chunks: int
    max_query: int
    max_context: int
    query_index: torch.Tensor
    kv_slots: torch.Tensor | None
    mask: torch.Tensor | None
    valid: torch.Tensor


@dataclass
class AttentionMetadata:
    """Per-iteration inputs of every attention layer (same for all layers)."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decode_tokens: int = 0  # the first tokens of the batch, one per decode request
    # Native kernel inputs (then decode_groups and prefills are empty), int64:
    # every request's block table [R, max_blocks], its query rows
    # [query_start_loc[r], query_start_loc[r + 1]) and its context length
    # after this iteration [R].
    block_table: torch.Tensor | None = None
    query_start_loc: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    paged_decodes: PagedDecodes | None = None  # instead of decode_groups, with a paged decode kernel
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_batch: PrefillBatch | None = None  # the batched layout's prefills (then ``prefills`` is empty)
    # The rows whose final hidden state is used: the last row of each request
    # that samples, in sampling order. A layer called with ``sampled_only``
    # (the model's last) still writes every row's K/V but returns only these
    # rows, so the rest of it runs on them alone. None: not built (no stage
    # after this one needs fewer rows). For the native kernel also the query
    # offsets [R + 1] that select just these rows (0 or 1 per request).
    sample_rows: torch.Tensor | None = None
    sample_query_start_loc: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head attention with GQA over the paged KV cache.

    Takes the already-projected (and rotated) q [T, H*D], k and v [T, Hkv*D].
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.kv_cache: torch.Tensor | None = None
        # The native paged attention kernel, bound by the runner with the cache when it can be used.
        self.attention_kernel = None
        self.cpu_ops = None  # native kernels (the K/V write), bound by the model runner when they apply
        # The paged decode kernel (kernels/triton_decode.py), bound by the runner on a GPU.
        self.decode_kernel = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, sampled_only: bool = False) -> torch.Tensor:
        """Write k/v of every row to the cache; attend. ``sampled_only``: return
        only the rows ``meta.sample_rows`` (the native kernel attends just those)."""
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound; see ModelRunner")
        n_tok, hkv, d = q.shape[0], self.num_kv_heads, self.head_dim
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        if self.cpu_ops is not None:
            self.cpu_ops.write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        else:
            k_cache.view(-1, hkv * d).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(-1, hkv * d).index_copy_(0, meta.slot_mapping, v)
        k, v = k.view(n_tok, hkv, d), v.view(n_tok, hkv, d)

        if sampled_only and meta.sample_rows is None:
            raise RuntimeError("sampled_only attention needs meta.sample_rows; see prepare_inputs")
        query_start = meta.query_start_loc
        if sampled_only and meta.block_table is not None:
            # Each request that samples keeps one query row, the last of its
            # context: the kernel takes it as a decode row.
            q, n_tok = q.index_select(0, meta.sample_rows), len(meta.sample_rows)
            query_start = meta.sample_query_start_loc
        out = torch.empty(n_tok, hkv, self.group, d, dtype=q.dtype, device=q.device)
        q = q.view(n_tok, hkv, self.group, d)
        if meta.block_table is not None:
            self.attention_kernel(out, q, k_cache, v_cache, meta.block_table, query_start, meta.seq_lens, self.scale)
            return out.view(n_tok, self.num_heads * d)
        if meta.paged_decodes is not None:
            n_dec, pd = meta.num_decode_tokens, meta.paged_decodes
            self.decode_kernel(q[:n_dec], k_cache, v_cache, pd.block_table, pd.seq_lens, self.scale, out=out[:n_dec])
        for group in meta.decode_groups:
            out[group.start:group.end] = self._decode(q[group.start:group.end], k_cache, v_cache, group)
        for chunk in meta.prefills:
            s, e = chunk.start, chunk.end
            if chunk.kv_slots is None:
                out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], None)
            else:
                # index_select copies whole rows; advanced indexing is far slower on CPU.
                ks = k_cache.view(-1, hkv, d).index_select(0, chunk.kv_slots)
                vs = v_cache.view(-1, hkv, d).index_select(0, chunk.kv_slots)
                out[s:e] = self._prefill(q[s:e], ks, vs, chunk.mask)
        out = out.view(n_tok, self.num_heads * d)
        if meta.prefill_batch is not None:
            out[meta.prefill_batch.start:] = self._prefill_batch(q, k, v, k_cache, v_cache, meta.prefill_batch)
        # The PyTorch path attends every row and keeps the sampled ones: the
        # saving that matters, the projections and MLP after it, still holds.
        return out.index_select(0, meta.sample_rows) if sampled_only else out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                group: DecodeGroup) -> torch.Tensor:
        # q [n, Hkv, G, d]; gathered K/V [n, Hkv, L, d] with L = num_blocks * block_size.
        n, length = group.end - group.start, group.num_blocks * k_cache.shape[1]
        rows = k_cache.shape[0]
        ks = k_cache.view(rows, -1).index_select(0, group.block_ids)
        vs = v_cache.view(rows, -1).index_select(0, group.block_ids)
        ks = ks.view(n, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        vs = vs.view(n, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return F.scaled_dot_product_attention(q, ks, vs, attn_mask=group.mask, scale=self.scale)

    def _prefill_batch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, batch: PrefillBatch) -> torch.Tensor:
        # q [T, Hkv, G, d] -> [P, H, Q, d]; the keys [P, Hkv, L, d], repeated per query head:
        # fresh prompts' from this step's k/v [T, Hkv, d], others' from the cache.
        p, n_q, n_k, d = batch.num_chunks, batch.max_query, batch.max_context, self.head_dim
        qp = q.reshape(-1, self.num_heads * d).index_select(0, batch.query_index)
        qp = qp.view(p, n_q, self.num_heads, d).transpose(1, 2)
        fresh = batch.kv_slots is None
        rows = batch.query_index if fresh else batch.kv_slots
        kv = [self._per_query_head(c.reshape(-1, self.num_kv_heads, d).index_select(0, rows)
                                   .view(p, n_k, self.num_kv_heads, d).transpose(1, 2), 1)
              for c in ((k, v) if fresh else (k_cache, v_cache))]
        o = F.scaled_dot_product_attention(qp, kv[0], kv[1], attn_mask=batch.mask, is_causal=batch.mask is None,
                                           scale=self.scale)
        return o.transpose(1, 2).reshape(p * n_q, self.num_heads * d).index_select(0, batch.valid)

    def _per_query_head(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        # K or V with each KV head (along ``axis``) repeated for its query heads:
        # SDPA's enable_gqa sends CPU to the slow math kernel, while the repeat
        # costs O(L * d) only.
        return t if self.group == 1 else t.repeat_interleave(self.group, axis)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        # q [Q, Hkv, G, d] -> [H, Q, d]; k, v [L, Hkv, d] -> [Hkv, L, d].
        n_q = q.shape[0]
        qh = q.reshape(n_q, self.num_heads, self.head_dim).transpose(0, 1)
        k, v = self._per_query_head(k.transpose(0, 1), 0), self._per_query_head(v.transpose(0, 1), 0)
        # 4-D inputs: with 3-D ones SDPA on CPU takes the slow math kernel, not flash.
        o = F.scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=mask,
                                           is_causal=mask is None, scale=self.scale)[0]
        return o.transpose(0, 1).reshape(n_q, self.num_kv_heads, self.group, self.head_dim)
