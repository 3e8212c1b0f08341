"""LLM API behaviour: seeded sampling, stop conditions, detokenization, bad input."""
import os
import shutil

import numpy as np
import pytest

from helpers_work import count_items_checked
from orca_serve import LLM, SamplingParams
from orca_serve.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=tiny_model_dir("llama"), num_kv_blocks=300, block_size=4, max_num_batched_tokens=64)


def test_seeded_sampling_same_alone_and_in_a_batch(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate([[5, 6, 7, 8]], params)[0].token_ids
    others = [[9, 10, 11], [12, 13, 14, 15, 16], [17] * 20]
    batch = llm.generate(others[:2] + [[5, 6, 7, 8]] + others[2:],
                         [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 2 + [params]
                         + [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)])
    assert batch[2].token_ids == alone
    other_seed = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=12, temperature=1.0, seed=99,
                                                             ignore_eos=True))[0].token_ids
    assert other_seed != alone


def test_stop_token_ids_and_eos(llm):
    greedy = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    stop_at = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_at)
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == greedy.token_ids[:first + 1]


def test_timing_metrics_are_ordered(llm):
    o = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    m = o.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"),
    (dict(logprobs=-1), "logprobs"),
    # inf sampled uniformly, and with min_tokens its masked -inf logits became NaN;
    # an int past float's range failed the whole batch in the sampler.
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=10 ** 400), "temperature must be a finite number"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1.0), "top_k must be an integer"),  # was taken as -1, "disabled"
    # Not lists: an int raised a bare TypeError, a str or bytes passed as its items.
    (dict(stop=5), "stop must be a list of strings, got int"),
    (dict(stop=b"ab"), "stop must be a list of strings, got bytes"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids, got int"),
    (dict(stop_token_ids="12"), "stop_token_ids must be a list of token ids, got str"),
    (dict(stop_token_ids=b"ab"), "stop_token_ids must be a list of token ids, got bytes"),
    (dict(logit_bias={5: 101}), r"logit_bias\[5\] must be in \[-100, 100\], got 101.0"),
    (dict(logit_bias={5: float("nan")}), r"logit_bias\[5\] must be a finite number"),
    (dict(logit_bias={-1: 1}), r"logit_bias: keys must be token ids \(integers >= 0\), got -1"),
    (dict(logit_bias={"5": 1}), r"logit_bias: keys must be token ids \(integers >= 0\), got '5'"),
    (dict(logit_bias=[5]), "logit_bias must be a mapping of token id to bias, got list"),
    # Any value passed as a flag: the string "false" meant True.
    (dict(ignore_eos="false"), "ignore_eos must be True or False"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output must be True or False"),
    (dict(skip_special_tokens=None), "skip_special_tokens must be True or False"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


# Past Python's 4300-digit limit for int -> str: a message built with f"{value}"
# or repr() raised "Exceeds the limit (4300 digits) for integer string
# conversion" instead, a message about the limit and not the field.
HUGE = 10 ** 5000  # 5001 digits


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=-HUGE), "max_tokens must be >= 1, got a negative integer of 5001 digits"),
    (dict(min_tokens=HUGE), r"min_tokens \(an integer of 5001 digits\) must be <= max_tokens \(16\)"),
    (dict(logprobs=HUGE), "logprobs must be <= 20, got an integer of 5001 digits"),
    (dict(top_k=-HUGE), "top_k must be >= -1, got a negative integer of 5001 digits"),
    (dict(temperature=HUGE), "temperature must be a finite number, got an integer of 5001 digits"),
    (dict(top_p=-HUGE), "top_p must be a finite number, got a negative integer of 5001 digits"),
    (dict(stop=[HUGE]), "stop strings must be non-empty strings, got an integer of 5001 digits"),
    (dict(stop_token_ids=[-HUGE]), "stop_token_ids must be >= 0, got a negative integer of 5001 digits"),
    (dict(ignore_eos=HUGE), "ignore_eos must be True or False, got an integer of 5001 digits"),
    (dict(seed=[HUGE]), r"seed must be an integer, got \[an integer of 5001 digits\]"),
    # A long text is cut, its length said.
    (dict(seed="7" * 5000), r"seed must be an integer, got '7+\.\.\.7+' \(a string of 5000 characters\)"),
])
def test_huge_sampling_params_are_named_not_printed(kwargs, match):
    with pytest.raises(ValueError, match=match) as exc:
        SamplingParams(**kwargs)
    assert len(str(exc.value)) < 400


