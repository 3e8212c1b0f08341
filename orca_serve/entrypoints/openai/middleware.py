"""What every request to the server passes through besides its route: the
handlers that turn exceptions into OpenAI's error body, and three ASGI
middlewares (values in error messages shown in JSON's words; an unhandled
exception as a 500 logged once; a trailing slash routed as the path without
it)."""
from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from orca_serve.entrypoints.openai.protocol import ApiError, bad_request
from orca_serve.shown import json_values

logger = logging.getLogger("orca_serve.server")


def error_response(err: ApiError) -> JSONResponse:
    """OpenAI's {"error": {...}} body with the error's status and headers."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_handlers(app: FastAPI) -> None:
    """The exception handlers and the middlewares, on ``app``."""
    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        return error_response(bad_request(str(exc.errors()[0].get("msg", exc))))

    app.add_middleware(_InternalErrorMiddleware)
    app.add_middleware(_SlashlessPath)
    app.add_middleware(_ValuesAsJSON)


class _ValuesAsJSON:
    """Error messages show the values a client sent as JSON writes them
    (``null``, ``"text"``), not as Python does: ``shown.json_values`` for the
    whole request. uvicorn runs each request in a task of its own, so the
    setting (a context variable) is that request's."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # the lifespan task is no request, and outlives them all
            await self.app(scope, receive, send)
            return
        with json_values():
            await self.app(scope, receive, send)


class _InternalErrorMiddleware:
    """An exception no handler took becomes the API's 500, logged once.

    Starlette's handler for ``Exception`` answers and then raises the exception
    again for the server to see, so uvicorn logged every such error a second
    time. This middleware sits inside Starlette's and keeps it. Once the answer
    has started (a stream) no 500 can be sent: the exception goes on, and
    uvicorn logs it and drops the connection."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception as exc:
            if started:
                raise
            logger.exception("unhandled error")
            response = error_response(ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error",
                                               code="internal_error"))
            await response(scope, receive, send)


_MODEL_PATH = "/v1/models/"


class _SlashlessPath:
    """Routes a path with a trailing slash (``POST /v1/completions/``) as the
    path without it.

    Starlette would answer 307 to the slashless path, and many clients do not
    send a POST's body again after a 307, or send it to another host behind a
    proxy. No route here differs from another by a trailing slash, so the
    slashed path can only mean the one without it. ``/v1/models/{name}`` is
    left as it is: a served model name may end in a slash, and that route
    takes the name with one more slash too."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and len(path) > 1 and path.endswith("/")
                and not (path.startswith(_MODEL_PATH) and path != _MODEL_PATH)):
            scope = {**scope, "path": path[:-1]}
        await self.app(scope, receive, send)
