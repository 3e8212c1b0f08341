"""What the engine hands back to callers (LLM API, async server) per step."""
from __future__ import annotations

from dataclasses import dataclass, field

from orca_serve.batch import Logprobs
from orca_serve.request import RequestMetrics


@dataclass
class RequestOutput:
    """State of one request after a step.

    ``text``/``token_ids`` are cumulative; ``delta_text``/``delta_token_ids`` are
    what this step added (streaming sends the deltas). ``finish_reason`` is
    "stop", "length", "abort" or "error" once ``finished``.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    logprobs: list[Logprobs] = field(default_factory=list)  # one per output token, if asked
    stop_reason: int | str | None = None
    error: str | None = None
    prompt: str | None = None
