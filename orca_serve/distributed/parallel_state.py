"""This process's place in the tensor- and pipeline-parallel grid.

Defaults describe a single process (tp=1, pp=1), where every collective is a
no-op, so layers can call them unconditionally and model code never branches
on the parallel layout. A distributed launcher calls ``set_parallel_state``
once per process before the model is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object = None  # torch.distributed ProcessGroup of this rank's TP peers


_state = ParallelState()


def set_parallel_state(tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0,
                       pp_size: int = 1, tp_group=None) -> None:
    """Record this process's ranks; call before building a model."""
    global _state
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"bad parallel ranks: tp {tp_rank}/{tp_size}, pp {pp_rank}/{pp_size}")
    if tp_size > 1 and tp_group is None and not dist.is_initialized():
        raise ValueError("tp_size > 1 needs torch.distributed initialized or a tp_group")
    _state = ParallelState(tp_rank, tp_size, pp_rank, pp_size, tp_group)


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
