"""Preemption: which running request gives way when KV blocks or seats run
out, and how it goes back to the waiting queue.

Plain Python, like the rest of the scheduler. The policy names the victim
(``victim_key``; ``may_preempt_for`` when a waiting request may evict running
ones). A victim keeps its arrival time, and so its place among equals in the
queue. In swap mode its blocks are copied to the host when ``SwapSpace`` has
slots for them; otherwise its KV is dropped and recomputed when it resumes.

A request in a batch in flight cannot be preempted. Pipeline parallelism
takes the policy's choice among the others. With async scheduling nearly
every running request is in flight, so the policy's choice stands: one in
flight is held out of the next batch (``held_back``) and preempted at the
schedule after, one iteration later than without async scheduling.
"""
from __future__ import annotations

from typing import Callable

from orca_serve.config import SchedulerConfig
from orca_serve.kv_cache import KVCacheManager
from orca_serve.request import Request, RequestStatus
from orca_serve.scheduler.policies import SchedulingPolicy
from orca_serve.scheduler.swap_space import SwapSpace
from orca_serve.scheduler.waiting_queue import WaitingQueue
from orca_serve.scheduler.worker_view import WorkerView


class Preemption:
    def __init__(self, config: SchedulerConfig, policy: SchedulingPolicy, kv: KVCacheManager,
                 swap: SwapSpace | None, worker_view: WorkerView, waiting: WaitingQueue,
                 clock: Callable[[], float]) -> None:
        """``swap``: the host slots in swap mode; None recomputes every victim."""
        self.config = config
        self.policy = policy
        self.kv = kv
        self.swap = swap
        self.worker_view = worker_view
        self.waiting = waiting
        self.clock = clock
        # Victims in the batch in flight, left out of the one being built so
        # that the next schedule() can preempt them (else a victim scheduled
        # every iteration would never be free to go). Emptied every schedule().
        self.held_back: set[str] = set()
        self.num_preemptions_total = 0

    def preempt(self, req: Request, running: list[Request]) -> None:
        """Take ``req`` out of ``running`` and put it back in the waiting queue."""
        running.remove(req)
        if not (self.swap is not None and self.swap.swap_out(req.request_id, self.kv.block_ids(req.request_id))):
            req.num_computed_tokens = 0
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.metrics.num_preemptions += 1
        self.num_preemptions_total += 1
        self.worker_view.forget(req.request_id)
        self.waiting.add(req, self.clock())

    def allocate_or_preempt(self, req: Request, n: int, running: list[Request],
                            scheduled: dict[str, int]) -> list[int] | None:
        """Blocks for ``n`` more tokens of ``req``, preempting victims not in
        ``scheduled`` until they fit; None when they do not (``req`` may be
        the victim itself)."""
        while True:
            blocks = self.kv.allocate_slots(req, n)
            if blocks is not None:
                return blocks
            victim = self.victim([r for r in running if r.request_id not in scheduled])
            if victim is None:
                return None  # wait for a batch to return
            self.preempt(victim, running)
            if victim is req:
                return None

    def victim(self, candidates: list[Request]) -> Request | None:
        """The request to preempt now among ``candidates``, or None.

        (A request that must wait for blocks itself needs no holding back:
        not scheduled now, it is not in flight next time.)
        """
        if not self.config.async_scheduling:
            candidates = [r for r in candidates if not self.worker_view.in_flight(r.request_id)]
        if not candidates:
            return None
        victim = max(candidates, key=self.policy.victim_key)
        if self.worker_view.in_flight(victim.request_id):
            self.held_back.add(victim.request_id)
            return None
        return victim

    def for_urgent_waiting(self, running: list[Request], head_admissible: Callable[[], bool]) -> None:
        """Let the waiting queue's head evict running requests its policy ranks
        below it (priority preemption), when seats or blocks are what stops it
        and ``head_admissible()`` says nothing else does."""
        if not self.waiting:
            return
        head = self.waiting.head
        while True:
            eligible = [r for r in running if self.policy.may_preempt_for(head, r)]
            if not eligible or not head_admissible():
                return
            no_seat = len(running) >= self.config.max_num_seqs
            first_chunk = min(head.num_tokens, self.config.max_num_batched_tokens)
            if self.kv.allocation == "reserve":
                first_chunk = max(first_chunk, head.max_total_tokens)
            # Running requests may each take a block this step as they grow.
            need = self.kv.blocks_needed(first_chunk) + len(running)
            if not no_seat and need <= self.kv.num_free_blocks:
                return
            victim = self.victim(eligible)
            if victim is None:
                return
            self.preempt(victim, running)
