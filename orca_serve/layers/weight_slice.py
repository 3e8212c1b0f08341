"""A checkpoint tensor that is read only where a rank needs it.

``WeightSlice`` wraps a lazily indexable source (a safetensors ``get_slice``
handle over a memory-mapped file) and supports the few views weight loaders
and routers take: ``narrow``, ``[a:b]`` on the first dimension, ``t()`` and
``chunk``. Nothing is read until ``load()``, which copies just the selected
rows/columns. So a tensor-parallel rank copies its shard out of the mapped
file and never materializes the full tensor.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class WeightSlice:
    def __init__(self, source, shape: tuple[int, ...], on_read: Callable[[int], None] | None = None,
                 _ranges: list[tuple[int, int]] | None = None, _transposed: bool = False) -> None:
        """``source[tuple_of_slices]`` must return a tensor; ``on_read(nbytes)`` counts reads."""
        self._source = source
        self._stored = tuple(shape)  # shape as stored in the checkpoint
        self._ranges = _ranges or [(0, n) for n in self._stored]
        self._transposed = _transposed
        self._on_read = on_read

    @property
    def shape(self) -> torch.Size:
        dims = [e - s for s, e in self._ranges]
        return torch.Size(dims[::-1] if self._transposed else dims)

    def dim(self) -> int:
        return len(self._stored)

    def _stored_dim(self, dim: int) -> int:
        dim = dim % len(self._stored)
        return len(self._stored) - 1 - dim if self._transposed else dim

    def narrow(self, dim: int, start: int, length: int) -> "WeightSlice":
        d = self._stored_dim(dim)
        lo, hi = self._ranges[d]
        if start < 0 or length < 0 or lo + start + length > hi:
            raise ValueError(f"narrow({dim}, {start}, {length}) is outside shape {tuple(self.shape)}")
        ranges = list(self._ranges)
        ranges[d] = (lo + start, lo + start + length)
        return WeightSlice(self._source, self._stored, self._on_read, ranges, self._transposed)

    def __getitem__(self, key: slice) -> "WeightSlice":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a WeightSlice supports only [start:stop] on its first dimension")
        start, stop, _ = key.indices(self.shape[0])
        return self.narrow(0, start, max(0, stop - start))

    def t(self) -> "WeightSlice":
        if len(self._stored) != 2:
            raise ValueError("t() needs a 2-D tensor")
        return WeightSlice(self._source, self._stored, self._on_read, list(self._ranges), not self._transposed)

    def chunk(self, chunks: int, dim: int = 0) -> list["WeightSlice"]:
        size = self.shape[dim]
        if size % chunks:
            raise ValueError(f"dimension {dim} of size {size} does not split into {chunks} equal chunks")
        step = size // chunks
        return [self.narrow(dim, i * step, step) for i in range(chunks)]

    def load(self) -> torch.Tensor:
        """Read the selected region (a copy out of the mapped file)."""
        tensor = self._source[tuple(slice(s, e) for s, e in self._ranges)]
        if self._on_read is not None:
            self._on_read(tensor.numel() * tensor.element_size())
        return tensor.t() if self._transposed else tensor


def materialize(loaded: torch.Tensor | WeightSlice) -> torch.Tensor:
    """The tensor a weight loader copies from: read a WeightSlice, pass a tensor through."""
    return loaded.load() if isinstance(loaded, WeightSlice) else loaded
