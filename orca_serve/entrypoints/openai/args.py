"""The HTTP server's own command-line flags, apart from the server so that the
``orca-serve`` parser (and ``bench`` on a machine without the HTTP packages,
such as a GPU image) builds without importing FastAPI or uvicorn."""
from __future__ import annotations

import argparse

DEFAULT_MAX_BODY_BYTES = 1 << 20


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server's own flags (engine flags come from cli.add_engine_args)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--request-log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="level of the one-line-per-finished-request log")
    parser.add_argument("--shutdown-timeout-s", type=float, default=10.0)
