"""/v1/completions and /v1/chat/completions: request in, JSON or SSE out.

Each handler tokenizes off the event loop, checks the context length, starts
the engine requests and then either collects them (watching for the client
going away) or streams them as server-sent events. A streaming client that
disconnects makes Starlette cancel the body iterator; its ``finally`` aborts
the engine requests, so their KV blocks are freed at the next iteration.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from orca_serve.engine.async_engine import AsyncLLMEngine
from orca_serve.engine.errors import EngineDeadError
from orca_serve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, name_field
from orca_serve.entrypoints.openai.serving import (
    SSE_DONE, SSE_HEADERS, RequestGroup, TokenText, check_context, choice_params, engine_error, failure,
    in_flight_failure, schedule_kwargs, sse)
from orca_serve.outputs import RequestOutput

# Status for a request whose client left before the answer (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class ServingContext:
    engine: AsyncLLMEngine
    model_name: str
    token_text: TokenText


async def _tokenize(fn, *args, param: str) -> list[int]:
    # Tokenizers and chat templates are pure functions of the (read-only)
    # tokenizer; run them on a worker thread so long prompts never stall the loop.
    try:
        return await asyncio.to_thread(fn, *args)
    except ValueError as exc:  # apply_chat_template's too, when the template fails on a conversation
        raise engine_error(ValueError(name_field(param, str(exc))), param) from None


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request,
                            arrival: float) -> Response:
    engine, n = ctx.engine, req.n
    request_id = f"cmpl-{uuid.uuid4().hex}"
    texts = req.prompts()
    group = RequestGroup(engine, request_id, len(texts), n)  # a fan-out past the queue: refused untokenized
    names = ["prompt"] if len(texts) == 1 else [f"prompt[{i}]" for i in range(len(texts))]
    prompt_ids = [await _tokenize(engine.tokenize, p, param=name) for p, name in zip(texts, names)]
    max_tokens = [check_context(ids, req.max_tokens, engine.max_model_len, name, "max_tokens")
                  for ids, name in zip(prompt_ids, names)]
    prompts = [ids for ids in prompt_ids for _ in range(n)]
    params = choice_params(req, [max_tokens[j // n] for j in range(len(prompts))], req.logprobs)
    await group.start(prompts, params, schedule_kwargs(req, arrival), "prompt")
    base = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name}
    if req.stream:
        return _sse_response(_framed(group, req, base, _stream_completion(ctx, group, req, base)), group)
    if not await _collect(group, raw):
        return Response(status_code=CLIENT_CLOSED)
    choices = []
    for i, out in enumerate(group.finals):
        lp = None if req.logprobs is None else _completion_logprobs(ctx, out, 0, len(out.logprobs), 0)[0]
        choices.append({"index": i, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason,
                        "stop_reason": out.stop_reason})
    return JSONResponse({**base, "choices": choices, "usage": group.usage(n)})


class _Failed(str):
    """An SSE chunk reporting a failed request: no usage chunk follows it."""


async def _framed(group: RequestGroup, req, base: dict, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """What every SSE response shares around its choice chunks: the usage chunk
    (unless a request failed), an error event if the engine died, aborting the
    group's requests when the stream ends or the client leaves, then [DONE]."""
    try:
        failed = False
        async for chunk in chunks:
            failed = failed or isinstance(chunk, _Failed)
            yield chunk
        if not failed and req.include_usage_in_stream:
            yield sse({**base, "choices": [], "usage": group.usage(req.n)})
    except EngineDeadError as exc:
        yield sse(in_flight_failure(exc).body())
    finally:
        await chunks.aclose()
        group.abort()
    yield SSE_DONE


async def _stream_completion(ctx: ServingContext, group: RequestGroup, req: CompletionRequest,
                             base: dict) -> AsyncIterator[str]:
    sent = [0] * len(group.ids)  # logprobs already sent, per choice
    offset = [0] * len(group.ids)  # text_offset of the next token, per choice
    extra = {"usage": None} if req.include_usage_in_stream else {}
    async for i, out in group.outputs():
        if out.finish_reason == "error":
            yield _Failed(sse(failure([out]).body()))
            return
        if not (out.delta_text or out.finished):
            continue  # a token whose text is held back (partial character, possible stop string)
        lp = None
        if req.logprobs is not None:
            lp, offset[i] = _completion_logprobs(ctx, out, sent[i], len(out.logprobs), offset[i])
            sent[i] = len(out.logprobs)
        choice = {"index": i, "text": out.delta_text, "logprobs": lp,
                  "finish_reason": out.finish_reason if out.finished else None}
        if out.finished:
            choice["stop_reason"] = out.stop_reason
        yield sse({**base, "choices": [choice], **extra})


