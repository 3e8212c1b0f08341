"""Scheduling policies: how the waiting queue is ordered and who is preempted.

The scheduler core (scheduler.py) is the same for every policy; a policy only
answers three questions:
- ``waiting_key``: sort key of the waiting queue (smallest first);
- ``victim_key``: among running requests, the largest key is preempted first;
- ``may_preempt_for``: may a waiting request evict this running one?
and, for the request-level baseline, ``may_admit``: may the queue's head
join the running batch now?
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from orca_serve.request import Request

if TYPE_CHECKING:  # (waiting_queue imports this module)
    from orca_serve.scheduler.waiting_queue import WaitingQueue


class SchedulingPolicy:
    name = "base"
    # Request-level (static) batching admits only into an empty batch.
    admits_only_when_idle = False
    # Requests may be refused on arrival or leave the queue unserved (the SLO policy's reject mode).
    rejects = False

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        """Called for every request's tokens in each batch (fair sharing counts them)."""

    def waiting_key(self, req: Request, now: float):
        raise NotImplementedError

    def order_epoch(self):
        """Changes whenever the waiting keys already made may no longer compare
        with new ones (fair sharing served tokens; the SLO policy's cost
        estimate moved): the waiting queue then makes them again."""
        return None

    def victim_key(self, req: Request):
        raise NotImplementedError

    def may_preempt_for(self, waiting: Request, running: Request) -> bool:
        return False

    def token_budget(self, running: list[Request], default: int, cost_model,
                     to_compute: Callable[[Request], int]) -> int:
        """Tokens this iteration may compute (the SLO policy shrinks it);
        ``to_compute(req)`` is what ``req`` has left to schedule."""
        return default

    def admission_error(self, req: Request, work_ahead: Callable[[Request], int], now: float,
                        budget: int) -> str | None:
        """Why ``req`` is refused on arrival, or None; ``work_ahead(req)`` is the
        prompt tokens queued before it, ``budget`` an iteration's tokens."""
        return None

    def expiry_error(self, req: Request, now: float) -> str | None:
        """Why a queued request leaves the queue unserved now, or None."""
        return None

    def may_admit(self, head: Request, waiting: "WaitingQueue", running: list[Request], now: float) -> bool:
        """Whether ``head``, first of the ``waiting`` queue, may join the batch now."""
        return True

    def on_finished(self, req: Request) -> None:
        """``req`` left the scheduler (finished, aborted or failed)."""


class FCFSPolicy(SchedulingPolicy):
    """Orca's order: first come, first served; the newest request is preempted.
    A preempted request keeps its arrival time, so it goes back to the head."""

    name = "fcfs"

    def waiting_key(self, req: Request, now: float):
        return (req.arrival_time,)

    def victim_key(self, req: Request):
        return (req.arrival_time,)


