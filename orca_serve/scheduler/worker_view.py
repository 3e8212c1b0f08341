"""The scheduler's view of the workers: which tokens of each request they
hold, which requests they must forget, and the batches still out there.

Plain Python, like the rest of the scheduler. A ``SchedulerOutput`` carries
a request in full the first time, then only the tokens the workers do not
hold yet (``tokens_held``); a request that finishes or is preempted is named
in the next output so that the workers drop their copy (``take_forgotten``).

A request in a batch that has not come back is *in flight* (pipeline
parallelism keeps several batches out, async scheduling two). With
``async_scheduling`` the engine schedules iteration i+1 while iteration i
runs, so a request may be scheduled again before the token its last batch
samples is known here: that token is *pending* (``pending``), counted as one
the request has, computed next as a decode whose input the worker takes from
its own copy of batch i's sampled tokens.

So the view says how many tokens a running request has for the batch being
built (``tokens_to_run``): none while a batch with it is out, unless async
scheduling runs it again on its pending token, and none when that token is
its last (``max_tokens``, the model's length).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from orca_serve.request import Request


class WorkerView:
    def __init__(self, async_scheduling: bool, max_model_len: int) -> None:
        self.async_scheduling = async_scheduling
        self.max_model_len = max_model_len
        self._tokens_held: dict[str, int] = {}
        self._forgotten: set[str] = set()  # requests the workers drop at the next batch
        # Request id -> how many batches in flight carry it.
        self._in_flight: Counter[str] = Counter()
        # Async scheduling: tokens sampled by batches in flight, not yet applied.
        self._pending: Counter[str] = Counter()

    def in_flight(self, req_id: str) -> bool:
        return req_id in self._in_flight

    def pending(self, req_id: str) -> int:
        """Tokens of ``req_id`` that batches in flight sample (async scheduling)."""
        return self._pending[req_id] if self._pending else 0

    def to_compute(self, req: Request) -> int:
        """Tokens of ``req`` not yet scheduled: its pending token (async) counts
        as one it has, unless that token is its last."""
        pending = self.pending(req.request_id)
        if pending and req.at_length_limit(self.max_model_len, pending):
            return 0
        return req.num_tokens + pending - req.num_computed_tokens

    def tokens_to_run(self, req: Request) -> int:
        """Tokens running ``req`` has for the batch being built: none while a
        batch with it is out, unless async scheduling runs it again on its
        pending token (none when that token is its last)."""
        if self.in_flight(req.request_id) and not self.async_scheduling:
            return 0
        return self.to_compute(req)

    def tokens_held(self, req_id: str) -> int | None:
        """How many of ``req_id``'s tokens the workers hold; None: they hold no copy of it."""
        return self._tokens_held.get(req_id)

    def scheduled(self, req: Request) -> None:
        """``req`` rides the batch being built, through ``req.num_computed_tokens``;
        the batch carries all its tokens known now."""
        rid = req.request_id
        self._tokens_held[rid] = req.num_tokens
        self._in_flight[rid] += 1
        if self.async_scheduling and req.num_computed_tokens == req.num_tokens + self._pending[rid]:
            self._pending[rid] += 1  # this batch samples its next token

    def take_forgotten(self) -> set[str]:
        """The requests the batch being built tells the workers to drop; the next starts empty."""
        forgotten, self._forgotten = self._forgotten, set()
        return forgotten

    def forget(self, req_id: str) -> None:
        """The workers are to drop their copy of ``req_id`` (preempted or finished)."""
        if self._tokens_held.pop(req_id, None) is not None:
            self._forgotten.add(req_id)

    def finished(self, req_id: str) -> None:
        """``req_id`` left the scheduler: the tokens its batches in flight sample are dropped."""
        # _in_flight keeps its count until the batches come back (batch_back):
        # the id is not free for a new request before then.
        self._pending.pop(req_id, None)
        self.forget(req_id)

    def batch_back(self, req_ids: Iterable[str]) -> None:
        """A batch with ``req_ids`` came back (its tokens applied or failed)."""
        for rid in req_ids:
            self._in_flight[rid] -= 1
            if self._in_flight[rid] <= 0:
                del self._in_flight[rid]

    def token_arrived(self, req_id: str) -> None:
        """A batch's sampled token for ``req_id`` is applied: no longer pending."""
        if self._pending[req_id] > 0:
            self._pending[req_id] -= 1
            if not self._pending[req_id]:
                del self._pending[req_id]
