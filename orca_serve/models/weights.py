"""Reading checkpoint tensors and routing them into model parameters.

Tensors are read one at a time from memory-mapped safetensors files, so peak
memory stays near one tensor above the model itself and a tensor-parallel
weight loader can keep just its slice.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from orca_serve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, default_weight_loader

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


def iter_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every safetensors file of a HF directory."""
    files = safetensors_files(directory)
    total = sum(os.path.getsize(f) for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights",
              disable=total < _PROGRESS_BYTES, leave=False) as bar:
        for path in files:
            try:
                handle = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"corrupt or truncated safetensors file {path}: {e}") from e
            with handle as f:
                for name in f.keys():
                    try:
                        tensor = f.get_tensor(name)
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"cannot read tensor {name!r} from {path}: {e}") from e
                    bar.update(tensor.numel() * tensor.element_size())
                    yield name, tensor


def _expected_shards(param: nn.Parameter) -> set:
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    if isinstance(owner, QKVParallelLinear):
        return {"q", "k", "v"}
    if isinstance(owner, MergedColumnParallelLinear):
        return set(range(len(owner.output_sizes)))
    return {None}


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], route: Router) -> None:
    """Copy checkpoint tensors into ``model`` through each parameter's weight_loader.

    Raises ValueError on an unknown tensor, a shape mismatch, or a parameter
    (or a shard of a fused one) that the checkpoint never provided.
    """
    params = dict(model.named_parameters())
    loaded: dict[str, set] = {name: set() for name in params}
    for ckpt_name, tensor in weights:
        for name, shard, value in route(ckpt_name, tensor):
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
    """Random weights without a checkpoint: N(0, std) matrices, unit norm scales, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            if param.device.type == "cpu":
                param.data.normal_(0.0, std, generator=gen)
            else:
                param.data.copy_(torch.empty(param.shape).normal_(0.0, std, generator=gen))
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.fill_(1.0)
