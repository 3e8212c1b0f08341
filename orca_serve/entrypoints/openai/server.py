"""OpenAI-compatible HTTP server (FastAPI on uvicorn).

Entry point for ``orca-serve serve`` (and ``python -m orca_serve.entrypoints.openai.server``)::

    run_server(engine_config, host, port, api_key, max_body_bytes, log_level,
               served_model_name=None, *, request_log_level="info", shutdown_timeout_s=10.0)

builds the engine (failing fast on a bad model; the waiting queue is bounded
at DEFAULT_MAX_WAITING_REQUESTS unless the config bounds it), serves until SIGINT/SIGTERM,
then shuts down gracefully and returns (exit status 0): new connections are
refused, in-flight requests are aborted and answered with finish_reason
"abort", and the whole shutdown is bounded by ``shutdown_timeout_s``.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health (503 once the engine is dead or shutting down), GET /metrics
(Prometheus); each GET route answers HEAD too, and a path with a trailing
slash is served as the path without it. With ``api_key`` set, /v1/* needs
``Authorization: Bearer KEY``. Every error is OpenAI's {"error": {"message",
"type", "param", "code"}}: an unknown model is a 404, a body past
``max_body_bytes`` a 413.
"""
from __future__ import annotations

import argparse
import dataclasses
import hmac
import logging
import signal
import sys
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from orca_serve.config import EngineConfig
from orca_serve.distributed.launch import listen_error
from orca_serve.engine.async_engine import AsyncLLMEngine
from orca_serve.entrypoints.openai.args import DEFAULT_MAX_BODY_BYTES, add_server_args, api_key_problem
from orca_serve.entrypoints.openai.body import decode_json
from orca_serve.entrypoints.openai.handlers import (
    CLIENT_CLOSED, ServingContext, create_chat_completion, create_completion)
from orca_serve.entrypoints.openai.metrics import ServerMetrics
from orca_serve.entrypoints.openai.middleware import error_response, install_handlers
from orca_serve.entrypoints.openai.protocol import (
    ApiError, ChatCompletionRequest, CompletionRequest, parse_request)
from orca_serve.entrypoints.openai.serving import TokenText
from orca_serve.shown import shown

logger = logging.getLogger("orca_serve.server")

# A server never queues without bound: past this many waiting requests new ones
# get 503 + Retry-After (unless --max-waiting-requests says otherwise).
DEFAULT_MAX_WAITING_REQUESTS = 1024

# Every read-only route answers HEAD as GET, without the body: load balancers'
# health checks and `curl -I` use HEAD (FastAPI, unlike Starlette, does not add it).
_GET_AND_HEAD = ["GET", "HEAD"]


def build_app(engine: AsyncLLMEngine, *, served_model_name: str | None = None, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, request_log_level: str = "info") -> FastAPI:
    """The FastAPI app over a running engine; also wires the engine's metrics observer."""
    if api_key is not None and (why := api_key_problem(api_key)):  # not only the CLI's: every caller's key
        raise ValueError(f"api_key {why}")
    model_name = served_model_name or engine.model_name
    metrics = ServerMetrics(model_name, logging.getLevelName(request_log_level.upper()))
    engine.set_observer(metrics)
    ctx = ServingContext(engine, model_name, TokenText(engine.tokenizer))
    created = int(time.time())
    # No 307 to the path without a trailing slash: middleware.py routes the slashed path as that one.
    @asynccontextmanager
    async def lifespan(_):
        metrics.serving_started()  # on the event loop's thread: its CPU counts from here
        yield

    app = FastAPI(title="orca-serve", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False,
                  lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    async def authorize(raw: Request) -> None:  # async: sync dependencies hop to a thread pool
        if api_key is None:
            return
        header = raw.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(raw: Request):
        declared = raw.headers.get("content-length", "")
        # ASCII digits only: headers decode as latin-1, where "²" is a digit to
        # isdigit() but not to int() (a 500). A header that is no number is
        # ignored, as a missing one is: the body below is counted as it comes.
        if declared.isascii() and declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large(max_body_bytes, int(declared))
        body, size = [], 0
        try:
            async for chunk in raw.stream():
                size += len(chunk)
                if size > max_body_bytes:  # no Content-Length (chunked): stop reading here
                    raise _too_large(max_body_bytes)
                body.append(chunk)
        except ClientDisconnect:  # nobody to answer; not a server error
            raise ApiError(CLIENT_CLOSED, "the client closed the connection before its request body arrived",
                           code="client_closed") from None
        return decode_json(b"".join(body))

    def check_model(name: str | None) -> None:
        # An empty name asks for the served model, as an absent one does (vLLM
        # reads it so too): clients that fill the field from an unset setting send "".
        if name and name != model_name:
            raise _model_not_found(name, model_name)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.post("/completions")
    async def completions(raw: Request) -> Response:
        arrival = time.monotonic()  # the scheduler's clock: queue time includes our own overhead
        req = parse_request(CompletionRequest, await read_json(raw))
        check_model(req.model)
        return await create_completion(ctx, req, raw, arrival)

    @v1.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        arrival = time.monotonic()
        req = parse_request(ChatCompletionRequest, await read_json(raw))
        check_model(req.model)
        return await create_chat_completion(ctx, req, raw, arrival)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "orca-serve",
                "max_model_len": engine.max_model_len}

    @v1.api_route("/models", methods=_GET_AND_HEAD)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.api_route("/models/{name:path}", methods=_GET_AND_HEAD)
    async def model(name: str) -> dict:
        # The slash middleware leaves this path as sent: a name may end in "/".
        if name not in (model_name, model_name + "/"):
            raise _model_not_found(name, model_name)
        return model_card()

    app.include_router(v1)

    @app.api_route("/health", methods=_GET_AND_HEAD)
    async def health() -> Response:
        if engine.is_accepting:
            return JSONResponse({"status": "ok"})
        status = "engine is dead" if not engine.is_healthy else "shutting down"
        return error_response(ApiError(503, status, type="server_error", code="unavailable"))

    @app.api_route("/metrics", methods=_GET_AND_HEAD)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    install_handlers(app)
    return app


