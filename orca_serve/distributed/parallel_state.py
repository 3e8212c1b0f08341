"""This process's place in the tensor- and pipeline-parallel grid.

Defaults describe a single process (tp=1, pp=1), where every collective is a
no-op, so layers can call them unconditionally and model code never branches
on the parallel layout. A worker calls ``init_worker_distributed`` (or a test
``set_parallel_state``) once per process before the model is built.

Ranks are laid out TP-major, ``rank = pp_rank * tp_size + tp_rank``: a
stage's TP peers have neighbouring ranks, so with one stage per node the
all-reduces stay inside a node and only stage-to-stage sends cross nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object = None  # torch.distributed ProcessGroup of this rank's TP peers

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank


_state = ParallelState()
# Stage-to-stage sends still on the wire: (work, tensor), the tensor kept alive until sent.
_pending_sends: list = []


def set_parallel_state(tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0,
                       pp_size: int = 1, tp_group=None) -> None:
    """Record this process's ranks; call before building a model."""
    global _state
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"bad parallel ranks: tp {tp_rank}/{tp_size}, pp {pp_rank}/{pp_size}")
    if tp_size > 1 and tp_group is None and not dist.is_initialized():
        raise ValueError("tp_size > 1 needs torch.distributed initialized or a tp_group")
    _state = ParallelState(tp_rank, tp_size, pp_rank, pp_size, tp_group)


def init_worker_distributed(rank: int, tp_size: int, pp_size: int, store, backend: str,
                            timeout_s: float) -> None:
    """Join the workers' process group through ``store`` and build the TP groups.

    ``timeout_s`` bounds every collective and receive: a peer that hangs makes
    the others fail instead of waiting forever.
    """
    world_size = tp_size * pp_size
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    tp_group = None
    for stage in range(pp_size):  # every rank must create every group, in the same order
        group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)),
                               timeout=timedelta(seconds=timeout_s))
        if stage == rank // tp_size:
            tp_group = group
    set_parallel_state(rank % tp_size, tp_size, rank // tp_size, pp_size, tp_group)


def destroy_worker_distributed() -> None:
    global _state
    for work, _ in _pending_sends:
        work.wait()
    _pending_sends.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = ParallelState()


def get_parallel_state() -> ParallelState:
    return _state


def get_tp_rank() -> int:
    return _state.tp_rank


def get_tp_size() -> int:
    return _state.tp_size


def get_pp_rank() -> int:
    return _state.pp_rank


def get_pp_size() -> int:
    return _state.pp_size


def is_first_stage() -> bool:
    return _state.pp_rank == 0


def is_last_stage() -> bool:
    return _state.pp_rank == _state.pp_size - 1


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of the layers stage ``pp_rank`` holds.

    Layers that do not divide evenly go to the stages before the last one,
    since the last stage already carries the LM head (as vLLM does).
    """
    if num_layers < pp_size:
        raise ValueError(f"{num_layers} layers cannot be split into {pp_size} pipeline stages")
    sizes = [num_layers // pp_size] * pp_size
    for i in range(num_layers % pp_size):
        sizes[-2 - i if pp_size > 1 else 0] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def stage_layer_range(num_layers: int) -> tuple[int, int]:
    """The layers this process's stage holds."""
    return pp_layer_range(num_layers, _state.pp_rank, _state.pp_size)


def min_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """Each of ``values`` at its smallest over the worker ranks, in one
    collective that every rank calls; the values themselves outside a worker group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.tolist()


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP group, in place; returns ``x`` untouched at tp=1."""
    if _state.tp_size == 1:
        return x
    dist.all_reduce(x, group=_state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each TP rank's ``x`` along ``dim`` in rank order."""
    if _state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=_state.tp_group)
    return torch.cat(parts, dim=dim)


def pp_send_next(x: torch.Tensor) -> None:
    """Send this stage's output to the same TP rank of the next stage, without
    waiting: this stage moves on to the next batch while the tensor travels."""
    while _pending_sends and _pending_sends[0][0].is_completed():
        _pending_sends.pop(0)
    x = x.contiguous()
    _pending_sends.append((dist.isend(x, _state.rank + _state.tp_size), x))


def pp_recv_prev(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Receive the previous stage's output (its shape is known from the batch)."""
    buf = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(buf, _state.rank - _state.tp_size)
    return buf
