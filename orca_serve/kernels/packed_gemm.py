"""Matmuls against weights prepacked once into oneDNN's blocked layout (CPU, float32).

``F.linear`` on CPU packs the weight matrix into the GEMM's panel layout
inside every call. A decode iteration reads each weight once, from DRAM (the layers
together are far larger than the cache), and at tens of rows that per-call
packing dominates: on this project's 2-core machine, with 30 layers' weights
cycling as in a real step, the SmolLM2 projections ran at 75-90 GFLOP/s
through ``F.linear`` and 105-125 GFLOP/s prepacked at 110 rows, and the LM head
at 80 vs 135 (33 vs 85 at 16 rows); at 2048 rows both are within noise.

The runner decides (``ModelConfig.cpu_kernels``, see ``orca_serve.kernels``);
layers own how their weight is packed (``pack_weight``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unavailable_reason(device, dtype) -> str | None:
    """Why prepacked oneDNN matmuls cannot run here, or None when they can."""
    if torch.device(device).type != "cpu":
        return f"they run on CPU only (device is {device})"
    if dtype != torch.float32:
        return f"they take float32 only (dtype is {dtype})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return "this torch build lacks mkldnn._reorder_linear_weight/_linear_pointwise"
    return None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A prepacked copy of a dense [out_features, in_features] float32 weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias with W prepacked by ``pack``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def matmul(x: torch.Tensor, weight: torch.Tensor | None, packed: torch.Tensor | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias by the packed copy of W when there is one, else ``F.linear``."""
    return linear(x, packed, bias) if packed is not None else F.linear(x, weight, bias)


def packed_bytes(packed: torch.Tensor) -> int:
    return packed.numel() * packed.element_size()