def test_numpy_numbers_are_taken_as_python_ones(llm):
    """A numpy integer is an integer: "must be an integer, got np.int64(3)" said otherwise."""
    params = SamplingParams(max_tokens=np.int64(3), min_tokens=np.int32(1), top_k=np.int64(5), seed=np.uint8(7),
                            temperature=np.float32(0.5), top_p=np.float32(0.5), logprobs=np.int16(2),
                            stop_token_ids=[np.int64(4)], ignore_eos=True)
    assert (params.max_tokens, params.min_tokens, params.top_k, params.seed, params.logprobs) == (3, 1, 5, 7, 2)
    assert type(params.max_tokens) is int and type(params.temperature) is float and params.stop_token_ids == [4]
    out = llm.generate([np.int64(5), np.int64(6), np.int64(7)], params, priority=[np.int64(1)])[0]
    assert out.prompt_token_ids == [5, 6, 7] and all(type(t) is int for t in out.prompt_token_ids)
    assert len(out.token_ids) == 3
    # Collections other than lists: a set of stop strings, an array of stop ids.
    other = SamplingParams(stop={"\n"}, stop_token_ids=np.array([4, 9]))
    assert other.stop == ["\n"] and other.stop_token_ids == [4, 9] and type(other.stop_token_ids[0]) is int


@pytest.mark.parametrize("kwargs,match", [
    # Every prompt has a token and must leave room for one: 1 fails every request.
    (dict(max_model_len=1), "max_model_len must be an integer >= 2"),
    (dict(max_model_len=0), "max_model_len"),
    # torch's generators take [0, 2**64): -1 was silently taken, 10**23 failed after the load.
    (dict(seed=-1), r"seed must be an integer in \[0, 18446744073709551615\], got -1"),
    (dict(seed=10**23), "seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed="x"), "seed must be an integer"),
    # Given without load_format="dummy" it was ignored and the checkpoint loaded.
    (dict(dummy_config="tiny-llama"), "dummy_config needs load_format='dummy'"),
    (dict(load_format="dummy", dummy_config=5), "dummy_config must be a preset name"),
    (dict(model=123), "model must be a path"),
    (dict(model=""), "model must be a path .* or None for the embedded default, got ''"),  # loaded the default
    (dict(cuda_graphs="yes"), "cuda_graphs must be True or False"),
    (dict(async_scheduling=None), "async_scheduling must be True or False"),
    # An infinite delay left a request-level batch that never fills waiting forever.
    (dict(max_queue_delay_s=float("inf")), "max_queue_delay_s must be a finite number >= 0"),
    (dict(max_queue_delay_s=float("nan")), "max_queue_delay_s"),
    (dict(max_queue_delay_s="0.1"), "max_queue_delay_s"),
    # SLO defaults: -1 rejected every request, NaN killed the engine on the first one.
    (dict(default_ttft_slo_s=-1.0), "default_ttft_slo_s must be a finite number > 0"),
    (dict(default_ttft_slo_s=float("inf")), "default_ttft_slo_s"),
    (dict(default_tpot_slo_s=float("nan")), "default_tpot_slo_s must be a finite number > 0"),
    (dict(default_tpot_slo_s=0), "default_tpot_slo_s"),
    (dict(default_tpot_slo_s="1"), "default_tpot_slo_s"),
])
def test_bad_engine_settings(kwargs, match):
    from orca_serve.config import EngineConfig

    with pytest.raises(ValueError, match=match):
        EngineConfig.from_kwargs(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seed=HUGE), r"seed must be an integer in \[0, 18446744073709551615\], got an integer of 5001 digits"),
    (dict(block_size=-HUGE), "block_size must be a positive integer, got a negative integer of 5001 digits"),
    (dict(max_model_len=-HUGE), "max_model_len must be an integer >= 2 .*got a negative integer of 5001 digits"),
    # An int past float's range raised OverflowError from math.isfinite, no ValueError at all.
    (dict(kv_cache_memory_gb=HUGE), "kv_cache_memory_gb must be a finite number > 0 or None, got an integer of "
                                    "5001 digits"),
    (dict(gpu_memory_utilization=HUGE), r"gpu_memory_utilization must be a number in \(0, 1\], got an integer "
                                        "of 5001 digits"),
    (dict(master_port=HUGE), r"master_port must be an integer in \[1, 65535\], got an integer of 5001 digits"),
    (dict(node_rank=HUGE), r"node_rank must be in \[0, nnodes=1\), got an integer of 5001 digits"),
    (dict(nnodes=HUGE, master_port=1234), "world size 1 .* is not divisible by nnodes an integer of 5001 digits"),
    (dict(parallel="auto", tensor_parallel_size=HUGE), "got an integer of 5001 digits and 1"),
    (dict(tensor_parallel_size=HUGE, async_scheduling=True),
     "async_scheduling runs on one rank only; tensor x pipeline parallel size is an integer of 5001 digits"),
    (dict(dtype="x" * 5000), r"dtype must be one of .*; got 'x+\.\.\.x+' \(a string of 5000 characters\)"),
    (dict(load_format="dummy", dummy_config=[HUGE]), r"dummy_config must be a preset name.*got \[an integer of "
                                                     r"5001 digits\]"),
])
def test_huge_engine_settings_are_named_not_printed(kwargs, match):
    from orca_serve.config import EngineConfig

    with pytest.raises(ValueError, match=match) as exc:
        EngineConfig.from_kwargs(**kwargs)
    assert len(str(exc.value)) < 400


