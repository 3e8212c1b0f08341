"""A request as the engine and scheduler see it: token ids, progress, status."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from orca_serve.identity_cache import Shared
from orca_serve.sampling_params import SamplingParams, finite_float, integer
from orca_serve.shown import shown


class RequestStatus(enum.IntEnum):
    """Ordered: every status after PREEMPTED is a finished one."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


def finish_reason(status: RequestStatus) -> str | None:
    """The OpenAI-style finish reason for a finished status, else None."""
    return _FINISH_REASONS.get(status)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0


@dataclass
class Request:
    """One generation request. ``all_token_ids`` = prompt + generated so far.

    ``num_computed_tokens`` counts tokens whose KV is in the cache; the
    scheduler closes the gap to ``num_tokens`` with its token budget.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Token ids that end generation unless ignore_eos (a model may have several).
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # SLO targets in seconds (None: no target). Used by the slo policy.
    ttft_slo: float | None = None
    tpot_slo: float | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        self._validate()
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        # Number of prompt tokens whose KV came from the prefix cache at the last admission.
        self.num_cached_tokens = 0
        self.logprobs: list = []  # batch.Logprobs per output token, when asked for
        # What was made from its params' lists once per distinct list, shared
        # with the requests that use the same one (identity_cache.py): the
        # engine's checks, the scheduler's set of its stop tokens, the output
        # processor's index of its stop strings. Held while
        # it runs and dropped when it finishes, since a list may change once
        # no running request uses it.
        self.held: list[Shared] = []
        self.stop_token_set: frozenset[int] = frozenset()  # set by the scheduler (add_request)

    def _validate(self) -> None:
        """ValueError naming the field: the scheduler sorts and budgets by these,
        so a bad one would fail every iteration, not just this request."""
        if not isinstance(self.request_id, str):
            raise ValueError(f"request_id must be a string, got {shown(self.request_id)}")
        self.priority = integer("priority", self.priority, minimum=None)
        self.arrival_time = finite_float("arrival_time", self.arrival_time)
        for name in ("ttft_slo", "tpot_slo"):
            value = getattr(self, name)
            if value is not None:
                value = finite_float(name, value)
                if value <= 0:
                    raise ValueError(f"{name} must be > 0 seconds, got {shown(value)}")
                setattr(self, name, value)
        if self.user is not None and not isinstance(self.user, str):
            raise ValueError(f"user must be a string, got {shown(self.user)}")

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus the most tokens this request may ever generate."""
        return self.num_prompt_tokens + self.sampling_params.max_tokens

    def at_length_limit(self, max_model_len: int, more: int = 0) -> bool:
        """Whether it has its last token (with ``more`` still to come): its
        ``max_tokens`` generated, or the model's length reached. The one rule
        for both: the scheduler finishes it there, and does not schedule a
        token past it."""
        return self.num_tokens + more >= min(self.max_total_tokens, max_model_len)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