def _completion_logprobs(ctx: ServingContext, out: RequestOutput, start: int, end: int,
                         offset: int) -> tuple[dict, int]:
    """Legacy completions logprobs for output tokens [start, end); returns the next text offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(out.token_ids[start:end], out.logprobs[start:end]):
        text = ctx.token_text(tid)
        top = {ctx.token_text(t): v for t, v in lp.top}
        top[text] = lp.sampled_logprob
        tokens.append(text)
        token_lps.append(lp.sampled_logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request,
                                 arrival: float) -> Response:
    engine, n = ctx.engine, req.n
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    group = RequestGroup(engine, request_id, 1, n)
    ids = await _tokenize(engine.apply_chat_template, req.messages, param="messages")
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = check_context(ids, req.requested_max_tokens, engine.max_model_len, "messages", max_tokens_param)
    params = choice_params(req, [max_tokens] * n, req.num_logprobs)
    await group.start([ids] * n, params, schedule_kwargs(req, arrival), "messages")
    base = {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name}
    if req.stream:
        base["object"] = "chat.completion.chunk"
        return _sse_response(_framed(group, req, base, _stream_chat(ctx, group, req, base)), group)
    if not await _collect(group, raw):
        return Response(status_code=CLIENT_CLOSED)
    choices = [{"index": i, "message": {"role": "assistant", "content": out.text},
                "logprobs": _chat_logprobs(ctx, out, 0, len(out.logprobs)) if req.logprobs else None,
                "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
               for i, out in enumerate(group.finals)]
    return JSONResponse({**base, "choices": choices, "usage": group.usage(n)})


async def _stream_chat(ctx: ServingContext, group: RequestGroup, req: ChatCompletionRequest,
                       base: dict) -> AsyncIterator[str]:
    sent = [0] * len(group.ids)
    extra = {"usage": None} if req.include_usage_in_stream else {}
    for i in range(len(group.ids)):  # OpenAI opens every choice with the role
        yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra})
    async for i, out in group.outputs():
        if out.finish_reason == "error":
            yield _Failed(sse(failure([out]).body()))
            return
        if out.delta_text or (req.logprobs and len(out.logprobs) > sent[i] and out.finished):
            lp = _chat_logprobs(ctx, out, sent[i], len(out.logprobs)) if req.logprobs else None
            sent[i] = len(out.logprobs)
            yield sse({**base, "choices": [{"index": i, "delta": {"content": out.delta_text},
                                            "logprobs": lp, "finish_reason": None}], **extra})
        if out.finished:
            yield sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                            "finish_reason": out.finish_reason,
                                            "stop_reason": out.stop_reason}], **extra})


def _chat_logprobs(ctx: ServingContext, out: RequestOutput, start: int, end: int) -> dict:
    def entry(tid: int, logprob: float) -> dict:
        text = ctx.token_text(tid)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, lp in zip(out.token_ids[start:end], out.logprobs[start:end]):
        content.append({**entry(tid, lp.sampled_logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]})
    return {"content": content}


def _sse_response(events: AsyncIterator[str], group: RequestGroup) -> StreamingResponse:
    async def abort() -> None:
        # The generator's own ``finally`` aborts on a disconnect mid-stream; this
        # covers a client gone before the generator ever started.
        group.abort()

    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS,
                             background=BackgroundTask(abort))


async def _collect(group: RequestGroup, raw: Request) -> bool:
    """Collect a non-streaming group; raise the 500 if the engine failed a choice."""
    try:
        if not await group.collect(raw):
            return False
    except EngineDeadError as exc:
        raise in_flight_failure(exc) from None
    error = failure(group.finals)
    if error is not None:
        raise error
    return True
