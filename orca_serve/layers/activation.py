"""Activation functions by HF config name, and SwiGLU's fused silu(gate) * up."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """Input is [gate | up] from one merged projection; returns silu(gate) * up."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_ops = None  # native kernels, bound by the model runner when they apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_ops is not None and x.dim() == 2 and x.stride(-1) == 1:
            out = x.new_empty(x.shape[0], x.shape[1] // 2)
            self.cpu_ops.silu_and_mul(out, x)
            return out
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh approximation, written as HF writes it so results match bit for bit.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTIVATIONS = {
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def get_act_fn(name: str):
    """The activation function for a HF ``hidden_act``/``activation_function`` name."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation function {name!r}; "
                         f"supported: {', '.join(sorted(_ACTIVATIONS))}") from None
