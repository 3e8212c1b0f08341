"""The waiting queue: requests not running (new or preempted), in the
scheduling policy's order.

Plain Python, like the rest of the scheduler. Entries stay sorted by
(policy key, queueing sequence), so requests with equal keys keep the order
they were queued in (a preempted request goes behind those queued before
it). A policy whose keys move (fair sharing as work is served, the SLO
policy's cost estimate) says so through ``order_epoch``; the queue makes
every key again before it next compares one with another.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from orca_serve.request import Request
from orca_serve.scheduler.policies import SchedulingPolicy


class WaitingQueue:
    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy
        self._entries: list[tuple] = []  # sorted (policy key, seq, request)
        self._seq = itertools.count()
        self._epoch = policy.order_epoch()  # the policy's epoch the keys were made in

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Request]:
        """The requests, head first."""
        return (entry[-1] for entry in self._entries)

    def add(self, req: Request, now: float) -> None:
        self.rekey_if_moved(now)
        bisect.insort(self._entries, (self.policy.waiting_key(req, now), next(self._seq), req))

    def remove(self, req: Request) -> None:
        for i, entry in enumerate(self._entries):
            if entry[-1] is req:
                del self._entries[i]
                return

    @property
    def head(self) -> Request:
        return self._entries[0][-1]

    def pop_head(self) -> Request:
        return self._entries.pop(0)[-1]

    def rekey_if_moved(self, now: float) -> None:
        """Make every entry's key again if the policy's order epoch moved."""
        epoch = self.policy.order_epoch()
        if epoch != self._epoch:
            self._epoch = epoch
            self._entries = sorted((self.policy.waiting_key(e[-1], now), e[1], e[-1]) for e in self._entries)

    def work_ahead(self, req: Request, now: float) -> int:
        """Prompt tokens of the queued requests the policy orders at or before ``req``."""
        self.rekey_if_moved(now)
        key = self.policy.waiting_key(req, now)
        return sum(e[-1].num_tokens - e[-1].num_computed_tokens for e in self._entries if e[0] <= key)
