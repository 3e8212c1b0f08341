"""What ``ModelRunner.execute_model_async`` returns: an iteration launched but
not waited for. ``result()`` is where the host waits for the device, once per
iteration, so that under async scheduling the engine can schedule the next
batch in between."""
from __future__ import annotations

import torch

from orca_serve.batch import ModelRunnerOutput
from orca_serve.layers.sampler import LogprobTensors, Sampler, SamplingMetadata


class Ready:
    """An iteration's result that needs no wait (nothing sampled on this rank)."""

    def __init__(self, output: ModelRunnerOutput | None) -> None:
        self.output = output

    def result(self) -> ModelRunnerOutput | None:
        return self.output


class SampledBatch:
    """An iteration launched on the device; ``result()`` waits for its
    sampled ids (the host's one sync per iteration) and returns them."""

    def __init__(self, tokens: torch.Tensor, logprobs: LogprobTensors | None, md: SamplingMetadata,
                 req_ids: list[str]) -> None:
        self.tokens, self.logprobs, self.md, self.req_ids = tokens, logprobs, md, req_ids

    def result(self) -> ModelRunnerOutput:
        out = Sampler.outputs(self.tokens, self.logprobs, self.md)
        return ModelRunnerOutput(
            sampled_token_ids=dict(zip(self.req_ids, out.token_ids)),
            logprobs={rid: lp for rid, lp in zip(self.req_ids, out.logprobs) if lp is not None})


RunnerResult = Ready | SampledBatch
