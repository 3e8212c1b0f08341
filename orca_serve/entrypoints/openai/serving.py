"""What /v1/completions and /v1/chat/completions share: checking prompts
against the context, building SamplingParams, running the engine requests
behind one HTTP request, usage, logprob token text, SSE framing.

One HTTP request becomes ``len(prompts) * n`` engine requests (a
``RequestGroup``); choice ``i`` is engine request ``{id}-{i}``.
"""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

from starlette.requests import Request

from orca_serve.engine.async_engine import AsyncLLMEngine
from orca_serve.engine.errors import EngineDeadError, EngineStoppedError, QueueFullError, SLORejectedError
from orca_serve.entrypoints.openai.protocol import ApiError, bad_request
from orca_serve.outputs import RequestOutput
from orca_serve.sampling_params import SamplingParams
from orca_serve.shown import shown

_FIELD_IN_MESSAGE = re.compile(r"^(prompt|max_tokens|min_tokens|priority|messages|top_k|top_p|temperature|"
                               r"seed|stop|stop_token_ids|logprobs|logit_bias)\b")


def engine_error(exc: BaseException, prompt_param: str = "prompt") -> ApiError:
    """The HTTP answer for an engine refusing or failing a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(503, f"the server is overloaded: {exc}", type="server_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(exc, SLORejectedError):
        return ApiError(503, str(exc), type="server_error", code="slo_rejected", headers={"Retry-After": "1"})
    if isinstance(exc, EngineStoppedError):
        return ApiError(503, str(exc), type="server_error", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, EngineDeadError):  # refused at the door; in-flight requests get a 500 instead
        return ApiError(503, str(exc), type="server_error", code="engine_dead")
    if isinstance(exc, ValueError):
        m = _FIELD_IN_MESSAGE.match(str(exc))
        param = m.group(1) if m else None
        return bad_request(str(exc), param=prompt_param if param == "prompt" else param)
    return ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def check_context(prompt_ids: list[int], max_tokens: int | None, max_model_len: int,
                  prompt_param: str, max_tokens_param: str) -> int:
    """Return the max_tokens to use; 400 when the prompt or max_tokens cannot fit."""
    n = len(prompt_ids)
    if n == 0:
        raise bad_request(f"{prompt_param} is empty", param=prompt_param)
    if n >= max_model_len:
        raise bad_request(f"{prompt_param} has {n} tokens but the model's context length is {max_model_len} "
                          "(at least one token must be left to generate)",
                          param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return max_model_len - n
    if n + max_tokens > max_model_len:
        raise bad_request(f"{max_tokens_param} ({shown(max_tokens)}) + prompt ({n} tokens) exceeds the model's "
                          f"context length {max_model_len}; use at most {max_model_len - n}",
                          param=max_tokens_param, code="context_length_exceeded")
    return max_tokens


def choice_params(req, max_tokens: list[int], num_logprobs: int | None) -> list[SamplingParams]:
    """Engine sampling parameters for each choice of an OpenAI request, choice
    j with ``max_tokens[j]``.

    With a seed and n > 1 each choice gets seed + j, so choices differ but the
    whole response is reproducible. The first is made and checked; the others
    are its copies, sharing its lists, which are checked once for them all
    (up to 1,024 choices, a list of up to 1 MiB).
    """
    def seed(j: int) -> int | None:
        return None if req.seed is None else req.seed + j

    try:
        first = SamplingParams(
            max_tokens=max_tokens[0], temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
            seed=seed(0), stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens, logprobs=num_logprobs, logit_bias=req.logit_bias)
        return [first, *(first.replace(max_tokens=m, seed=seed(j)) for j, m in enumerate(max_tokens[1:], 1))]
    except ValueError as exc:
        raise engine_error(exc) from None


def schedule_kwargs(req, arrival_time: float) -> dict:
    return {"priority": req.priority, "arrival_time": arrival_time, "user": req.user,
            "ttft_slo": None if req.ttft_slo_ms is None else req.ttft_slo_ms / 1000.0,
            "tpot_slo": None if req.tpot_slo_ms is None else req.tpot_slo_ms / 1000.0}


class RequestGroup:
    """The engine requests behind one HTTP request, read as one stream."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, num_prompts: int, n: int) -> None:
        """Checks the fan-out only (no tokens needed): make it before tokenizing,
        so a body of many prompts that could never be queued costs nothing."""
        count, limit = num_prompts * n, engine.max_waiting_requests
        if limit is not None and count > limit:  # it could never be queued: no retry would help
            raise bad_request(f"this request asks for {count} sequences (prompts × n); the server queues "
                              f"at most {limit} at a time (--max-waiting-requests)",
                              param="prompt" if num_prompts > limit else "n")
        self.engine = engine
        self.ids = [f"{request_id}-{i}" for i in range(count)]
        self.finals: list[RequestOutput | None] = [None] * count
        self.queue: asyncio.Queue = asyncio.Queue()
        self._index = {rid: i for i, rid in enumerate(self.ids)}

    async def start(self, prompts: list[list[int]], params: list[SamplingParams], kwargs: dict,
                    prompt_param: str) -> None:
        """Add every request; if one is refused, abort the others and raise an ApiError."""
        try:
            futures = [self.engine.add_request(rid, p, sp, self.queue, **kwargs)
                       for rid, p, sp in zip(self.ids, prompts, params)]
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException as exc:  # refused at submit, or the client went away
            self.abort()
            raise engine_error(exc, prompt_param) if isinstance(exc, Exception) else exc
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.abort()
            raise engine_error(errors[0], prompt_param)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) until every choice finished; EngineDeadError if the engine died."""
        remaining = sum(f is None for f in self.finals)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            i = self._index[item.request_id]
            if item.finished:
                self.finals[i] = item
                remaining -= 1
            yield i, item

    def abort(self) -> None:
        """Abort every choice not finished yet (a no-op for the rest)."""
        for rid, final in zip(self.ids, self.finals):
            if final is None:
                self.engine.abort(rid)

    async def collect(self, raw: Request) -> bool:
        """Run to the end; False if the client disconnected first (then all is aborted)."""
        async def drain():
            async for _ in self.outputs():
                pass

        task = asyncio.ensure_future(drain())
        watcher = asyncio.ensure_future(_wait_disconnect(raw))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # re-raise EngineDeadError
                return True
            return False
        finally:
            task.cancel()
            watcher.cancel()
            self.abort()

    def usage(self, n: int) -> dict:
        """OpenAI usage: each prompt counted once, whatever n is."""
        finals = [f for f in self.finals if f is not None]
        prompt = sum(len(f.prompt_token_ids) for i, f in enumerate(self.finals) if f and i % n == 0)
        cached = sum(f.num_cached_tokens for i, f in enumerate(self.finals) if f and i % n == 0)
        completion = sum(len(f.token_ids) for f in finals)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


async def _wait_disconnect(raw: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def in_flight_failure(exc: EngineDeadError) -> ApiError:
    """The engine died under a request it had accepted."""
    return ApiError(500, str(exc), type="server_error", code="engine_dead")


def failure(outputs: list[RequestOutput | None]) -> ApiError | None:
    """The error answer for the first choice the engine failed, if any (500, or
    503 for an SLO rejection)."""
    for out in outputs:
        if out is not None and out.finish_reason == "error":
            if (out.error or "").startswith("rejected:"):
                # The SLO policy (reject admission) dropped it from the queue past its
                # TTFT target: load shedding, not a failure.
                return ApiError(503, out.error, type="server_error", code="slo_rejected",
                                headers={"Retry-After": "1"})
            return ApiError(500, f"the engine failed this request: {out.error}", type="server_error",
                            code="engine_error")
    return None


class TokenText:
    """Token id -> the text OpenAI shows in logprobs (decoded, or token_id:N)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = (f"token_id:{token_id}" if self.tokenizer is None
                    else self.tokenizer.decode([token_id], skip_special_tokens=False))
            self._cache[token_id] = text
        return text


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