@pytest.mark.parametrize("argv,message", [
    # argparse's int() echoed all 5000 digits ("invalid int value: '999...'").
    (["generate", "--prompt", "x", "--max-tokens", "9" * 5000],
     "argument --max-tokens: expected an integer of at most 4300 digits, got one of 5000"),
    (["generate", "--prompt", "x", "--max-num-seqs", "-" + "9" * 5000],
     "argument --max-num-seqs: expected an integer of at most 4300 digits, got one of 5000"),
    (["serve", "--port", "9" * 5000], "argument --port: expected an integer of at most 4300 digits, got one of 5000"),
    (["generate", "--prompt", "x", "--top-k", "x" * 5000],
     "argument --top-k: expected an integer, got 'xxx"),
    # Readable, but 4300 digits: the message printed every one of them.
    (["generate", "--prompt", "x", "--seed", "9" * 4300],
     "orca-serve: error: seed must be an integer in [0, 18446744073709551615], got an integer of 4300 digits"),
    (["generate", "--prompt", "x", "--max-tokens", "-" + "9" * 4300],
     "orca-serve: error: max_tokens must be >= 1, got a negative integer of 4300 digits"),
])
def test_huge_numbers_on_the_command_line_are_named_not_printed(argv, message, capsys):
    from orca_serve.entrypoints.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refused the flag
        code = exc.code
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and len(last) < 400, last


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_generates(tiny_model_dir, dtype):
    # --dtype bfloat16/float16 on a Llama started, then failed every batch (RoPE promoted q/k to float32).
    llm = LLM(model=tiny_model_dir("llama"), dtype=dtype, num_kv_blocks=64)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert out.error is None and out.finish_reason == "length" and len(out.token_ids) == 4


def test_swap_preemption_without_swap_space_says_it_recomputes(tiny_model_dir, caplog):
    # It ran as preemption_mode='recompute' without a word.
    LLM(model=tiny_model_dir("llama"), num_kv_blocks=16, preemption_mode="swap", swap_space_gb=0)
    assert "preemption_mode='swap' but swap_space_gb=0 holds no KV block: every preemption recomputes" in caplog.text


def test_bad_engine_setting_fails_before_the_model_loads(tmp_path):
    # LLM(...) checks its settings first: the model path here does not even exist.
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False"):
        LLM(model=str(tmp_path / "nope"), enable_prefix_caching="no")


@pytest.mark.parametrize("prompt,match", [
    ([], "empty"),
    ([1, 2, 100000], "outside the vocabulary"),
    ([1, -1], "outside the vocabulary"),
    ([1] * 600, "context length"),
    (["a"], "integers"),
])
def test_bad_prompts_fail_alone(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3], prompt], SamplingParams(max_tokens=3))
    # The engine keeps serving, and nothing leaked.
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].finish_reason in ("length", "stop")
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and stats.num_running == 0


@pytest.mark.parametrize("kwargs,match", [
    # Non-finite times broke the waiting queue's order (a str left the request
    # half-added, its id taken for good); with the slo policy an inf or NaN
    # TPOT target failed every iteration's token budget, a str SLO the step
    # that finished the request.
    (dict(arrival_time=float("nan")), "arrival_time must be a finite number"),
    (dict(arrival_time="now"), "arrival_time must be a finite number"),
    (dict(ttft_slo=float("inf")), "ttft_slo must be a finite number"),
    (dict(ttft_slo="1"), "ttft_slo must be a finite number"),
    (dict(ttft_slo=0.0), "ttft_slo must be > 0"),
    (dict(tpot_slo=float("inf")), "tpot_slo must be a finite number"),
    (dict(tpot_slo=float("nan")), "tpot_slo must be a finite number"),
    (dict(tpot_slo=-1.0), "tpot_slo must be > 0"),
    (dict(user=["a"]), "user must be a string"),  # unhashable: a TypeError from the fair policy
    (dict(priority=float("nan")), "priority must be an integer"),
    (dict(request_id=["x"]), "request_id must be a string"),
    (dict(request_id=None), "request_id must be a string"),
    (dict(request_id=HUGE), "request_id must be a string, got an integer of 5001 digits"),
    (dict(user=-HUGE), "user must be a string, got a negative integer of 5001 digits"),
    (dict(priority=[HUGE]), r"priority must be an integer, got \[an integer of 5001 digits\]"),
])
def test_bad_request_fields_fail_alone(tiny_model_dir, kwargs, match):
    llm = LLM(model=tiny_model_dir("llama"), num_kv_blocks=64, block_size=4, scheduling_policy="slo")
    engine, good = llm.engine, SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("before", [1, 2, 3], good, tpot_slo=0.5)
    kwargs = {"request_id": "bad", **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.add_request(kwargs.pop("request_id"), [4, 5, 6], good, **kwargs)
    engine.abort_request(["x"])  # never a request's id: ignored, as an unknown one is
    engine.add_request("after", [7, 8, 9], good)
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert sorted(done) == ["after", "before"] and all(o.finish_reason == "length" for o in done.values())
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and list(engine.scheduler.requests) == []


def test_a_stop_token_outside_the_vocabulary_fails_alone(llm):
    """With min_tokens the sampler masks the stop tokens' logits; an id past the
    vocabulary would fail the whole batch there, so the engine refuses it."""
    bad = SamplingParams(max_tokens=3, min_tokens=2, stop_token_ids=[5, 100000])
    with pytest.raises(ValueError, match="stop_token_ids: token id 100000 is outside the vocabulary"):
        llm.generate([[1, 2, 3], [4, 5, 6]], [SamplingParams(max_tokens=3), bad])
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, min_tokens=2, stop_token_ids=[5]))[0].finished
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and stats.num_running == 0


