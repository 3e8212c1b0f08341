"""Linear layers that own their tensor-parallel sharding (Megatron-LM style).

Each parameter carries a ``weight_loader(param, full_tensor[, shard_id])``
that receives the *full* checkpoint tensor (usually a lazy ``WeightSlice``
over the memory-mapped file) and copies this rank's slice, so model code
stays written as if on one device and a rank reads only its shard. At tp=1
every layer is a plain ``F.linear`` (on CPU float32, a matmul against a weight
prepacked once: ``packed_gemm``).

Column-parallel layers split the output features and need no communication;
a row-parallel layer splits the input features and sums partial products
with one all-reduce. Pairing them (QKV -> attention -> O, gate/up -> down)
costs one all-reduce per block.
"""
from __future__ import annotations

import torch
from torch import nn

from orca_serve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_reduce
from orca_serve.kernels import packed_gemm
from orca_serve.layers.activation import SiluAndMul
from orca_serve.layers.weight_slice import WeightSlice, materialize

Loaded = torch.Tensor | WeightSlice


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor parallel size {denominator}")
    return numerator // denominator


def default_weight_loader(param: nn.Parameter, loaded: Loaded) -> None:
    """Copy a whole (unsharded) tensor into ``param``, checking the shape first
    so a mismatch is reported before anything is read."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(materialize(loaded))


def _check_narrow(loaded: Loaded, dim: int, start: int, size: int, what: str) -> Loaded:
    if loaded.shape[dim] < start + size:
        raise ValueError(f"{what}: checkpoint tensor {tuple(loaded.shape)} too small on dim {dim}")
    return loaded.narrow(dim, start, size)


def _param(*shape: int, dtype: torch.dtype | None, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


class PackableLinear(nn.Module):
    """A linear layer whose weight the runner may swap for a prepacked copy
    (``packed_gemm``, CPU float32); the dense weight is then released."""

    packed_weight: packed_gemm.PackedWeight | None = None

    def pack_weight(self, cpu_ops=None, arena: packed_gemm.PanelArena | None = None) -> None:
        self._pack(self.weight, cpu_ops, arena)

    def _pack(self, weight: torch.Tensor, cpu_ops, arena: packed_gemm.PanelArena | None) -> None:
        """Hold ``weight`` (this layer's, in the layout its matmul reads) packed; release the dense one."""
        self.packed_weight = packed_gemm.PackedWeight(weight, cpu_ops, arena)
        self.register_parameter("weight", None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return packed_gemm.matmul(x, self.weight, self.packed_weight, bias)


class ColumnParallelLinear(PackableLinear):
    """y = x W^T + b with W's rows (output features) split across TP ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_features = in_features
        self.out_features = out_features
        self.out_per_rank = divide(out_features, self.tp_size)
        self.weight = _param(self.out_per_rank, in_features, dtype=dtype, loader=self.weight_loader)
        self.bias = _param(self.out_per_rank, dtype=dtype, loader=self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        size = param.shape[0]
        default_weight_loader(param, _check_narrow(loaded, 0, self.tp_rank * size, size, "column shard"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one
    matmul (e.g. gate and up of SwiGLU); each rank holds its slice of each."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype)
        for size in output_sizes:
            divide(size, self.tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: int) -> None:
        tp = self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // tp
        size = self.output_sizes[shard_id] // tp
        shard = _check_narrow(loaded, 0, self.tp_rank * size, size, f"merged shard {shard_id}")
        default_weight_loader(param.data.narrow(0, offset, size), shard)


class GateUpSiluAndMul(MergedColumnParallelLinear):
    """SwiGLU's gate and up projections in one matmul, returning silu(gate) * up
    (this rank's share of the intermediate features).

    Packed for the native kernels, the two are held interleaved 16 features
    at a time (``packed_gemm.interleave_gate_up``), so the matmul applies
    silu(gate) * up to each unit of its work while the product is in cache
    (``panel_linear_silu_mul``) instead of writing the [tokens, 2 x
    intermediate] product out and reading it back: bit for bit what the
    panel matmul and then the native ``silu_and_mul`` give. Otherwise
    (oneDNN's layout, another device or dtype, or an intermediate size per
    rank that is not a multiple of 16) it is the matmul, then ``SiluAndMul``."""

    def __init__(self, in_features: int, intermediate_size: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, [intermediate_size] * 2, bias=bias, dtype=dtype)
        self.act = SiluAndMul()
        self.fused = False  # set by pack_weight when the native matmul applies silu(gate) * up
        self.gated_bias: torch.Tensor | None = None  # the bias interleaved, for that matmul

    def pack_weight(self, cpu_ops=None, arena: packed_gemm.PanelArena | None = None) -> None:
        width = cpu_ops.panel_width if cpu_ops is not None else None
        if width is None or (self.out_per_rank // 2) % width:
            # oneDNN's layout, or an intermediate size the panels cannot pair
            # up: the plain matmul, then SiluAndMul.
            super().pack_weight(cpu_ops, arena)
            return
        self._pack(packed_gemm.interleave_gate_up(self.weight.detach(), width), cpu_ops, arena)
        if self.bias is not None:
            self.gated_bias = packed_gemm.interleave_gate_up(self.bias.detach(), width)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.packed_weight.matmul_silu_and_mul(x, self.gated_bias)
        return self.act(self.matmul(x, self.bias))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matmul, split by attention heads.

    When there are fewer KV heads than TP ranks, KV heads are replicated so
    that every rank holds the KV head its query heads attend to.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype | None = None) -> None:
        tp = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp)
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp)
            self.kv_head_start = get_tp_rank() * self.num_kv_heads
        else:
            divide(tp, num_kv_heads)
            self.num_kv_heads = 1
            self.kv_head_start = get_tp_rank() // (tp // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias=bias, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: str) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, start = self.kv_size, self.kv_head_start * self.head_dim
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        shard = _check_narrow(loaded, 0, start, size, f"qkv shard {shard_id}")
        default_weight_loader(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(PackableLinear):
    """y = x W^T + b with W's columns (input features) split across TP ranks.

    The input arrives already split (output of a column-parallel layer); the
    partial products are summed by one all-reduce, then the bias is added once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_features = in_features
        self.out_features = out_features
        self.in_per_rank = divide(in_features, self.tp_size)
        self.weight = _param(out_features, self.in_per_rank, dtype=dtype, loader=self.weight_loader)
        self.bias = _param(out_features, dtype=dtype, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: Loaded) -> None:
        size = param.shape[1]
        default_weight_loader(param, _check_narrow(loaded, 1, self.tp_rank * size, size, "row shard"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        y = tp_all_reduce(self.matmul(x, None))
        return y + self.bias if self.bias is not None else y
