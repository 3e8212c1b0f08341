"""Per-request block tables on top of the block pool.

Two allocation modes:
- ``paged`` (default): blocks are taken as a request's tokens arrive; when the
  pool runs dry the scheduler preempts.
- ``reserve`` (Orca): at admission a request reserves blocks for its prompt
  plus ``max_tokens``, so it never needs more and is never preempted.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator

from orca_serve.kv_cache.block_pool import BlockPool, KVBlock, hash_block_tokens
from orca_serve.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, allocation: str = "paged",
                 enable_prefix_caching: bool = True) -> None:
        if allocation not in ("paged", "reserve"):
            raise ValueError(f"allocation must be 'paged' or 'reserve', got {allocation!r}")
        self.block_size = block_size
        self.allocation = allocation
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        # Hashes of a request's full blocks, computed incrementally as tokens arrive.
        self.req_hashes: dict[str, list[bytes]] = {}
        # How many of a request's leading blocks are already in the prefix cache,
        # so each step looks only at the blocks that filled since (a decode
        # fills one every block_size steps).
        self.req_num_cached: dict[str, int] = {}
        # The batch being scheduled: a block cached now is filled when it runs.
        self.current_batch = 0
        # Batch -> (request id, block) for each block it made findable, kept
        # until the batch comes back (``batch_done``): if it fails, those go.
        self._cached_by_batch: dict[int, list[tuple[str, KVBlock]]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- prefix cache -------------------------------------------------
    def _block_hashes(self, request: Request) -> list[bytes]:
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """Cached blocks holding a prefix of the request's tokens (not yet referenced).

        At least one token is always left to compute, so the request has a
        position to sample from.
        """
        if not self.pool.enable_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for h in self._block_hashes(request)[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- allocation ---------------------------------------------------
    def num_blocks_to_take(self, request: Request, num_new_tokens: int,
                           computed_blocks: list[KVBlock] | None = None) -> int:
        """Free blocks ``allocate_slots`` with these arguments would take.

        The same sum as ``allocate_slots``' own, which keeps it inline: it
        runs for every running request every iteration, where a call more
        costs ~0.3 us each (tests/test_kv_cache.py checks that the two agree)."""
        computed_blocks = computed_blocks or []
        held = len(self.req_blocks.get(request.request_id, ()))
        target_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        if self.allocation == "reserve" and not held:
            target_tokens = max(target_tokens, request.max_total_tokens)
        need = self.blocks_needed(target_tokens) - held - len(computed_blocks)
        return max(need, 0) + sum(1 for b in computed_blocks if b.ref_cnt == 0)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        ``computed_blocks`` are prefix-cache hits to attach first (new requests
        only). Returns the block ids newly attached, or None when the free
        pool cannot satisfy the request (nothing is changed then).
        """
        computed_blocks = computed_blocks or []
        rid = request.request_id
        held = self.req_blocks.get(rid)
        if held is None:
            held = []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        target_tokens = num_computed + num_new_tokens
        if self.allocation == "reserve" and not held:
            target_tokens = max(target_tokens, request.max_total_tokens)
        need = self.blocks_needed(target_tokens) - len(held) - len(computed_blocks)
        # Cached blocks with no other holder come off the free queue when touched.
        reclaim = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(need, 0) + reclaim > self.pool.num_free_blocks:
            return None
        if computed_blocks:
            self.pool.touch(computed_blocks)
            held.extend(computed_blocks)
        new_blocks = self.pool.allocate(need) if need > 0 else []
        held.extend(new_blocks)
        self.req_blocks[rid] = held
        self._cache_full_blocks(request, held, num_computed + num_new_tokens)
        return [b.block_id for b in computed_blocks + new_blocks]

    def _cache_full_blocks(self, request: Request, held: list[KVBlock], num_tokens: int) -> None:
        if not self.pool.enable_caching:
            return
        # Only blocks whose tokens are all known and will be computed by the end of this step.
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.req_num_cached.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request)
        for i in range(start, num_full):
            if held[i].block_hash is None and self.pool.cache_block(held[i], hashes[i], self.current_batch):
                self._cached_by_batch.setdefault(self.current_batch, []).append((request.request_id, held[i]))
        self.req_num_cached[request.request_id] = num_full

    def uncache_unfilled(self, failed_batch: int, req_ids: set[str]) -> set[int]:
        """Batch ``failed_batch`` failed: take out of the prefix cache every block
        it made findable, and those later batches in flight made findable for
        ``req_ids`` (requests the worker skips there, or that read unfilled
        blocks), whether or not the requests are still alive. Returns their ids."""
        unfilled = set()
        for batch, entries in self._cached_by_batch.items():
            for rid, block in entries:
                if ((batch == failed_batch or (batch > failed_batch and rid in req_ids))
                        and block.cached_in == batch and block.block_hash is not None):
                    self.pool.uncache(block)
                    unfilled.add(block.block_id)
        return unfilled

    def batch_done(self, batch: int) -> None:
        """Batch ``batch`` came back: the blocks it made findable are filled (or gone)."""
        self._cached_by_batch.pop(batch, None)

    def free(self, request: Request) -> None:
        """Release every block of the request (tail first, so prefixes live longest)."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self.req_num_cached.pop(request.request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))

    def num_freed_by(self, requests: list[Request], keep: Collection[KVBlock] = ()) -> Iterator[int]:
        """For i = 0, 1, ...: how many blocks freeing ``requests[:i + 1]``
        would return to the pool (a block another request holds too stays),
        not counting those in ``keep`` (taken straight back)."""
        keep = set(keep)
        holders: Counter[KVBlock] = Counter()
        freed = 0
        for request in requests:
            for block in self.req_blocks.get(request.request_id, ()):
                holders[block] += 1
                freed += holders[block] == block.ref_cnt and block not in keep
            yield freed

    def forget(self, request: Request) -> None:
        """Free blocks and drop the request's hash memo (it is gone for good)."""
        self.free(request)
        self.req_hashes.pop(request.request_id, None)
