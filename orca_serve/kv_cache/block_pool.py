"""Fixed-size KV blocks: a free list, reference counts and content hashes.

Free blocks sit in an LRU-ordered free queue. A freed block that holds a full,
hashed block of tokens stays findable by its hash until it is handed out
again, so a later request with the same prefix can take it back (prefix
caching); the least recently freed cached block is evicted first.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


class OutOfBlocksError(RuntimeError):
    pass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    cached_in: int = -1  # the batch whose run fills the block, from when it is findable by its hash


def hash_block_tokens(parent_hash: bytes | None, token_ids) -> bytes:
    """Hash of a full block's tokens chained with the hash of all blocks before it."""
    h = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        h.update(parent_hash)
    h.update(b"|")
    h.update(",".join(map(str, token_ids)).encode())
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, for blocks with ref_cnt 0; front = next to hand out.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}
        self.num_cache_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, cached-but-unreferenced included)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict_hash(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference to (cached) blocks, pulling free ones off the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference to each block. Callers pass a request's blocks tail
        first, so a prefix's head blocks are the last to be evicted."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise AssertionError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes, batch: int = -1) -> bool:
        """Make a full block findable by its content hash (first writer wins);
        ``batch`` is the one that fills it. Whether it became findable."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False  # an identical block is already cached; this one stays private
        block.block_hash, block.cached_in = block_hash, batch
        self._cached[block_hash] = block
        return True

    def uncache(self, block: KVBlock) -> None:
        """Make a block unfindable (its contents are not what its hash says)."""
        self._evict_hash(block)

    def _evict_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                self.num_cache_evictions += 1
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                self._evict_hash(block)
