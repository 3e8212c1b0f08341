"""The HTTP server's own command-line flags, apart from the server so that the
``orca-serve`` parser (and ``bench`` on a machine without the HTTP packages,
such as a GPU image) builds without importing FastAPI or uvicorn."""
from __future__ import annotations

import argparse

from orca_serve.entrypoints.arg_types import float_in, int_in, nonempty

DEFAULT_MAX_BODY_BYTES = 1 << 20


def api_key_problem(key: str) -> str | None:
    """Why ``key`` cannot guard the API, or None. An empty key would let every
    request in; HTTP strips spaces at a header's ends and carries ASCII, so a
    key with either could never match."""
    if not key:
        return "must not be empty (an empty key would let every request in)"
    if key != key.strip() or not key.isascii() or not key.isprintable():
        return "must be printable ASCII with no spaces at either end (a client sends it in an HTTP header)"
    return None


def api_key(text: str) -> str:
    why = api_key_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (engine flags come from cli.add_engine_args)."""
    parser.add_argument("--host", default="127.0.0.1", type=nonempty)
    parser.add_argument("--port", type=int_in(0, 65535), default=8000, help="0: any free port")
    parser.add_argument("--api-key", default=None, type=api_key, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name", default=None, type=nonempty)
    parser.add_argument("--max-body-bytes", type=int_in(1), default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--request-log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="level of the one-line-per-finished-request log")
    parser.add_argument("--shutdown-timeout-s", type=float_in(0, strict=True), default=10.0)
