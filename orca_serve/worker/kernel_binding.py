"""Binding the native CPU kernels (``orca_serve.kernels``) to a model's layers.

The layers keep their PyTorch code for every case the kernels do not cover;
the runner calls ``bind_cpu_kernels`` once, on the model it loaded.
"""
from __future__ import annotations

import torch

from orca_serve.kernels import cpu_ops_for, packed_gemm, packed_gemm_for, paged_attention_kernel
from orca_serve.kernels.huge_pages import release_free_heap
from orca_serve.layers.attention import Attention


def bind_cpu_kernels(model: torch.nn.Module, layers: list[Attention], mode: str, device: torch.device,
                     dtype: torch.dtype) -> bool:
    """Give ``model`` the native kernels that ``mode`` (``ModelConfig.cpu_kernels``)
    allows and that built: the attention ``layers`` the paged attention op, the
    norms, activations and RoPE that have a native version the module, and the
    linear layers prepacked weights; then a model that can run its layers as
    one native call (``bind_native_stack``) does. Whether the attention layers
    took the op."""
    cpu_ops = cpu_ops_for(mode, device, dtype)
    attention_kernel = paged_attention_kernel(mode, cpu_ops, layers[0].head_dim)
    for layer in layers:
        layer.attention_kernel = attention_kernel
    for module in model.modules():
        if hasattr(module, "cpu_ops"):
            module.cpu_ops = cpu_ops
    if packed_gemm_for(mode, device, dtype, cpu_ops):
        packable = [m for m in model.modules() if hasattr(m, "pack_weight")]
        # Shapes only: a list of the weights would keep each dense one alive
        # after its layer releases it for the packed copy.
        arena = (packed_gemm.PanelArena([tuple(m.weight.shape) for m in packable], cpu_ops)
                 if cpu_ops is not None else None)
        for module in packable:
            module.pack_weight(cpu_ops, arena)
            if arena is not None:
                # The dense weight just released sits in the allocator's heap,
                # which the arena (a mapping of its own) cannot reuse. Handed
                # back, the load peaks at the dense weights plus what is packed
                # so far: SmolLM2's runner peaked at 3.22 GB RSS this way,
                # 3.45 GB without (3.26 GB before the arena).
                release_free_heap()
    # Without the attention op a model's layers cannot run as one native
    # call; asked anyway, so that binding again clears a stack bound before.
    for module in model.modules():
        if hasattr(module, "bind_native_stack"):
            module.bind_native_stack(cpu_ops if attention_kernel is not None else None)
    return attention_kernel is not None
