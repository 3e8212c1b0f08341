"""Output assembly: from a request the iteration advanced (or ended) to the
``RequestOutput`` its caller gets.

Each request's incremental detokenizer turns its new token into text and
looks for stop strings; a stop string, or a detokenizer that fails, finishes
the request in the scheduler. A finished request is counted for goodput
(``slo_met``) and its detokenizer dropped. The request-level baseline hands
out its requests only when their whole batch has ended (``release``).
"""
from __future__ import annotations

import weakref

from orca_serve.engine.detokenizer import IncrementalDetokenizer
from orca_serve.engine.stop_strings import StopStrings
from orca_serve.identity_cache import IdentityCache, Shared
from orca_serve.outputs import RequestOutput
from orca_serve.request import Request, RequestStatus, finish_reason
from orca_serve.sampling_params import SamplingParams
from orca_serve.scheduler import Scheduler


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompts: dict[str, str | None] = {}
        self._held: dict[str, RequestOutput] = {}  # request-level baseline: outputs until the batch ends
        self.num_finished = 0
        self.num_slo_met = 0
        # Each stop list indexed, while a request uses it: the sequences of one
        # HTTP request and the prompts of one generate() share their list, found
        # by its identity; another request's equal list by its content.
        self._stop_lists = IdentityCache(self._stop_strings)
        self._stops_by_content: weakref.WeakValueDictionary[tuple[str, ...], StopStrings] = \
            weakref.WeakValueDictionary()

    def add_request(self, request_id: str, prompt: str | list[int], token_ids: list[int],
                    params: SamplingParams) -> Shared[StopStrings] | None:
        """A request the scheduler took: its detokenizer, and its prompt text
        (outputs echo it). Returns its hold on its stop list's index, which
        the request keeps while it runs (``Request.held``, as its other
        shared values): a later request with the same list finds it by the
        list's identity. Its detokenizer keeps the index itself."""
        shared = self._stop_lists.get(params.stop) if params.stop else None
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, token_ids, params,
                                                         shared.value if shared else None)
        self._prompts[request_id] = prompt if isinstance(prompt, str) else None
        return shared

    def _stop_strings(self, stop: list[str]) -> StopStrings:
        """``stop`` indexed: as a running request with an equal list has it,
        else anew. Looking it up costs a tuple of the list and its hash, in C,
        once per list (the 1,024 sequences of a request hashed it 1,024 times)."""
        key = tuple(stop)
        stops = self._stops_by_content.get(key)
        if stops is None:
            stops = self._stops_by_content[key] = StopStrings(key)
        return stops

    def has_held(self) -> bool:
        """Whether finished outputs wait for the rest of their batch (request-level baseline)."""
        return bool(self._held)

    def make_output(self, req: Request) -> RequestOutput:
        rid = req.request_id
        detok = self._detok.get(rid)
        delta_ids = req.output_token_ids[-1:] if req.output_token_ids and req.status != RequestStatus.FINISHED_ABORTED else []
        delta_text = ""
        if detok is not None and delta_ids:
            try:
                delta_text, stop = detok.add_tokens(delta_ids, final=req.finished)
            except Exception as exc:  # a detokenizer failure is this request's alone
                req.error = f"detokenization failed: {exc}"
                self.scheduler.finish_requests([req], RequestStatus.FINISHED_ERROR)
                stop = None
            if stop is not None:
                req.stop_reason = stop
                if not req.finished:
                    self.scheduler.finish_requests([req], RequestStatus.FINISHED_STOPPED)
                else:
                    req.status = RequestStatus.FINISHED_STOPPED
        output = RequestOutput(
            request_id=rid, prompt_token_ids=req.prompt_token_ids, token_ids=list(req.output_token_ids),
            text=detok.text if detok else "", delta_token_ids=delta_ids, delta_text=delta_text,
            finished=req.finished, finish_reason=finish_reason(req.status), metrics=req.metrics,
            num_cached_tokens=req.num_cached_tokens, logprobs=list(req.logprobs),
            stop_reason=req.stop_reason, error=req.error, prompt=self._prompts.get(rid))
        if req.finished:
            self._count_finished(req)
            self._forget(rid)
        return output

    def _forget(self, request_id: str) -> None:
        """Drop a finished request's detokenizer and prompt."""
        self._detok.pop(request_id, None)
        self._prompts.pop(request_id, None)

    def _count_finished(self, req: Request) -> None:
        if req.status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR):
            return
        self.num_finished += 1
        if slo_met(req):
            self.num_slo_met += 1

    def release(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """The request-level baseline returns a request only when its whole batch ends."""
        if not self.scheduler.policy.admits_only_when_idle:
            return outputs
        passthrough = []
        for o in outputs:
            if o.finish_reason in ("abort", "error"):
                passthrough.append(o)
            elif o.finished:
                # Nothing was streamed: the whole completion is this output's delta.
                o.delta_text, o.delta_token_ids = o.text, list(o.token_ids)
                self._held[o.request_id] = o
        if self._held and not self.scheduler.policy.static_batch:
            passthrough.extend(self._held.values())
            self._held = {}
        return passthrough


def slo_met(req: Request) -> bool:
    """Did a finished request meet its TTFT and time-per-output-token targets?"""
    m = req.metrics
    if req.ttft_slo is not None:
        if m.first_token_time is None or m.first_token_time - m.arrival_time > req.ttft_slo:
            return False
    if req.tpot_slo is not None and req.num_output_tokens > 1 and m.first_token_time is not None:
        tpot = (m.last_token_time - m.first_token_time) / (req.num_output_tokens - 1)
        if tpot > req.tpot_slo:
            return False
    return True
