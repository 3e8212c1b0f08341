"""A rank's KV memory: the device pool the attention layers read and write
in place, and the host pool that swap-mode preemption copies blocks to.

The device pool is one ``[layers, 2, num_blocks + 1, block_size, kv_heads,
head_dim]`` allocation; each attention layer is bound to its slice. The
last block is scratch space no request is given (the decode graphs' padding
rows write there). Everything here is per rank: under tensor/pipeline
parallelism a rank holds its stage's layers and its share of the KV heads,
so a block's bytes differ between ranks while the block ids do not.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from orca_serve.kernels.huge_pages import zeros_on_huge_pages


class KVPool:
    def __init__(self, layers: list, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """``layers``: this rank's attention modules, each with a ``kv_cache`` slot."""
        self.layers = layers
        self.dtype, self.device = dtype, device
        a = layers[0]
        self._block_shape = (block_size, a.num_kv_heads, a.head_dim)
        # One block of every layer's K and V on this rank.
        self.block_bytes = len(layers) * 2 * block_size * a.num_kv_heads * a.head_dim * dtype.itemsize
        self.cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.host_cache = self._host(0)

    def allocate(self, num_blocks: int) -> None:
        """Give every layer a zeroed pool of ``num_blocks`` blocks (plus the scratch block)."""
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.release()  # the old pool (a profile run's) goes before the new one is taken
        # Zeroed, not empty: masked-out cache rows are multiplied by zero attention
        # weights, and uninitialized memory could hold NaN (0 * NaN = NaN).
        shape = (len(self.layers), 2, num_blocks + 1) + self._block_shape
        with _allocating(f"the KV pool ({num_blocks} blocks + 1 scratch", (num_blocks + 1) * self.block_bytes,
                         self.device, "--num-kv-blocks, --kv-cache-memory-gb or --block-size"):
            self.cache = zeros_on_huge_pages(shape, self.dtype, self.device)
        self.num_blocks = num_blocks
        for i, layer in enumerate(self.layers):
            layer.kv_cache = self.cache[i]

    def release(self) -> None:
        self.cache, self.num_blocks = None, 0
        for layer in self.layers:
            layer.kv_cache = None

    @property
    def nbytes(self) -> int:
        """The device pool's bytes, scratch block included."""
        return 0 if self.cache is None else self.cache.numel() * self.cache.element_size()

    # ---- swap-mode preemption ------------------------------------------
    def allocate_host(self, num_blocks: int) -> None:
        self.host_cache = self._host(num_blocks)

    @property
    def num_host_blocks(self) -> int:
        return self.host_cache.shape[2]

    def _host(self, num_blocks: int) -> torch.Tensor:
        # Pinned on a GPU's host, so swaps copy at full PCIe speed.
        with _allocating(f"the swap space ({num_blocks} blocks", num_blocks * self.block_bytes, "host",
                         "--swap-space-gb or --block-size"):
            return torch.zeros((len(self.layers), 2, num_blocks) + self._block_shape, dtype=self.dtype, device="cpu",
                               pin_memory=self.device.type == "cuda" and num_blocks > 0)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy blocks device -> host, as (host_slot, device_block) pairs."""
        host, dev = self._split(pairs)
        self.host_cache.index_copy_(2, host, self.cache.index_select(2, dev.to(self.device)).cpu())

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy blocks host -> device, as (host_slot, device_block) pairs."""
        host, dev = self._split(pairs)
        self.cache.index_copy_(2, dev.to(self.device), self.host_cache.index_select(2, host).to(self.device))

    def _split(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_host_blocks == 0:
            raise RuntimeError("swap requested but the runner has no CPU blocks (num_cpu_blocks=0)")
        host, dev = zip(*pairs)
        return torch.tensor(host, dtype=torch.int64), torch.tensor(dev, dtype=torch.int64)


@contextmanager
def _allocating(what: str, nbytes: int, where, flags: str):
    """A pool the settings made too large to allocate is the settings' error, not a crash."""
    try:
        yield
    # A size past int64 is an OverflowError or TypeError, a failed mmap an OSError;
    # any other RuntimeError than running out (a CUDA fault, a bug) is not the settings'.
    except (MemoryError, OverflowError, OSError, TypeError, torch.OutOfMemoryError) as exc:
        raise ValueError(f"cannot allocate {what} of {nbytes / 2**30:,.2f} GiB) on {where}: "
                         f"{str(exc).splitlines()[0]}; lower {flags}") from None
