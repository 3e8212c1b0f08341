"""Async scheduling's token hand-off, on the runner's side.

With ``async_scheduling`` the engine schedules and launches batch i+1 before
it has read batch i's sampled ids back, so a decode in batch i+1 may be
scheduled through a token that batch i samples and the runner has not been
sent. ``PendingTokens`` keeps batch i's sampled ids on the device, puts a
placeholder for such a token in the request's tokens and writes the sampled
id over it on the device; the next diff carries the real id (see
``ModelRunner._update_states``). It also remembers which requests the batch
after a failed one must skip. The runner owns one only under async
scheduling, so the synchronous path does none of this work.
"""
from __future__ import annotations

import numpy as np
import torch

from orca_serve.batch import SchedulerOutput
from orca_serve.layers.device import to_device
from orca_serve.worker.input_batch import RequestState

NOTHING_LOST: frozenset[str] = frozenset()


class PendingTokens:
    """One runner's hand-off of sampled ids to the batch after (async scheduling only)."""

    def __init__(self) -> None:
        # The last batch's sampled ids on the device and each request's row in
        # them, for a request scheduled before its token came back.
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] | None = None
        # (the batch after one that failed to launch, that one's requests): ``batch_failed``
        self._lost: tuple[int, frozenset[str]] = (0, NOTHING_LOST)

    def lost(self, iteration: int) -> frozenset[str]:
        """The requests batch ``iteration`` skips: those of a failed batch
        right before it, whose tokens it was scheduled with."""
        # Only the very next batch was scheduled before the engine heard of the
        # failure; one scheduled later may reuse a failed request's id.
        lost = self._lost[1] if iteration == self._lost[0] else NOTHING_LOST
        if self._lost[1]:
            self._lost = (0, NOTHING_LOST)
        return lost

    def batch_failed(self, so: SchedulerOutput) -> None:
        """``so`` failed to launch. The next batch was scheduled before the
        engine hears of it, with tokens its requests were to sample: that batch
        skips them (the engine fails them once it collects this one) instead of
        failing as a whole, innocent requests with it."""
        # (every request of the batch, new or cached, is a scheduled one)
        self._lost = (so.iteration + 1, frozenset(so.num_scheduled_tokens))
        self._last_sampled = None

    def sampled(self, tokens: torch.Tensor, req_ids: list[str]) -> None:
        """The batch just launched sampled ``tokens`` (on the device), row i for ``req_ids[i]``."""
        self._last_sampled = (tokens, {rid: i for i, rid in enumerate(req_ids)})

    def forget(self) -> None:
        """The batch just run sampled nothing any request is waiting for."""
        self._last_sampled = None

    def add_placeholders(self, scheduled: list[tuple[RequestState, int]]) -> bool:
        """A request scheduled through the token its previous batch samples gets
        a placeholder for it, filled on the device (``fill``). Whether any did."""
        added = False
        for state, n in scheduled:
            missing = state.num_computed_tokens + n - len(state.token_ids)
            if missing <= 0:
                continue
            rows = self._last_sampled[1] if self._last_sampled is not None else {}
            if missing > 1 or state.pending or state.req_id not in rows:
                raise RuntimeError(f"request {state.req_id!r} was scheduled {missing} token(s) past those sent, "
                                   f"but the previous batch sampled {'one' if state.req_id in rows else 'none'}")
            state.token_ids.append(0)
            state.pending = added = True
        return added

    def fill(self, input_ids: torch.Tensor, rows: np.ndarray, states: list[RequestState]) -> None:
        """Write the previous batch's sampled ids over the placeholders in
        ``input_ids``, whose row ``rows[i]`` is ``states[i]``'s last token."""
        pending = [i for i, s in enumerate(states) if s.pending]
        if not pending:
            return
        tokens, prev_rows = self._last_sampled
        dst = np.fromiter((rows[i] for i in pending), dtype=np.int64, count=len(pending))
        src = np.fromiter((prev_rows[states[i].req_id] for i in pending), dtype=np.int64, count=len(pending))
        values = tokens.index_select(0, to_device(src, tokens.device))
        input_ids.index_copy_(0, to_device(dst, input_ids.device), values)
