"""Admission: whether a new request may wait at all, and which waiting
requests join the batch being built, each with its first chunk.

Plain Python, like the rest of the scheduler. A request is refused on arrival
when the waiting queue is at its bound, when the policy refuses it (the SLO
policy's reject mode: its TTFT target out of reach) or when the KV pool could
never hold it (``check_arrival``).

Once the running requests have their tokens (``schedule()``), waiting
requests join in the policy's order while tokens, seats and KV blocks last.
Head of line: when the queue's head cannot join, nobody behind it does, so
the policy's order holds. A request starts after its prefix-cache hits; one
that was swapped out goes on from its computed tokens, its blocks swapped
back in.

Priority preemption asks the same of the head before the running requests
get their tokens (``head_blocks``, and ``Scheduler._head_joins``, which adds
the running requests' seats and tokens): victims are evicted only for a
head that then joins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from orca_serve.config import SchedulerConfig
from orca_serve.kv_cache import KVBlock, KVCacheManager
from orca_serve.request import Request, RequestStatus
from orca_serve.scheduler.errors import QueueFullError, SLORejectedError
from orca_serve.scheduler.policies import SchedulingPolicy
from orca_serve.scheduler.swap_space import SwapSpace
from orca_serve.scheduler.waiting_queue import WaitingQueue


@dataclass(eq=False)
class Admission:
    """Holds the scheduler's own queue, pool, host slots and policy; the
    running requests and the batch being built come with each call."""

    config: SchedulerConfig
    policy: SchedulingPolicy
    kv: KVCacheManager
    swap: SwapSpace
    waiting: WaitingQueue
    clock: Callable[[], float]
    max_model_len: int

    def check_arrival(self, req: Request) -> None:
        """Refuse a new ``req`` that may not wait: QueueFullError when the
        waiting queue is at its bound, SLORejectedError when the policy
        refuses it (the SLO policy's reject mode), ValueError when the KV pool
        could never hold it."""
        limit = self.config.max_waiting_requests
        if limit is not None and len(self.waiting) >= limit:
            raise QueueFullError(f"waiting queue is full ({limit} requests); retry later")
        if self.policy.rejects:
            now = self.clock()
            error = self.policy.admission_error(req, lambda r: self.waiting.work_ahead(r, now), now,
                                                self.config.max_num_batched_tokens)
            if error is not None:
                raise SLORejectedError(error)
        need = self.kv.blocks_needed(min(req.max_total_tokens, self.max_model_len))
        if need > self.kv.num_blocks:
            raise ValueError(
                f"prompt ({req.num_prompt_tokens} tokens) + max_tokens ({req.sampling_params.max_tokens}) "
                f"needs {need} KV blocks but the pool has only {self.kv.num_blocks}")

    def head_admissible(self, running: list[Request]) -> bool:
        """Whether the waiting queue's head may join the batch now, seats,
        tokens and blocks aside: the policy lets it, and if it is swapped out,
        the batch copying it out is back (its slots may not hold its K/V yet).
        Priority preemption asks too: a victim evicted for a head that cannot
        join would lose its work for nothing."""
        head = self.waiting.head
        return (self.policy.may_admit(head, self.waiting, running, self.clock())
                and not (self.swap.holds(head.request_id) and self.swap.in_transit(head.request_id)))

    def has_seat(self, num_running: int, num_in_batch: int, seats: int) -> bool:
        """Whether one more request may join the batch being built: below
        max_num_seqs running, and below the batch's ``seats`` (Scheduler._batch_seats)."""
        return num_running < self.config.max_num_seqs and num_in_batch < seats

    def first_chunk(self, req: Request, budget: int) -> tuple[int, list[KVBlock]]:
        """Waiting ``req``'s first chunk within ``budget``, and the prefix-cache
        hits it starts after (none when swapped out: it goes on from its
        computed tokens, its blocks swapped back in)."""
        if self.swap.holds(req.request_id):
            return min(req.num_tokens - req.num_computed_tokens, budget), []
        computed = self.kv.get_computed_blocks(req)
        return min(req.num_tokens - len(computed) * self.kv.block_size, budget), computed

    def head_blocks(self) -> tuple[int, list[KVBlock]]:
        """Free blocks the waiting queue's head takes to join with a whole
        token budget, as ``admit`` allocates them, and its prefix-cache
        hits (blocks a victim frees that the head takes straight back)."""
        head = self.waiting.head
        n, hits = self.first_chunk(head, self.config.max_num_batched_tokens)
        return self.kv.num_blocks_to_take(head, n, hits), hits

    def admit(self, running: list[Request], budget: int, scheduled: dict[str, int],
              new_blocks: dict[str, list[int]], seats: int) -> None:
        """Move waiting requests into ``running`` and the batch being built
        (``scheduled``, ``new_blocks``) while ``budget`` tokens, seats and
        blocks last."""
        while self.waiting and budget > 0 and self.has_seat(len(running), len(scheduled), seats):
            req = self.waiting.head
            if not self.head_admissible(running):
                break
            swapped = self.swap.holds(req.request_id)
            n, computed = self.first_chunk(req, budget)
            num_cached = len(computed) * self.kv.block_size
            if not swapped:
                req.num_computed_tokens = 0
            blocks = self.kv.allocate_slots(req, n, computed)
            if blocks is None:
                break  # head-of-line: keep the policy's order
            self.waiting.pop_head()
            req.status = RequestStatus.RUNNING
            if swapped:
                self.swap.swap_in(req.request_id, blocks)
            else:
                req.num_computed_tokens = num_cached
            if req.metrics.first_scheduled_time is None:  # first admission: report prefix hits
                req.num_cached_tokens = num_cached
                req.metrics.num_cached_tokens = num_cached
                req.metrics.first_scheduled_time = self.clock()
            running.append(req)
            scheduled[req.request_id] = n
            new_blocks[req.request_id] = blocks
            budget -= n
