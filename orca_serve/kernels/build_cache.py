"""The kernel build cache: one directory per build, held while in use, old ones removed.

Each build lives in its own directory of the cache (``orca_cpu_ops_<digest>``,
see ``build_name``), and every distinct torch version, flag set, source
content and source path makes a new one (~1.5 MB of objects). A process
holds a ``flock`` on the directory's ``BUILD_FLOCK`` file while it builds or
loads there (``one_build_at_a_time``) and marks the file's mtime then, so
that mtime is the build's last use. After a new build, ``remove_stale``
removes the siblings no process has used for ``STALE_AFTER_S``, or that were
built on this host from sources that are gone (a deleted checkout), skipping
any whose flock another process holds.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

BUILD_FLOCK = "orca_build.flock"  # held while a process builds or loads in the directory; mtime: last use
SOURCES_RECORD = "orca_sources.json"  # which host built it, from which sources directory
STALE_AFTER_S = 30 * 24 * 3600.0
# What build_name makes; anything else in the cache is not ours to touch.
_BUILD_DIR = re.compile(r"orca_cpu_ops_[0-9a-f]{12}")


def _still_linked(handle, path: Path) -> bool:
    """Whether the file ``handle`` has open is still the one at ``path`` (not
    removed meanwhile). Links are followed, as the ``open`` that made
    ``handle`` followed them: else a flock file that is a link would never
    match, and the caller would retry forever."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def one_build_at_a_time(build_dir: Path):
    """Hold the build directory against every other process of ours.

    torch serializes builds with a file it creates and deletes (``lock``); a
    process killed mid-build (a server stopped during its first start) leaves
    it, and every later load waits for it forever, silently. A ``flock`` is
    released by the kernel when its holder dies, and while we hold it no
    other process of ours is building here, so a ``lock`` file found then is
    such a leftover. A directory ``remove_stale`` removed while we waited
    for it is made again."""
    flock_path = build_dir / BUILD_FLOCK
    while True:
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(flock_path, "a")
        except FileNotFoundError:  # removed between the mkdir and the open
            continue
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if not _still_linked(handle, flock_path):
                continue  # we waited on a removal, and hold the removed directory's file
            os.utime(handle.fileno())  # the last use remove_stale reads
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("removing %s, left by a kernel build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
            return


def record_sources(build_dir: Path, sources: Path) -> None:
    """Note in a new build which host built it from which sources (read by ``remove_stale``)."""
    record = dict(host=socket.gethostname(), sources=str(sources.resolve()))
    try:
        (build_dir / SOURCES_RECORD).write_text(json.dumps(record))
    except OSError as exc:  # the build itself is fine; it is then judged by age only
        logger.warning("cannot record the sources of the kernel build %s: %s", build_dir, exc)


def remove_stale(cache: Path, keep: str, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Remove the builds in ``cache`` (other than ``keep``) that are stale and
    that no process holds; returns their names. Only directories named as
    ``build_name`` names them and holding a ``BUILD_FLOCK`` are builds; other
    entries, and symlinks, are left alone. Errors are logged, never raised:
    a cache that cannot be tidied must not fail a build."""
    try:
        with os.scandir(cache) as entries:
            names = [e.name for e in entries
                     if e.name != keep and _BUILD_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError as exc:
        logger.warning("cannot list the kernel cache %s to remove old builds: %s", cache, exc)
        return []
    removed = []
    for name in names:
        try:
            why = _remove_if_stale(cache / name, stale_after_s)
        except OSError as exc:
            logger.warning("cannot remove the old kernel build %s: %s", cache / name, exc)
            continue
        if why:
            logger.info("removed the kernel build %s: %s", cache / name, why)
            removed.append(name)
    return removed


def _remove_if_stale(build_dir: Path, stale_after_s: float) -> str | None:
    """Remove ``build_dir`` if it is stale and free; returns why, or None if it stays."""
    # O_NOFOLLOW: a name swapped for a symlink since the listing is refused, not followed.
    try:
        dir_fd = os.open(build_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    try:
        try:
            handle = os.fdopen(os.open(BUILD_FLOCK, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd))
        except FileNotFoundError:
            return None  # no flock file: not a build of ours
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # a process builds or loads there
            if not _still_linked(handle, build_dir / BUILD_FLOCK):
                return None  # another process removed it first
            why = _why_stale(dir_fd, os.fstat(handle.fileno()).st_mtime, stale_after_s)
            if why is None:
                return None
            # Everything but the flock file first: a process that opens it now
            # waits on our lock, and then sees it removed and starts afresh.
            with os.scandir(dir_fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(build_dir / entry.name)
                    elif entry.name != BUILD_FLOCK:
                        os.unlink(entry.name, dir_fd=dir_fd)
            os.unlink(BUILD_FLOCK, dir_fd=dir_fd)
            try:  # still holding the lock, so a process waiting on it finds no directory
                os.rmdir(build_dir)
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                # A process opened a new flock file since the unlink: it builds there, afresh.
        return why
    finally:
        os.close(dir_fd)


def _why_stale(dir_fd: int, last_use: float, stale_after_s: float) -> str | None:
    idle_s = time.time() - last_use
    if idle_s > stale_after_s:
        return f"unused for {idle_s / 86400:.0f} days"
    try:
        with os.fdopen(os.open(SOURCES_RECORD, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None  # made before builds recorded their sources, or never finished: judged by age only
    if not isinstance(record, dict):
        return None
    # Another host's build (a cache on a shared home) names paths of that host.
    sources = record.get("sources")
    if record.get("host") == socket.gethostname() and isinstance(sources, str) and not os.path.exists(sources):
        return f"its sources {sources} are gone"
    return None
