"""What crosses the scheduler/worker boundary: small plain dataclasses.

A request's full data is sent once (``NewRequestData``); afterwards only diffs
(``CachedRequestData``): new token ids the worker has not seen, new block ids,
and how many tokens to compute. This keeps the per-iteration control message
small, which matters when it crosses process boundaries (distributed workers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from orca_serve.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    # Tokens already generated (non-empty when a preempted request resumes).
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]  # tokens appended since this request was last sent
    new_block_ids: list[int]  # blocks appended to its block table
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One iteration's batch: which requests compute how many tokens."""

    iteration: int
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> number of tokens computed in this iteration (1 for a decode).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the worker must forget (finished, aborted or preempted) before running.
    finished_req_ids: set[str] = field(default_factory=set)
    # Swap-mode preemption: (cpu_slot, gpu_block) copies to do before the model runs.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return len(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def goes_out(self) -> bool:
        """Whether the workers must see it. One with nothing to compute still
        does when it moves KV blocks or tells them to forget requests (a request
        that stopped while its next batch was in flight is finished in an
        otherwise empty one)."""
        return not self.is_empty or bool(self.blocks_to_swap_out or self.blocks_to_swap_in or self.finished_req_ids)


@dataclass
class Logprobs:
    """Logprob of the sampled token and the top-n alternatives (token_id, logprob)."""

    sampled_logprob: float
    top: list[tuple[int, float]]


@dataclass
class ModelRunnerOutput:
    """Tokens sampled in one iteration. A request in the batch whose prompt is
    still being prefilled in chunks samples nothing and is absent here."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, Logprobs] = field(default_factory=dict)
