"""Async scheduling (--async-scheduling): iteration i+1 is scheduled and
launched before iteration i's tokens come back, a request's pending token
taken from the device. On a CPU the runner finishes each batch before the
next is scheduled, but every step of the protocol runs (placeholders, the
device-side fill, stops found one batch late); the outputs must be those of
the synchronous engine, and greedy ones HF's."""
from __future__ import annotations

import pytest
import torch

from helpers_models import fail_next_forward, load_hf
from orca_serve.batch import ModelRunnerOutput
from orca_serve.config import CacheConfig, EngineConfig, SchedulerConfig
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.request import Request
from orca_serve.sampling_params import SamplingParams
from orca_serve.scheduler import Scheduler
from test_engine_correctness import hf_generate, make_prompts, run_staggered


def engine(path: str, asynchronous: bool, **kw) -> LLMEngine:
    args = dict(model=path, num_kv_blocks=200, block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
                enable_prefix_caching=False)
    args.update(kw)
    return LLMEngine(EngineConfig.from_kwargs(async_scheduling=asynchronous, **args))


def run(eng: LLMEngine, prompts, params, abort_at: dict[int, str] | None = None) -> dict[str, object]:
    """All prompts at once; ``abort_at`` {iteration: request id} aborts mid-run."""
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    outs, it = {}, 0
    while eng.has_unfinished_requests():
        if abort_at and it in abort_at:
            eng.abort_request(abort_at[it])
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        it += 1
    stats = eng.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total, "KV blocks leaked"
    assert not eng.scheduler.worker_view._pending and not eng.scheduler.worker_view._in_flight
    return outs


@pytest.mark.parametrize("kind,kernels", [("llama", "auto"), ("llama", "off"), ("gpt2", "off"), ("qwen2", "auto")])
def test_greedy_matches_hf_with_staggered_arrivals(tiny_model_dir, kind, kernels):
    path = tiny_model_dir(kind)
    prompts = make_prompts(12, 384, seed=31)
    max_tokens = [4 + (7 * i) % 19 for i in range(len(prompts))]
    eng = engine(path, True, cpu_kernels=kernels)
    outs = run_staggered(eng, prompts, max_tokens)
    hf = load_hf(path)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.token_ids == hf_generate(hf, p, max_tokens[i]), f"prompt {i} differs"
    assert eng.stats().num_kv_blocks_free == 200


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_decode_graph_path_fills_pending_tokens(tiny_model_dir, device):
    """Decode graphs (captured on a GPU, their static path run uncaptured on a
    CPU) take the pending tokens into their static buffer; logprobs are read
    before the next replay can overwrite the graph's logits."""
    path = tiny_model_dir("llama")
    prompts = make_prompts(9, 384, seed=32, lo=10, hi=40)
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2 if i % 2 else None)
              for i in range(len(prompts))]
    outs = {}
    for asynchronous in (False, True):
        eng = engine(path, asynchronous, cpu_kernels="off", max_num_seqs=7, device=device,
                     cuda_graphs=device == "cuda")
        if device == "cpu":
            eng.executor.runner.use_decode_graphs(capture=False)
        outs[asynchronous] = run(eng, prompts, params)
        assert eng.executor.runner.decode_graphs.num_steps >= 10
    hf = load_hf(path)
    for i, p in enumerate(prompts):
        a, b = outs[False][str(i)], outs[True][str(i)]
        assert b.token_ids == a.token_ids == hf_generate(hf, p, 16), f"prompt {i}"
        assert len(b.logprobs) == (16 if i % 2 else 0)
        for x, y in zip(a.logprobs, b.logprobs):
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            assert [v for _, v in y.top] == pytest.approx([v for _, v in x.top], abs=1e-4)


