"""What every backend shares: the run record and the client-side admission rule."""
from __future__ import annotations

import heapq
import math
import threading
import time
from dataclasses import dataclass, field

from orca_serve.bench.metrics import RequestResult
from orca_serve.bench.workloads import RequestSpec


@dataclass
class BackendRun:
    """One run's per-request results; ``t0`` is the perf_counter time arrivals count from."""

    results: list[RequestResult]
    t0: float
    end: float
    extra: dict = field(default_factory=dict)  # backend-specific figures (KV usage, chosen batch size...)

    @property
    def duration(self) -> float:
        return self.end - self.t0


class Admission:
    """Releases requests at their arrival times, at most ``max_concurrency`` in flight.

    A request's start time is when a closed-loop client would have sent it:
    its arrival, or the moment a slot freed up if all were busy then. The
    driver may notice an arrival late (busy running an iteration); the
    request still counts from its arrival, because a real client sent it then.
    Thread-safe so a submitting thread and a collecting thread can share it.
    """

    def __init__(self, arrivals: list[float], max_concurrency: int | None, t0: float) -> None:
        self.t0 = t0
        self._order = sorted(range(len(arrivals)), key=lambda i: (arrivals[i], i))
        self._arrivals = arrivals
        self._next = 0
        cap = len(arrivals) if max_concurrency is None else max(1, min(max_concurrency, len(arrivals)))
        self._free = [t0] * cap  # min-heap of the times each free slot became free
        self._lock = threading.Lock()
        self.slot_freed = threading.Condition(self._lock)

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self._order)

    def due(self, now: float | None = None) -> list[tuple[int, float]]:
        """(request index, start time) of every request that may be sent now."""
        now = time.perf_counter() if now is None else now
        out = []
        with self._lock:
            while self._next < len(self._order) and self._free:
                i = self._order[self._next]
                arrival = self.t0 + self._arrivals[i]
                if arrival > now:
                    break
                out.append((i, max(arrival, heapq.heappop(self._free))))
                self._next += 1
        return out

    def done(self, now: float | None = None) -> None:
        """A request finished: its slot is free from ``now``."""
        with self._lock:
            heapq.heappush(self._free, time.perf_counter() if now is None else now)
            self.slot_freed.notify_all()

    def wait_hint(self, now: float | None = None) -> float | None:
        """Seconds until the next arrival; None if nothing is left or all slots are busy."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            if self._next >= len(self._order) or not self._free:
                return None
            return max(0.0, self.t0 + self._arrivals[self._order[self._next]] - now)


def new_result(spec: RequestSpec, start: float) -> RequestResult:
    return RequestResult(index=spec.index, prompt_len=spec.prompt_len or 0, start=start)


def fail_unfinished(results: dict[int, RequestResult], specs: list[RequestSpec], reason: str,
                    now: float) -> list[RequestResult]:
    """Every spec gets a result; the ones that never finished are failures."""
    out = []
    for s in specs:
        r = results.get(s.index)
        if r is None:
            r = new_result(s, now)
        if not r.success and r.error is None:
            r.error, r.finish = reason, now
        out.append(r)
    return out


def sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0 and math.isfinite(delay):
        time.sleep(delay)
