"""Where one engine iteration's time goes: wall time per step, and for a few
decode steps under torch.profiler the number of ops dispatched, the time the
device spent in kernels and the busiest ops. On a GPU, wall time far above
kernel time means the step is bound by launches and host work.

    python scripts/profile_steps.py --dummy-config gpt3-1.3b --dtype bfloat16 --device cuda

A diagnostic, not a benchmark: the figures we quote come from ``orca-serve bench``.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from orca_serve.bench.overhead import run_prompts_in
from orca_serve.config import EngineConfig
from orca_serve.engine.llm_engine import LLMEngine
from orca_serve.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dummy-config", default="gpt3-125m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--decode-steps", type=int, default=20, help="timed decode steps after the prompts")
    p.add_argument("--kv-cache-memory-gb", type=float, default=4.0)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="decode steps from captured CUDA graphs (the first decode step captures)")
    args = p.parse_args()

    engine = LLMEngine(EngineConfig.from_kwargs(load_format="dummy", dummy_config=args.dummy_config,
                                                dtype=args.dtype, device=args.device,
                                                kv_cache_memory_gb=args.kv_cache_memory_gb,
                                                cuda_graphs=args.cuda_graphs))
    device = engine.executor.runner.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = random.Random(0)
    for i in range(args.requests):
        engine.add_request(str(i), [rng.randrange(100, 1000) for _ in range(args.prompt_len)],
                           SamplingParams(max_tokens=args.decode_steps + 10, temperature=0, ignore_eos=True))

    def timed_step() -> float:
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        return (time.perf_counter() - t0) * 1e3

    prefill = run_prompts_in(engine, timed_step)
    decode = [timed_step() for _ in range(args.decode_steps)]
    graphs = "with decode graphs" if args.cuda_graphs else "eager"
    print(f"{args.dummy_config} {args.dtype} on {device} ({graphs}), {args.requests} requests of "
          f"{args.prompt_len} tokens")
    print(f"prefill steps: {len(prefill)}, ms: {', '.join(f'{t:.1f}' for t in prefill)}")
    print(f"decode steps of {args.requests}: median {statistics.median(decode):.2f} ms "
          f"(min {min(decode):.2f}, max {max(decode):.2f})")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 3
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::")) // steps
    print(f"per decode step under the profiler: {ops} aten ops dispatched", end="")
    if device.type == "cuda":
        kernel_ms = sum(e.self_device_time_total for e in events) / steps / 1e3
        print(f", {kernel_ms:.2f} ms of device kernel time")
        print(events.table(sort_by="self_device_time_total", row_limit=12))
    else:
        print()
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