def test_same_outputs_as_the_synchronous_engine(tiny_model_dir):
    """Stops found one batch late (stop tokens, max_tokens of one),
    min_tokens, seeded sampling and logprobs: as without async scheduling."""
    path = tiny_model_dir("llama")
    prompts = make_prompts(10, 384, seed=33, lo=3, hi=30)
    probe = run(engine(path, False), prompts, [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)] * 10)
    # A token each greedy run reaches early, so stopping on it cuts the run short.
    stop_ids = [probe[str(i)].token_ids[3] for i in range(10)]
    params = []
    for i in range(10):
        kind = i % 5
        if kind == 0:
            params.append(SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_ids[i]]))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=3))
        elif kind == 3:
            params.append(SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=100 + i, ignore_eos=True,
                                         logprobs=1))
        else:
            params.append(SamplingParams(max_tokens=12, temperature=0, min_tokens=8,
                                         stop_token_ids=[stop_ids[i]]))
    sync = run(engine(path, False), prompts, params)
    asyn = run(engine(path, True), prompts, params)
    for i in range(10):
        a, b = sync[str(i)], asyn[str(i)]
        assert (a.token_ids, a.finish_reason, a.stop_reason) == (b.token_ids, b.finish_reason, b.stop_reason), i
        assert [(lp.top, round(lp.sampled_logprob, 5)) for lp in a.logprobs] == \
            [(lp.top, round(lp.sampled_logprob, 5)) for lp in b.logprobs]
    # The cases under test happened: stop tokens cut runs short, min_tokens held one back.
    assert sync["0"].finish_reason == "stop" and len(sync["0"].token_ids) < 20
    assert len(sync["4"].token_ids) >= 8 and len(sync["2"].token_ids) == 1
    assert len(sync["3"].logprobs) == len(sync["3"].token_ids) == 15


def test_smollm2_stop_strings_found_one_batch_late(default_model_dir):
    """The engine finds a stop string in a token after the next batch took the
    request in; that batch's token is dropped (SmolLM2: a tokenizer)."""
    prompts = ["The capital of France is", "List three colors:", "Once upon a time"]
    greedy = SamplingParams(max_tokens=24, temperature=0)
    probe = run(engine(None, False, num_kv_blocks=64, block_size=16, max_num_batched_tokens=256), prompts,
                [greedy] * 3)
    # A stop string from the middle of each run's text.
    stops = [probe[str(i)].text[len(probe[str(i)].text) // 2:][:4] for i in range(3)]
    assert all(len(s) == 4 for s in stops)
    params = [SamplingParams(max_tokens=24, temperature=0, stop=[s]) for s in stops]
    outs = [run(engine(None, asynchronous, num_kv_blocks=64, block_size=16, max_num_batched_tokens=256),
                prompts, params) for asynchronous in (False, True)]
    for i in range(3):
        a, b = outs[0][str(i)], outs[1][str(i)]
        assert a.finish_reason == "stop" and a.stop_reason == stops[i] and stops[i] not in a.text
        assert (a.token_ids, a.text, a.stop_reason) == (b.token_ids, b.text, b.stop_reason)


def test_preemption_and_abort_keep_parity_and_free_blocks(tiny_model_dir):
    path = tiny_model_dir("llama")
    prompts = make_prompts(10, 384, seed=34)
    hf = load_hf(path)
    greedy = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)] * 10
    for mode in ("recompute", "swap"):
        eng = engine(path, True, num_kv_blocks=26, preemption_mode=mode, swap_space_gb=0.01)
        outs = run(eng, prompts, greedy, abort_at={5: "3"})
        assert eng.stats().num_preemptions_total > 0
        assert outs["3"].finish_reason == "abort"
        for i, p in enumerate(prompts):
            if i != 3:
                assert outs[str(i)].token_ids == hf_generate(hf, p, 20), f"{mode}: prompt {i}"


POISON = [7] * 6


@pytest.mark.parametrize("where", ["launch", "forward"])
def test_a_failed_batch_fails_only_its_own_requests(tiny_model_dir, monkeypatch, where):
    """The batch after a failed one is launched before the failure is known,
    with tokens the failed batch's requests were to sample: it skips them, and
    every other request, in it or arriving later, finishes as HF's."""
    path = tiny_model_dir("llama")
    eng = engine(path, True)
    runner = eng.executor.runner
    if where == "launch":  # a fault before the runner saw the batch, once
        real_launch, faults = runner.execute_model_async, []

        def launch(so):
            if "poison" in so.num_scheduled_tokens and not faults:
                faults.append(so.iteration)
                raise RuntimeError("injected fault")
            return real_launch(so)

        monkeypatch.setattr(runner, "execute_model_async", launch)
    else:  # a fault in the model (say, out of memory) whenever it sees the poison prompt
        real_forward = runner.model.forward

        def forward(input_ids, *args):
            ids = input_ids.tolist()
            if any(ids[i:i + len(POISON)] == POISON for i in range(len(ids))):
                raise RuntimeError("injected fault")
            return real_forward(input_ids, *args)

        monkeypatch.setattr(runner.model, "forward", forward)
    prompts = make_prompts(5, 384, seed=37, lo=5, hi=10)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    # The poison prompt's batch fails alone; the next one holds its pending token.
    arrivals = {0: [("poison", POISON)], **{it: [(str(it - 1), prompts[it - 1])] for it in range(1, 6)}}
    outs, it = {}, 0
    while it < 6 or eng.has_unfinished_requests():
        for rid, prompt in arrivals.get(it, []):
            eng.add_request(rid, prompt, greedy)
        outs.update((o.request_id, o) for o in eng.step() if o.finished)
        it += 1
    assert outs.pop("poison").error == "RuntimeError: injected fault"
    hf = load_hf(path)
    for rid, o in sorted(outs.items()):
        assert (o.finish_reason, o.error) == ("length", None), rid
        assert o.token_ids == hf_generate(hf, prompts[int(rid)], 12), rid
    assert len(outs) == 5 and eng.stats().num_kv_blocks_free == 200
    assert not eng.scheduler.worker_view._pending and not eng.scheduler.worker_view._in_flight