class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` value is more urgent; FCFS among equals.

    Victims: least urgent first, newest first among equals. A waiting request
    may only evict running requests of strictly lower urgency.
    """

    name = "priority"

    def waiting_key(self, req: Request, now: float):
        return (req.priority, req.arrival_time)

    def victim_key(self, req: Request):
        return (req.priority, req.arrival_time)

    def may_preempt_for(self, waiting: Request, running: Request) -> bool:
        return running.priority > waiting.priority


class SLOPolicy(SchedulingPolicy):
    """Earliest deadline first by slack.

    A waiting request's deadline is its TTFT target; the slack subtracts an
    estimate of the work still needed (its prompt at the measured prefill
    rate), so a long prompt with the same deadline goes first. Requests
    without a target sort after all with one, FCFS among themselves.
    """

    name = "slo"
    # Waiting keys subtract the prompt's work at the cost model's per-token
    # time, which moves every iteration. Keys made at different times would
    # weigh work at different rates, so they all use one rate, held until the
    # estimate is more than a step (20%) away from it; then the queue is
    # re-keyed. The margin keeps measurement noise from re-sorting a long
    # queue every few iterations.
    _RATE_STEP = math.log(1.2)

    def __init__(self, cost_model=None, reject: bool = False) -> None:
        self.cost_model = cost_model
        self._epoch: int | None = None  # the held rate is exp(_epoch * _RATE_STEP)
        self._per_token = 0.0
        # Reject mode: refuse a request whose TTFT target cannot be met given the
        # prompt work queued ahead of it, and drop one whose deadline passed in the queue.
        self.rejects = reject

    def admission_error(self, req: Request, work_ahead: Callable[[Request], int], now: float,
                        budget: int) -> str | None:
        if not self.rejects or req.ttft_slo is None or self.cost_model.num_observations < 3:
            return None  # without measurements there is nothing to base a refusal on
        ahead = work_ahead(req)
        work = ahead + req.num_tokens
        predicted = -(-work // budget) * self.cost_model.predict(min(work, budget))
        waited = now - req.arrival_time
        if waited + predicted <= req.ttft_slo:
            return None
        return (f"rejected: predicted time to first token {1000 * (waited + predicted):.0f} ms exceeds the "
                f"request's TTFT target {1000 * req.ttft_slo:.0f} ms ({ahead} prompt tokens queued ahead)")

    def expiry_error(self, req: Request, now: float) -> str | None:
        # A request past its TTFT deadline would take capacity it can no longer use well.
        if (self.rejects and req.ttft_slo is not None and req.num_output_tokens == 0
                and now - req.arrival_time > req.ttft_slo):
            return (f"rejected: waited {1000 * (now - req.arrival_time):.0f} ms in the queue, past "
                    f"its TTFT target {1000 * req.ttft_slo:.0f} ms")
        return None

    def order_epoch(self):
        if self.cost_model is None:
            return None
        steps = math.log(self.cost_model.b) / self._RATE_STEP
        if self._epoch is None or abs(steps - self._epoch) > 1:
            self._epoch = round(steps)
            self._per_token = math.exp(self._epoch * self._RATE_STEP)
        return self._epoch

    def slack(self, req: Request, now: float) -> float:
        """Seconds to spare before the TTFT deadline once the prompt's own work
        is done, at the per-token time held for the current ``order_epoch``."""
        if req.ttft_slo is None:
            return math.inf
        remaining = req.num_tokens - req.num_computed_tokens
        return req.arrival_time + req.ttft_slo - now - remaining * self._per_token

    def waiting_key(self, req: Request, now: float):
        if req.ttft_slo is None:
            return (1, req.arrival_time, 0.0)
        # Deadline less estimated work; independent of `now`, so the order only
        # moves with the cost estimate's epoch.
        return (0, self.slack(req, 0.0), req.arrival_time)

    def token_budget(self, running: list[Request], default: int, cost_model,
                     to_compute: Callable[[Request], int]) -> int:
        """Adaptive batching: the biggest iteration that still keeps every
        running request's time-per-output-token target. Decodes always fit
        (starving them would only make every target worse), those whose token
        is still pending under async scheduling included."""
        targets = [r.tpot_slo for r in running if r.tpot_slo is not None]
        if not targets or cost_model.num_observations < 3:
            return default
        decodes = sum(1 for r in running if to_compute(r) == 1)
        return max(min(default, cost_model.max_tokens_within(min(targets))), decodes, 1)

    def victim_key(self, req: Request):
        # Evict the request with the loosest per-token target, newest first.
        tpot = req.tpot_slo if req.tpot_slo is not None else math.inf
        return (tpot, req.arrival_time)


class FairPolicy(SchedulingPolicy):
    """Per-client fair sharing of tokens (a virtual token counter, as in VTC).

    Each client (``Request.user``; requests without one share the client
    "") has a counter of the tokens computed for it, divided by its weight.
    The waiting request whose client has the smallest counter goes first, so
    a heavy client cannot starve a light one; a client that (re)appears starts
    at the smallest counter among active clients, so idle time earns no credit.
    """

    name = "fair"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = weights or {}
        self.served: dict[str, float] = {}
        self._num_served = 0  # on_scheduled calls: every one moves a client's key

    def _counter(self, user: str) -> float:
        if user not in self.served:
            self.served[user] = min(self.served.values(), default=0.0)
        return self.served[user]

    def on_scheduled(self, req: Request, num_tokens: int) -> None:
        user = req.user or ""
        self.served[user] = self._counter(user) + num_tokens / self.weights.get(user, 1.0)
        self._num_served += 1

    def order_epoch(self):
        return self._num_served

    def waiting_key(self, req: Request, now: float):
        return (self._counter(req.user or ""), req.arrival_time)

    def victim_key(self, req: Request):
        return (self._counter(req.user or ""), req.arrival_time)


class RequestLevelPolicy(FCFSPolicy):
    """The paper's baseline: Triton's dynamic batcher in front of a static-batch
    engine. A batch forms from arrived requests (up to max_batch_size, or when
    the oldest has waited max_queue_delay); nobody joins until all of it ends."""

    name = "request-level"
    admits_only_when_idle = True

    def __init__(self, max_batch_size: int = 16, max_queue_delay_s: float = 0.01) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.static_batch: set[str] = set()  # ids of the batch being served, until all of it ends

    def may_admit(self, head: Request, waiting: "WaitingQueue", running: list[Request], now: float) -> bool:
        if not self.static_batch and not running:
            self._form_batch(waiting, now)
        return head.request_id in self.static_batch

    def _form_batch(self, waiting: "WaitingQueue", now: float) -> None:
        """A batch forms only when the last one is done, from up to
        max_batch_size arrived requests, once the batch is full or the oldest
        request has waited max_queue_delay_s."""
        oldest = min(req.arrival_time for req in waiting)
        if len(waiting) < self.max_batch_size and now - oldest < self.max_queue_delay_s:
            return
        self.static_batch = {req.request_id for req in itertools.islice(waiting, self.max_batch_size)}

    def on_finished(self, req: Request) -> None:
        self.static_batch.discard(req.request_id)


def make_policy(name: str, cost_model=None, slo_admission: str = "best-effort", max_batch_size: int = 16,
                max_queue_delay_s: float = 0.01) -> SchedulingPolicy:
    policies = {"fcfs": FCFSPolicy, "priority": PriorityPolicy, "slo": SLOPolicy, "fair": FairPolicy,
                "request-level": RequestLevelPolicy}
    if name not in policies:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {', '.join(policies)}")
    if name == "slo":
        return SLOPolicy(cost_model, reject=slo_admission == "reject")
    if name == "request-level":
        return RequestLevelPolicy(max_batch_size, max_queue_delay_s)
    return policies[name]()