def test_a_logit_bias_outside_the_vocabulary_fails_alone(llm):
    """The sampler adds the bias at the token's column: one past the vocabulary
    would fail the whole batch there, so the engine refuses it."""
    bad = SamplingParams(max_tokens=3, logit_bias={5: 1.0, 100000: 1.0})
    with pytest.raises(ValueError, match="logit_bias: token id 100000 is outside the vocabulary"):
        llm.generate([[1, 2, 3], [4, 5, 6]], [SamplingParams(max_tokens=3), bad])
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                   logit_bias={5: 100.0}))[0]
    assert out.token_ids == [5, 5, 5]
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and stats.num_running == 0


@pytest.mark.parametrize("field,value,match", [
    ("logprobs", 10 ** 6, "logprobs must be <= 20"),  # failed its batch in topk, the others with it
    ("seed", "x", "seed must be an integer"),  # the same, in the seeded noise
    ("temperature", float("nan"), "temperature must be a finite number"),  # token 0 every time
    ("top_p", 0.0, "top_p must be in"),  # token 0 every time
    ("max_tokens", 0, "max_tokens must be >= 1"),  # generated one token anyway
    ("logit_bias", {5: 1e6}, r"logit_bias\[5\] must be in \[-100, 100\]"),
])
def test_sampling_params_changed_after_construction_are_checked_again(llm, field, value, match):
    params = SamplingParams(max_tokens=3, temperature=1.0)
    setattr(params, field, value)
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3], [4, 5, 6]], [SamplingParams(max_tokens=3), params])
    assert not llm.engine.has_unfinished_requests()
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_min_tokens_with_every_token_a_stop_token_is_refused(llm):
    """The sampler would mask every logit: NaN probabilities, and token 0 out,
    a stop token before min_tokens."""
    vocab = llm.engine.vocab_size
    params = SamplingParams(max_tokens=4, min_tokens=2, temperature=0.8, seed=0, stop_token_ids=list(range(vocab)))
    with pytest.raises(ValueError, match="stop_token_ids: with min_tokens every token of the vocabulary"):
        llm.generate([[1, 2, 3]], params)
    # One token left (EOS is 2) is enough, and it is what comes out.
    params.stop_token_ids = [t for t in range(vocab) if t != 7]
    out = llm.generate([[1, 2, 3]], params)[0]
    assert out.token_ids[:2] == [7, 7] and out.finish_reason == "stop"


def test_the_runner_makes_a_shared_list_s_tensors_once_and_drops_them_after(llm, monkeypatch):
    """The sampler's index tensors of a stop list (under min_tokens) and of a
    bias map were made again every iteration, for every row; now once, shared
    by the requests with that list, and dropped once the worker forgets them."""
    runner = llm.engine.executor.runner
    scatters, sample = [], runner.sampler.sample

    def spy(logits, md):
        scatters.append((md.suppressed, md.logit_bias))
        return sample(logits, md)

    monkeypatch.setattr(runner.sampler, "sample", spy)
    ids = list(range(100, 380))  # long enough to be scattered on its own, not copied per row
    bias = {i: 0.5 for i in range(3, 300)}
    params = SamplingParams(max_tokens=5, min_tokens=5, temperature=0, stop_token_ids=ids, logit_bias=bias)
    outs = llm.generate([[5, 6, 7], [8, 9], [10, 11, 12]], params)
    assert [len(o.token_ids) for o in outs] == [5, 5, 5] and len(scatters) == 5
    assert len(runner.sampling_tensors) == 2
    for suppressed, biased in scatters:
        [(rows, cols, _)] = suppressed
        assert rows.tolist() == [[0], [1], [2]] and cols is scatters[0][0][0][1]
        [(rows, cols, values)] = biased
        assert cols is scatters[0][1][0][1] and values is scatters[0][1][0][2]
    del scatters[:], suppressed, biased, rows, cols, values
    llm.generate([[3, 4]], SamplingParams(max_tokens=1))  # its batch tells the worker to forget them
    assert len(runner.sampling_tensors) == 0


