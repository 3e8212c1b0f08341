"""CUDA graphs for decode iterations (``--cuda-graphs``).

On a GPU a decode step of a model this size is bound by kernel launches, not
by the kernels: every layer dispatches tens of small ops from Python, each
costing microseconds of host time while the GPU waits. A captured graph
replays the whole step, embedding to logits, as one launch.

A graph has fixed shapes, so one is captured per bucket (B, M): up to B
decode requests whose contexts fit in M KV blocks (M a power of two).
With the paged decode kernel (``paged=True``, a GPU with Triton) the kernel
reads each context in place up to its length, and M only bounds the block
table a step copies in (one table as wide as max_model_len would be
megabytes a step for a long-context model); without it the bucket's decodes
are gathered as one padded decode group (see
``layers.attention.DecodeGroup``). Every graph reads its
inputs from the same static buffers: a step copies its tokens, positions,
cache slots, context lengths and block table in, pads the rest, replays its
bucket's graph and reads the first rows of its logits.

Padding never touches a request's cache: padding rows write their K/V into a
scratch block (the pool's last, one more than the scheduler hands out) and
attend to its first slot alone; block-table columns past a request's blocks
point at the scratch block too and are masked out by the context lengths.

Graphs are captured on a bucket's first use, all in one private memory pool:
they never run at the same time and no graph's output is read after another
replays, which is what sharing a pool needs. Iterations a graph cannot serve
run eagerly: any prefill row, a row that does not sample, a batch or a
context beyond the largest bucket, or (gathering, without the paged kernel)
padding that would gather more than ``GATHER_SLACK`` times the blocks the
batch really reads (a graph saves launches, not the bytes its gather moves,
and one long context would make every row gather as much as it). If a
capture fails, graphs are switched off with a warning and every later step
runs eagerly.

Without capture (``capture=False``, the CPU) the same static path runs
eagerly: that is how tests check its padding against transformers where no
GPU is.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch

from orca_serve.layers.attention import AttentionMetadata, DecodeGroup, PagedDecodes
from orca_serve.layers.device import copy_from_host
from orca_serve.worker.input_batch import RequestState, cache_slots, request_block_table

logger = logging.getLogger(__name__)

# How many times the blocks a batch's contexts really hold its padded bucket
# may gather. Untuned: set from the eager batched layout's 2x, doubled for
# the rounding of both the batch and the context up to their buckets.
GATHER_SLACK = 4.0


def bucket_sizes(limit: int, half_steps_from: int | None = None) -> list[int]:
    """Powers of two below ``limit``, then ``limit`` itself; from
    ``half_steps_from`` on also the sizes halfway between (8, 12, 16, 24, ...),
    so padding a batch up to its bucket costs at most 1.5x."""
    sizes, size = [], 1
    while size < limit:
        sizes.append(size)
        if half_steps_from is not None and size >= half_steps_from and size + size // 2 < limit:
            sizes.append(size + size // 2)
        size *= 2
    return sizes + [limit]


def smallest_fit(sizes: list[int], n: int) -> int | None:
    return next((s for s in sizes if s >= n), None)


class DecodeGraphs:
    """Serves decode-only iterations from captured graphs (see the module doc).

    ``model``: the runner's model; ``kv_blocks``: the blocks the scheduler
    hands out (the pool holds one more, the scratch block); ``max_batch``:
    the most decodes a graph takes (the scheduler's max_num_seqs);
    ``max_context``: the longest context (max_model_len); ``paged``: the
    attention layers have a paged decode kernel bound."""

    def __init__(self, model: torch.nn.Module, kv_blocks: int, block_size: int, max_batch: int,
                 max_context: int, device: torch.device, capture: bool, paged: bool = False) -> None:
        self.model, self.block_size, self.device, self.capture = model, block_size, device, capture
        self.paged = paged
        self.scratch_block = kv_blocks
        self.batch_sizes = bucket_sizes(max_batch, half_steps_from=8)
        max_blocks = -(-max_context // block_size)
        self.block_counts = bucket_sizes(max_blocks)
        max_b, max_m = self.batch_sizes[-1], self.block_counts[-1]
        # Rows: token ids, positions, cache slots, context lengths; each graph reads [:, :B].
        self.rows = torch.zeros(4, max_b, dtype=torch.int64, device=device)
        self.block_table = torch.zeros(max_b, max_m, dtype=torch.int64, device=device)
        self.key_positions = torch.arange(max_m * block_size, device=device)
        self._reset_to_padding()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.disabled_reason: str | None = None
        # What a run did, for logs and benchmarks.
        self.num_steps = 0  # iterations served by the static path
        self.capture_s = 0.0  # time spent capturing graphs

    def bucket(self, context_lens: np.ndarray) -> tuple[int, int] | None:
        """The (batch, blocks) bucket for decodes with these context lengths
        (after this step's token), or None when the batch should run eagerly."""
        if self.disabled_reason is not None or len(context_lens) == 0:
            return None
        blocks = -(-np.asarray(context_lens) // self.block_size)
        b = smallest_fit(self.batch_sizes, len(blocks))
        m = smallest_fit(self.block_counts, int(blocks.max()))
        if b is None or m is None or (not self.paged and b * m > GATHER_SLACK * int(blocks.sum())):
            return None
        return b, m

    def logits(self, token_ids: np.ndarray, positions: np.ndarray, requests: list[RequestState],
               bucket: tuple[int, int], fill: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor | None:
        """Logits [n, vocab] of n decodes of ``requests``: each one's next
        token and its position (= its context length before this step).
        ``fill`` gets the static token ids once this step's are in, to write
        those that are still on the device (async scheduling). None when
        capturing the bucket's graph failed (the step runs eagerly)."""
        b, m = bucket
        n = len(token_ids)
        if self.capture and bucket not in self.graphs:
            self._capture(bucket)
        if self.disabled_reason is not None:
            return None
        rows = np.zeros((4, b), dtype=np.int64)
        rows[2, :] = self.scratch_block * self.block_size
        rows[3, :] = 1
        rows[0, :n], rows[1, :n], rows[3, :n] = token_ids, positions, positions + 1
        table = np.full((b, m), self.scratch_block, dtype=np.int64)
        table[:n] = request_block_table(requests, positions + 1, self.block_size, width=m, pad=self.scratch_block)
        rows[2, :n] = cache_slots(table, np.arange(n), positions, self.block_size)
        copy_from_host(self.rows[:, :b], rows)
        copy_from_host(self.block_table[:b, :m], table)
        if fill is not None:
            fill(self.rows[0])
        self.num_steps += 1
        if self.capture:
            graph, out = self.graphs[bucket]
            graph.replay()
        else:
            out = self._forward(b, m)
        return out[:n]

    def _forward(self, b: int, m: int) -> torch.Tensor:
        # Everything shaped by (b, m) only, reading the static buffers through
        # views, so a replay sees each step's values.
        seq_lens = self.rows[3, :b]
        meta = AttentionMetadata(slot_mapping=self.rows[2, :b], num_decode_tokens=b)
        if self.paged:
            meta.paged_decodes = PagedDecodes(block_table=self.block_table[:b, :m], seq_lens=seq_lens)
        else:
            mask = (self.key_positions[:m * self.block_size][None, :] < seq_lens[:, None])[:, None, None, :]
            meta.decode_groups.append(DecodeGroup(start=0, end=b, num_blocks=m, mask=mask,
                                                  block_ids=self.block_table[:b, :m].reshape(-1)))
        hidden = self.model(self.rows[0, :b], self.rows[1, :b], meta)
        return self.model.compute_logits(hidden)

    def _reset_to_padding(self) -> None:
        # Valid inputs for every row: a capture's warm-up runs must write only
        # the scratch block.
        self.rows.zero_()
        self.rows[2].fill_(self.scratch_block * self.block_size)
        self.rows[3].fill_(1)
        self.block_table.fill_(self.scratch_block)

    def _capture(self, bucket: tuple[int, int]) -> None:
        t0 = time.perf_counter()
        try:
            self._reset_to_padding()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # Warm up on a side stream (as torch.cuda.graph's docs ask), so
            # lazily initialized kernels and workspaces are not captured.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(*bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(*bucket)
            self.graphs[bucket] = (graph, out)
        except Exception as exc:  # noqa: BLE001 - any failure: serve eagerly, say why
            self.disabled_reason = f"capturing bucket {bucket} failed: {type(exc).__name__}: {exc}"
            self.graphs.clear()
            logger.warning("CUDA graphs switched off, decode runs eagerly: %s", self.disabled_reason)
        finally:
            self.capture_s += time.perf_counter() - t0
        if self.disabled_reason is None:
            logger.info("captured decode graph: %d rows x %d blocks in %.0f ms (%d graphs, %.1f s in all)",
                        bucket[0], bucket[1], 1e3 * (time.perf_counter() - t0), len(self.graphs), self.capture_s)
