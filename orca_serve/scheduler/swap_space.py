"""Swap-mode preemption's slots on the host: which preempted request's KV
blocks sit in which slot, and the copies the next batch carries.

Plain Python, like the rest of the scheduler. A slot is an index into every
rank's host pool (``worker/kv_pool.py``); the workers make the copies that a
``SchedulerOutput`` lists, swap-outs before swap-ins.

A swap-out's slots hold the request's K/V only once the batch that carries
the copy has run. So a request is not swapped back in by a later batch while
that one is in flight (``in_transit``), and if that batch fails (it may have
failed before its copies) the request recomputes instead (``batch_failed``).
"""
from __future__ import annotations


class SwapSpace:
    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots))
        self._held: dict[str, list[int]] = {}  # request id -> the slots of its blocks, in order
        self._out: list[tuple[int, int]] = []  # (slot, device block) copies for the next batch
        self._in: list[tuple[int, int]] = []
        self._unsent: list[str] = []  # requests swapped out for the batch being built
        self._in_transit: dict[int, list[str]] = {}  # batch in flight -> requests its swap-outs copy
        self.num_swaps_total = 0

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def holds(self, req_id: str) -> bool:
        return req_id in self._held

    def swap_out(self, req_id: str, blocks: list[int]) -> bool:
        """Copy ``req_id``'s device ``blocks`` out when there is a slot for each;
        False when not (the request is recomputed instead)."""
        if not 0 < len(blocks) <= len(self._free):
            return False
        slots = [self._free.pop() for _ in blocks]
        self._out.extend(zip(slots, blocks))
        self._held[req_id] = slots
        self._unsent.append(req_id)
        self.num_swaps_total += 1
        return True

    def in_transit(self, req_id: str) -> bool:
        """Whether ``req_id``'s swap-out rides a batch that is not back yet."""
        return any(req_id in ids for ids in self._in_transit.values())

    def swap_in(self, req_id: str, blocks: list[int]) -> None:
        """Copy ``req_id``'s blocks back into device ``blocks``. Its slots are
        free at once: this schedule makes no more swap-outs, and the workers
        copy the next one's after this one's."""
        slots = self._held.pop(req_id)
        self._in.extend(zip(slots, blocks))
        self._free.extend(slots)

    def release(self, req_id: str) -> None:
        """A swapped-out request finished: its slots are free."""
        self._free.extend(self._held.pop(req_id, ()))

    def take_copies(self, batch: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(swap-outs, swap-ins) for ``batch``, the one being built; the next starts empty."""
        copies = self._out, self._in
        if self._unsent:
            self._in_transit[batch] = self._unsent
        self._out, self._in, self._unsent = [], [], []
        return copies

    def batch_done(self, batch: int) -> None:
        """``batch`` came back: the swap-outs it carried are in their slots."""
        self._in_transit.pop(batch, None)

    def batch_failed(self, batch: int) -> list[str]:
        """``batch`` failed, perhaps before its copies: the requests it was to
        swap out (and still swapped out) give up their slots; they recompute
        when they resume. Returns their ids."""
        lost = [req_id for req_id in self._in_transit.pop(batch, ()) if req_id in self._held]
        for req_id in lost:
            self.release(req_id)
        return lost
