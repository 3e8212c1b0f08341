"""How many blocks a rank's KV pool gets.

An operator either fixes the pool (``--num-kv-blocks``, or a budget with
``--kv-cache-memory-gb``) or, on a GPU, lets the rank take what is left of
``--gpu-memory-utilization`` of the device once the weights are loaded and
the largest batches the scheduler can form have run once (vLLM's rule: more
blocks are more requests in the batch, so a GPU should give the pool all the
memory nothing else needs). On a CPU the pool's default budget stays fixed:
host memory is shared with everything else on the machine, and what is
"free" there says little about what this process may take.

The profile run goes through ``ModelRunner.execute_model`` with the batches
``profile_batches`` builds, so its peak is the real code path's: the padded
prefill's attention, the sampled rows' logits, the sampler's sort. Under
tensor/pipeline parallelism every rank runs the same batches in lockstep
and the ranks agree on the smallest pool (an all-reduce in the runner).

What the profile does not see comes out of the share left over (1 -
utilization): CUDA graphs captured later (decode-sized, a few MB a bucket),
and decodes that gather their K/V for SDPA (``--triton-decode off``), whose
transient copy grows with the contexts the pool will hold, which a run
before the pool exists cannot have. The Triton kernel, the default on a
GPU, reads K/V in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from orca_serve.batch import NewRequestData, SchedulerOutput
from orca_serve.config import CacheConfig, SchedulerConfig
from orca_serve.sampling_params import SamplingParams

GiB = 2**30


@dataclass(frozen=True)
class MemorySnapshot:
    """A device's memory right after the profile run (bytes)."""

    total: int  # the device's capacity
    free: int  # what the driver reports free (other processes count as used)
    reserved: int  # what torch's caching allocator holds
    peak_allocated: int  # torch's allocated peak since the profile began: weights + activations + profile pool


class CudaMemory:
    """``torch.cuda``'s counters for one GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def snapshot(self) -> MemorySnapshot:
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return MemorySnapshot(total=total, free=free, reserved=torch.cuda.memory_reserved(self.device),
                              peak_allocated=torch.cuda.max_memory_allocated(self.device))


def device_memory(device: torch.device) -> CudaMemory | None:
    """The probe that sizes the pool from the device's memory, or None where
    the pool has a fixed default budget (the CPU)."""
    return CudaMemory(device) if device.type == "cuda" else None


def fixed_kv_blocks(cache: CacheConfig, block_bytes: int, on_gpu: bool) -> int | None:
    """The pool's size when it does not depend on a profile run, else None."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if cache.kv_sized_from_memory(on_gpu):
        return None
    return max(1, int(cache.kv_budget_gb * GiB) // block_bytes)


def swap_blocks(cache: CacheConfig, block_bytes: int) -> int:
    """The host pool's size: ``swap_space_gb`` of blocks under swap-mode preemption, else none."""
    return int(cache.swap_space_gb * GiB) // block_bytes if cache.preemption_mode == "swap" else 0


def blocks_from_profile(snap: MemorySnapshot, utilization: float, block_bytes: int,
                        profile_pool_bytes: int) -> tuple[int, str]:
    """(blocks, a line saying how) for the pool that fills ``utilization`` of the device.

    Whatever was in use at the profile's peak stays in use while serving:
    torch's allocated peak without the profile's own small pool (weights,
    activations, logits), and what torch does not hold (the CUDA context,
    NCCL's buffers, other processes on the same GPU). Raises ValueError,
    naming the figures, when not one block fits.
    """
    outside_torch = max(0, snap.total - snap.free - snap.reserved)
    in_use = snap.peak_allocated - profile_pool_bytes
    budget = utilization * snap.total - in_use - outside_torch
    how = (f"{utilization:g} x {snap.total / GiB:.2f} GiB - {in_use / GiB:.2f} GiB of weights and peak activations "
           f"- {outside_torch / GiB:.2f} GiB outside torch (CUDA context, other processes) = "
           f"{budget / GiB:.2f} GiB for the KV pool")
    # The pool holds one scratch block beside those the scheduler hands out.
    blocks = int(budget // block_bytes) - 1 if budget > 0 else 0
    if blocks < 1:
        raise ValueError(f"no room for the KV cache on the GPU: {how}, less than one block "
                         f"({block_bytes / 2**20:.2f} MiB) and the scratch block; raise "
                         f"--gpu-memory-utilization, lower --max-num-batched-tokens or --max-num-seqs, or split "
                         f"the model with --tensor-parallel-size / --pipeline-parallel-size")
    return blocks, f"{how}: {blocks} blocks"


def profile_batches(scheduler: SchedulerConfig, max_model_len: int, block_size: int,
                    vocab_size: int) -> tuple[list[SchedulerOutput], int]:
    """(the batches whose peak sizes the pool, the most blocks one of them needs).

    Three shapes bound what an iteration holds at once:

    - one fresh prompt as long as an iteration allows: its attention is
      quadratic in it (on the chunk's own K/V);
    - one chunk as long as an iteration allows at the end of the longest
      context (a later chunk of a long prompt, or a prompt after a prefix-cache
      hit): its attention gathers the whole context and masks it. The
      context's whole blocks all name one block, so the gather is the full
      context's while the profile's pool stays small;
    - as many requests as may run, sharing the token budget, every one
      sampled: logits and the sampler's work grow with the rows.

    Every row takes the sampler's widest path (top-k and top-p, a minimum
    length, logprobs) with a seed of its own, so the runner's shared
    generator is not drawn from.
    """
    budget = scheduler.max_num_batched_tokens
    longest = max(1, max_model_len - 1)  # a prompt leaves room for one output token
    num_short = min(scheduler.max_num_seqs, budget)
    short = [min(longest, budget // num_short + (i < budget % num_short)) for i in range(num_short)]
    late = min(budget, longest - 1)  # a chunk with at least one token of context
    shapes = [[(0, min(budget, longest))], *([[(longest - late, late)]] if late > 0 else []),
              [(0, n) for n in short]]  # (context, chunk) per request
    outputs, most = [], 0
    for step, rows in enumerate(shapes):
        new, next_block = [], 0  # each batch runs alone, from the start of the pool
        for i, (context, n) in enumerate(rows):
            shared = context // block_size
            own = list(range(next_block, next_block + -(-(context + n) // block_size) - shared))
            next_block += len(own)
            params = SamplingParams(max_tokens=2, min_tokens=1, temperature=1.0, top_k=vocab_size // 2,
                                    top_p=0.9, logprobs=20, seed=i)
            new.append(NewRequestData(req_id=f"kv-profile-{step}-{i}",
                                      prompt_token_ids=[(7 * (i + j)) % vocab_size for j in range(context + n)],
                                      output_token_ids=[], sampling_params=params,
                                      block_ids=own[:1] * shared + own, num_computed_tokens=context))
        most = max(most, next_block)
        outputs.append(SchedulerOutput(iteration=-1 - step, scheduled_new_reqs=new, scheduled_cached_reqs=[],
                                       num_scheduled_tokens={r.req_id: n for r, (_, n) in zip(new, rows)},
                                       total_num_scheduled_tokens=sum(n for _, n in rows),
                                       finished_req_ids=set()))
    return outputs, most
