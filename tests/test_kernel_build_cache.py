"""The kernel build cache (orca_serve/kernels/build_cache.py): a build
directory is held while a process builds or loads there, a build killed
midway leaves nothing later loads wait on, and a new build removes exactly
the stale builds of ours that no process holds."""
import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from orca_serve import kernels
from orca_serve.kernels import build_cache
from orca_serve.kernels.build_cache import BUILD_FLOCK

DAY_S = 86400.0


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


def make_build(cache: Path, i: int, idle_days: float = 0.0, sources: Path | None = None, host: str | None = None):
    """A build directory as ``_build`` leaves it, last used ``idle_days`` ago;
    ``sources`` None: made before builds recorded their sources."""
    name = f"orca_cpu_ops_{i:012x}"
    build_dir = cache / name
    build_dir.mkdir(parents=True)
    (build_dir / f"{name}.so").write_bytes(b"\0" * 64)
    if sources is not None:
        record = dict(host=host or socket.gethostname(), sources=str(sources))
        (build_dir / build_cache.SOURCES_RECORD).write_text(json.dumps(record))
    last_use = time.time() - idle_days * DAY_S
    (build_dir / BUILD_FLOCK).touch()
    os.utime(build_dir / BUILD_FLOCK, (last_use, last_use))
    return name


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


def test_a_new_build_removes_only_stale_builds_of_ours_no_process_holds(tmp_path, monkeypatch, caplog):
    """Every torch version, flag set, source content and checkout made a new
    build directory and none was ever removed. A new build now removes those
    unused for 30 days and those built here from sources that are gone; not
    one a process holds, another host's, anything not named and marked as a
    build of ours, nor what a symlink points to. A load of an existing build
    removes nothing."""
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    checkout = tmp_path / "checkout" / "csrc"
    checkout.mkdir(parents=True)
    deleted = tmp_path / "deleted-checkout" / "csrc"
    unused = make_build(cache, 1, idle_days=31, sources=checkout)
    sources_gone = make_build(cache, 2, sources=deleted)
    unused_unrecorded = make_build(cache, 3, idle_days=31)
    recent = make_build(cache, 4, idle_days=29, sources=checkout)
    recent_unrecorded = make_build(cache, 5, idle_days=29)
    other_host = make_build(cache, 6, sources=deleted, host="another-host")
    held = make_build(cache, 7, idle_days=31, sources=deleted)
    unmarked = make_build(cache, 8, idle_days=31, sources=deleted)
    (cache / unmarked / BUILD_FLOCK).unlink()  # named like a build, but nothing of ours made it
    (cache / "notes").mkdir()
    os.utime(cache / "notes", (0, 0))
    (cache / "orca_cpu_ops_00000000000a").write_text("a file, not a build")
    target = make_build(elsewhere, 11, idle_days=31, sources=deleted)
    (cache / "orca_cpu_ops_00000000000b").symlink_to(elsewhere / target)

    loads = []

    def fake_load(name, sources, build_directory, **kwargs):  # a build that takes no minute
        loads.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return "module"

    monkeypatch.setenv("ORCA_SERVE_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    holder = ("import fcntl, sys, time\nf = open(sys.argv[1])\nfcntl.flock(f, fcntl.LOCK_EX)\n"
              "print('ready', flush=True)\ntime.sleep(60)")
    with caplog.at_level(logging.INFO, logger=build_cache.__name__), child(holder, cache / held / BUILD_FLOCK):
        assert kernels._build(kernels.cpu_isa()) == ("module", None)
    new = loads[0]
    kept = {new, recent, recent_unrecorded, other_host, held, unmarked, "notes", "orca_cpu_ops_00000000000a",
            "orca_cpu_ops_00000000000b"}
    assert set(os.listdir(cache)) == kept
    assert sorted(os.listdir(elsewhere / target)) == sorted([BUILD_FLOCK, build_cache.SOURCES_RECORD, f"{target}.so"])
    record = json.loads((cache / new / build_cache.SOURCES_RECORD).read_text())
    assert record == dict(host=socket.gethostname(), sources=str(kernels._SOURCES.resolve()))
    removed = {r.getMessage() for r in caplog.records if r.getMessage().startswith("removed the kernel build")}
    assert removed == {f"removed the kernel build {cache / unused}: unused for 31 days",
                       f"removed the kernel build {cache / unused_unrecorded}: unused for 31 days",
                       f"removed the kernel build {cache / sources_gone}: its sources {deleted} are gone"}

    later = make_build(cache, 12, idle_days=31, sources=deleted)
    assert kernels._build(kernels.cpu_isa()) == ("module", None)
    assert loads == [new, new] and (cache / later).exists()


def test_a_process_waiting_on_a_build_being_removed_makes_it_again(tmp_path):
    """``remove_stale`` removes a build while holding its flock. A process
    that opened the flock file just before, and waited, must not go on in the
    removed directory (torch would fail there), but hold a new one."""
    build_dir = tmp_path / make_build(tmp_path, 1, idle_days=31)
    outcome = []

    def load():
        try:
            with build_cache.one_build_at_a_time(build_dir):
                with open(build_dir / BUILD_FLOCK) as probe:  # the flock file there must be the one held
                    with pytest.raises(BlockingIOError):
                        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            outcome.append("held the directory at its path")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome.append(repr(exc))

    with open(build_dir / BUILD_FLOCK) as remover:
        fcntl.flock(remover, fcntl.LOCK_EX)
        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(0.5)  # the loader opens the flock file and waits on our lock
        for path in build_dir.iterdir():  # as remove_stale does, the flock file last
            if path.name != BUILD_FLOCK:
                path.unlink()
        (build_dir / BUILD_FLOCK).unlink()
        build_dir.rmdir()
    loader.join(10)
    assert outcome == ["held the directory at its path"]


def test_a_flock_file_that_is_a_link_is_held_not_retried_forever(tmp_path):
    """The holder checks that the flock file it locked is still the one in the
    directory; comparing without following the link it had opened through, a
    linked flock file never matched and the holder spun forever."""
    build_dir, target = tmp_path / "orca_cpu_ops_0123456789ab", tmp_path / "elsewhere.flock"
    build_dir.mkdir()
    target.touch()
    (build_dir / BUILD_FLOCK).symlink_to(target)
    entered = threading.Event()

    def hold():
        with build_cache.one_build_at_a_time(build_dir):
            entered.set()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert entered.wait(10), "one_build_at_a_time never entered"
    thread.join(10)