def test_the_sequences_of_a_request_check_its_lists_once(llm, monkeypatch):
    """add_request checked every list and map again for each sequence (40,000
    stop ids and as many stop strings: about 5 ms each, on the engine thread).
    A list a running request uses is checked already and cannot have changed
    (SamplingParams' contract); once none runs it may, and is checked again."""
    engine = llm.engine
    params = SamplingParams(max_tokens=2, min_tokens=1, stop=[f"s{i}" for i in range(300)],
                            stop_token_ids=list(range(100, 380)), logit_bias={i: 0.5 for i in range(3, 300)})
    checked = count_items_checked(monkeypatch)
    engine.add_request("share-0", [1, 2, 3], params)
    assert sum(checked) >= 300 + 280 + 2 * 297
    checked.clear()
    for i in range(1, 4):
        engine.add_request(f"share-{i}", [1, 2, 3], params)
    assert sum(checked) == 0
    assert len(engine._outputs._stop_lists) == 1  # one index of the stop strings, held while they run
    with pytest.raises(ValueError, match="prompt is empty"):  # refused: holds nothing, though its traceback is kept
        engine.add_request("share-refused", [], params)
    while engine.has_unfinished_requests():
        engine.step()
    assert all(len(cache) == 0 for cache in engine._checks._checked.values())
    assert len(engine._outputs._stop_lists) == 0
    params.stop_token_ids.append(100000)  # allowed now that no request using it runs
    with pytest.raises(ValueError, match="stop_token_ids: token id 100000 is outside the vocabulary"):
        engine.add_request("share-4", [1, 2, 3], params)
    assert not engine.has_unfinished_requests()


