"""One benchmark command: build the backend(s) and the workload, run every
(policy, rate) point, and collect the results as one JSON-ready dict."""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys

from tqdm import tqdm

from orca_serve.bench import workloads as wl
from orca_serve.bench.machine import machine_info
from orca_serve.bench.metrics import SLO, RequestResult, summarize
from orca_serve.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig

ENGINE_FIELDS = {f.name for cls in (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)
                 for f in dataclasses.fields(cls)}
# Prompt contents of warmup requests come from their own stream, never the measured prompts,
# so a warmup cannot seed a prefix cache with a measured prompt.
_WARMUP_SALT = 1_000_003


def slo_from_args(args) -> SLO:
    def s(ms):
        return None if ms is None else ms / 1000.0
    return SLO(ttft=s(args.slo_ttft_ms), tpot=s(args.slo_tpot_ms),
               normalized_latency=s(args.slo_normalized_latency_ms))


def make_backend(args, policy: str | None):
    """The backend named by ``--backend``; for the engine, one per scheduling policy."""
    if args.backend == "engine":
        from orca_serve.bench.backends.engine import EngineBackend

        kwargs = {k: getattr(args, k) for k in ENGINE_FIELDS if getattr(args, k, None) is not None}
        kwargs["scheduling_policy"] = policy
        return EngineBackend(kwargs, slo_from_args(args))
    if args.backend == "openai":
        from orca_serve.bench.backends.openai import OpenAIBackend
        from orca_serve.bench.hf_model import load_tokenizer

        if not args.base_url:
            raise ValueError("--backend openai needs --base-url")
        tok = None if args.vocab_size else load_tokenizer(args.tokenizer or _local(args.model))
        if args.prompt_mode == "text" and tok is None:
            raise ValueError("--prompt-mode text needs a tokenizer (--tokenizer) to turn prompt ids into text")
        return OpenAIBackend(args.base_url, model=args.served_model or _served_name(args.model), tokenizer=tok,
                             prompt_mode=args.prompt_mode, plain=args.plain_openai, vocab_size=args.vocab_size)
    from orca_serve.bench.backends.hf import HFContinuousBackend, HFStaticBackend

    common = dict(model=args.model, dtype=args.dtype or "float32", load_format=args.load_format or "auto",
                  dummy_config=args.dummy_config, device=args.device or "auto")
    if args.backend == "hf-static":
        return HFStaticBackend(batch_sizes=_ints(args.hf_batch_sizes), **common)
    if args.backend == "hf-cb":
        return HFContinuousBackend(max_batch_tokens=args.max_num_batched_tokens or 512,
                                   page_size=args.block_size or 64, **common)
    raise ValueError(f"unknown backend {args.backend!r}")


def _local(model: str | None) -> str | None:
    return model if model is None or os.path.exists(model) else None


def _served_name(model: str | None) -> str | None:
    # A local path given to --model names the tokenizer, not the served model: ask the server.
    return None if model is None or os.path.exists(model) else model


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def build_workload(args, backend, salt: int = 0) -> list[wl.RequestSpec]:
    if args.workload.endswith(".jsonl"):
        specs = wl.load_jsonl(args.workload, args.num_requests, ignore_eos=not args.no_ignore_eos)
    else:
        vocab_size, special = backend.vocab()
        params = wl.WorkloadParams(
            input_len=wl.parse_range(args.input_len) if args.input_len else None,
            output_len=wl.parse_range(args.output_len) if args.output_len else None,
            input_median=args.input_median, output_median=args.output_median, sigma=args.sigma,
            num_prefixes=args.num_prefixes, prefix_len=args.prefix_len, ignore_eos=not args.no_ignore_eos)
        specs = wl.generate(args.workload, args.num_requests, wl.allowed_token_ids(vocab_size, special),
                            seed=args.seed, params=params, salt=salt)
    tok = getattr(backend, "tokenizer", None)
    needs_text = getattr(backend, "prompt_mode", "ids") == "text"
    if tok is not None and (needs_text or any(s.prompt_token_ids is None for s in specs)):
        wl.attach_text(specs, tok)
    return specs


def run_point(backend, specs, rate: float, args, label: str, policy: str | None) -> dict:
    arrivals = wl.arrival_times(len(specs), rate, args.burstiness, seed=args.seed)
    total = len(specs) * getattr(backend, "passes", 1)
    with tqdm(total=total, desc=f"{label} @ {_rate_str(rate)} req/s", unit="req",
              disable=args.no_progress, file=sys.stderr, mininterval=0.5) as bar:
        run = backend.run(specs, arrivals, args.max_concurrency, progress=lambda: bar.update(1))
    metrics = summarize(run.results, run.duration, slo_from_args(args))
    return {"label": label, "backend": args.backend, "scheduling_policy": policy,
            "request_rate": _rate_str(rate), "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency, "metrics": metrics, "backend_stats": run.extra,
            "requests": [_request_row(r) for r in run.results]}


def warmup(backend, args) -> None:
    """A few short requests so one-time costs (allocation, lazy init) stay out of the figures."""
    if args.num_warmups <= 0:
        return
    vocab_size, special = backend.vocab()
    specs = wl.generate("random", args.num_warmups, wl.allowed_token_ids(vocab_size, special), seed=args.seed,
                        params=wl.WorkloadParams(input_len=(16, 16), output_len=(4, 4)), salt=_WARMUP_SALT)
    if getattr(backend, "prompt_mode", "ids") == "text" and backend.tokenizer is not None:
        wl.attach_text(specs, backend.tokenizer)
    backend.run(specs, [0.0] * len(specs), None)


def run_bench(args) -> dict:
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [float(args.request_rate)]
    policies = args.scheduling_policy.split(",") if args.backend == "engine" else [None]
    runs, model_name = [], None
    for policy in policies:
        backend = make_backend(args, policy)
        try:
            model_name = model_name or getattr(backend, "model_name", None)
            label = _label(args, policy, len(policies))
            warmup(backend, args)
            for k, rate in enumerate(rates):
                # A new prompt stream per rate: a run must not find its prompts in the
                # prefix cache that the previous run on the same engine/server left.
                specs = build_workload(args, backend, salt=args.prompt_salt + k)
                runs.append(run_point(backend, specs, rate, args, label, policy))
                if not args.quiet:
                    from orca_serve.bench.report import print_run
                    print_run(runs[-1])
        finally:
            backend.close()
    return {"version": 1, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "machine": machine_info(), "model": model_name,
            "config": _config(args), "runs": runs}


def _label(args, policy, num_policies) -> str:
    if args.label:
        return f"{args.label}/{policy}" if num_policies > 1 else args.label
    return policy if args.backend == "engine" else args.backend


def _rate_str(rate: float):
    return "inf" if math.isinf(rate) else rate


def _request_row(r: RequestResult) -> dict:
    def ms(x):
        return None if x is None else round(x * 1000.0, 4)
    return {"index": r.index, "success": r.success, "prompt_len": r.prompt_len, "output_len": r.output_len,
            "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot), "e2el_ms": ms(r.latency),
            "normalized_latency_ms": ms(r.normalized_latency), "num_chunks": len(r.chunk_times),
            "num_preemptions": r.num_preemptions, "error": r.error}


def _config(args) -> dict:
    skip = {"func", "bench_command"}
    return {k: v for k, v in sorted(vars(args).items()) if k not in skip and not callable(v)}
