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

The waiting queue's head evicts running requests (priority preemption) only
when that lets it join the batch being built: victims evicted for a head
that still waits would lose their work for nothing.
"""
from __future__ import annotations

from typing import Callable

from orca_serve.config import SchedulerConfig
from orca_serve.kv_cache import KVBlock, KVCacheManager
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
        # Victims left out of the batch being built so that the next schedule()
        # can preempt them: one in the batch in flight (else a victim scheduled
        # every iteration would never be free to go), and the urgent head's
        # others with it. Emptied every schedule().
        self.held_back: set[str] = set()
        self.num_preemptions_total = 0
        # ((head, its blocks, candidates), free blocks) when evicting every
        # candidate would not have made room for the head (for_urgent_waiting).
        self._no_room_for: tuple | None = None

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

    def for_urgent_waiting(self, running: list[Request], head_blocks: Callable[[], tuple[int, list[KVBlock]]],
                           head_joins: Callable[[list[Request]], bool]) -> None:
        """Let the waiting queue's head evict running requests its policy ranks
        below it (priority preemption), when seats or blocks are what stops it:
        the fewest, in the order ``victim`` takes them, that free a seat and
        the blocks it takes (``head_blocks()``: how many, and its prefix-cache
        hits, which a victim may hold: freed, the head takes them straight
        back, so they make no room). None when all of them would not, or when
        ``head_joins(staying)`` says that with only ``staying`` running it
        would still not join the batch being built: they would lose their work
        and the head still wait. A batch's seats under pipeline parallelism
        and its tokens are no reason to evict: a later batch has them again,
        with no work lost, as the requests that take them now move on (are in
        flight then, or done with a chunked prefill)."""
        if not self.waiting:
            return
        head = self.waiting.head
        candidates = [r for r in running if self.policy.may_preempt_for(head, r)]
        if not self.config.async_scheduling:  # as in victim(): one in flight cannot go
            candidates = [r for r in candidates if not self.worker_view.in_flight(r.request_id)]
        if not candidates:
            return
        need, hits = head_blocks()

        def room(staying: int, num_freed: int) -> bool:
            # A seat, and the head's blocks; running requests may each take a block this step as they grow.
            return staying < self.config.max_num_seqs and need + staying <= self.kv.num_free_blocks + num_freed

        if room(len(running), 0):
            return  # room already: no victim needed
        # When even all candidates made too little room, it stays so while the
        # head, its need and the candidates stay and no block is freed: the
        # waiting queue admits nobody past its head, so the running set can
        # only shrink, and as running requests grow, free blocks shrink by as
        # many as the candidates' grow, or more. Skip the walk over every
        # candidate's blocks (milliseconds, every iteration) until then.
        situation = (head.request_id, need, tuple(r.request_id for r in candidates))
        if (self._no_room_for is not None and self._no_room_for[0] == situation
                and self.kv.num_free_blocks <= self._no_room_for[1]):
            return
        candidates.sort(key=self.policy.victim_key, reverse=True)
        for k, num_freed in enumerate(self.kv.num_freed_by(candidates, keep=hits), start=1):
            if room(len(running) - k, num_freed):
                break
        else:
            self._no_room_for = (situation, self.kv.num_free_blocks)
            return  # even all of them would not make room
        victims = candidates[:k]
        gone = {v.request_id for v in victims}
        if not head_joins([r for r in running if r.request_id not in gone]):
            return
        if any(self.worker_view.in_flight(v.request_id) for v in victims):
            # Async scheduling: the head cannot join before they all can go;
            # out of this batch, they can at the next schedule().
            self.held_back.update(v.request_id for v in victims)
            return
        for victim in victims:
            self.preempt(victim, running)
