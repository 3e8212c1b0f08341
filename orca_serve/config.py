"""Engine configuration: frozen dataclasses, validated once in __post_init__.

CLI flags map to these fields by name (``--max-num-seqs`` -> ``max_num_seqs``),
see ``entrypoints/cli.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

KV_ALLOCATION_MODES = ("paged", "reserve")
PREEMPTION_MODES = ("recompute", "swap")
SCHEDULING_POLICIES = ("fcfs", "priority", "slo", "request-level")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # HF directory, .gguf file, or None for the embedded default
    dtype: str = "float32"
    load_format: str = "auto"  # auto | dummy
    # With load_format="dummy": a named preset (see models/registry.py) or a HF config dict.
    dummy_config: str | dict | None = None
    max_model_len: int | None = None  # None: the model's context length
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("load_format", self.load_format, ("auto", "dummy"))
        _positive("max_model_len", self.max_model_len, allow_none=True)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Exact pool size in blocks; None: size from kv_cache_memory_gb.
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 2.0
    kv_allocation: str = "paged"
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"
    swap_space_gb: float = 4.0

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _positive("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not self.swap_space_gb >= 0:
            raise ValueError(f"swap_space_gb must be >= 0, got {self.swap_space_gb}")
        _choice("kv_allocation", self.kv_allocation, KV_ALLOCATION_MODES)
        _choice("preemption_mode", self.preemption_mode, PREEMPTION_MODES)


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

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_waiting_requests", self.max_waiting_requests, allow_none=True)
        _positive("max_batch_size", self.max_batch_size)
        _choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        _choice("slo_admission", self.slo_admission, ("reject", "best-effort"))
        if self.max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

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
