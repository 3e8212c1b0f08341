"""The kernel build cache (orca_serve/kernels/build_cache.py): a build
directory is held while a process builds or loads there, and a build killed
midway leaves nothing later loads wait on."""
import contextlib
import fcntl
import subprocess
import sys
from pathlib import Path

import pytest

from orca_serve.kernels import build_cache
from orca_serve.kernels.build_cache import BUILD_FLOCK


@contextlib.contextmanager
def child(script: str, path: Path):
    """Run ``script`` (``path`` is its sys.argv[1]) until it prints "ready"; kill it on leaving."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield
    finally:
        proc.kill()
        proc.wait()


def test_a_build_killed_midway_leaves_no_lock_later_loads_wait_on(tmp_path):
    """torch marks a build in progress with a ``lock`` file; a process killed
    mid-build (a server stopped during its first start) left it, and every
    later start waited on it forever. The build directory is held with a
    flock, which dies with its holder; the file it left is then cleared."""
    builder = ("import sys, time; from pathlib import Path; from orca_serve.kernels import build_cache\n"
               "d = Path(sys.argv[1]); held = build_cache.one_build_at_a_time(d); held.__enter__()\n"
               "(d / 'lock').touch(); print('ready', flush=True); time.sleep(60)")
    with child(builder, tmp_path):
        with open(tmp_path / BUILD_FLOCK) as other:  # nobody else may build there meanwhile
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert (tmp_path / "lock").exists()
    with build_cache.one_build_at_a_time(tmp_path):
        assert not (tmp_path / "lock").exists()
