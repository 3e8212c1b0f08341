"""Pipeline stages in model code: each stage builds only its own modules.

A module another stage owns is a ``PPMissingLayer``: no parameters, and it
passes its input through, so ``self.norm(x)`` on a stage without the final
norm is a no-op and the model reads the same at any pipeline size.
Parameter names keep their global layer index (``layers.7...``), so
checkpoint names map unchanged and ``load_params`` simply skips tensors that
belong to missing modules.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from orca_serve.distributed.parallel_state import stage_layer_range


class PPMissingLayer(nn.Identity):
    """Placeholder for a module held by another pipeline stage."""


def make_layers(num_layers: int, build: Callable[[int], nn.Module]) -> tuple[int, int, nn.ModuleList]:
    """``(start, end, layers)``: this stage's layers ``[start, end)`` built, the rest placeholders."""
    start, end = stage_layer_range(num_layers)
    layers = nn.ModuleList(build(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return start, end, layers


def sampled_only_layer(end: int, num_layers: int, meta) -> int:
    """The layer to run on the sampled rows only (``meta.sample_rows``): the
    model's last, when this stage holds it and the rows were asked for; else -1."""
    return num_layers - 1 if meta.sample_rows is not None and end == num_layers else -1


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the modules this stage does not hold."""
    return tuple(name + "." for name, m in model.named_modules() if isinstance(m, PPMissingLayer))
