"""Native CPU kernels, compiled on first use and cached.

``load()`` builds the sources in ``csrc/`` (``cpu_ops.cpp`` binds them into
one module) with torch's C++ extension tooling into
``~/.cache/orca-serve/kernels`` (``ORCA_SERVE_KERNEL_CACHE`` overrides) and
returns the module, or None when it cannot be built (no compiler, no ninja,
a failed build); the reason is kept in ``load_error()`` so callers can log it
or, when the kernels were demanded, raise it. It targets one vector
extension (``cpu_isa()``: the best of ``ISAS`` this CPU has, unless
``$ORCA_SERVE_CPU_ISA`` caps it; ``load(isa)`` builds another for
comparison). The build is keyed by the sources and headers and the flags,
which name that extension, so a cache shared by different machines never
hands one a binary it cannot run, and a
changed header is never served by an old build. It is keyed by where the
sources are too: torch's build file names them by path, so two checkouts
sharing one build directory would rebuild it in turn.

Concurrent builds from several processes are serialized by a ``flock`` on the
build directory (``build_cache.one_build_at_a_time``), which dies with its
process; torch's own lock file, which a killed build leaves behind for every
later start to wait on forever, is cleared under it. A new build removes the
cache's stale builds (``build_cache.remove_stale``: unused for 30 days, or
built here from sources that are gone), never one a process holds.

``gpu_decode_kernel`` picks the GPU's one kernel, Triton paged decode
attention (``triton_decode.py``), by ``ModelConfig.triton_decode``.

``packed_gemm`` is the other CPU fast path: matmuls against weights prepacked
once, as panels for this module's ``panel_linear`` when it built, else in
oneDNN's layout (no build needed). ``ModelConfig.cpu_kernels`` decides both
(``cpu_ops_for``, ``packed_gemm_for``).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

from orca_serve.kernels import build_cache

logger = logging.getLogger(__name__)

_SOURCES = Path(__file__).with_name("csrc")
_lock = threading.Lock()
_state: dict = {}  # "error": the last load's; "warned": whether _not_used has logged
_builds: dict[str, tuple] = {}  # ISA -> (module or None, why not)


# The vector extensions a build can target, best first: the compiler flags
# that enable each and the /proc/cpuinfo flags it needs. The inner loops are
# written for AVX2 + FMA; AVX-512 widens the matmul's and the prompt
# attention's register tiles to zmm (panel_gemm.cpp, attention_prompt.h).
# "generic" is the compiler's baseline (SSE2 on x86-64): correct and slower.
ISAS = {
    "avx512": (["-mavx2", "-mfma", "-mavx512f"], {"avx2", "fma", "avx512f"}),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
    "generic": ([], set()),
}
# Caps the build at an ISA below the CPU's best, to compare them or for a host
# whose AVX-512 runs slower than its AVX2.
ISA_ENV = "ORCA_SERVE_CPU_ISA"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))


def available_isas() -> list[str]:
    """The ISAs this CPU can run, best first (always ends with "generic")."""
    have = _cpu_flags()
    return [isa for isa, (_, needs) in ISAS.items() if needs <= have]


def cpu_isa() -> str:
    """The ISA ``load()`` builds for: ``$ORCA_SERVE_CPU_ISA`` when set, else the
    best this CPU has. ValueError for a name not in ``ISAS`` or one the CPU lacks."""
    wanted = os.environ.get(ISA_ENV)
    if not wanted:
        return available_isas()[0]
    return _runnable(wanted.strip().lower(), ISA_ENV)


def _runnable(isa: str, source: str) -> str:
    """``isa`` if this CPU can run a build for it, else a ValueError naming
    ``source`` (where the name came from) and what is wrong with it."""
    if isa not in ISAS:
        raise ValueError(f"{source} must be one of {', '.join(ISAS)}; got {isa!r}")
    if isa not in available_isas():
        missing = sorted(ISAS[isa][1] - _cpu_flags())
        raise ValueError(f"{source}={isa} but this CPU lacks {', '.join(missing)} (its ISAs: "
                         f"{', '.join(available_isas())})")
    return isa


def cache_dir() -> Path:
    root = os.environ.get("ORCA_SERVE_KERNEL_CACHE") or Path.home() / ".cache" / "orca-serve" / "kernels"
    return Path(root)


def load(isa: str | None = None):
    """The compiled kernel module for ``isa`` (default ``cpu_isa()``), or None
    if it cannot be built here; ``load_error()`` then says why. Each ISA's
    module is built (or found in the cache) and loaded once per process."""
    try:  # a build for an ISA the CPU lacks would die on its first instruction
        isa = _runnable(isa, "load's isa") if isa else cpu_isa()
    except ValueError as exc:
        _state["error"] = str(exc)
        return None
    module, _state["error"] = _load(isa)
    return module


def load_error() -> str | None:
    """Why the last ``load()`` returned None (None if it did not)."""
    return _state.get("error")


def _load(isa: str) -> tuple:
    """The module for ``isa`` (one this CPU runs) and the reason it is None,
    as one pair (another thread's load cannot come between them)."""
    with _lock:
        if isa not in _builds:
            _builds[isa] = _build(isa)
        return _builds[isa]


def build_name(sources: Path, settings: list[str]) -> str:
    """The module's name, and its build directory's: a digest of ``settings``
    (torch version, flags) and of every source and header in ``sources``.
    torch's own versioning hashes the .cpp files it is given, not the headers
    they include, so without this a changed header could be served by a
    build made before the change."""
    digest = hashlib.sha256(" ".join(settings).encode())
    for path in sorted(sources.glob("*.cpp")) + sorted(sources.glob("*.h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"orca_cpu_ops_{digest.hexdigest()[:12]}"


def _build(isa: str):
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return None, f"torch C++ extension support is unavailable: {exc}"
    arch = ISAS[isa][0]
    # -fopenmp: at::parallel_for is inline OpenMP; the extension links the
    # libgomp.so.1 torch already loaded, so there is one thread pool, not two.
    # -fno-trapping-math lets the exp/select loops vectorize (no FP exceptions are used).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", *arch]
    name = build_name(_SOURCES, [torch.__version__, str(_SOURCES.resolve()), *flags])
    build_dir = cache_dir() / name
    # torch drives the build with ninja; the pip-installed one sits next to this
    # interpreter, which is not on PATH when the venv is not activated.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), path])
    built = False
    try:
        with build_cache.one_build_at_a_time(build_dir):
            built = not (build_dir / f"{name}.so").exists()
            module = cpp_extension.load(name=name, sources=[str(p) for p in sorted(_SOURCES.glob("*.cpp"))],
                                        extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                        build_directory=str(build_dir), verbose=False)
            if built:
                build_cache.record_sources(build_dir, _SOURCES)
    except Exception as exc:  # no compiler / ninja, or a failed build
        return None, f"building the kernels in {_SOURCES} failed ({type(exc).__name__}: {str(exc).strip()[-500:]})"
    finally:
        os.environ["PATH"] = path
    if built:  # only then: a load of an existing build stays a lock and a stat
        build_cache.remove_stale(build_dir.parent, keep=name)
    logger.debug("CPU kernels loaded from %s", build_dir)
    return module, None


def cpu_ops_for(mode: str, device, dtype):
    """The native kernel module for a runner, or None for the PyTorch path.

    ``mode`` is ``ModelConfig.cpu_kernels``: "off" -> None; "auto" -> the
    module when the kernels apply (CPU, float32) and build, else None (logged
    once); "on" -> the module, or a ValueError saying why it cannot be used.
    A bad ``$ORCA_SERVE_CPU_ISA`` is a ValueError under "auto" too.
    """
    import torch

    if mode == "off":
        return None
    reason = None
    if torch.device(device).type != "cpu":
        reason = f"they run on CPU only (device is {device})"
    elif dtype != torch.float32:
        reason = f"they take float32 only (dtype is {dtype})"
    else:
        # A bad ORCA_SERVE_CPU_ISA is the operator's mistake, not a missing
        # compiler: an error in every mode, not a fall back to the slow path.
        isa = cpu_isa()
        if isa not in _builds:
            logger.info("building the native CPU kernels for %s (once per machine, about a minute) in %s",
                        isa, cache_dir())
        module, reason = _load(isa)
        if module is not None:
            return module
    _not_used(mode, reason)
    return None


def packed_gemm_for(mode: str, device, dtype, module=None) -> bool:
    """Whether a runner prepacks its linear weights (``packed_gemm``); ``mode``
    as in ``cpu_ops_for``, ``module`` what it returned. With a module the
    weights become its panels, which need nothing more; without one, oneDNN's
    layout, which needs torch's oneDNN."""
    if mode == "off":
        return False
    if module is not None:
        return True
    from orca_serve.kernels import packed_gemm

    reason = packed_gemm.unavailable_reason(device, dtype)
    if reason is None:
        return True
    _not_used(mode, f"prepacked matmuls: {reason}")
    return False


def paged_attention_kernel(mode: str, module, head_dim: int):
    """The paged attention op of ``module`` (what ``cpu_ops_for`` returned), or
    None when there is no module or it has no kernel for ``head_dim`` (an
    error under mode "on", as in ``cpu_ops_for``)."""
    if module is None:
        return None
    if not module.supports_head_dim(head_dim):
        _not_used(mode, f"head_dim {head_dim} has no compiled kernel")
        return None
    return module.paged_attention


def gpu_decode_kernel(mode: str, device, dtype, num_kv_heads: int, group: int, head_dim: int, block_size: int):
    """``triton_decode.paged_decode_attention`` for a model on a CUDA device,
    once it has compiled for these shapes and matched the PyTorch reference;
    None when ``mode`` is "off", the device is not CUDA, Triton is missing or
    the check fails (logged; under mode "on" a ValueError saying why)."""
    if mode == "off":
        return None
    if device.type != "cuda":
        reason = f"the model is on {device}, not a CUDA GPU"
    else:
        try:
            from orca_serve.kernels import triton_decode

            triton_decode.self_check(device, dtype, num_kv_heads, group, head_dim, block_size)
            return triton_decode.paged_decode_attention
        except Exception as exc:  # noqa: BLE001 - no Triton, a compile error, a wrong result: say which
            reason = f"{type(exc).__name__}: {exc}"
    if mode == "on":
        raise ValueError(f"triton_decode='on' but the Triton paged decode kernel cannot be used: {reason}")
    if device.type == "cuda":
        logger.warning("Triton paged decode kernel not used (%s); decodes gather their K/V for SDPA", reason)
    return None


def _not_used(mode: str, reason: str | None) -> None:
    if mode == "on":
        raise ValueError(f"cpu_kernels='on' but the native CPU kernels cannot be used: {reason}")
    if not _state.get("warned"):
        _state["warned"] = True
        logger.warning("native CPU kernels not used (%s); running the PyTorch path", reason)
