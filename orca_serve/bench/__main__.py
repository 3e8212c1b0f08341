"""``python -m orca_serve.bench ...`` == ``orca-serve bench ...``."""
from __future__ import annotations

import argparse
import logging
import sys

from orca_serve.bench.cli import add_bench_parser


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orca_serve.bench")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_bench_parser(parser.add_subparsers(dest="command"))
    argv = sys.argv[1:] if argv is None else argv
    # Leading global flags stay in front; everything else belongs to "bench".
    head = argv[:2] if argv[:1] == ["--log-level"] else []
    args = parser.parse_args(head + ["bench"] + argv[len(head):])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"orca-serve bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
