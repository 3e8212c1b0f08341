"""Throughput with P batches in flight vs one, on a P-stage pipeline.

    python -m orca_serve.distributed.bench_inflight --pipeline-parallel-size 2

Runs the same fixed-seed workload (all requests at once, greedy, fixed
lengths) on an engine with ``max_inflight_batches`` = P and = 1, and reports
generated tokens/s, how much of the time the pipeline stages computed at the
same moment (from the workers' batch timings), and the per-iteration control
message size and cost on the driver. Dummy weights: no checkpoint needed.
"""
from __future__ import annotations

import argparse
import json
import random
import time

from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.sampling_params import SamplingParams

# A GPT-2-shaped model big enough that compute, not control messages, dominates on CPU.
DEFAULT_MODEL = dict(model_type="gpt2", n_embd=512, n_layer=8, n_head=8, n_positions=1024, vocab_size=8192,
                     bos_token_id=0, eos_token_id=0)


def stage_overlap(trace: dict[int, list[tuple]], tp_size: int, pp_size: int) -> dict:
    """From ``DistributedExecutor.batch_trace()``: each stage's busy seconds
    (compute, after its input arrived) and the seconds when every stage was busy at once."""
    busy = []
    for stage in range(pp_size):
        records = trace.get(stage * tp_size, [])
        busy.append(sorted((rec[3], rec[4]) for rec in records))
    if not all(busy):
        return dict(busy_s=[0.0] * pp_size, all_busy_s=0.0, span_s=0.0)
    events = sorted((t, +1 if kind == 0 else -1, s) for s, ivs in enumerate(busy)
                    for iv in ivs for kind, t in enumerate(iv))
    active, all_busy, last = [0] * pp_size, 0.0, None
    for t, delta, stage in events:
        if last is not None and all(a > 0 for a in active):
            all_busy += t - last
        active[stage] += delta
        last = t
    span = max(iv[-1][1] for iv in busy) - min(iv[0][0] for iv in busy)
    return dict(busy_s=[sum(e - s for s, e in ivs) for ivs in busy], all_busy_s=all_busy, span_s=span)


def run_once(args, inflight: int) -> dict:
    engine = LLMEngine(EngineConfig.from_kwargs(
        load_format="dummy", dummy_config=DEFAULT_MODEL, tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, max_inflight_batches=inflight,
        num_kv_blocks=args.num_requests * (-(-(args.prompt_len + args.max_tokens) // 16)) + 8,
        max_num_seqs=args.num_requests, max_num_batched_tokens=max(2048, args.num_requests * args.prompt_len)))
    try:
        rng = random.Random(0)
        vocab = DEFAULT_MODEL["vocab_size"]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        _run(engine, [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(4)], params)  # warm-up
        prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
        sent_before = engine.executor.control_stats()["messages"]
        seconds, iterations = _run(engine, prompts, params)
        trace = engine.executor.batch_trace()
        recent = {rank: [r for r in recs if r[0] >= sent_before] for rank, recs in trace.items()}
        overlap = stage_overlap(recent, args.tensor_parallel_size, args.pipeline_parallel_size)
        latency = [r[1] for recs in recent.values() for r in recs]
        return dict(inflight=inflight, seconds=seconds, engine_steps=iterations,
                    tokens_per_s=args.num_requests * args.max_tokens / seconds,
                    all_stages_busy_fraction=overlap["all_busy_s"] / max(overlap["span_s"], 1e-9),
                    stage_busy_s=overlap["busy_s"], control=engine.executor.control_stats(),
                    control_latency_us=1e6 * sum(latency) / max(1, len(latency)))
    finally:
        engine.shutdown()


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return time.perf_counter() - t0, steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", type=int, default=2)
    # Enough requests that half a batch still costs about half a batch (on CPU
    # a small batch costs nearly as much as a larger one, which hides the gain).
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two settings this many times")
    args = parser.parse_args(argv)
    results = []
    for _ in range(args.repeats):
        for inflight in (args.pipeline_parallel_size, 1):
            results.append(run_once(args, inflight))
            print(json.dumps(results[-1]), flush=True)
    for inflight in (args.pipeline_parallel_size, 1):
        rates = [r["tokens_per_s"] for r in results if r["inflight"] == inflight]
        print(f"in-flight batches {inflight}: {sum(rates) / len(rates):.1f} tok/s (runs: "
              f"{', '.join(f'{x:.1f}' for x in rates)})")


if __name__ == "__main__":
    main()
