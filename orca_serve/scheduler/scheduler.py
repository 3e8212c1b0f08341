"""Iteration-level scheduler: schedule() picks one iteration's batch, update()
applies its sampled tokens.

There are no prefill/decode phases. Every request has ``num_computed_tokens``
and ``num_tokens``; each iteration spends a token budget
(``max_num_batched_tokens``, ``max_num_seqs``) to close those gaps: running
decodes first, then running chunked prefills, then waiting requests in policy
order (``admission.py``). A prompt longer than the budget left is prefilled in
chunks. When KV blocks or seats run out, running requests are preempted
(``preemption.py``).

With ``async_scheduling`` a request may be scheduled again while the token
its batch in flight samples is *pending* (``worker_view.py``). A request
whose pending token is its last (``max_tokens``, the model's length) is not
scheduled again; one that stops on EOS, a stop token or a stop string
computes one token too many, which is dropped.
"""
from __future__ import annotations

import time
from typing import Callable

from orca_serve.batch import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from orca_serve.config import CacheConfig, SchedulerConfig
from orca_serve.identity_cache import IdentityCache
from orca_serve.kv_cache import KVCacheManager
from orca_serve.request import Request, RequestStatus
from orca_serve.scheduler.admission import Admission
from orca_serve.scheduler.cost_model import IterationCostModel
from orca_serve.scheduler.policies import make_policy
from orca_serve.scheduler.preemption import Preemption
from orca_serve.scheduler.swap_space import SwapSpace
from orca_serve.shown import shown
from orca_serve.scheduler.waiting_queue import WaitingQueue
from orca_serve.scheduler.worker_view import WorkerView


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig, num_kv_blocks: int,
                 max_model_len: int, clock: Callable[[], float] = time.monotonic,
                 num_cpu_blocks: int = 0, max_inflight_batches: int = 1) -> None:
        self.config = config
        self.max_inflight_batches = max_inflight_batches
        self.async_scheduling = config.async_scheduling
        self.max_model_len = max_model_len
        self.clock = clock
        self.cost_model = IterationCostModel()
        self.policy = make_policy(config.scheduling_policy, self.cost_model, config.slo_admission,
                                  config.max_batch_size, config.max_queue_delay_s)
        # Swap-mode preemption: a bounded pool of host block slots (a preemption
        # the slots cannot hold recomputes instead).
        self.swap = SwapSpace(num_cpu_blocks)
        # Requests the scheduler ended itself (SLO rejections); the engine reports them.
        self.rejected: list[Request] = []
        self.kv = KVCacheManager(num_kv_blocks, cache_config.block_size, cache_config.kv_allocation,
                                 cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []
        self._waiting = WaitingQueue(self.policy)
        # A request in flight is never a victim; it is scheduled again only with async scheduling.
        self.worker_view = WorkerView(self.async_scheduling, max_model_len)
        swap = self.swap if cache_config.preemption_mode == "swap" else None
        self.preemption = Preemption(config, self.policy, self.kv, swap, self.worker_view, self._waiting, clock)
        self.admission = Admission(config, self.policy, self.kv, self.swap, self._waiting, clock, max_model_len)
        self.iteration = 0
        # Each request's stop_token_ids as a set, looked up per sampled token:
        # ``in`` on the list scanned it (49,000 ids, 256 running requests: 12M
        # comparisons an iteration). Made once per distinct list, as the
        # sequences of one request share theirs.
        self._stop_token_sets = IdentityCache(frozenset)

    # ---- queue -------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def waiting_requests(self) -> list[Request]:
        return list(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self.running)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {shown(req.request_id)} is already in use")
        if self.worker_view.in_flight(req.request_id):  # its tokens would be taken for the new request's
            raise ValueError(f"request id {shown(req.request_id)} is still in use: a batch with the finished "
                             f"request of that id is in flight; use a new id")
        self.admission.check_arrival(req)
        stop_tokens = self._stop_token_sets.get(req.sampling_params.stop_token_ids)
        req.held.append(stop_tokens)
        req.stop_token_set = stop_tokens.value
        self.requests[req.request_id] = req
        self._waiting.add(req, self.clock())

    def abort_request(self, req_id: str) -> Request | None:
        """Drop a request wherever it is; its blocks are free at once."""
        req = self.requests.get(req_id)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self._waiting.remove(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def fail_batch(self, so: SchedulerOutput, error: str) -> list[Request]:
        """Batch ``so`` came back with ``error``: fail its requests and retire it.

        The blocks it (or a batch in flight behind it) was to fill for them
        leave the prefix cache, and a request that took one of those blocks
        meanwhile (a prefix hit in a batch in flight) fails too: what it read
        there is not its prefix's K/V. Returns the failed requests."""
        ids = set(so.num_scheduled_tokens)  # aborted ones too: their blocks may still be findable
        failed = [self.requests[rid] for rid in so.num_scheduled_tokens if rid in self.requests]  # batch order
        for req in failed:
            req.error = error
        while True:  # a request that read unfilled blocks filled its own with garbage
            unfilled = self.kv.uncache_unfilled(so.iteration, ids)
            # Such a request took its hit for a batch behind this one, still in
            # flight now; a request in flight is never preempted, so it is running.
            hit = [r for r in self.running
                   if r.request_id not in ids and not unfilled.isdisjoint(self.kv.block_ids(r.request_id))]
            if not hit:
                break
            for req in hit:
                req.error = f"its prefix-cache hit was on blocks a failed batch was to fill ({error})"
                ids.add(req.request_id)
            failed += hit
        self.finish_requests(failed, RequestStatus.FINISHED_ERROR)
        for rid in self.swap.batch_failed(so.iteration):  # its K/V may never have reached the host
            req = self.requests[rid]
            self._waiting.remove(req)  # re-queued: a policy's key may count computed tokens (SLO)
            req.num_computed_tokens = 0
            self._waiting.add(req, self.clock())
        self.update(so, ModelRunnerOutput(sampled_token_ids={}))
        return failed

    def finish_requests(self, reqs: list[Request], status: RequestStatus) -> None:
        """Finish requests the engine decided are done (e.g. a stop string)."""
        for req in reqs:
            if not req.finished:
                if req in self.running:
                    self.running.remove(req)
                else:
                    self._waiting.remove(req)
                self._finish(req, status)

    def _drop_expired_waiting(self) -> None:
        """Queued requests the policy says have waited too long leave, rejected."""
        if not self.policy.rejects:
            return
        now = self.clock()
        for req in list(self._waiting):
            error = self.policy.expiry_error(req, now)
            if error is not None:
                self._waiting.remove(req)
                req.error = error
                self._finish(req, RequestStatus.FINISHED_ERROR)
                self.rejected.append(req)

    def observe_iteration(self, num_tokens: int, seconds: float) -> None:
        """The engine reports each iteration's measured time (feeds the cost model)."""
        self.cost_model.observe(num_tokens, seconds)

    @property
    def num_swaps_total(self) -> int:
        return self.swap.num_swaps_total

    @property
    def num_preemptions_total(self) -> int:
        return self.preemption.num_preemptions_total

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.swap.release(req.request_id)
        self.worker_view.finished(req.request_id)
        req.status = status
        req.held.clear()  # what it shared with requests using its lists (Request.held)
        req.metrics.finished_time = self.clock()
        self.kv.forget(req)
        self.requests.pop(req.request_id, None)
        self.policy.on_finished(req)

    # ---- schedule ----------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.iteration += 1
        self.kv.current_batch = self.iteration
        self.preemption.held_back = set()
        self._drop_expired_waiting()
        self._waiting.rekey_if_moved(self.clock())
        scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        seats = self._batch_seats()

        self.preemption.for_urgent_waiting(self.running, self.admission.head_blocks,
                                           lambda staying: self._head_joins(staying, seats))
        # Sized for the requests that run this iteration, after any were preempted.
        budget = self._token_budget(self.running)
        # Running requests: decodes first (they must never starve), then chunked
        # prefills; oldest (smallest victim key) first so victims are found at the tail.
        order = sorted(self.running,
                       key=lambda r: (self.worker_view.to_compute(r) > 1, self.policy.victim_key(r)))
        for req in order:
            if budget <= 0 or len(scheduled) >= seats:
                break
            if req.status != RequestStatus.RUNNING or req.request_id in self.preemption.held_back:
                continue  # preempted earlier in this loop, or to be preempted next time
            n = min(self.worker_view.tokens_to_run(req), budget)
            if n <= 0:
                continue  # its last batch is still out, or (async) its pending token is its last
            blocks = self.preemption.allocate_or_preempt(req, n, self.running, scheduled)
            if blocks is None:
                continue
            scheduled[req.request_id] = n
            new_blocks[req.request_id] = blocks
            budget -= n
        self.admission.admit(self.running, budget, scheduled, new_blocks, seats)
        return self._build_output(scheduled, new_blocks)

    def _token_budget(self, running: list[Request]) -> int:
        """Tokens an iteration of ``running`` may compute (the SLO policy's may be fewer)."""
        return self.policy.token_budget(running, self.config.max_num_batched_tokens, self.cost_model,
                                        self.worker_view.to_compute)

    def _batch_seats(self) -> int:
        """Most requests one batch may take. With several batches in flight (one
        per pipeline stage) the active requests are split across them, since a
        request in flight cannot join the next batch: one batch taking them all
        would leave the other stages idle."""
        active = min(len(self.running) + len(self._waiting), self.config.max_num_seqs)
        if self.max_inflight_batches == 1:
            return self.config.max_num_seqs
        return max(1, -(-active // self.max_inflight_batches))

    def _head_joins(self, staying: list[Request], seats: int) -> bool:
        """Whether the waiting queue's head joins the batch being built if only
        ``staying`` run, blocks aside (priority preemption counts those):
        admission's checks, made before the loop in schedule() gives the
        running requests their seats and tokens."""
        if not self.admission.head_admissible(self.running):
            return False
        tokens = [n for n in map(self.worker_view.tokens_to_run, staying) if n > 0]
        return (self.admission.has_seat(len(staying), len(tokens), seats)
                and sum(tokens) < self._token_budget(staying))

    def _build_output(self, scheduled: dict[str, int], new_blocks: dict[str, list[int]]) -> SchedulerOutput:
        new_reqs, cached_reqs = [], []
        for rid, n in scheduled.items():
            req = self.requests[rid]
            known = self.worker_view.tokens_held(rid)
            if known is None:
                new_reqs.append(NewRequestData(
                    req_id=rid, prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=list(req.output_token_ids), sampling_params=req.sampling_params,
                    block_ids=self.kv.block_ids(rid), num_computed_tokens=req.num_computed_tokens))
            else:
                cached_reqs.append(CachedRequestData(
                    req_id=rid, new_token_ids=req.all_token_ids[known:], new_block_ids=new_blocks[rid],
                    num_computed_tokens=req.num_computed_tokens))
            req.num_computed_tokens += n
            self.policy.on_scheduled(req, n)
            self.worker_view.scheduled(req)
        finished = self.worker_view.take_forgotten()
        swap_out, swap_in = self.swap.take_copies(self.iteration)
        return SchedulerOutput(
            iteration=self.iteration, scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
            finished_req_ids=finished, blocks_to_swap_out=swap_out, blocks_to_swap_in=swap_in)

    # ---- update ------------------------------------------------------
    def update(self, so: SchedulerOutput, out: ModelRunnerOutput) -> list[Request]:
        """Append sampled tokens, apply stop conditions, free finished requests.
        Returns the requests that got a token (finished ones included)."""
        now = self.clock()
        advanced = []
        self.kv.batch_done(so.iteration)
        self.swap.batch_done(so.iteration)
        self.worker_view.batch_back(so.num_scheduled_tokens)
        for rid in so.num_scheduled_tokens:
            req = self.requests.get(rid)
            token = out.sampled_token_ids.get(rid)
            if req is None or token is None or req.status != RequestStatus.RUNNING:
                continue  # aborted meanwhile, or a chunk of a prefill that samples nothing
            self.worker_view.token_arrived(rid)
            req.append_token(token)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            status = self._stop_status(req, token)
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
            advanced.append(req)
        return advanced

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if token in req.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in req.stop_token_set:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.at_length_limit(self.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None