def _run_engine(engine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


class _LetterTokenizer:
    """Token i decodes to one letter (the tiny model has no tokenizer, so no text)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_a_stop_list_changed_after_its_request_was_aborted_is_used_as_changed(llm, monkeypatch):
    """Once abort_request returns no request uses the list, so it may change
    (SamplingParams' contract), and a request added then with it is checked
    anew. The aborted request's stop index, found by the list's identity, was
    kept until the next step: the new request stopped on the old strings."""
    engine = llm.engine
    monkeypatch.setattr(engine._outputs, "tokenizer", _LetterTokenizer())
    prompt = [3, 4, 5]
    ref = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop = ref.text[-2:]
    assert len(stop) == 2 and "0" not in ref.text
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=["0"])
    engine.add_request("stale-stops-a", prompt, params)
    engine.abort_request("stale-stops-a")
    params.stop[:] = [stop]  # allowed: no request that uses it runs
    engine.add_request("stale-stops-b", prompt, params)
    [b] = [o for o in _run_engine(engine) if o.request_id == "stale-stops-b" and o.finished]
    assert b.finish_reason == "stop" and b.stop_reason == stop
    assert len(engine._outputs._stop_lists) == 0


def test_a_request_id_free_again_after_an_abort_keeps_its_detokenizer(llm, monkeypatch):
    """An aborted request's output was made at the next step, and dropped the
    detokenizer of its id then: a request that took the id meanwhile (it is
    free once abort_request returns) lost its text."""
    engine = llm.engine
    monkeypatch.setattr(engine._outputs, "tokenizer", _LetterTokenizer())
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ref = llm.generate([[3, 4, 5]], params)[0]
    engine.add_request("reused-id", [3, 4, 5], params)
    engine.abort_request("reused-id")
    engine.add_request("reused-id", [3, 4, 5], params)
    finals = [o for o in _run_engine(engine) if o.finished]
    assert [o.finish_reason for o in finals] == ["abort", "length"]
    assert len(ref.text) == 4 and finals[1].token_ids == ref.token_ids and finals[1].text == ref.text


def test_a_failed_batch_keeps_no_sampler_tensors_of_its_lists(llm, monkeypatch):
    """The runner's tensors of a bias map are found by the map's identity
    while a request here holds them. A failed batch's traceback (a cycle,
    freed only by the collector) kept its requests' states, and so their
    tensors: a request added with the map changed in place (allowed: no
    request that uses it runs) was biased by the old one until a collection."""
    import gc

    from helpers_models import fail_next_forward

    engine, runner = llm.engine, llm.engine.executor.runner
    bias = {7: 100.0}
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logit_bias=bias)
    collecting = gc.isenabled()
    gc.disable()  # as a server that freezes or tunes the collector may run
    try:
        engine.add_request("doomed", [3, 4, 5], params)
        assert [o.token_ids for o in engine.step()] == [[7]]  # its row's tensors made
        fail_next_forward(monkeypatch, runner)
        assert [o.finish_reason for o in engine.step()] == ["error"]
        bias.clear()
        bias[9] = 100.0  # allowed now
        engine.add_request("after", [3, 4, 5], params)
        [after] = [o for o in _run_engine(engine) if o.finished]
    finally:
        if collecting:
            gc.enable()
    assert after.token_ids == [9, 9, 9, 9]


def test_a_refused_prompt_leaves_none_of_its_batch_behind(tiny_model_dir):
    """generate cleaned up the prompts queued before a refused one only on a
    ValueError; a full waiting queue left them to run unseen."""
    from orca_serve.engine.errors import QueueFullError

    llm = LLM(model=tiny_model_dir("llama"), num_kv_blocks=64, block_size=4, max_waiting_requests=2)
    with pytest.raises(QueueFullError):
        llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=3))
    assert not llm.engine.has_unfinished_requests()
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    assert len(llm.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=3))) == 2


@pytest.mark.parametrize("prompt,params,priority,match", [
    ([1, HUGE], {}, 0, "prompt 1: prompt: token id an integer of 5001 digits is outside the vocabulary"),
    ([1, -HUGE], {}, 0, "prompt 1: prompt: token id a negative integer of 5001 digits is outside the vocabulary"),
    ([4, 5, 6], dict(max_tokens=HUGE), 0,
     r"prompt 1: max_tokens \(an integer of 5001 digits\) \+ prompt \(3 tokens\) exceeds"),
    ([4, 5, 6], dict(stop_token_ids=[HUGE]), 0,
     "prompt 1: stop_token_ids: token id an integer of 5001 digits is outside the vocabulary"),
    ([4, 5, 6], {}, "9" * 5000, r"prompt 1: priority must be an integer, got '9+\.\.\.9+' \(a string of 5000"),
])
def test_huge_values_in_generate_are_named_and_fail_alone(llm, prompt, params, priority, match):
    with pytest.raises(ValueError, match=match) as exc:
        bad = SamplingParams(**{"max_tokens": 3, **params})
        llm.generate([[1, 2, 3], prompt], [SamplingParams(max_tokens=3), bad], priority=[0, priority])
    assert len(str(exc.value)) < 400
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3))[0].finish_reason in ("length", "stop")
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and stats.num_running == 0


def test_huge_integers_that_are_valid_are_served(llm):
    """A seed, a top_k past the vocabulary (off) and a priority may be any size."""
    params = SamplingParams(max_tokens=3, seed=HUGE, top_k=HUGE, temperature=1.0, ignore_eos=True)
    outs = llm.generate([[1, 2, 3], [4, 5, 6]], params, priority=[-HUGE, HUGE])
    assert [len(o.token_ids) for o in outs] == [3, 3]
    again = llm.generate([[1, 2, 3]], params)[0]
    assert again.token_ids == outs[0].token_ids  # the seed, however large, still decides the tokens
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total


def test_max_tokens_over_context(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=600))


def test_bad_model_paths(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="does not exist|not found|No such"):
        LLM(model=str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config"):
        LLM(model=str(broken))
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    src = tiny_model_dir("llama")
    for name in os.listdir(src):
        data = open(os.path.join(src, name), "rb").read()
        if name.endswith(".safetensors"):
            data = data[: len(data) // 2]
        (trunc / name).write_bytes(data)
    with pytest.raises(ValueError, match="safetensors|truncated|corrupt"):
        LLM(model=str(trunc))


def test_incremental_detokenizer_multibyte(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = "Héllo wörld — 日本語のテキスト 🙂🚀 naïve café"
    ids = tok(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, [1, 2], SamplingParams(skip_special_tokens=True))
    pieces = [detok.add_tokens([t], final=(i == len(ids) - 1))[0] for i, t in enumerate(ids)]
    assert "".join(pieces) == tok.decode(ids) == detok.text
    assert all("\ufffd" not in p for p in pieces)


def test_direct_decoder_gives_the_tokenizers_text(default_model_dir):
    """The detokenizer calls the Rust decoder directly; its text must be
    transformers' ``decode``, special tokens and stray bytes included."""
    import random

    from transformers import AutoTokenizer

    from orca_serve.engine.detokenizer import decoder_for

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert not tok.clean_up_tokenization_spaces
    decode = decoder_for(tok)
    rng = random.Random(0)
    special = list(tok.all_special_ids)
    for _ in range(200):
        ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tok))
               for _ in range(rng.randint(1, 12))]
        for skip in (False, True):
            assert decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip), ids
    # A tokenizer that asks for the clean-up, or whose class decodes its own
    # way, keeps its decode.
    ids = tok("a , b .", add_special_tokens=False).input_ids

    class Shouting(type(tok)):
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).upper()
    shouting = Shouting.from_pretrained(default_model_dir)
    assert decoder_for(shouting)(ids, skip_special_tokens=True) == "A , B ."
    tok.clean_up_tokenization_spaces = True
    tok.decode = lambda token_ids, skip_special_tokens: "decode() was called"
    assert decoder_for(tok)(ids, skip_special_tokens=True) == "decode() was called"


