"""The kernel build cache: one directory per build, held while a process builds there.

Each build lives in its own directory of the cache (``orca_cpu_ops_<digest>``,
see ``build_name``). A process holds a ``flock`` on the directory's
``BUILD_FLOCK`` file while it builds or loads there (``one_build_at_a_time``).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

BUILD_FLOCK = "orca_build.flock"  # in the build directory: held while a process builds there


@contextlib.contextmanager
def one_build_at_a_time(build_dir: Path):
    """Hold the build directory against every other process of ours.

    torch serializes builds with a file it creates and deletes (``lock``); a
    process killed mid-build (a server stopped during its first start) leaves
    it, and every later load waits for it forever, silently. A ``flock`` is
    released by the kernel when its holder dies, and while we hold it no
    other process of ours is building here, so a ``lock`` file found then is
    such a leftover."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / BUILD_FLOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a kernel build that did not finish", stale)
            stale.unlink(missing_ok=True)
        yield
