"""ModelRunner driven by hand-built SchedulerOutputs: outputs equal HF run per prompt."""
from __future__ import annotations

import random

import pytest

from helpers_models import MiniScheduler, hf_greedy, load_hf, make_runner
from orca_serve.batch import CachedRequestData, NewRequestData, SchedulerOutput
from orca_serve.sampling_params import SamplingParams

BLOCK = MiniScheduler.block_size


def prompts(lengths, vocab=384, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("kind,budget", [("llama", 16), ("gpt2", 11)])
def test_greedy_batch_with_chunked_prefill_matches_hf(tiny_model_dir, kind, budget):
    path = tiny_model_dir(kind)
    runner = make_runner(path)
    sched = MiniScheduler(num_blocks=64, budget=budget)
    ps = prompts([5, 23, 40, 9, 2])
    arrivals = {0: [0, 1], 3: [2], 6: [3, 4]}  # requests join a running batch
    sp = SamplingParams(temperature=0, max_tokens=10)
    step = 0
    while step < 200 and (sched.reqs or step <= max(arrivals)):
        for i in arrivals.get(step, []):
            sched.add(f"r{i}", ps[i], sp)
        sched.step(runner)
        step += 1
    hf = load_hf(path)
    for i, p in enumerate(ps):
        assert sched.outputs[f"r{i}"] == hf_greedy(hf, p, 10), f"request r{i} differs from HF"
    runner.execute_model(sched.make_output())  # delivers the last finished ids
    assert not runner.requests  # finished requests were dropped


def test_swap_out_and_in_resumes_exactly(tiny_model_dir):
    path = tiny_model_dir("llama")
    runner = make_runner(path, num_blocks=32, num_cpu_blocks=8)
    prompt = prompts([14], seed=3)[0]
    sp = SamplingParams(temperature=0, max_tokens=8)
    sched = MiniScheduler(num_blocks=32, budget=64)
    sched.add("a", prompt, sp)
    for _ in range(4):
        sched.step(runner)
    r = sched.reqs["a"]
    old_blocks = list(r["blocks"])
    # Preempt by swapping: the worker forgets "a", its blocks go to CPU and get clobbered.
    runner.execute_model(SchedulerOutput(99, [], [], {}, 0, finished_req_ids={"a"},
                                         blocks_to_swap_out=list(enumerate(old_blocks))))
    runner.kv_pool.cache[:, :, old_blocks] = 0.0
    new_blocks = [b for b in range(32) if b not in old_blocks][:len(old_blocks)]
    resume = NewRequestData("a", prompt, list(r["out"]), sp, new_blocks, r["computed"])
    n = len(prompt) + len(r["out"]) - r["computed"]
    out = runner.execute_model(SchedulerOutput(100, [resume], [], {"a": n}, n,
                                               blocks_to_swap_in=list(zip(range(len(new_blocks)), new_blocks))))
    tokens = r["out"] + [out.sampled_token_ids["a"]]
    assert tokens == hf_greedy(load_hf(path), prompt, len(tokens))


def test_partial_prefill_samples_nothing_and_logprobs(tiny_model_dir):
    runner = make_runner(tiny_model_dir("gpt2"))
    sched = MiniScheduler(num_blocks=16, budget=4)
    sched.add("a", prompts([10])[0], SamplingParams(temperature=0, max_tokens=2, logprobs=3))
    outs = [sched.step(runner)[1] for _ in range(4)]
    assert [bool(o.sampled_token_ids) for o in outs] == [False, False, True, True]
    lp = outs[2].logprobs["a"]
    assert len(lp.top) == 3 and lp.top[0][0] == outs[2].sampled_token_ids["a"]  # greedy = top-1
    assert lp.sampled_logprob == pytest.approx(lp.top[0][1])


def test_seeded_sampling_independent_of_batch(tiny_model_dir):
    path = tiny_model_dir("llama")
    ps = prompts([7, 12, 3], seed=5)
    seeded = SamplingParams(temperature=1.5, top_k=40, seed=42, max_tokens=12)

    def run(requests):
        sched = MiniScheduler(num_blocks=64, budget=32)
        for rid, p, sp in requests:
            sched.add(rid, p, sp)
        runner = make_runner(path)
        while sched.reqs:
            sched.step(runner)
        return sched.outputs

    alone = run([("s", ps[0], seeded)])["s"]
    crowd = run([("x", ps[1], SamplingParams(temperature=1.0, max_tokens=5)), ("s", ps[0], seeded),
                 ("y", ps[2], SamplingParams(temperature=0.8, seed=1, max_tokens=9))])["s"]
    assert alone == crowd


def test_runner_rejects_inconsistent_messages(tiny_model_dir):
    runner = make_runner(tiny_model_dir("gpt2"), num_blocks=8)
    with pytest.raises(RuntimeError, match="unknown request"):
        runner.execute_model(SchedulerOutput(0, [], [CachedRequestData("nope", [1], [], 0)], {"nope": 1}, 1))
    short = NewRequestData("a", list(range(3, 12)), [], SamplingParams(), [0], 0)  # 9 tokens, one block of 4
    with pytest.raises(RuntimeError, match="KV blocks"):
        runner.execute_model(SchedulerOutput(0, [short], [], {"a": 9}, 9))
    with pytest.raises(RuntimeError, match="no CPU blocks"):
        runner.execute_model(SchedulerOutput(1, [], [], {}, 0, blocks_to_swap_out=[(0, 1)]))


def _huge_page_kib(ptr: int) -> int | None:
    """AnonHugePages of the mapping holding address ``ptr`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return None


def _resident_kib(ptr: int, nbytes: int) -> int:
    """KiB of [ptr, ptr + nbytes) in memory (mincore). Unlike a field of the
    mapping in smaps this counts that range only: the kernel may merge a new
    mapping with a neighbour of the same flags (an earlier test's arena or
    KV pool) into one entry there, whose Rss is the neighbour's too."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = ptr - ptr % page
    pages = -(-(ptr + nbytes - start) // page)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) * page // 1024


def _huge_pages_on() -> bool:
    import sys

    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    return sys.platform.startswith("linux") and "[never]" not in open(thp).read()


def test_kv_pool_is_zeroed_on_huge_pages():
    import torch

    from orca_serve.kernels.huge_pages import zeros_on_huge_pages

    pool = zeros_on_huge_pages((2, 1024, 16, 2, 64), torch.float32, torch.device("cpu"))  # 16 MiB
    assert pool.shape == (2, 1024, 16, 2, 64) and pool.dtype == torch.float32
    assert not pool.any()
    if _huge_pages_on():
        # At least the 2 MiB-aligned interior (all but the edges) is on huge pages.
        assert _huge_page_kib(pool.data_ptr()) >= 8 * 1024


def test_packed_weights_fill_one_arena_on_huge_pages_as_they_are_packed(tiny_model_dir):
    """The runner packs every weight into one PanelArena; the arena takes
    memory only as weights are packed into it (so a load's peak holds the
    dense weights plus what is packed so far, not twice the model), and that
    memory is on huge pages."""
    import sys

    import torch

    from orca_serve.kernels import load, packed_gemm

    runner = make_runner(tiny_model_dir("llama"))
    panels = [m.packed_weight.panels for m in runner.model.modules() if getattr(m, "packed_weight", None)]
    assert len(panels) >= 5 and all(p is not None for p in panels)
    assert len({p.untyped_storage().data_ptr() for p in panels}) == 1

    ops = load()
    assert packed_gemm.PanelArena([], ops).buffer.numel() == 0  # a stage with nothing to pack
    arena = packed_gemm.PanelArena([(1024, 1024)] * 3, ops)  # 12 MiB
    linux = sys.platform.startswith("linux")
    nbytes = arena.buffer.numel() * arena.buffer.element_size()
    if linux:
        assert _resident_kib(arena.buffer.data_ptr(), nbytes) < 1024
    for _ in range(3):
        w = torch.randn(1024, 1024)
        assert torch.equal(ops.pack_panels(w, arena.take(1024, 1024)), ops.pack_panels(w))
    if linux:
        assert _resident_kib(arena.buffer.data_ptr(), nbytes) >= 12 * 1024
    if _huge_pages_on():
        assert _huge_page_kib(arena.buffer.data_ptr()) >= 10 * 1024
