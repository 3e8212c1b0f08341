"""Matmuls against weights prepacked once (CPU, float32): the native kernels'
16-feature panels when they are built, oneDNN's blocked layout otherwise.

``F.linear`` on CPU packs the weight matrix into the GEMM's panel layout
inside every call. A decode iteration reads each weight once, from DRAM (the layers
together are far larger than the cache), and at tens of rows that per-call
packing dominates: on this project's 2-core machine, with 30 layers' weights
cycling as in a real step, the SmolLM2 projections ran at 75-90 GFLOP/s
through ``F.linear`` and 105-125 GFLOP/s prepacked at 110 rows, and the LM head
at 80 vs 135 (33 vs 85 at 16 rows); at 2048 rows both are within noise.

When the native kernels are built, each weight is repacked once into panels
for ``cpu_ops.panel_linear``, which serves every batch size: decode-sized
batches stream whole panels (1.2-1.7x oneDNN's prepacked GEMM from 4 to 96
rows with the weights cycling from DRAM), prefill-sized ones run cache-blocked
over K slices (on the 128-request trace, its prefill iterations took 60-65 s
against 67-72 s with oneDNN's). Without the module (no compiler), oneDNN's
prepacked layout serves instead. Either way each weight is held once.

The panels of all the layers go into one ``PanelArena``, a mapping on 2 MiB
pages (``huge_pages``): a decode-sized step streams them all from DRAM, and on
4 KiB pages it paid a TLB miss every 4 KiB.

The runner decides (``ModelConfig.cpu_kernels``, see ``orca_serve.kernels``);
layers own how their weight is packed (``pack_weight``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from orca_serve.kernels.huge_pages import empty_on_huge_pages


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


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's prepacked copy of a dense [out_features, in_features] float32 weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear_onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias with W prepacked by ``pack_onednn``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PanelArena:
    """One region (on huge pages where the OS gives them) that holds the
    panels of the given weight shapes ([out_features, in_features] each),
    handed out by ``take`` one after another, each weight's panels on a
    64-byte cache line."""

    ALIGN = 16  # floats

    def __init__(self, shapes: list[tuple[int, int]], cpu_ops) -> None:
        self.panel_width = cpu_ops.panel_width
        sizes = [self._aligned(math.prod(self.panels_shape(n, k))) for n, k in shapes]
        self.buffer = empty_on_huge_pages(sum(sizes), torch.float32)
        self.used = 0

    def _aligned(self, numel: int) -> int:
        return -(-numel // self.ALIGN) * self.ALIGN

    def panels_shape(self, out_features: int, in_features: int) -> tuple[int, int, int]:
        return (-(-out_features // self.panel_width), in_features, self.panel_width)

    def take(self, out_features: int, in_features: int) -> torch.Tensor:
        """The next unused stretch, shaped as one [N, K] weight's panels."""
        shape = self.panels_shape(out_features, in_features)
        numel = math.prod(shape)
        if self.used + numel > self.buffer.numel():
            raise ValueError(f"the panel arena has {self.buffer.numel() - self.used} floats left, "
                             f"a [{out_features}, {in_features}] weight needs {numel}")
        out = self.buffer[self.used:self.used + numel].view(shape)
        self.used += self._aligned(numel)
        return out


class PackedWeight:
    """One weight in the one layout its matmuls read: the native kernels'
    panels when ``cpu_ops`` (the built module) is given, in ``arena`` when one
    is given, else oneDNN's."""

    def __init__(self, weight: torch.Tensor, cpu_ops=None, arena: PanelArena | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        # What this weight is in the checkpoint, whatever layout it is held in.
        self.checkpoint_bytes = weight.numel() * weight.element_size()
        self.cpu_ops = cpu_ops
        self.panels = None
        if cpu_ops is not None:
            out = arena.take(*weight.shape) if arena is not None else None
            self.panels = cpu_ops.pack_panels(weight.detach(), out)
        self.onednn = pack_onednn(weight) if cpu_ops is None else None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.panels is None:
            return linear_onednn(x, self.onednn, bias)
        return self._native(self.cpu_ops.panel_linear, x, bias, self.out_features)

    def matmul_silu_and_mul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """silu(gate) * up of a merged gate/up weight packed as
        ``interleave_gate_up(W)`` (bias interleaved the same way), in one
        native call (``cpu_ops.panel_linear_silu_mul``)."""
        return self._native(self.cpu_ops.panel_linear_silu_mul, x, bias, self.out_features // 2)

    def _native(self, op, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        rows = x.numel() // self.in_features
        x2 = x.reshape(rows, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = x2.new_empty(rows, out_features)
        op(out, x2, self.panels, bias)
        return out.view(*x.shape[:-1], out_features)


def interleave_gate_up(t: torch.Tensor, width: int) -> torch.Tensor:
    """[gate; up] (a merged weight's rows, or its bias) -> their rows
    alternating ``width`` at a time: gate 0..w-1, up 0..w-1, gate w..2w-1, ...
    Packed into panels of ``width`` features, each gate panel is followed by
    the up panel of the same features, as ``panel_linear_silu_mul`` reads them."""
    half = t.shape[0] // 2
    if t.shape[0] % 2 or half % width:
        raise ValueError(f"gate/up of {t.shape[0]} rows cannot be interleaved {width} at a time")
    return t.reshape(2, half // width, width, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def matmul(x: torch.Tensor, weight: torch.Tensor | None, packed: PackedWeight | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + bias by the packed copy of W when there is one, else ``F.linear``."""
    return packed.matmul(x, bias) if packed is not None else F.linear(x, weight, bias)
