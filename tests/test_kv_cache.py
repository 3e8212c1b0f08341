"""Block pool and KV cache manager: free list, ref counts, prefix hashes. No torch."""
import subprocess
import sys

import pytest

from orca_serve.kv_cache import BlockPool, KVCacheManager
from orca_serve.request import Request
from orca_serve.sampling_params import SamplingParams


def make_req(rid, n_prompt, max_tokens=4, base=0):
    return Request(rid, [base + i for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens))


def test_no_torch_imported():
    # In a fresh interpreter: other test modules import torch during collection.
    code = ("import sys; import orca_serve.scheduler, orca_serve.kv_cache, orca_serve.engine.llm_engine; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_pool_allocate_free_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free_blocks == 1 and all(b.ref_cnt == 1 for b in a)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free_blocks == 4
    with pytest.raises(AssertionError):
        pool.free([a[0]])


def test_paged_allocates_as_tokens_arrive():
    kv = KVCacheManager(10, block_size=4, allocation="paged", enable_prefix_caching=False)
    req = make_req("a", 5, max_tokens=20)
    assert len(kv.allocate_slots(req, 5)) == 2
    req.num_computed_tokens = 5
    assert kv.allocate_slots(req, 1) == []  # position 5 fits block 2
    req.num_computed_tokens = 8
    assert len(kv.allocate_slots(req, 1)) == 1
    kv.forget(req)
    assert kv.num_free_blocks == 10


def test_reserve_takes_prompt_plus_max_tokens_at_admission():
    kv = KVCacheManager(10, block_size=4, allocation="reserve", enable_prefix_caching=False)
    req = make_req("a", 5, max_tokens=10)  # 15 tokens -> 4 blocks
    assert len(kv.allocate_slots(req, 5)) == 4
    req.num_computed_tokens = 5
    for _ in range(9):
        assert kv.allocate_slots(req, 1) == []
        req.num_computed_tokens += 1
    big = make_req("b", 5, max_tokens=40)
    assert kv.allocate_slots(big, 5) is None  # 12 blocks needed, 6 free: nothing taken
    assert kv.num_free_blocks == 6


def test_prefix_blocks_shared_and_evicted_lru():
    kv = KVCacheManager(6, block_size=4)
    a = make_req("a", 9)
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    b = make_req("b", 10)  # same first 9 tokens
    hits = kv.get_computed_blocks(b)
    assert len(hits) == 2
    kv.allocate_slots(b, 10 - 8, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.pool.blocks[kv.block_ids("a")[0]].ref_cnt == 2
    kv.forget(a)
    kv.forget(b)
    assert kv.num_free_blocks == 6
    # Cached blocks survive while free and are found again.
    c = make_req("c", 9)
    assert len(kv.get_computed_blocks(c)) == 2
    # Allocating everything evicts them.
    d = make_req("d", 24, base=500)
    kv.allocate_slots(d, 24)
    assert kv.get_computed_blocks(c) == []


def test_num_freed_by_counts_a_shared_block_once_all_its_holders_go():
    kv = KVCacheManager(10, block_size=4)
    a = make_req("a", 9)
    kv.allocate_slots(a, 9)  # 3 blocks
    a.num_computed_tokens = 9
    b = make_req("b", 10)  # shares a's first two blocks
    kv.allocate_slots(b, 2, kv.get_computed_blocks(b))  # 1 block of its own
    c = make_req("c", 4, base=500)
    kv.allocate_slots(c, 4)
    assert list(kv.num_freed_by([b, a, c])) == [1, 1 + 3, 1 + 3 + 1]
    # a's and b's shared blocks are a head's prefix hits: freed, it takes them straight back.
    hits = kv.get_computed_blocks(make_req("head", 12))
    assert len(hits) == 2 and list(kv.num_freed_by([b, a], keep=hits)) == [1, 1 + 1]
    free = kv.num_free_blocks
    kv.free(b)
    kv.free(a)
    assert kv.num_free_blocks == free + 4


@pytest.mark.parametrize("allocation", ["paged", "reserve"])
def test_num_blocks_to_take_is_what_allocate_slots_takes(allocation):
    """The two sums are written out separately (allocate_slots' runs for every
    request every iteration); they must agree: fresh prompts, decode growth,
    prefix hits held by a running request and hits on the free queue."""
    kv = KVCacheManager(40, block_size=4, allocation=allocation)
    done = []
    a, b = make_req("a", 9), make_req("b", 14)
    for req_ in (a, b, make_req("c", 9)):  # a: no hits; b and c: a's first two blocks
        hits = kv.get_computed_blocks(req_)
        n = req_.num_tokens - len(hits) * kv.block_size
        free = kv.num_free_blocks
        expected = kv.num_blocks_to_take(req_, n, hits)
        assert kv.allocate_slots(req_, n, hits) is not None
        assert free - kv.num_free_blocks == expected, req_.request_id
        req_.num_computed_tokens = len(hits) * kv.block_size + n
        done.append(req_)
    for req_ in done:  # decode growth, across a block boundary for some
        for _ in range(5):
            free = kv.num_free_blocks
            expected = kv.num_blocks_to_take(req_, 1)
            kv.allocate_slots(req_, 1)
            assert free - kv.num_free_blocks == expected
            req_.num_computed_tokens += 1
    kv.free(a)
    kv.free(b)  # b's own full block stays cached on the free queue; c holds the first two
    d = make_req("d", 14)
    hits = kv.get_computed_blocks(d)
    assert [blk.ref_cnt for blk in hits] == [1, 1, 0]
    free = kv.num_free_blocks
    expected = kv.num_blocks_to_take(d, d.num_tokens - len(hits) * kv.block_size, hits)
    kv.allocate_slots(d, d.num_tokens - len(hits) * kv.block_size, hits)
    assert free - kv.num_free_blocks == expected


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(6, block_size=4)
    a = make_req("a", 8)
    kv.allocate_slots(a, 8)
    b = make_req("b", 8)
    assert len(kv.get_computed_blocks(b)) == 1


def test_every_full_block_is_cached_as_chunks_and_decodes_fill_it():
    """Blocks enter the prefix cache as they fill, whether a prompt chunk or
    a decoded token fills them; each step looks only at the blocks filled
    since the last. After a preemption (free) the request's new blocks are
    cached again from the first."""
    kv = KVCacheManager(6, block_size=4)  # the request's 21 tokens fill the pool
    req = make_req("a", 10, max_tokens=12)

    def cached_blocks():
        return sum(kv.pool.blocks[i].block_hash is not None for i in kv.block_ids("a"))

    for chunk, expect in ((3, 0), (6, 2)):  # a 10-token prompt in chunks: 3 tokens, then 7
        kv.allocate_slots(req, chunk if expect == 0 else 7)
        req.num_computed_tokens += chunk if expect == 0 else 7
        assert cached_blocks() == expect
    for step in range(1, 12):  # decodes: token 10 + step fills block (10 + step) // 4
        req.append_token(100 + step)
        kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
        assert cached_blocks() == (10 + step) // 4, step
    kv.free(req)
    req.num_computed_tokens = 0
    other = make_req("b", 24, base=500)  # takes all 6 blocks: evicts every cached block of "a"
    kv.allocate_slots(other, 24)
    kv.forget(other)
    kv.allocate_slots(req, req.num_tokens)
    assert cached_blocks() == req.num_tokens // 4


def test_uncache_unfilled_takes_only_the_blocks_of_failed_batches():
    """A failed batch never filled the blocks it made findable: they leave the
    prefix cache; blocks an earlier batch filled stay."""
    kv = KVCacheManager(8, block_size=4)
    a = make_req("a", 12, max_tokens=8)
    kv.current_batch = 1
    kv.allocate_slots(a, 4)  # batch 1 fills block 0
    a.num_computed_tokens = 4
    kv.current_batch = 2
    kv.allocate_slots(a, 8)  # batch 2 (to fail) was to fill blocks 1 and 2
    held = kv.block_ids("a")
    kv.batch_done(1)
    kv.forget(a)  # aborted before its failed batch came back: its blocks are free, still findable
    assert len(kv.get_computed_blocks(make_req("b", 12))) == 2  # (a full hit leaves one block to compute)
    assert kv.uncache_unfilled(2, {"a"}) == set(held[1:3])
    assert [kv.pool.blocks[i].block_hash is not None for i in held] == [True, False, False]
    assert len(kv.get_computed_blocks(make_req("b", 12))) == 1
    assert kv.uncache_unfilled(2, {"a"}) == set()
    # A later batch in flight: only what it cached for the failed batch's requests goes.
    c, d = make_req("c", 8, base=100), make_req("d", 8, base=200)
    kv.current_batch = 3
    kv.allocate_slots(c, 8)
    kv.allocate_slots(d, 8)
    assert kv.uncache_unfilled(2, {"c"}) == set(kv.block_ids("c"))
    assert all(kv.pool.blocks[i].block_hash is not None for i in kv.block_ids("d"))
    kv.batch_done(2)
    kv.batch_done(3)
    assert kv.uncache_unfilled(2, {"d"}) == set()  # batches that came back are forgotten
