"""``bench overhead``: what the engine spends outside the model per iteration.

Runs the same decode-heavy state twice in one process: once with the real
model, once with a null executor that "samples" instantly. The null run's
step time is everything but the model (scheduling, KV bookkeeping, building
the control message, applying tokens, detokenization, outputs); its share of
the real step time is the engine's overhead. Orca's target: under 5% at 256
running requests.
"""
from __future__ import annotations

import random
import statistics
import time

from orca_serve.batch import ModelRunnerOutput, SchedulerOutput
from orca_serve.config import EngineConfig
from orca_serve.engine.executor import Executor
from orca_serve.entrypoints.arg_types import int_in
from orca_serve.sampling_params import SamplingParams


class NullExecutor(Executor):
    """Mirrors the worker's token counts from the control messages and samples a
    fixed token for every request that caught up; no tensors at all."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id
        self.known: dict[str, int] = {}

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids:
            self.known.pop(rid, None)
        for new in so.scheduled_new_reqs:
            self.known[new.req_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
        for cached in so.scheduled_cached_reqs:
            self.known[cached.req_id] += len(cached.new_token_ids)
        sampled = {}
        for new in so.scheduled_new_reqs:
            if new.num_computed_tokens + so.num_scheduled_tokens[new.req_id] == self.known[new.req_id]:
                sampled[new.req_id] = self.token_id
        for cached in so.scheduled_cached_reqs:
            if cached.num_computed_tokens + so.num_scheduled_tokens[cached.req_id] == self.known[cached.req_id]:
                sampled[cached.req_id] = self.token_id
        return ModelRunnerOutput(sampled_token_ids=sampled)


def run_prompts_in(engine, step=None) -> list:
    """Step ``engine`` (or call ``step``) until every request is past its
    prompt, so what follows are pure decode iterations; returns what each step returned."""
    step = step or engine.step
    out = []
    while engine.scheduler.num_waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        out.append(step())
    return out


def _decode_step_times(engine, num_requests: int, prompt_len: int, steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    vocab = engine.vocab_size
    for i in range(num_requests):
        prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
        engine.add_request(f"o{i}", prompt, SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
    run_prompts_in(engine)  # prefill everyone first: we time pure decode iterations
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for i in range(num_requests):
        engine.abort_request(f"o{i}")
    engine.step()
    return times


def run_overhead(args) -> dict:
    from orca_serve.engine.llm_engine import LLMEngine

    kwargs = dict(model=args.model, max_num_seqs=max(256, args.num_requests),
                  max_num_batched_tokens=max(2048, args.num_requests))
    if args.load_format == "dummy":
        kwargs.update(load_format="dummy", dummy_config=args.dummy_config)
    blocks = args.num_requests * (-(-(args.prompt_len + args.steps + 8) // 16)) + 16
    engine = LLMEngine(EngineConfig.from_kwargs(num_kv_blocks=blocks, **kwargs))
    real = _decode_step_times(engine, args.num_requests, args.prompt_len, args.steps, args.seed)
    engine.executor = NullExecutor(token_id=min(100, engine.vocab_size - 1))
    null = _decode_step_times(engine, args.num_requests, args.prompt_len, args.steps, args.seed)
    out = {"num_requests": args.num_requests, "prompt_len": args.prompt_len, "steps": args.steps,
           "median_model_step_ms": 1e3 * statistics.median(real),
           "median_null_step_ms": 1e3 * statistics.median(null)}
    out["overhead_fraction"] = out["median_null_step_ms"] / out["median_model_step_ms"]
    print(f"{args.num_requests} running requests, decode steps: model {out['median_model_step_ms']:.1f} ms, "
          f"engine without model {out['median_null_step_ms']:.2f} ms -> overhead "
          f"{100 * out['overhead_fraction']:.2f}% of an iteration (median of {args.steps})")
    return out


def add_overhead_parser(sub) -> None:
    o = sub.add_parser("overhead", help="engine time outside the model per iteration (null model)")
    o.add_argument("--model", default=None)
    o.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    o.add_argument("--dummy-config", default=None)
    o.add_argument("--num-requests", type=int_in(1), default=256)
    o.add_argument("--prompt-len", type=int_in(1), default=128)
    o.add_argument("--steps", type=int_in(1), default=20)
    o.add_argument("--seed", type=int_in(0), default=0)
    o.add_argument("--out", default=None)
