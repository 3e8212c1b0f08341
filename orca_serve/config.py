"""Engine configuration: frozen dataclasses, validated once in __post_init__.

CLI flags map to these fields by name (``--max-num-seqs`` -> ``max_num_seqs``),
see ``entrypoints/cli.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from orca_serve.sampling_params import is_finite_number
from orca_serve.shown import shown

KV_ALLOCATION_MODES = ("paged", "reserve")
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority", "slo", "fair", "request-level")
DTYPES = ("float32", "bfloat16", "float16", "auto")
PARALLEL_MODES = ("manual", "auto")
CPU_KERNEL_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")
# The KV pool's budget per device where none is given and the device's free
# memory does not size it (a CPU: see worker/kv_sizing.py).
DEFAULT_KV_CACHE_MEMORY_GB = 2.0


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {shown(value)}")


def _number(name: str, value, low: float, *, strict: bool, allow_none: bool = False) -> None:
    """A finite real number above ``low`` (``strict``) or at least ``low``; NaN,
    infinities, booleans and strings are refused."""
    if value is None and allow_none:
        return
    if not is_finite_number(value) or not (value > low if strict else value >= low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}"
                         f"{' or None' if allow_none else ''}, got {shown(value)}")


def _int_in(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {shown(value)}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {shown(value)}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {shown(value)}")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # HF directory, .gguf file, or None for the embedded default
    dtype: str = "float32"
    load_format: str = "auto"  # auto | dummy
    # With load_format="dummy": a named preset (see models/registry.py) or a HF config dict.
    dummy_config: str | dict | None = None
    max_model_len: int | None = None  # None: the model's context length
    seed: int = 0
    # Native CPU kernels (orca_serve/kernels, compiled once on first use):
    # "auto" uses them when they build and apply (CPU, float32), "on" demands
    # them (an error says why not), "off" keeps the pure PyTorch path.
    cpu_kernels: str = "auto"
    # Where the model runs: "auto" takes a CUDA GPU when torch sees one (each
    # worker of a tensor/pipeline-parallel group its node-local rank's GPU),
    # else the CPU; "cuda" demands a GPU (an error at start-up says why not).
    device: str = "auto"
    # Decode iterations replayed from captured CUDA graphs (worker/decode_graphs.py);
    # needs the model on a GPU, one rank (no tensor/pipeline parallelism).
    cuda_graphs: bool = False
    # Decode attention on a GPU by the Triton paged kernel (kernels/triton_decode.py),
    # which reads K/V in place instead of gathering them for SDPA: "auto" uses it when
    # Triton imports and the kernel passes its start-up check, "on" demands it, "off"
    # keeps the gather.
    triton_decode: str = "auto"

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("cpu_kernels", self.cpu_kernels, CPU_KERNEL_MODES)
        _choice("triton_decode", self.triton_decode, CPU_KERNEL_MODES)
        _choice("load_format", self.load_format, ("auto", "dummy"))
        # An empty path is not "the default model" (None is): it loaded that silently.
        if self.model is not None and (not isinstance(self.model, (str, os.PathLike)) or not str(self.model).strip()):
            raise ValueError(f"model must be a path (a HF directory or a .gguf file) or None for the embedded "
                             f"default, got {shown(self.model)}")
        if self.dummy_config is not None:
            if not isinstance(self.dummy_config, (str, dict)):
                raise ValueError(f"dummy_config must be a preset name, a config.json path or a config dict, "
                                 f"got {shown(self.dummy_config)}")
            if self.load_format != "dummy":  # it would be ignored: the checkpoint's weights would load
                raise ValueError(f"dummy_config needs load_format='dummy' (--load-format dummy); "
                                 f"load_format is {self.load_format!r}")
        # Every prompt has a token and must leave room for one more.
        if self.max_model_len is not None and (isinstance(self.max_model_len, bool)
                                               or not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2 (a prompt token and a generated one), "
                             f"got {shown(self.max_model_len)}")
        # torch's generators take seeds in [0, 2**64).
        _int_in("seed", self.seed, 0, 2**64 - 1)
        _flag("cuda_graphs", self.cuda_graphs)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Exact pool size in blocks; None: sized from kv_cache_memory_gb, or on a GPU
    # from gpu_memory_utilization (worker/kv_sizing.py).
    num_kv_blocks: int | None = None
    # KV memory per device: with tensor/pipeline parallelism each rank holds its
    # layers' and heads' share of every block, so the same budget buys more blocks.
    # None: on a GPU what gpu_memory_utilization leaves, on a CPU 2 GiB.
    kv_cache_memory_gb: float | None = None
    # On a GPU with no fixed pool: the share of the device's memory this engine
    # may fill (weights, activations and the KV pool together).
    gpu_memory_utilization: float = 0.9
    kv_allocation: str = "paged"
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"
    swap_space_gb: float = 4.0

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _positive("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _number("kv_cache_memory_gb", self.kv_cache_memory_gb, 0, strict=True, allow_none=True)
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {shown(u)}")
        _number("swap_space_gb", self.swap_space_gb, 0, strict=False)
        _flag("enable_prefix_caching", self.enable_prefix_caching)
        _choice("kv_allocation", self.kv_allocation, KV_ALLOCATION_MODES)
        _choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)

    def kv_sized_from_memory(self, on_gpu: bool) -> bool:
        """Whether the KV pool takes what the GPU's memory leaves
        (``worker/kv_sizing.py``): on a GPU, with neither a size nor a budget given."""
        return on_gpu and self.num_kv_blocks is None and self.kv_cache_memory_gb is None

    @property
    def kv_budget_gb(self) -> float:
        """The KV pool's memory per rank when it is not sized from a GPU's:
        the budget given, else the default (the CPU's)."""
        return DEFAULT_KV_CACHE_MEMORY_GB if self.kv_cache_memory_gb is None else self.kv_cache_memory_gb


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    scheduling_policy: str = "fcfs"
    # Bound on the waiting queue (None: unbounded, for offline use).
    max_waiting_requests: int | None = None
    # request-level baseline (Triton-style dynamic batcher): batch size and queue delay.
    max_batch_size: int = 16
    max_queue_delay_s: float = 0.01
    # slo policy: what to do with a request whose TTFT cannot be met.
    slo_admission: str = "best-effort"
    default_ttft_slo_s: float | None = None
    default_tpot_slo_s: float | None = None
    # Schedule and prepare iteration i+1 while iteration i runs on the device,
    # the sampled tokens passed on there (scheduler.py). Pays on a GPU, where
    # the host's work per iteration can then hide behind the device's; on a
    # CPU the model runs in the engine's thread, so every token comes one
    # iteration later. One rank only.
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_waiting_requests", self.max_waiting_requests, allow_none=True)
        _positive("max_batch_size", self.max_batch_size)
        _choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        _choice("slo_admission", self.slo_admission, ("reject", "best-effort"))
        # Finite: with an infinite delay a batch that never fills would wait forever.
        _number("max_queue_delay_s", self.max_queue_delay_s, 0, strict=False)
        _number("default_ttft_slo_s", self.default_ttft_slo_s, 0, strict=True, allow_none=True)
        _number("default_tpot_slo_s", self.default_tpot_slo_s, 0, strict=True, allow_none=True)
        _flag("async_scheduling", self.async_scheduling)


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over worker processes (see docs/architecture.md,
    "Distributed execution"). Ranks are laid out TP-major: rank = pp_rank * T +
    tp_rank, so a stage's TP peers are neighbours (on one node) and stages
    span nodes."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "auto": pick T and P from model size, device memory and device count at start-up.
    parallel: str = "manual"
    # Batches the engine keeps in the pipeline; None: one per stage (Orca). 1 turns overlap off.
    max_inflight_batches: int | None = None
    # A batch that takes longer than this to come back (or a peer that stops
    # answering a collective) counts as a hung worker: the engine fails and stops.
    worker_timeout_s: float = 60.0
    # Multi-node rendezvous (torchrun-style); the driver (engine) runs on node 0.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: any free port (single node only)

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)
        _choice("parallel", self.parallel, PARALLEL_MODES)
        if self.parallel == "auto" and self.world_size > 1:  # the plan would silently replace them
            raise ValueError(f"parallel='auto' chooses tensor_parallel_size and pipeline_parallel_size itself; "
                             f"got {shown(self.tensor_parallel_size)} and {shown(self.pipeline_parallel_size)} "
                             f"(leave them at 1, or use parallel='manual')")
        _positive("max_inflight_batches", self.max_inflight_batches, allow_none=True)
        _positive("nnodes", self.nnodes)
        if self.master_port is not None:
            _int_in("master_port", self.master_port, 1, 65535)
        if not isinstance(self.master_addr, str) or not self.master_addr.strip():
            raise ValueError(f"master_addr must be a host name or IP address, got {shown(self.master_addr)}")
        _number("worker_timeout_s", self.worker_timeout_s, 0, strict=True)
        if isinstance(self.node_rank, bool) or not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={shown(self.nnodes)}), got {shown(self.node_rank)}")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("master_port is required when nnodes > 1")
        if self.parallel == "manual" and self.world_size % self.nnodes:
            raise ValueError(f"world size {shown(self.world_size)} (tensor x pipeline parallel) is not divisible "
                             f"by nnodes {shown(self.nnodes)}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def inflight_batches(self) -> int:
        return self.max_inflight_batches or self.pipeline_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        for name in ("cuda_graphs", "triton_decode"):
            if getattr(self.model, name) in (True, "on") and self.model.device == "cpu":
                raise ValueError(f"{name} needs the model on a CUDA GPU, but device is 'cpu'")
        if self.scheduler.async_scheduling and self.parallel.world_size > 1:
            raise ValueError(f"async_scheduling runs on one rank only; tensor x pipeline parallel size is "
                             f"{shown(self.parallel.world_size)}")
        if self.model.cuda_graphs and self.parallel.world_size > 1:
            raise ValueError(f"cuda_graphs runs on one rank only; tensor x pipeline parallel size is "
                             f"{shown(self.parallel.world_size)}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments (LLM(...) and CLI flags), by field name."""
        parts = {}
        for name, sub in (("model", ModelConfig), ("cache", CacheConfig),
                          ("scheduler", SchedulerConfig), ("parallel", ParallelConfig)):
            names = {f.name for f in fields(sub)}
            parts[name] = sub(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise ValueError(f"unknown engine argument(s): {', '.join(sorted(kwargs))}")
        return cls(**parts)
