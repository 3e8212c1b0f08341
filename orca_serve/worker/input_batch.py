"""Per-request worker state and the per-iteration model inputs built from it.

The runner keeps each request's tokens, block table and progress, updated
from the scheduler's diffs. ``prepare_inputs`` turns one iteration's
scheduled requests into flat tensors (token ids, positions, cache slots) and
the ``AttentionMetadata`` every layer reuses. Decodes (query length 1) go
first so attention can treat them as one contiguous batch.

Index arithmetic is done once here in numpy, never per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orca_serve.layers.attention import AttentionMetadata, DecodeGroup, PagedDecodes, PrefillBatch, PrefillChunk
from orca_serve.layers.device import to_device
from orca_serve.layers.sampler import RowTensors
from orca_serve.sampling_params import SamplingParams


@dataclass
class RequestState:
    req_id: str
    token_ids: list[int]  # prompt + every generated token the scheduler has sent
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    # Async scheduling: the last of token_ids stands for a token the previous
    # batch sampled, still on the device (its value here is a placeholder).
    pending: bool = False
    # Its row's tensors in the sampler (layers/sampler.py RowTensors), shared
    # with the requests that have the same lists; made when it first samples.
    sampling_rows: RowTensors | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] row of the last token of each sampling request
    logits_rows: np.ndarray  # the same rows, on the host
    sampling_states: list[RequestState]  # the S requests that sample, in logits order


def prepare_inputs(scheduled: list[tuple[RequestState, int]], block_size: int,
                   device: torch.device, native_attention: bool = False,
                   sampled_rows_only: bool = False, batched_attention: bool = False,
                   paged_decodes: bool = False) -> ModelInputs:
    """Build one iteration's inputs from (request, number of tokens to compute) pairs.

    ``native_attention``: describe the batch for the native kernel (block
    table, query offsets, context lengths of every request) instead of as
    decode length groups and prefill chunks for the PyTorch path.
    ``sampled_rows_only``: fill ``sample_rows`` (and, for the native kernel,
    their query offsets) so the model's last layer runs on the sampled rows
    alone and returns just those, in ``sampling_states`` order.
    ``batched_attention``: the PyTorch path's layout for a GPU, decodes in as
    few groups as padding each to at most twice its context allows (usually
    one) and all prefill chunks in one padded ``PrefillBatch`` (one SDPA per
    chunk instead where padding would more than double the work).
    ``paged_decodes``: the PyTorch path's decodes go to a paged decode kernel
    (their block tables and context lengths, ``PagedDecodes``), not in
    gathered length groups."""
    # Decodes first; for the PyTorch path longest context first, so length groups
    # are contiguous (the native kernel takes any order).
    decodes = [(r, n) for r, n in scheduled if n == 1]
    if not native_attention:
        decodes.sort(key=lambda x: -x[0].num_computed_tokens)
    order = decodes + [(r, n) for r, n in scheduled if n > 1]
    counts = np.fromiter((n for _, n in order), dtype=np.int64, count=len(order))
    starts = np.fromiter((r.num_computed_tokens for r, _ in order), dtype=np.int64, count=len(order))
    ends = starts + counts
    offsets = np.concatenate(([0], np.cumsum(counts)))
    num_tokens = int(offsets[-1])

    input_ids = np.empty(num_tokens, dtype=np.int64)
    positions = np.empty(num_tokens, dtype=np.int64)
    n_dec = len(decodes)
    input_ids[:n_dec] = [r.token_ids[r.num_computed_tokens] for r, _ in decodes]
    positions[:n_dec] = starts[:n_dec]
    for i in range(n_dec, len(order)):
        r, (s, e), (o, p) = order[i][0], (starts[i], ends[i]), (offsets[i], offsets[i + 1])
        input_ids[o:p] = r.token_ids[s:e]
        positions[o:p] = np.arange(s, e)

    block_table = request_block_table([r for r, _ in order], ends, block_size)
    slots = cache_slots(block_table, np.repeat(np.arange(len(order)), counts), positions, block_size)

    to_dev = lambda a: to_device(a, device)  # noqa: E731
    meta = AttentionMetadata(slot_mapping=to_dev(slots), num_decode_tokens=n_dec)
    if native_attention:
        meta.block_table = to_dev(block_table)
        meta.query_start_loc = to_dev(offsets)
        meta.seq_lens = to_dev(ends)
    else:
        if paged_decodes:
            if n_dec:
                meta.paged_decodes = PagedDecodes(block_table=to_dev(block_table[:n_dec]),
                                                  seq_lens=to_dev(ends[:n_dec]))
        else:
            # The batched layout lets decodes pad up to twice their context (one
            # group for most batches) but not beyond: one long context among many
            # short ones would otherwise make every decode gather as much as it.
            for g_start, g_end in _length_groups(ends[:n_dec], slack=2.0 if batched_attention else 1.25):
                ctx = ends[g_start:g_end]
                n_blocks = int(-(-ctx[0] // block_size))  # the group's longest context comes first
                ids = np.ascontiguousarray(block_table[g_start:g_end, :n_blocks]).reshape(-1)
                mask = None
                if ctx[-1] != n_blocks * block_size:
                    mask = to_dev((np.arange(n_blocks * block_size)[None, :] < ctx[:, None])[:, None, None, :])
                meta.decode_groups.append(DecodeGroup(start=g_start, end=g_end, num_blocks=n_blocks,
                                                      block_ids=to_dev(ids), mask=mask))
        if batched_attention and n_dec < len(order) and _pads_little(counts[n_dec:], ends[n_dec:]):
            meta.prefill_batch = _prefill_batch(block_table[n_dec:], starts[n_dec:], ends[n_dec:],
                                                int(offsets[n_dec]), block_size, to_dev)
        else:
            for i in range(n_dec, len(order)):
                meta.prefills.append(_prefill_chunk(block_table[i], int(starts[i]), int(ends[i]),
                                                    int(offsets[i]), block_size, to_dev))

    sampling = [i for i, (r, _) in enumerate(order) if ends[i] == len(r.token_ids)]
    logits_rows = offsets[1:][sampling] - 1
    logits_indices = to_dev(logits_rows)
    if sampled_rows_only:
        meta.sample_rows = logits_indices
        if native_attention:
            samples = np.zeros(len(order), dtype=np.int64)
            samples[sampling] = 1
            meta.sample_query_start_loc = to_dev(np.concatenate(([0], np.cumsum(samples))))
    return ModelInputs(
        input_ids=to_dev(input_ids), positions=to_dev(positions), attn_metadata=meta,
        logits_indices=logits_indices, logits_rows=logits_rows, sampling_states=[order[i][0] for i in sampling])


def _length_groups(ctx: np.ndarray, max_groups: int = 8, slack: float = 1.25) -> list[tuple[int, int]]:
    """Split decodes (context lengths in descending order) into contiguous groups
    whose padded size (count x longest) stays within ``slack`` of their real size."""
    groups, start, total = [], 0, 0
    for i, c in enumerate(ctx):
        if i > start and (i - start + 1) * ctx[start] > slack * (total + c) and len(groups) < max_groups - 1:
            groups.append((start, i))
            start, total = i, 0
        total += int(c)
    if len(ctx):
        groups.append((start, len(ctx)))
    return groups


def request_block_table(requests: list[RequestState], ends: np.ndarray, block_size: int,
                        width: int | None = None, pad: int = 0) -> np.ndarray:
    """[requests, width] ids of the blocks holding each request's first
    ``ends[i]`` tokens, the rest ``pad`` (width: the most blocks any needs)."""
    needed = -(-ends // block_size)
    table = np.full((len(requests), int(needed.max()) if width is None else width), pad, dtype=np.int64)
    for i, r in enumerate(requests):
        k = int(needed[i])
        if len(r.block_ids) < k:
            raise RuntimeError(f"request {r.req_id}: {len(r.block_ids)} KV blocks cannot hold "
                               f"{int(ends[i])} tokens at block size {block_size}")
        table[i, :k] = r.block_ids[:k]
    return table


def cache_slots(table: np.ndarray, rows: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slot of each token: position ``positions[t]`` of request ``rows[t]`` of ``table``."""
    return table[rows, positions // block_size] * block_size + positions % block_size


def _prefill_chunk(row: np.ndarray, start: int, end: int, offset: int, block_size: int, to_dev) -> PrefillChunk:
    chunk = PrefillChunk(start=offset, end=offset + end - start)
    if start == 0:
        return chunk  # no earlier context: plain causal attention on the fresh K/V
    pos = np.arange(end)
    chunk.kv_slots = to_dev(row[pos // block_size] * block_size + pos % block_size)
    # Query i sits at absolute position start + i and sees every key up to it.
    chunk.mask = to_dev(pos[None, :] <= np.arange(start, end)[:, None])
    return chunk


def _pads_little(lens: np.ndarray, ends: np.ndarray, slack: float = 2.0) -> bool:
    """Whether padding every prefill chunk to the longest at most doubles both
    the query rows and the keys gathered. One long prompt beside a few short
    ones would not: padded, the short ones would attend (and gather) as much as
    the long one, which with long contexts is gigabytes per layer."""
    return all(len(a) * int(a.max()) <= slack * int(a.sum()) for a in (lens, ends))


def _prefill_batch(table: np.ndarray, starts: np.ndarray, ends: np.ndarray, first_row: int, block_size: int,
                   to_dev) -> PrefillBatch:
    """The prefill chunks [starts, ends) of rows ``table``, padded for one SDPA (see PrefillBatch)."""
    lens = ends - starts
    n_q, n_k = int(lens.max()), int(ends.max())
    qi, ki = np.arange(n_q), np.arange(n_k)
    row_starts = first_row + np.concatenate(([0], np.cumsum(lens)[:-1]))
    real_q = qi[None, :] < lens[:, None]  # [P, Q]
    query_index = np.where(real_q, row_starts[:, None] + qi[None, :], first_row)
    valid = to_dev(np.flatnonzero(real_q.reshape(-1)))
    if not starts.any():
        # Fresh prompts: each chunk's keys are its own rows, in query order, and
        # query i sees keys 0..i, SDPA's own causal mask (no mask tensor: on a
        # GPU that is flash attention's kernel). A padding query sees padding
        # keys, real rows' copies, and its output is dropped.
        return PrefillBatch(start=first_row, num_chunks=len(lens), max_query=n_q, max_context=n_q,
                            query_index=to_dev(query_index.reshape(-1)), kv_slots=None, mask=None, valid=valid)
    # Keys past a chunk's end read the table's zero padding, block 0: real
    # memory, and masked out.
    kv_slots = table[:, ki // block_size] * block_size + ki % block_size  # [P, L]
    # Query i of chunk p sits at position starts[p] + i and sees the keys up to
    # it; a padding row is put at position 0, so it sees key 0 alone. The
    # [P, Q, L] mask itself is built where it is used: on a GPU it would cost
    # milliseconds of numpy and a large copy per iteration.
    position = to_dev(np.where(real_q, starts[:, None] + qi[None, :], 0))
    mask = torch.arange(n_k, device=position.device) <= position[:, :, None]
    return PrefillBatch(start=first_row, num_chunks=len(lens), max_query=n_q, max_context=n_k,
                        query_index=to_dev(query_index.reshape(-1)), kv_slots=to_dev(kv_slots.reshape(-1)),
                        mask=mask[:, None], valid=valid)
