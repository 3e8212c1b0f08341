"""Scheduling policies: how the waiting queue is ordered and who is preempted.

The scheduler core (scheduler.py) is the same for every policy; a policy only
answers three questions:
- ``waiting_key``: sort key of the waiting queue (smallest first);
- ``victim_key``: among running requests, the largest key is preempted first;
- ``may_preempt_for``: may a waiting request evict this running one?
"""
from __future__ import annotations

import math

from orca_serve.request import Request


class SchedulingPolicy:
    name = "base"
    # Request-level (static) batching admits only into an empty batch.
    admits_only_when_idle = False

    def waiting_key(self, req: Request, now: float):
        raise NotImplementedError

    def victim_key(self, req: Request):
        raise NotImplementedError

    def may_preempt_for(self, waiting: Request, running: Request) -> bool:
        return False


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

    def __init__(self, prefill_seconds_per_token: float = 0.0) -> None:
        self.prefill_seconds_per_token = prefill_seconds_per_token

    def slack(self, req: Request, now: float) -> float:
        if req.ttft_slo is None:
            return math.inf
        remaining = req.num_tokens - req.num_computed_tokens
        return req.arrival_time + req.ttft_slo - now - remaining * self.prefill_seconds_per_token

    def waiting_key(self, req: Request, now: float):
        if req.ttft_slo is None:
            return (1, req.arrival_time, 0.0)
        # Deadline less estimated work; independent of `now`, so the order is stable.
        return (0, self.slack(req, 0.0), req.arrival_time)

    def victim_key(self, req: Request):
        # Evict the request with the loosest per-token target, newest first.
        tpot = req.tpot_slo if req.tpot_slo is not None else math.inf
        return (tpot, req.arrival_time)


class RequestLevelPolicy(FCFSPolicy):
    """The paper's baseline: Triton's dynamic batcher in front of a static-batch
    engine. A batch forms from arrived requests (up to max_batch_size, or when
    the oldest has waited max_queue_delay); nobody joins until all of it ends."""

    name = "request-level"
    admits_only_when_idle = True


def make_policy(name: str) -> SchedulingPolicy:
    policies = {"fcfs": FCFSPolicy, "priority": PriorityPolicy, "slo": SLOPolicy,
                "request-level": RequestLevelPolicy}
    if name not in policies:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {', '.join(policies)}")
    return policies[name]()