def test_a_failed_requests_id_serves_again_once_its_batch_is_back(tiny_model_dir, monkeypatch):
    """The batch after a failed one skips the failed requests; a batch
    scheduled later (here after an empty schedule: the failed request's only
    token was its last) may hold a new request with the same id, and runs it."""
    path = tiny_model_dir("llama")
    eng = engine(path, True)
    fail_next_forward(monkeypatch, eng.executor.runner)
    prompt = make_prompts(1, 384, seed=41, lo=8, hi=8)[0]
    outs = run(eng, [prompt], [SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)])
    assert outs["0"].error == "RuntimeError: injected fault"
    outs = run(eng, [prompt], [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)])
    assert (outs["0"].error, outs["0"].token_ids) == (None, hf_generate(load_hf(path), prompt, 4))


def test_workers_forget_requests_that_stop_while_their_next_batch_is_in_flight(tiny_model_dir):
    """A request that stops on a token is finished while the batch after it is
    in flight; the step that collects that batch schedules nothing, yet must
    still tell the runner to drop the request's state (served one at a time,
    every request would otherwise stay in the runner for good)."""
    path = tiny_model_dir("llama")
    prompts = make_prompts(6, 384, seed=38, lo=5, hi=30)
    eng = engine(path, True)
    hf = load_hf(path)
    for i, p in enumerate(prompts):
        stop = hf_generate(hf, p, 3)[2]  # the third token, so each request stops early
        eng.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                  stop_token_ids=[stop]))
        outs = []
        while eng.has_unfinished_requests():
            outs += [o for o in eng.step() if o.finished]
        assert outs[0].finish_reason == "stop" and len(outs[0].token_ids) <= 3
        assert not eng.executor.runner.requests


