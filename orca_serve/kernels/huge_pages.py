"""CPU tensors in private mappings that the kernel is asked to back with
2 MiB pages (transparent huge pages, ``madvise`` mode), 2 MiB-aligned.

Two things a CPU step reads at DRAM speed live here: the KV pool, whose
blocks a decode reads scattered, and the packed weights, which a decode-sized
batch streams whole each step. On 4 KiB pages both pay a TLB miss every few
KiB: each 12 KiB KV block of a SmolLM2 layer spans three pages. On this
project's 2-core Zen 4 machine, side by side in one process:

- the native attention, 110 decodes over 330 tokens with the blocks in random
  order, ran ~11% faster with the pool on huge pages;
- SmolLM2's 30 layers' matmuls and its LM head, cycling as in a step, took
  0.93-0.98x the time at 1 row and 0.90-0.97x at 8 rows with the panels on
  huge pages (medians of 15-41 alternated rounds, five sittings; one noisy
  sitting measured 1.12x at 1 row), and 0.98x at 64 rows, where the matmul
  is no longer bound by the weights' reads. In the engine that is ~2% of a
  decode step, under its run-to-run noise.

Each is its own mapping, not memory from the allocator, which may hand out
heap pages already faulted in small. Elsewhere (not Linux, no MADV_HUGEPAGE,
not CPU) these are plain torch tensors.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys

import torch

HUGE_PAGE = 2 << 20


def _mapping(numel: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A flat tensor over a new anonymous mapping advised for huge pages, or
    None where there is no such advice. Anonymous memory reads as zeros; a
    page is faulted in (and takes RSS) when first touched. Nothing to map for
    no elements (torch.frombuffer refuses a count of 0)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if not sys.platform.startswith("linux") or advice is None or numel == 0:
        return None
    region = mmap.mmap(-1, numel * dtype.itemsize + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(advice)
    offset = -torch.frombuffer(region, dtype=torch.uint8).data_ptr() % HUGE_PAGE
    # The tensor keeps the mapping alive.
    return torch.frombuffer(region, dtype=dtype, count=numel, offset=offset)


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, every page faulted in now rather than mid-serving (the KV pool)."""
    flat = _mapping(math.prod(shape), dtype) if device.type == "cpu" else None
    if flat is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return flat.view(shape).zero_()


def empty_on_huge_pages(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor whose pages are faulted in only as the caller writes
    them (the weight arena: packing fills it weight by weight while each dense
    weight it replaces is released and, by ``release_free_heap``, handed back,
    so the load's peak memory does not grow by the arena's size). Its contents
    are the caller's to write."""
    flat = _mapping(numel, dtype)
    return torch.empty(numel, dtype=dtype) if flat is None else flat


def release_free_heap() -> None:
    """Hand the C allocator's free memory back to the OS (glibc's
    ``malloc_trim``; nothing where there is no glibc). Freed tensors of a few
    MB stay in glibc's heap, where only later heap allocations can reuse them,
    not a mapping of our own."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