def _model_not_found(name: str, served: str) -> ApiError:
    # 404 as OpenAI and vLLM answer it: their clients raise NotFoundError on it,
    # and a 400 read as a malformed request rather than a wrong model name.
    return ApiError(404, f"the model {shown(name)} does not exist; this server serves {shown(served)} "
                         "(see GET /v1/models)", param="model", code="model_not_found")


def _too_large(limit: int, size: int | None = None) -> ApiError:
    """413 for a body past ``limit``: its size when declared (Content-Length),
    else only that it went past the limit (a chunked body is not read to its end)."""
    what = f"is {size} bytes; the limit is" if size is not None else "exceeds the limit of"
    return ApiError(413, f"request body {what} {limit} bytes (--max-body-bytes)", param="body",
                    code="body_too_large")


class _GracefulServer(uvicorn.Server):
    """uvicorn that aborts in-flight requests when asked to stop, and exits 0.

    uvicorn re-raises a caught SIGINT/SIGTERM once it has shut down, which
    would turn a clean shutdown into a non-zero exit; ``handle_exit`` here
    records the request to stop without that.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for connections
        else:
            self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        logger.info("shutting down: aborting in-flight requests")
        self.engine.begin_shutdown()
        await super().shutdown(sockets)


def run_server(engine_config: EngineConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "warning",
               served_model_name: str | None = None, *, request_log_level: str = "info",
               shutdown_timeout_s: float = 10.0) -> None:
    """Build the engine, serve until SIGINT/SIGTERM, shut down within ``shutdown_timeout_s``."""
    why = listen_error(host, port)  # now, not after the model has loaded
    if why:
        raise ValueError(f"cannot listen on --host {host} --port {port}: {why}")
    if api_key is not None and (why := api_key_problem(api_key)):
        raise ValueError(f"api_key {why}")
    if engine_config.scheduler.max_waiting_requests is None:
        engine_config = dataclasses.replace(engine_config, scheduler=dataclasses.replace(
            engine_config.scheduler, max_waiting_requests=DEFAULT_MAX_WAITING_REQUESTS))
    engine = AsyncLLMEngine.from_config(engine_config)
    try:
        app = build_app(engine, served_model_name=served_model_name, api_key=api_key,
                        max_body_bytes=max_body_bytes, request_log_level=request_log_level)
        # loop/http "auto": uvloop and httptools, dependencies of ours, where they
        # import. With them the event loop thread took 0.62-0.80 s of CPU over the
        # 128-request trace against 0.85-1.12 s with asyncio's loop and h11 (the same
        # client; five and four runs on the 2-core Xeon).
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), loop="auto", http="auto",
                                access_log=log_level.lower() == "debug",
                                timeout_graceful_shutdown=max(1, int(shutdown_timeout_s)))
        server = _GracefulServer(config, engine)
        logger.info("serving %s on http://%s:%d", served_model_name or engine.model_name, host, port)
        server.run()
    finally:
        engine.shutdown(timeout=shutdown_timeout_s)


def main(argv: list[str] | None = None) -> int:
    from orca_serve.entrypoints.cli import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser(description="orca-serve OpenAI-compatible server")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_server_args(parser)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_server(engine_config_from_args(args), args.host, args.port, args.api_key, args.max_body_bytes,
                   args.log_level, args.served_model_name, request_log_level=args.request_log_level,
                   shutdown_timeout_s=args.shutdown_timeout_s)
    except (ValueError, FileNotFoundError) as exc:  # a bad setting: one line, as orca-serve says it
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
