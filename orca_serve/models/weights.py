"""Reading checkpoint tensors and routing them into model parameters.

Safetensors files are memory-mapped and each tensor is handed out as a lazy
``WeightSlice``: a weight loader narrows it to this rank's shard and only
that region is copied out of the file. So a tensor- or pipeline-parallel
rank reads about its share of the checkpoint and never holds the full model;
tensors of layers on other pipeline stages are skipped unread.
"""
from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from orca_serve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, default_weight_loader
from orca_serve.layers.weight_slice import WeightSlice
from orca_serve.models.stages import missing_prefixes

# Show a progress bar only for checkpoints big enough to take noticeable time.
_PROGRESS_BYTES = 64 << 20

# A router maps one checkpoint tensor to (parameter name, shard id or None, tensor) targets;
# an empty list skips the tensor.
Router = Callable[[str, torch.Tensor], list[tuple[str, object, torch.Tensor]]]


def safetensors_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors files in model directory {directory}")
    return files


@dataclass
class LoadStats:
    """What one process read from the checkpoint (a parallel rank: its shard)."""

    bytes_read: int = 0

    def add(self, nbytes: int) -> None:
        self.bytes_read += nbytes


class _CheckedSlice:
    """A safetensors slice handle whose read errors name the tensor and file."""

    def __init__(self, handle, name: str, path: str) -> None:
        self.handle, self.name, self.path = handle, name, path

    def __getitem__(self, key):
        try:
            return self.handle[key]
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read tensor {self.name!r} from {self.path}: {e}") from e


def iter_safetensors(directory: str, stats: LoadStats | None = None) -> Iterator[tuple[str, WeightSlice]]:
    """Yield (name, lazy slice) for every tensor of a HF directory's safetensors
    files. A slice is valid until the next item is requested (its file stays
    mapped only that long), which is how ``load_params`` consumes them."""
    files = safetensors_files(directory)
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights",
              disable=total < _PROGRESS_BYTES, leave=False) as bar:
        def on_read(nbytes: int) -> None:
            bar.update(nbytes)
            if stats is not None:
                stats.add(nbytes)

        for path in files:
            try:
                handle = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"corrupt or truncated safetensors file {path}: {e}") from e
            with handle as f:
                for name in f.keys():
                    try:
                        piece = f.get_slice(name)
                        shape = tuple(piece.get_shape())
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from e
                    yield name, WeightSlice(_CheckedSlice(piece, name, path), shape, on_read)


def _expected_shards(param: nn.Parameter) -> set:
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    if isinstance(owner, QKVParallelLinear):
        return {"q", "k", "v"}
    if isinstance(owner, MergedColumnParallelLinear):
        return set(range(len(owner.output_sizes)))
    return {None}


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | WeightSlice]],
                route: Router) -> None:
    """Copy checkpoint tensors into ``model`` through each parameter's weight_loader.

    Tensors of modules another pipeline stage holds are skipped. Raises
    ValueError on an unknown tensor, a shape mismatch, or a parameter (or a
    shard of a fused one) that the checkpoint never provided.
    """
    params = dict(model.named_parameters())
    elsewhere = missing_prefixes(model)
    loaded: dict[str, set] = {name: set() for name in params}
    for ckpt_name, tensor in weights:
        for name, shard, value in route(ckpt_name, tensor):
            if elsewhere and name.startswith(elsewhere):
                continue
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {ckpt_name!r} matches no model parameter")
            loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                loader(param, value) if shard is None else loader(param, value, shard)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {ckpt_name!r}: {e}") from e
            loaded[name].add(shard)
    missing = sorted(n for n, p in params.items() if not _expected_shards(p) <= loaded[n])
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing tensors for: {shown}")


def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights without a checkpoint: N(0, std) matrices, unit norm scales, zero biases.

    Each parameter draws from its own generator seeded by (seed, name), so a
    parameter every tensor-parallel rank replicates gets the same values on
    each. (Sharded ones are random per rank: dummy outputs depend on the layout.)
    """
    gen = torch.Generator()
    for name, param in model.named_parameters():
        # Within torch's 64-bit seeds whatever the seed (the same value as before for seeds below ~1.8e13).
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0xFFFF_FFFF_FFFF_FFFF)
        if param.dim() >= 2:
            if param.device.type == "cpu":
                param.data.normal_(0.0, std, generator=gen)
            else:
                param.data.copy_(torch.empty(param.shape).normal_(0.0, std, generator=gen))
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.fill_(1.0)
