"""Iteration-level scheduler driven by a fake runner (no torch)."""
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_runner import FakeRunner, reference_output, replay_ops
from helpers_work import count_calls
from orca_serve.config import CacheConfig, SchedulerConfig
from orca_serve.request import Request, RequestStatus
from orca_serve.sampling_params import SamplingParams
from orca_serve.scheduler import Scheduler


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_sched(num_blocks=64, block_size=4, clock=None, **kw):
    cache_kw = {k: kw.pop(k) for k in list(kw) if k in ("kv_allocation", "enable_prefix_caching")}
    return Scheduler(SchedulerConfig(**kw), CacheConfig(block_size=block_size, **cache_kw), num_blocks,
                     max_model_len=4096, clock=clock or Clock())


def req(rid, n_prompt, max_tokens=5, base=1, arrival=0.0, **kw):
    return Request(rid, [(base + i) % 997 for i in range(n_prompt)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=arrival, **kw)


def step(s, runner):
    so = s.schedule()
    out = runner.execute_model(so)
    s.update(so, out)
    return so


def run_all(s, runner, limit=10_000):
    for _ in range(limit):
        if not s.has_unfinished_requests():
            return
        step(s, runner)
    raise AssertionError("scheduler did not finish")


def test_scheduler_does_not_import_torch():
    # In a fresh interpreter: other test modules import torch during collection.
    code = ("import sys; import orca_serve.scheduler, orca_serve.kv_cache, orca_serve.engine.llm_engine; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_join_next_iteration_and_leave_at_once():
    s, r = make_sched(), FakeRunner(4)
    a = req("a", 6, max_tokens=2)
    s.add_request(a)
    so = step(s, r)
    assert so.num_scheduled_tokens == {"a": 6}
    b = req("b", 3, max_tokens=5)
    s.add_request(b)
    so = step(s, r)  # a decodes its last token and b prefills in the same iteration
    assert so.num_scheduled_tokens == {"a": 1, "b": 3}
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert "a" not in s.kv.req_blocks  # freed the moment it finished
    so = step(s, r)
    assert so.num_scheduled_tokens == {"b": 1} and so.finished_req_ids == {"a"}


def test_chunked_prefill_samples_only_when_caught_up_and_decodes_go_first():
    s, r = make_sched(max_num_batched_tokens=8), FakeRunner(4)
    s.add_request(req("d", 2, max_tokens=10))
    step(s, r)
    s.add_request(req("long", 20, max_tokens=3, base=50))
    sizes = []
    for _ in range(4):
        so = step(s, r)
        sizes.append(dict(so.num_scheduled_tokens))
    assert sizes[0] == {"d": 1, "long": 7} and sizes[1] == {"d": 1, "long": 7}
    assert sizes[2] == {"d": 1, "long": 6} and sizes[3] == {"d": 1, "long": 1}
    assert s.requests["long"].output_token_ids == reference_output(s.requests["long"].prompt_token_ids, 2)


def test_max_num_seqs_limits_batch():
    s, r = make_sched(max_num_seqs=2), FakeRunner(4)
    for i in range(4):
        s.add_request(req(f"r{i}", 3, arrival=i))
    so = step(s, r)
    assert set(so.num_scheduled_tokens) == {"r0", "r1"}
    run_all(s, r)


def test_paged_preempts_newest_and_outputs_unchanged():
    s, r = make_sched(num_blocks=8, block_size=4), FakeRunner(4)
    reqs = [req(f"r{i}", 6, max_tokens=12, base=10 * i, arrival=i) for i in range(4)]
    for q in reqs:
        s.add_request(q)
    run_all(s, r)
    assert s.num_preemptions_total > 0
    assert reqs[0].metrics.num_preemptions == 0  # oldest is never the victim
    assert sum(q.metrics.num_preemptions for q in reqs) == s.num_preemptions_total
    for q in reqs:
        assert q.output_token_ids == reference_output(q.prompt_token_ids, 12)
    assert s.kv.num_free_blocks == 8


def test_reserve_mode_never_preempts():
    s, r = make_sched(num_blocks=10, block_size=4, kv_allocation="reserve"), FakeRunner(4)
    reqs = [req(f"r{i}", 6, max_tokens=12, base=10 * i, arrival=i) for i in range(4)]
    for q in reqs:
        s.add_request(q)
    so = step(s, r)
    assert set(so.num_scheduled_tokens) == {"r0", "r1"}  # 5 blocks each reserved
    run_all(s, r)
    assert s.num_preemptions_total == 0
    for q in reqs:
        assert q.output_token_ids == reference_output(q.prompt_token_ids, 12)


def test_request_too_big_for_pool_is_rejected():
    s = make_sched(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(req("big", 6, max_tokens=10))
    assert not s.has_unfinished_requests()


def test_abort_frees_blocks_and_tells_worker():
    s, r = make_sched(num_blocks=16), FakeRunner(4)
    s.add_request(req("a", 5, max_tokens=50))
    step(s, r)
    assert s.abort_request("a").status == RequestStatus.FINISHED_ABORTED
    assert s.kv.num_free_blocks == 16
    so = s.schedule()
    assert so.finished_req_ids == {"a"} and so.is_empty


class CountedId(int):
    """A stop token id whose comparisons are calls, so that count_calls sees a scan of its list."""

    def __eq__(self, other):
        return int.__eq__(self, other)

    __hash__ = int.__hash__


def test_work_per_token_does_not_grow_with_the_number_of_stop_token_ids():
    """``token in stop_token_ids`` scanned the list for every token of every
    request: 49,000 ids (the vocabulary) and 256 running requests were 12M
    comparisons an iteration. Tokens are now looked up in a set of the list."""

    def work(num_ids):
        s, r = make_sched(), FakeRunner(4)
        ids = [CountedId(1000 + i) for i in range(num_ids)]  # the fake model's tokens are under 1000
        for i in range(3):
            params = SamplingParams(max_tokens=20, ignore_eos=True)
            params.stop_token_ids = ids  # after its checks, which would make them plain ints
            s.add_request(Request(f"r{i}", [1 + i, 2, 3], params))
        return count_calls(lambda: run_all(s, r))

    few, many = work(10), work(10_000)
    assert many < 1.05 * few, (few, many)


def test_requests_share_the_set_of_their_stop_token_list_while_one_runs():
    """The sequences of one request share its list, so its set is made once
    for them all; it goes when the last of them finishes (the list may change
    then)."""
    s, r = make_sched(), FakeRunner(4)
    prompt = [1, 2, 3]
    ref = reference_output(prompt, 10)
    ids = [*range(1000, 1100), ref[4]]
    reqs = [Request(rid, prompt, SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=ids)) for rid in "abc"]
    for q in reqs:
        s.add_request(q)
    assert reqs[0].stop_token_set is reqs[1].stop_token_set is reqs[2].stop_token_set == frozenset(ids)
    assert len(s._stop_token_sets) == 1
    run_all(s, r)
    for q in reqs:
        assert q.status == RequestStatus.FINISHED_STOPPED and q.stop_reason == ref[4]
        assert q.output_token_ids == ref[:ref.index(ref[4]) + 1] and q.held == []
    assert len(s._stop_token_sets) == 0


def test_request_level_forms_batches_and_admits_nobody_meanwhile():
    clock = Clock()
    s, r = make_sched(scheduling_policy="request-level", max_batch_size=2, max_queue_delay_s=1.0,
                      clock=clock), FakeRunner(4)
    s.add_request(req("a", 3, max_tokens=2))
    assert s.schedule().is_empty  # batch not full, delay not over
    clock.t = 2.0
    s.add_request(req("b", 3, max_tokens=6, arrival=2.0))
    so = step(s, r)  # a has waited long enough: batch {a, b}
    assert set(so.num_scheduled_tokens) == {"a", "b"}
    s.add_request(req("c", 3, max_tokens=2, arrival=2.0))
    while s.policy.static_batch:
        so = step(s, r)
        assert "c" not in so.num_scheduled_tokens
    clock.t = 4.0
    so = step(s, r)
    assert "c" in so.num_scheduled_tokens


# ---- property test ------------------------------------------------------
ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 20), st.integers(0, 2)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("fail"), st.just(0)),
), min_size=1, max_size=60)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, num_blocks=st.integers(12, 40), budget=st.integers(4, 64),
       allocation=st.sampled_from(["paged", "reserve"]), caching=st.booleans(),
       policy=st.sampled_from(["fcfs", "priority"]))
