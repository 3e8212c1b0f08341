"""The model runner: SchedulerOutput -> tensors -> model -> sampler -> ModelRunnerOutput.

It owns the model and the rank's KV memory (``kv_pool``: the device pool
every attention layer views, sized by ``kv_sizing``, and the host pool for
swap-mode preemption). It mirrors each request's tokens and block
table from the scheduler's messages: full data once, then diffs. It never
appends the tokens it samples itself; they come back as ``new_token_ids`` of
the next ``CachedRequestData``, so the scheduler stays the one source of truth.

Under tensor/pipeline parallelism every rank runs one runner on the same
messages (each builds the same inputs; each holds only its layers' and heads'
KV). A later stage receives the previous stage's hidden states instead of
embedding tokens; only the last stage's TP rank 0 samples and returns an
output, the other ranks return None.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from orca_serve.batch import ModelRunnerOutput, SchedulerOutput
from orca_serve.config import EngineConfig
from orca_serve.distributed.parallel_state import (get_tp_rank, is_first_stage, is_last_stage, min_over_ranks,
                                                   pp_recv_prev, pp_send_next)
from orca_serve.kernels import gpu_decode_kernel
from orca_serve.layers.attention import Attention
from orca_serve.layers.sampler import Sampler, SamplingMetadata, SamplingTensors
from orca_serve.models.loader import load_model, max_model_len, model_eos_token_ids
from orca_serve.models.weights import LoadStats
from orca_serve.worker import kv_sizing
from orca_serve.worker.async_tokens import NOTHING_LOST, PendingTokens
from orca_serve.worker.decode_graphs import DecodeGraphs
from orca_serve.worker.input_batch import RequestState, prepare_inputs
from orca_serve.worker.kernel_binding import bind_cpu_kernels
from orca_serve.worker.kv_pool import KVPool
from orca_serve.worker.runner_result import Ready, RunnerResult, SampledBatch

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, engine_config: EngineConfig, num_kv_blocks: int | None = None,
                 num_cpu_blocks: int | None = None, device: torch.device | str = "cpu") -> None:
        """``num_kv_blocks`` and ``num_cpu_blocks`` override the pool sizes the
        cache config gives (``kv_sizing``: fixed, or on a GPU sized by a
        profile run; the swap pool from ``swap_space_gb``)."""
        if num_kv_blocks is not None and num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")
        if num_cpu_blocks is not None and num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0, got {num_cpu_blocks}")
        self.config = engine_config
        self.device = torch.device(device)
        self.block_size = engine_config.cache.block_size
        self.load_stats = LoadStats()
        self.model, self.hf_config = load_model(engine_config.model, self.device, self.load_stats)
        self.vocab_size = self.hf_config.vocab_size
        self.hidden_size = self.hf_config.hidden_size
        self.dtype = next(self.model.parameters()).dtype
        self.first_stage, self.last_stage = is_first_stage(), is_last_stage()
        self.samples = self.last_stage and get_tp_rank() == 0
        self.last_recv_wait_s = 0.0  # time the last batch waited for the previous stage

        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_pool = KVPool(layers, self.block_size, self.dtype, self.device)
        self.uses_attention_kernel = bind_cpu_kernels(self.model, layers, engine_config.model.cpu_kernels,
                                                      self.device, self.dtype)
        # The PyTorch attention path's layout: on a GPU a few padded SDPA calls
        # per layer (launches are what cost there), on a CPU length groups and
        # one call per prefill chunk (padding is what costs there).
        self.batched_attention = self.device.type == "cuda"
        a = layers[0]
        self.bind_decode_kernel(gpu_decode_kernel(engine_config.model.triton_decode, self.device, self.dtype,
                                                  a.num_kv_heads, a.group, a.head_dim, self.block_size))
        self.decode_graphs = None
        if engine_config.model.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on a CUDA GPU; it is on {self.device}")
        self.sampler = Sampler(seed=engine_config.model.seed, device=self.device)
        # For min_tokens: EOS must not be sampled before a request's minimum length.
        self.eos_token_ids = model_eos_token_ids(engine_config.model, self.hf_config)
        # Each distinct stop-id list and bias map as tensors, made once while a
        # request that uses it is here (each RequestState holds its row's).
        self.sampling_tensors = SamplingTensors(self.device, self.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        # Async scheduling's hand-off of sampled ids to the next batch; None without it.
        self.async_tokens = PendingTokens() if engine_config.scheduler.async_scheduling else None

        cache, pool = engine_config.cache, self.kv_pool
        memory = kv_sizing.device_memory(self.device)
        if num_kv_blocks is None:
            num_kv_blocks = kv_sizing.fixed_kv_blocks(cache, pool.block_bytes, memory is not None)
        if num_kv_blocks is None:
            num_kv_blocks = self._kv_blocks_from_memory(memory)
        if num_cpu_blocks is None:
            num_cpu_blocks = kv_sizing.swap_blocks(cache, pool.block_bytes)
        # Every rank takes the smallest size any rank found: a budget buys fewer
        # blocks on a stage with more layers, and free memory differs by GPU.
        num_kv_blocks, num_cpu_blocks = min_over_ranks([num_kv_blocks, num_cpu_blocks], self.device)
        pool.allocate(num_kv_blocks)
        pool.allocate_host(num_cpu_blocks)
        logger.info("KV pool: %d blocks of %d tokens, %.1f MiB on this rank; %d swap blocks on the host",
                    pool.num_blocks, self.block_size, pool.nbytes / 2**20, pool.num_host_blocks)
        if engine_config.model.cuda_graphs:
            self.use_decode_graphs(capture=True)

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_pool.num_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.kv_pool.num_host_blocks

    def _kv_blocks_from_memory(self, memory) -> int:
        """Run the largest batches once in a small pool, then size the pool from
        what they left of the device (``kv_sizing``)."""
        batches, blocks = kv_sizing.profile_batches(self.config.scheduler,
                                                    max_model_len(self.config.model, self.hf_config),
                                                    self.block_size, self.vocab_size)
        memory.reset_peak()
        try:
            self.kv_pool.allocate(blocks)
            for so in batches:
                self.execute_model(so)
                self.requests.clear()
        except torch.OutOfMemoryError as exc:
            raise ValueError(f"the device ran out of memory in the KV profile run, before the pool was sized: "
                             f"the largest iteration the scheduler may form does not fit ({exc}); lower "
                             f"--max-num-batched-tokens, --max-num-seqs or --max-model-len, or split the model "
                             f"with --tensor-parallel-size / --pipeline-parallel-size") from exc
        if self.async_tokens is not None:
            self.async_tokens.forget()  # the profile's rows are no request's
        snap = memory.snapshot()
        profile_pool_bytes = self.kv_pool.nbytes
        self.kv_pool.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        blocks, how = kv_sizing.blocks_from_profile(snap, self.config.cache.gpu_memory_utilization,
                                                    self.kv_pool.block_bytes, profile_pool_bytes)
        logger.info("KV pool from device memory: %s", how)
        return blocks

    def bind_decode_kernel(self, kernel) -> None:
        """Attend the PyTorch path's decodes with ``kernel`` (the signature of
        ``triton_decode.paged_decode_attention``) in place in the pool, or
        gather them for SDPA when None. Tests bind the Triton kernel on the CPU,
        run by Triton's interpreter."""
        self.paged_decodes = kernel is not None
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.decode_kernel = kernel

    def use_decode_graphs(self, capture: bool) -> None:
        """Serve decode-only iterations through ``DecodeGraphs``: captured on a
        GPU; ``capture=False`` runs the same static path eagerly (tests on CPU)."""
        if self.uses_attention_kernel:
            raise ValueError("decode graphs take the PyTorch attention path; the native CPU kernel is on")
        self.decode_graphs = DecodeGraphs(self.model, self.num_kv_blocks, self.block_size,
                                          self.config.scheduler.max_num_seqs,
                                          max_model_len(self.config.model, self.hf_config), self.device, capture,
                                          paged=self.paged_decodes)

    @property
    def param_bytes(self) -> int:
        """Bytes of the checkpoint's weights this rank holds, each once (tied
        ones once; a prepacked weight in place of its dense one). A tied LM
        head's prepacked copy sits beside the embedding and is not counted."""
        packed = [m.packed_weight for m in self.model.modules()
                  if getattr(m, "packed_weight", None) is not None and m.weight is None]
        return (sum(p.numel() * p.element_size() for p in self.model.parameters())
                + sum(w.checkpoint_bytes for w in packed))

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run one iteration; returns the tokens sampled by requests that caught
        up (None on a rank that does not sample)."""
        return self.execute_model_async(so).result()

    @torch.inference_mode()
    def execute_model_async(self, so: SchedulerOutput) -> RunnerResult:
        """Launch one iteration without waiting for the device; ``.result()``
        waits and returns what ``execute_model`` does. A request scheduled one
        token past those it was sent (async scheduling) takes that token from
        the previous batch's sampled ids, on the device."""
        lost = self.async_tokens.lost(so.iteration) if self.async_tokens is not None else NOTHING_LOST
        self._update_states(so, lost)
        if so.blocks_to_swap_out:
            self.kv_pool.swap_out(so.blocks_to_swap_out)
        if so.blocks_to_swap_in:
            self.kv_pool.swap_in(so.blocks_to_swap_in)
        empty = Ready(ModelRunnerOutput(sampled_token_ids={}) if self.samples else None)
        unknown = so.num_scheduled_tokens.keys() - self.requests.keys() - lost
        if unknown:
            raise RuntimeError(f"scheduled request(s) the worker was never sent: {sorted(unknown)}")
        scheduled = [(self.requests[rid], n) for rid, n in so.num_scheduled_tokens.items()
                     if n > 0 and rid not in lost]
        if not scheduled:
            return empty
        pending = self.async_tokens is not None and self.async_tokens.add_placeholders(scheduled)
        if self.decode_graphs is not None:
            graphed = self._decode_from_graph(scheduled, pending)
            if graphed is not None:
                return self._sample(*graphed)
        # On the last stage the model returns only the rows it samples (see LlamaModel).
        inputs = prepare_inputs(scheduled, self.block_size, self.device, native_attention=self.uses_attention_kernel,
                                sampled_rows_only=self.last_stage, batched_attention=self.batched_attention,
                                paged_decodes=self.paged_decodes)
        if pending:
            self.async_tokens.fill(inputs.input_ids, inputs.logits_rows, inputs.sampling_states)
        prev = None
        if not self.first_stage:
            t0 = time.perf_counter()
            prev = pp_recv_prev((len(inputs.input_ids), self.hidden_size), self.dtype, self.device)
            self.last_recv_wait_s = time.perf_counter() - t0
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn_metadata, prev)
        if not self.last_stage:
            pp_send_next(hidden)
            return Ready(None)
        states = inputs.sampling_states
        if not states:
            if self.async_tokens is not None:
                self.async_tokens.forget()
            return empty
        # Every TP rank of the last stage takes part in gathering the logits; one samples.
        logits = self.model.compute_logits(hidden)
        if not self.samples:
            return Ready(None)
        return self._sample(logits, states)

    def batch_failed(self, so: SchedulerOutput) -> None:
        """``so`` failed to launch: forget the requests it finished; under async
        scheduling the next batch skips its requests (``PendingTokens.batch_failed``)."""
        for rid in so.finished_req_ids:  # in case it failed before they were dropped
            self._forget(rid)
        if self.async_tokens is not None:
            self.async_tokens.batch_failed(so)

    def _decode_from_graph(self, scheduled: list[tuple[RequestState, int]], pending: bool):
        """(logits, requests) of a decode-only iteration the graphs serve, else None.
        A decode here is one token at the end of its request's tokens, so it samples."""
        if any(n != 1 or r.num_computed_tokens + 1 != len(r.token_ids) for r, n in scheduled):
            return None
        states = [r for r, _ in scheduled]
        positions = np.fromiter((r.num_computed_tokens for r in states), dtype=np.int64, count=len(states))
        bucket = self.decode_graphs.bucket(positions + 1)
        if bucket is None:
            return None
        tokens = np.fromiter((r.token_ids[-1] for r in states), dtype=np.int64, count=len(states))
        fill = None
        if pending:
            def fill(ids: torch.Tensor) -> None:  # the static buffer's row i is states[i]
                self.async_tokens.fill(ids, np.arange(len(states)), states)
        logits = self.decode_graphs.logits(tokens, positions, states, bucket, fill=fill)
        return None if logits is None else (logits, states)

    def _sample(self, logits: torch.Tensor, states: list[RequestState]) -> SampledBatch:
        for s in states:
            if s.sampling_rows is None:
                s.sampling_rows = self.sampling_tensors.row(s.sampling_params)
        md = SamplingMetadata.build([s.sampling_params for s in states],
                                    [s.num_output_tokens for s in states], self.vocab_size, self.device,
                                    eos_token_ids=self.eos_token_ids, rows=[s.sampling_rows for s in states])
        tokens, logprobs = self.sampler.sample(logits, md)
        req_ids = [s.req_id for s in states]
        if self.async_tokens is not None:
            self.async_tokens.sampled(tokens, req_ids)
        return SampledBatch(tokens, logprobs, md, req_ids)

    def _forget(self, req_id: str) -> None:
        """Drop a request the scheduler finished or preempted, and its hold on
        its lists' sampler tensors: its state may outlive it (a failed batch's
        traceback keeps it until the collector runs), and once no request here
        uses a list it may change, its tensors to be made anew."""
        state = self.requests.pop(req_id, None)
        if state is not None:
            state.sampling_rows = None

    def _update_states(self, so: SchedulerOutput, lost: frozenset[str]) -> None:
        for rid in so.finished_req_ids:
            self._forget(rid)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = RequestState(
                req_id=new.req_id, token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_prompt_tokens=len(new.prompt_token_ids), block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens, sampling_params=new.sampling_params)
        for cached in so.scheduled_cached_reqs:
            state = self.requests.get(cached.req_id)
            if state is None and cached.req_id in lost:
                continue  # its first batch failed before this worker saw it
            if state is None:
                raise RuntimeError(f"scheduler sent a diff for unknown request {cached.req_id!r}")
            new = cached.new_token_ids
            if state.pending and new:  # the token that was pending, now known
                state.token_ids[-1], new, state.pending = new[0], new[1:], False
            state.token_ids.extend(new)
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
