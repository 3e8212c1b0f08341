"""What machine a result came from, so that results from different CPUs are
never compared as if they were one machine's.

This project's CI kind has moved between CPUs under the same name (Zen 3
with AVX2 only, Zen 4 with AVX-512). Peers that run their matmuls through
oneDNN take its AVX-512 kernels only where the CPU has them, so the same
peer's figures moved 55-75% with the CPU while ours moved 25-38%: a ratio
taken across CPUs measures the machines as much as the servers."""
from __future__ import annotations

import os
import platform

# The vector extensions that decide which matmul kernels oneDNN and ours take.
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """The CPU's model and vector extensions, from the first processor's
    block of ``/proc/cpuinfo``; elsewhere only what ``platform`` knows."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if not line.strip():
                    break  # every processor's block says the same of the model
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {"model_name": platform.processor() or platform.machine()}
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name"), "family": fields.get("cpu family"),
            "model": fields.get("model"), "vector_isa": [f for f in _VECTOR_FLAGS if f in flags]}


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "cpu": cpu_info()}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return info


def describe(cpu: dict) -> str:
    """One line for a ``cpu_info`` dict, e.g. "AMD EPYC (family 25, model 1; avx2, fma)"."""
    isa = ", ".join(cpu.get("vector_isa") or []) or "no listed vector extensions"
    if cpu.get("family") is None:
        return f"{cpu.get('model_name')} ({isa})"
    return f"{cpu.get('model_name')} (family {cpu['family']}, model {cpu.get('model')}; {isa})"


def cpus_of(results: dict[str, dict]) -> dict[str, dict]:
    """Each result file's CPU, for the files that recorded one (results from
    before this was recorded have none)."""
    return {path: data["machine"]["cpu"] for path, data in results.items()
            if isinstance(data.get("machine"), dict) and isinstance(data["machine"].get("cpu"), dict)}


def mixed_cpus_warning(cpus: dict[str, dict]) -> str | None:
    """A warning naming the CPUs when the results came from more than one, else None."""
    distinct: dict[str, list[str]] = {}
    for path, cpu in cpus.items():
        distinct.setdefault(describe(cpu), []).append(path)
    if len(distinct) < 2:
        return None
    listed = "; ".join(f"{d}: {', '.join(paths)}" for d, paths in distinct.items())
    return (f"WARNING: these results come from {len(distinct)} different CPUs ({listed}); "
            f"ratios between them compare the machines as well as the systems")