def test_slo_budget_counts_decodes_whose_token_is_pending(tiny_model_dir):
    """The SLO policy shrinks the token budget to keep a TPOT target but never
    below the decodes. A decode whose token is still pending is a decode: with
    it left out, batches alternated between some of the four requests and the
    last one waited for the others to finish."""
    eng = engine(tiny_model_dir("llama"), True, scheduling_policy="slo", default_tpot_slo_s=1e-6)
    for i, p in enumerate(make_prompts(4, 384, seed=39, lo=5, hi=10)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    finished_at, batch_sizes, it = {}, [], 0
    while eng.has_unfinished_requests():
        finished_at.update((o.request_id, it) for o in eng.step() if o.finished)
        batch_sizes.append(eng.stats().last_num_reqs)
        it += 1
    assert max(finished_at.values()) - min(finished_at.values()) <= 1, finished_at
    assert batch_sizes[:19] == [4] * 19, batch_sizes


def test_prefix_caching(tiny_model_dir):
    path = tiny_model_dir("llama")
    system = make_prompts(1, 384, seed=35, lo=40, hi=40)[0]
    prompts = [system + tail for tail in make_prompts(6, 384, seed=36, lo=2, hi=12)]
    eng = engine(path, True, block_size=8, enable_prefix_caching=True)
    outs = run_staggered(eng, prompts, [8] * len(prompts), every=3, first=1)
    hf = load_hf(path)
    assert [o.token_ids for o in outs] == [hf_generate(hf, p, 8) for p in prompts]
    assert all(o.num_cached_tokens == 40 for o in outs[1:])


def test_refused_with_several_ranks():
    with pytest.raises(ValueError, match="async_scheduling runs on one rank only"):
        EngineConfig.from_kwargs(async_scheduling=True, tensor_parallel_size=2)


# ---- the scheduler alone (no torch) ------------------------------------------
def make_scheduler(max_model_len: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(async_scheduling=True, max_num_batched_tokens=16), CacheConfig(block_size=4),
                     32, max_model_len)


def add(s: Scheduler, rid: str, prompt_len: int, max_tokens: int) -> Request:
    req = Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    s.add_request(req)
    return req


def test_scheduler_schedules_a_request_again_on_its_pending_token():
    """In the engine's order: batch i+1 is scheduled, then batch i's tokens applied."""
    s = make_scheduler()
    req = add(s, "a", 6, max_tokens=3)
    b1 = s.schedule()  # the prompt; it samples token 1
    assert b1.num_scheduled_tokens == {"a": 6}
    b2 = s.schedule()  # before b1 returns: a decode of the pending token 1
    assert b2.num_scheduled_tokens == {"a": 1}
    assert b2.scheduled_cached_reqs[0].new_token_ids == [] and req.num_computed_tokens == 7
    s.update(b1, ModelRunnerOutput({"a": 11}))
    b3 = s.schedule()  # token 2 (b2's) is pending and is not the last: its decode
    assert b3.num_scheduled_tokens == {"a": 1}
    assert b3.scheduled_cached_reqs[0].new_token_ids == [11]  # the token b2 took from the device
    s.update(b2, ModelRunnerOutput({"a": 12}))
    assert s.schedule().is_empty  # b3 samples token 3, the last: nothing more to run
    s.update(b3, ModelRunnerOutput({"a": 13}))
    assert req.output_token_ids == [11, 12, 13] and req.finished
    assert not s.worker_view._pending and not s.worker_view._in_flight and s.kv.num_free_blocks == 32


def test_scheduler_drops_the_token_of_a_request_that_stopped():
    s = make_scheduler()
    req = add(s, "a", 4, max_tokens=10)
    b1, b2 = s.schedule(), s.schedule()
    s.finish_requests([req], req.status.FINISHED_STOPPED)  # e.g. a stop string in b1's token
    assert s.kv.num_free_blocks == 32
    assert s.update(b1, ModelRunnerOutput({"a": 5})) == []
    assert s.update(b2, ModelRunnerOutput({"a": 6})) == []
    assert req.output_token_ids == [] and not s.worker_view._pending and not s.worker_view._in_flight
    assert s.schedule().finished_req_ids == {"a"}  # the worker forgets it


def test_scheduler_refuses_an_id_whose_batch_is_in_flight():
    """An aborted request's batch still comes back with its token; a new
    request of the same id before then would take it."""
    s = make_scheduler()
    add(s, "a", 4, max_tokens=10)
    b1, b2 = s.schedule(), s.schedule()
    s.abort_request("a")
    with pytest.raises(ValueError, match="'a' is still in use: a batch .* is in flight"):
        add(s, "a", 4, max_tokens=10)
    s.update(b1, ModelRunnerOutput({"a": 5}))
    with pytest.raises(ValueError, match="in flight"):
        add(s, "a", 4, max_tokens=10)
    s.update(b2, ModelRunnerOutput({"a": 6}))
    again = add(s, "a", 4, max_tokens=10)
    s.update(s.schedule(), ModelRunnerOutput({"a": 7}))
    assert again.output_token_ids == [7]


def test_scheduler_chunked_prompt_and_model_length():
    s = make_scheduler(max_model_len=24)
    req = add(s, "a", 20, max_tokens=4)
    b1 = s.schedule()
    assert b1.num_scheduled_tokens == {"a": 16}  # the budget: a chunk that samples nothing
    b2 = s.schedule()  # the rest of the prompt, while the first chunk runs
    assert b2.num_scheduled_tokens == {"a": 4}
    s.update(b1, ModelRunnerOutput({}))
    b3 = s.schedule()  # the pending token 1 (b2's)
    assert b3.num_scheduled_tokens == {"a": 1}
    s.update(b2, ModelRunnerOutput({"a": 7}))
    b4 = s.schedule()
    assert b4.num_scheduled_tokens == {"a": 1}
    s.update(b3, ModelRunnerOutput({"a": 8}))
    # b4 samples token 3, position 22; a fourth would reach position 23, the
    # model's last: max_tokens (4) and max_model_len (24) agree it is the last one.
    b5 = s.schedule()
    assert b5.num_scheduled_tokens == {"a": 1}
    s.update(b4, ModelRunnerOutput({"a": 9}))
    assert s.schedule().is_empty
    s.update(b5, ModelRunnerOutput({"a": 10}))
    assert req.finished and req.output_token_ids == [7, 8, 9, 10]


def test_scheduler_stops_at_the_model_length_before_max_tokens():
    s = make_scheduler(max_model_len=10)
    req = add(s, "a", 8, max_tokens=50)
    b1 = s.schedule()
    b2 = s.schedule()  # token 1 (position 8) pending; its decode samples token 2, at the last position
    assert b2.num_scheduled_tokens == {"a": 1}
    s.update(b1, ModelRunnerOutput({"a": 5}))
    assert s.schedule().is_empty  # 8 + 2 tokens fill the model's 10 positions
    s.update(b2, ModelRunnerOutput({"a": 6}))
    assert req.finished and req.output_token_ids == [5, 6]


def test_on_a_cpu_it_says_it_is_meant_for_a_gpu(tiny_model_dir, caplog):
    with caplog.at_level("WARNING", logger="orca_serve.engine.executor"):
        engine(tiny_model_dir("llama"), False, device="cpu")
        assert "async_scheduling" not in caplog.text
        engine(tiny_model_dir("llama"), True, device="cpu")
    assert "async_scheduling on a CPU overlaps nothing" in caplog.text


def test_scheduler_preempts_the_policys_victim_though_it_is_always_in_flight():
    """A newer request in every batch is always in flight when scheduling runs;
    it is held out of one batch so that it, not the older request that needs
    its blocks, is preempted (FCFS: the newest goes)."""
    s = Scheduler(SchedulerConfig(async_scheduling=True, max_num_batched_tokens=16), CacheConfig(block_size=4),
                  4, max_model_len=16)  # 4 blocks: room for one request's whole length
    a, b = add(s, "a", 7, max_tokens=20), add(s, "b", 4, max_tokens=20)
    b1 = s.schedule()  # both prompts: a 2 blocks, b 1
    b2 = s.schedule()  # both decodes; b takes the last free block
    assert b1.num_scheduled_tokens == {"a": 7, "b": 4} and b2.num_scheduled_tokens == {"a": 1, "b": 1}
    assert s.kv.num_free_blocks == 0
    s.update(b1, ModelRunnerOutput({"a": 1, "b": 2}))
    b3 = s.schedule()  # a needs a third block; the victim, b, is in b2: held back, a waits
    assert b3.is_empty and s.num_preemptions_total == 0
    s.update(b2, ModelRunnerOutput({"a": 3, "b": 4}))
    b4 = s.schedule()  # b is out of flight now: preempted, and a gets its block
    assert b4.num_scheduled_tokens["a"] == 1 and s.num_preemptions_total == 1
    assert b.metrics.num_preemptions == 1 and a.metrics.num_preemptions == 0
    # The worker forgets b; b comes back from the queue at once, its full
    # first block a prefix-cache hit, with the block a did not need.
    assert b4.finished_req_ids == {"b"}
    assert [(r.req_id, r.num_computed_tokens) for r in b4.scheduled_new_reqs] == [("b", 4)]



@pytest.mark.parametrize("copy_out_fails", [False, True])
def test_scheduler_swaps_a_request_in_only_once_its_copy_out_is_back(copy_out_fails):
    """A swap-out's slots hold the K/V once the batch carrying the copy has run:
    the request is not swapped back in by the batch behind it, and if that
    batch fails (perhaps before its copies) the request recomputes."""
    s = Scheduler(SchedulerConfig(async_scheduling=True, max_num_batched_tokens=16),
                  CacheConfig(block_size=4, preemption_mode="swap", enable_prefix_caching=False),
                  4, max_model_len=16, num_cpu_blocks=8)
    a, b = add(s, "a", 7, max_tokens=20), add(s, "b", 4, max_tokens=20)
    b1, b2 = s.schedule(), s.schedule()
    s.update(b1, ModelRunnerOutput({"a": 1, "b": 2}))
    s.schedule()  # a needs a block; the victim b is in b2: held back (as in the test above)
    s.update(b2, ModelRunnerOutput({"a": 3, "b": 4}))
    b4 = s.schedule()  # b swapped out
    assert b4.num_scheduled_tokens == {"a": 1} and len(b4.blocks_to_swap_out) == 2 and s.swap.holds("b")
    s.abort_request("a")  # blocks for b at once, while b4 is in flight
    b5 = s.schedule()
    assert b5.is_empty and not b5.blocks_to_swap_in  # b waits for its copy-out
    if copy_out_fails:
        assert s.fail_batch(b4, "boom") == []  # its one request, a, was aborted
        assert not s.swap.holds("b") and b.num_computed_tokens == 0
    else:
        s.update(b4, ModelRunnerOutput({"a": 5}))
    s.update(b5, ModelRunnerOutput({}))
    b6 = s.schedule()
    assert b6.num_scheduled_tokens == {"b": 6 if copy_out_fails else 1}
    assert len(b6.blocks_to_swap_in) == (0 if copy_out_fails else 2)
    assert s.swap.num_free_slots == 8