def test_random_add_abort_step_fail_never_leaks(ops, num_blocks, budget, allocation, caching, policy):
    s = make_sched(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget, max_num_seqs=8,
                   kv_allocation=allocation, enable_prefix_caching=caching, scheduling_policy=policy)
    r = FakeRunner(4)
    # Shared heads make prefix-cache hits likely.
    added = replay_ops(s, ops, lambda op, n: req(f"q{n}", op[1], max_tokens=op[2], base=1, arrival=float(n),
                                                 priority=op[3]),
                       lambda: step(s, r), check=_check_invariants, runner=r)
    run_all(s, r)
    _check_invariants(s)
    assert s.kv.num_free_blocks == num_blocks
    assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)
    for q in added:
        assert q.finished
        if q.status == RequestStatus.FINISHED_LENGTH:
            assert q.output_token_ids == reference_output(q.prompt_token_ids, q.sampling_params.max_tokens)


def _check_invariants(s):
    refs = {}
    for rid, blocks in s.kv.req_blocks.items():
        assert rid in s.requests
        for b in blocks:
            refs[b.block_id] = refs.get(b.block_id, 0) + 1
    for b in s.kv.pool.blocks:
        assert b.ref_cnt == refs.get(b.block_id, 0), f"block {b.block_id} ref count wrong"
    assert s.kv.num_free_blocks == sum(1 for b in s.kv.pool.blocks if b.ref_cnt == 0)
    assert len(s.running) <= s.config.max_num_seqs
