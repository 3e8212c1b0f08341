"""``--parallel auto``: choose tensor (T) and pipeline (P) parallel sizes.

The Orca paper leaves the split manual. The rule here: the weights plus the
KV budget must fit every device's memory; use as few pipeline stages as
possible (each adds a hop and needs batches in flight to stay busy), then
the smallest tensor-parallel size that fits. A TP group stays inside a node,
where its per-layer all-reduces are fast, and so stages go across nodes,
where only one hidden-state send per stage and batch crosses.
``plan_parallelism`` is a pure function so made-up inventories can test it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Keep a margin of every device for activations, the allocator and the runtime.
MEMORY_UTILIZATION = 0.9
GiB = 2**30


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    memory_bytes: int
    node: int = 0


def valid_tp_sizes(num_heads: int, num_kv_heads: int, limit: int) -> list[int]:
    """TP sizes that split the attention heads evenly (KV heads split or replicated)."""
    return [t for t in range(1, limit + 1)
            if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]


def plan_parallelism(model_bytes: int, kv_bytes_per_token: int, kv_tokens: int, devices: list[DeviceInfo], *,
                     num_heads: int, num_kv_heads: int, num_layers: int,
                     memory_utilization: float = MEMORY_UTILIZATION) -> tuple[int, int, str]:
    """Pick (T, P, reason) for a model of ``model_bytes`` whose KV pool must hold ``kv_tokens`` tokens.

    The devices may span several nodes (``DeviceInfo.node``); a multi-node
    launch uses every node, with the same number of ranks on each and whole
    TP groups per node. Raises ValueError when nothing fits.
    """
    if not devices:
        raise ValueError("parallel auto: no devices")
    nodes = sorted({d.node for d in devices})
    per_node = min(sum(1 for d in devices if d.node == n) for n in nodes)
    usable = memory_utilization * min(d.memory_bytes for d in devices)
    kv_total = kv_bytes_per_token * kv_tokens
    options = []
    for t in valid_tp_sizes(num_heads, num_kv_heads, per_node):
        for p in range(1, num_layers + 1):
            world = t * p
            ranks_per_node, rest = divmod(world, len(nodes))
            if ranks_per_node > per_node:
                break
            if rest or ranks_per_node % t:
                continue
            # Pipeline stages split weights and KV; TP splits KV only down to one head per rank.
            need = model_bytes / world + kv_total / (p * min(t, num_kv_heads))
            if need <= usable:
                options.append((p, t, need))
    if not options:
        total = memory_utilization * sum(d.memory_bytes for d in devices)
        raise ValueError(f"parallel auto: the model ({model_bytes / GiB:.1f} GiB) plus KV for {kv_tokens} tokens "
                         f"({kv_total / GiB:.1f} GiB) does not fit {len(devices)} device(s) "
                         f"({total / GiB:.1f} GiB usable in all: {memory_utilization:g} of each)")
    p, t, need = min(options)
    world = t * p
    reason = (f"parallel auto: T={t} P={p} on {world} of {len(devices)} devices ({len(nodes)} node(s) x "
              f"{per_node} x {usable / memory_utilization / GiB:.1f} GiB): weights "
              f"{model_bytes / world / GiB:.2f} GiB + KV {(need - model_bytes / world) / GiB:.2f} GiB "
              f"per device <= {usable / GiB:.1f} GiB usable; fewest stages, then smallest TP that fits "
              f"(heads {num_heads}, KV heads {num_kv_heads}); TP inside a node, PP across nodes")
    return t, p, reason


def local_devices(nnodes: int = 1) -> list[DeviceInfo]:
    """This node's accelerators (or its host memory on CPU), assumed the same on every node."""
    import torch

    if torch.cuda.is_available():
        local = [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                 for i in range(torch.cuda.device_count())]
    else:
        # CPU ranks share one host memory: more ranks never give more room.
        local = [("cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]
    return [DeviceInfo(name, mem, node) for node in range(nnodes) for name, mem in local]


def check_parallel(config, facts) -> None:
    """Refuse, before any worker starts, T and P that the model's shapes or this
    node's GPUs cannot take (a worker would fail while building its part)."""
    p = config.parallel
    t, pp = p.tensor_parallel_size, p.pipeline_parallel_size
    valid = valid_tp_sizes(facts.num_heads, facts.num_kv_heads, facts.num_heads)
    if t not in valid:
        raise ValueError(f"tensor_parallel_size {t} does not split the model's attention heads ({facts.num_heads} "
                         f"heads, {facts.num_kv_heads} KV heads); it may be {', '.join(map(str, valid))}")
    if facts.intermediate_size and facts.intermediate_size % t:
        raise ValueError(f"tensor_parallel_size {t} does not divide the model's MLP width {facts.intermediate_size}")
    if pp > facts.num_layers:
        raise ValueError(f"pipeline_parallel_size {pp} exceeds the model's {facts.num_layers} layers "
                         f"(one stage needs at least one)")
    import torch

    per_node = p.world_size // p.nnodes
    if config.model.device != "cpu" and torch.cuda.is_available() and per_node > torch.cuda.device_count():
        raise ValueError(f"tensor x pipeline parallel size {p.world_size} puts {per_node} ranks on each node, one "
                         f"per GPU, but torch sees {torch.cuda.device_count()} GPU(s) here; lower "
                         f"--tensor-parallel-size or --pipeline-parallel-size, or use --device cpu")


def resolve_parallel(config, facts, devices: list[DeviceInfo] | None = None):
    """The engine config with T and P chosen when ``parallel="auto"`` (else
    unchanged, once ``check_parallel`` has found T and P possible)."""
    p = config.parallel
    if p.parallel != "auto":
        check_parallel(config, facts)
        return config
    dtype_bytes = facts.dtype.itemsize
    per_token = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * dtype_bytes
    cache = config.cache
    devices = devices or local_devices(p.nnodes)
    # A pool sized from GPU memory takes what the weights leave of the share the
    # operator allows: the plan leaves room for one sequence of the model's full
    # length, within that share. A fixed pool is planned as it is, and does not
    # read the share.
    from_memory = cache.kv_sized_from_memory(on_gpu=any(d.name != "cpu" for d in devices))
    budget = 0 if from_memory else cache.kv_budget_gb
    kv_tokens = (cache.num_kv_blocks * cache.block_size if cache.num_kv_blocks
                 else max(facts.max_model_len, int(budget * GiB) // per_token))
    utilization = cache.gpu_memory_utilization if from_memory else MEMORY_UTILIZATION
    t, pp, reason = plan_parallelism(facts.num_params * dtype_bytes, per_token, kv_tokens,
                                     devices, num_heads=facts.num_heads, num_kv_heads=facts.num_kv_heads,
                                     num_layers=facts.num_layers, memory_utilization=utilization)
    logger.info(reason)
    chosen = dataclasses.replace(p, tensor_parallel_size=t, pipeline_parallel_size=pp, parallel="manual")
    config = dataclasses.replace(config, parallel=chosen)
    check_parallel(config, facts)  # the plan reads heads and layers, not the MLP's width
    return config
