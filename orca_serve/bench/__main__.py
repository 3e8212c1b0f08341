"""``python -m orca_serve.bench ...`` == ``orca-serve bench ...``."""
from __future__ import annotations

import sys

from orca_serve.entrypoints.cli import main


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Leading global flags stay in front; everything else belongs to "bench".
    head = argv[:2] if argv[:1] == ["--log-level"] else []
    return main(head + ["bench"] + argv[len(head):])


if __name__ == "__main__":
    sys.exit(run())