def test_stop_string_is_cut_and_never_streamed(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tok("The capital of France is Paris. It is big.", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, [1], SamplingParams(stop=["Paris."]))
    streamed, stop = "", None
    for t in ids:
        delta, stop = detok.add_tokens([t])
        streamed += delta
        if stop:
            break
    assert stop == "Paris." and streamed == "The capital of France is " == detok.text


def test_stop_strings_wait_for_min_tokens(default_model_dir):
    """Like EOS and stop tokens, a stop string ends a request only after
    min_tokens tokens; it ended one at its first token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tok("a b c d e f", add_special_tokens=False).input_ids
    assert len(ids) == 6

    def run(min_tokens):
        detok = IncrementalDetokenizer(tok, [1], SamplingParams(stop=[" "], min_tokens=min_tokens))
        for n, t in enumerate(ids, 1):
            _, stop = detok.add_tokens([t])
            if stop:
                return n, detok.text
    assert run(0) == (2, "a")
    assert run(3) == (4, "a b c")  # the space of the 4th token, the first past min_tokens


def test_a_prompt_with_a_lone_surrogate_is_refused(tiny_model_dir, default_model_dir, tmp_path):
    """The tokenizer's TypeError named no field, and generate left the prompts before it queued."""
    shutil.copytree(tiny_model_dir("llama"), tmp_path, dirs_exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(default_model_dir, name), tmp_path)
    llm = LLM(model=str(tmp_path), num_kv_blocks=64, block_size=4)
    with pytest.raises(ValueError, match="prompt 1: prompt: text holds an unpaired UTF-16 surrogate at 3"):
        llm.generate([[1, 2, 3], "hi \ud800"], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    """A tiny llama with a real tokenizer and a ChatML template (server_helpers)."""
    from server_helpers import build_tiny_model

    return LLM(model=str(build_tiny_model(tmp_path_factory.mktemp("chat-llama"))), num_kv_blocks=64, block_size=4)


_HI = [{"role": "user", "content": "hi"}]


def _serves_and_holds_nothing(llm) -> None:
    assert not llm.engine.has_unfinished_requests()
    assert llm.chat(_HI, SamplingParams(max_tokens=2))[0].finish_reason in ("length", "stop")
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total and stats.num_running == 0


@pytest.mark.parametrize("messages,match", [
    # Each raised what the template or tokenizer raised (a jinja UndefinedError,
    # a TypeError, a KeyError) or rendered garbage, naming no message.
    ("hi", r"messages must be a list of \{role, content\} dicts .*, got str"),
    ({"role": "user", "content": "hi"}, r"messages must be a list of \{role, content\} dicts .*, got dict"),
    (["hi"], r"messages\[0\]: must be an object with role and content, got 'hi'"),
    ([{"role": "user", "content": "hi"}, {"content": "x"}], r"messages\[1\]\.role is missing"),
    ([{"role": 5, "content": "hi"}], r"messages\[0\]\.role must be a string, got 5"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content must be a string, a list of text parts or None, "
                                       r"got 5"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content: part 0 has type 'image_url'; only text parts are supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], r'messages\[0\]\.content: part 0 needs "text", a string'),
    ([{"role": "user", "content": "hi", "name": 5}], r"messages\[0\]\.name must be a string, got 5"),
    ([{"role": "user", "content": "hi \ud800"}],
     r"messages\[0\]\.content: text holds an unpaired UTF-16 surrogate at 3"),
    # A list of conversations: the bad one is named, and none of them is queued.
    ([_HI, []], "conversation 1: messages must hold at least one message"),
    ([_HI, _HI + [{"role": None, "content": "x"}]], r"conversation 1: messages\[1\]\.role must be a string, got None"),
    ([_HI, "hi"], r"conversation 1: messages: must be a list of objects with role and content, got 'hi'"),
])
def test_malformed_chat_messages_are_named_and_nothing_is_queued(chat_llm, messages, match):
    with pytest.raises(ValueError, match=match):
        chat_llm.chat(messages, SamplingParams(max_tokens=3))
    _serves_and_holds_nothing(chat_llm)


@pytest.mark.parametrize("template,error", [
    ("{{ raise_exception('roles must alternate') }}", "TemplateError: roles must alternate"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
    ("{{ messages[0].nope.deeper }}", "UndefinedError"),
])
def test_a_failing_chat_template_is_named_with_its_conversation(chat_llm, monkeypatch, template, error):
    """A template may fail on a well-formed conversation (here on one of two
    messages); the error says the template failed, and on which conversation."""
    two = _HI + [{"role": "assistant", "content": "hello"}]
    monkeypatch.setattr(chat_llm.tokenizer, "chat_template",
                        "{% if messages | length > 1 %}" + template + "{% endif %}{{ messages[0]['content'] }}")
    with pytest.raises(ValueError, match=f"^conversation 1: messages: the chat template failed: {error}"):
        chat_llm.chat([_HI, two], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match=f"^messages: the chat template failed: {error}"):
        chat_llm.chat(two, SamplingParams(max_tokens=3))
    _serves_and_holds_nothing(chat_llm)


def test_a_conversation_the_engine_refuses_is_named_as_a_conversation(chat_llm):
    """Errors found after rendering (the context length, a sampling field)
    named "prompt 1", a word the caller of chat never used."""
    too_long = [{"role": "user", "content": "hi " * (chat_llm.engine.max_model_len + 10)}]
    with pytest.raises(ValueError, match=r"^conversation 1: prompt has \d+ tokens"):
        chat_llm.chat([_HI, too_long], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="one entry per conversation"):
        chat_llm.chat([_HI, _HI], [SamplingParams(max_tokens=3)])
    _serves_and_holds_nothing(chat_llm)


def test_chat_takes_the_content_shapes_the_server_takes(chat_llm, monkeypatch):
    """Text parts are joined by newlines, as the server joins them; a null
    content (an assistant message with tool calls) and keys other than role,
    content and name reach the template as given: templates test for them."""
    params = SamplingParams(max_tokens=2, temperature=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": "Hello\nworld"}]
    assert chat_llm.chat(parts, params)[0].prompt_token_ids == chat_llm.chat(plain, params)[0].prompt_token_ids
    monkeypatch.setattr(chat_llm.tokenizer, "chat_template",
                        "{% for m in messages %}{{ m['role'] }}:"
                        "{% if m.content is defined %}{{ m.content }}{% else %}<absent>{% endif %}"
                        "{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% endif %}"
                        "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %};{% endfor %}")
    tools = _HI + [{"role": "assistant", "content": None, "tool_calls": [
                       {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
                   {"role": "tool", "content": "4", "tool_call_id": "c1"}]
    out = chat_llm.chat([tools, _HI], params)
    # As transformers renders the messages as given: it drops a null content, which
    # a tool-call turn's template tests for ('' would be a content).
    given = chat_llm.tokenizer.apply_chat_template(tools, tokenize=False)
    assert given == "user:hi;assistant:<absent>add;tool:4[c1];"
    expected = chat_llm.tokenizer(given, add_special_tokens=False).input_ids
    assert out[0].prompt_token_ids == expected and len(out) == 2
    _serves_and_holds_nothing(chat_llm)


def test_chat_and_cli_on_default_model(default_model_dir, capsys):
    from orca_serve.entrypoints.cli import main

    assert main(["generate", "--prompt", "What is the capital of France?", "--max-tokens", "12",
                 "--num-kv-blocks", "64"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["generate", "--prompt", "x", "--max-tokens", "0", "--num-kv-blocks", "64"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_generate_chat_on_a_model_without_a_chat_template_names_the_flag(capsys):
    from orca_serve.entrypoints.cli import main

    # It said "messages: this model has no chat template", a field the command line does not have.
    assert main(["generate", "--prompt", "x", "--load-format", "dummy", "--dummy-config", "tiny-llama",
                 "--num-kv-blocks", "8"]) == 2
    assert "orca-serve: error: --chat: this model has no chat template; pass --no-chat" in capsys.readouterr().err


def test_baseline_batch_flags_say_they_do_not_cap_other_policies():
    # --max-batch-size reads like a cap on every policy; the help must say it
    # is the request-level baseline's alone, and where the real cap lives.
    import argparse

    from orca_serve.entrypoints.cli import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["max_batch_size"].startswith("request-level policy only")
    assert "--max-num-seqs" in helps["max_batch_size"] and helps["max_batch_size"].endswith("default: 16")
    assert helps["max_queue_delay_s"].startswith("request-level policy only")
    assert helps["max_num_seqs"] == "default: 256"


def test_an_interrupted_generate_leaves_nothing_behind(tiny_model_dir):
    """A Ctrl-C inside generate (not an Exception) left its requests in the
    engine: they ran on unseen, and the next generate could take their outputs."""
    llm = LLM(model=tiny_model_dir("llama"), num_kv_blocks=64, block_size=4)
    step, calls = llm.engine.step, []

    def interrupted_once():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step()

    llm.engine.step = interrupted_once
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert not llm.engine.has_unfinished_requests()
    stats = llm.engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total
    outs = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(outs) == 1 and outs[0].prompt_token_ids == [7, 8, 9] and len(outs[0].token_ids) == 3
