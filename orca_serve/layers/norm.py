"""RMSNorm and LayerNorm over the last dimension.

RMSNorm follows HF transformers' order of operations exactly (normalize in
float32, cast back, then scale) so that greedy outputs match it token for token.
On CPU in float32 the runner binds the native kernel (``cpu_ops``), which does
the same arithmetic in one pass over the row, with the residual add before
the norm in that pass too (``add_and_norm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.cpu_ops = None  # native kernels, bound by the model runner when they apply

    def _native(self, x: torch.Tensor) -> bool:
        """Whether the native kernel takes x: bound, and rows of x contiguous."""
        return self.cpu_ops is not None and x.dim() == 2 and x.stride(-1) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):
            out = torch.empty_like(x)
            self.cpu_ops.rms_norm(out, x, self.weight, self.eps)
            return out
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, this norm of it): a pre-norm block's residual add and
        the next norm, in one pass with the native kernel."""
        if self._native(x) and self._native(residual) and x.shape == residual.shape:
            total, out = torch.empty_like(x), torch.empty_like(x)
            self.cpu_ops.add_rms_norm(out, total, x, residual, self.weight, self.eps)
            return total, out
        total = x + residual
        return total, self(total)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
