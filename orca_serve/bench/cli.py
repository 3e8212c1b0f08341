"""``orca-serve bench``: run a benchmark, or ``compare`` / ``roofline`` / ``hf-dir``.

``add_bench_parser`` hangs the command on the main CLI; ``python -m
orca_serve.bench`` runs the same parser alone. Engine flags are the main
CLI's (derived from the config dataclasses); ``--seed``,
``--scheduling-policy`` (a comma list here) and ``--model`` are redefined.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from orca_serve.config import SCHEDULING_POLICIES
from orca_serve.entrypoints.arg_types import checked, float_in, int_in, list_of
from orca_serve.shown import shown

BACKENDS = ("engine", "openai", "hf-static", "hf-cb")
# Requests per second, > 0; inf: all at once.
_rate = float_in(0, strict=True, allow_inf=True)


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {shown(text)}")
    return text


def _workload(text: str) -> str:
    from orca_serve.bench.workloads import WORKLOADS

    if text in WORKLOADS or (text.endswith(".jsonl") and os.path.isfile(text)):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(WORKLOADS)} or an existing .jsonl file, "
                                     f"got {shown(text)}")


def _policy(text: str) -> str:
    if text not in SCHEDULING_POLICIES:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a scheduling policy; choose from "
                                         f"{', '.join(SCHEDULING_POLICIES)}")
    return text


def _length_range(text: str):
    from orca_serve.bench.workloads import parse_range

    try:
        return parse_range(text)
    except ValueError as exc:
        if "length range" in str(exc):
            raise
        raise ValueError(f"expected a length N or a range LO:HI, got {shown(text)}") from None


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark the engine, a server or a peer",
                              conflict_handler="resolve", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from orca_serve.entrypoints.cli import add_engine_args

    add_engine_args(p)  # first, so the bench flags below replace the few that clash
    g = p.add_argument_group("target")
    g.add_argument("--backend", choices=BACKENDS, default="engine")
    g.add_argument("--model", default=None, help="model dir or .gguf (engine, hf-*: default the embedded "
                   "SmolLM2); openai: the served model name, or a local path to take the tokenizer from")
    g.add_argument("--base-url", default=None, type=_http_url, help="openai: e.g. http://127.0.0.1:8000")
    g.add_argument("--served-model", default=None, help="openai: model name to request (default: "
                   "--model if it is not a path, else the server's first model)")
    g.add_argument("--tokenizer", default=None, help="openai: tokenizer dir/.gguf for the vocabulary and text")
    g.add_argument("--vocab-size", type=int_in(1), default=None, help="openai without a tokenizer: draw ids below this")
    g.add_argument("--prompt-mode", choices=("ids", "text"), default="ids", help="openai: prompt as token ids or text")
    g.add_argument("--plain-openai", action="store_true", help="openai: omit ignore_eos/min_tokens extensions")
    g.add_argument("--hf-batch-sizes", default="8,32,128", type=checked(list_of(int_in(1))), help="hf-static: batch sizes to try (best is kept)")
    g.add_argument("--scheduling-policy", default="fcfs", type=checked(list_of(_policy)),
                   help="engine: policy, or a comma list for one curve each (e.g. fcfs,request-level)")
    g.add_argument("--threads", type=int_in(1), default=None, help="torch threads in this process")
    g.add_argument("--label", default=None, help="curve name in results and plots (default: policy/backend)")

    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="orca", type=_workload,
                   help="orca | random | sharegpt-like | shared-prefix | FILE.jsonl")
    w.add_argument("--num-requests", type=int_in(1), default=128)
    w.add_argument("--seed", type=int_in(0), default=0, help="one seed for lengths, prompts, arrivals (and dummy weights)")
    w.add_argument("--input-len", default=None, type=checked(_length_range), help="prompt length LO:HI or N (orca default 32:512)")
    w.add_argument("--output-len", default=None, type=checked(_length_range), help="output length LO:HI or N (orca default 1:128)")
    w.add_argument("--input-median", type=float_in(0, strict=True), default=128.0, help="sharegpt-like: median prompt length")
    w.add_argument("--output-median", type=float_in(0, strict=True), default=192.0, help="sharegpt-like: median output length")
    w.add_argument("--sigma", type=float_in(0), default=1.0, help="sharegpt-like: log-normal sigma")
    w.add_argument("--num-prefixes", type=int_in(1), default=4, help="shared-prefix: distinct system prompts")
    w.add_argument("--prefix-len", type=int_in(0), default=256, help="shared-prefix: tokens per system prompt")
    w.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    w.add_argument("--prompt-salt", type=int_in(0), default=0, help="new prompt contents, same lengths (fresh caches)")

    a = p.add_argument_group("load")
    a.add_argument("--request-rate", type=_rate, default=float("inf"), help="req/s; inf = all at t=0")
    a.add_argument("--rates", default=None, type=checked(list_of(_rate)), help="sweep: R1,R2,... req/s (overrides --request-rate)")
    a.add_argument("--burstiness", type=float_in(0, strict=True), default=1.0, help="gamma shape of gaps; 1 = Poisson")
    a.add_argument("--max-concurrency", type=int_in(1), default=None, help="at most this many requests in flight")
    a.add_argument("--num-warmups", type=int_in(0), default=2, help="short unmeasured requests first")

    o = p.add_argument_group("results")
    o.add_argument("--slo-ttft-ms", type=float_in(0, strict=True), default=None)
    o.add_argument("--slo-tpot-ms", type=float_in(0, strict=True), default=None)
    o.add_argument("--slo-normalized-latency-ms", type=float_in(0, strict=True), default=None)
    o.add_argument("--out", default=None, help="write every figure and per-request row as JSON")
    o.add_argument("--plot", default=None, help="PNG: median normalized latency vs throughput")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--quiet", action="store_true", help="no summary tables")
    p.set_defaults(func=main, bench_command=None)

    sub = p.add_subparsers(dest="bench_command")
    c = sub.add_parser("compare", help="ratios between result files (throughput at equal latency; SLO "
                                       "attainment where the baseline's falls to 42%%)")
    c.add_argument("files", nargs="+")
    c.add_argument("--baseline", default=None, help="label of the reference curve (default: last file's)")
    c.add_argument("--plot", default=None, help="PNG with every file's curves")
    c.add_argument("--out", default=None, help="write the ratios as JSON")
    c.add_argument("--median", action="store_true",
                   help="the files are repeats: compare each label's per-metric medians, and the "
                        "repeats round by round (the median of the per-round ratios)")
    c.set_defaults(func=main)
    r = sub.add_parser("roofline", help="this machine's GEMM/bandwidth ceiling for the model")
    r.add_argument("--model", default=None)
    r.add_argument("--load-format", choices=("auto", "dummy"), default="auto")
    r.add_argument("--dummy-config", default=None)
    r.add_argument("--num-tokens", type=int_in(1), default=128, help="tokens per iteration (decode batch)")
    r.add_argument("--context-len", type=int_in(1), default=None, help="KV context per token (default: from --result)")
    r.add_argument("--prefill-tokens", type=int_in(1), default=2048,
                   help="rows of a prefill iteration (the token budget) for the trace's prompt GEMM rate")
    r.add_argument("--result", default=None, nargs="+",
                   help="bench JSON(s): print the (median) throughput's fraction of the ceiling")
    r.add_argument("--rounds", type=int, default=3,
                   help="times every GEMM shape is measured; the ceiling takes each shape's best round")
    r.add_argument("--round-gap", type=float, default=10.0,
                   help="seconds between rounds, so that one busy minute on a shared machine cannot set them all")
    r.add_argument("--threads", type=int_in(1), default=None)
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    r.add_argument("--out", default=None)
    r.set_defaults(func=main)
    from orca_serve.bench.overhead import add_overhead_parser

    add_overhead_parser(sub)
    o = sub.choices["overhead"]
    o.set_defaults(func=main)
    h = sub.add_parser("hf-dir", help="print the HF directory of a model (for vLLM / transformers peers)")
    h.add_argument("--model", default=None)
    h.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    cmd = getattr(args, "bench_command", None)
    if cmd == "compare":
        from orca_serve.bench import report

        result = report.compare(args.files, args.baseline, median=args.median)
        if args.plot:
            from orca_serve.bench.plot import plot

            plot([report.load(f) for f in args.files], args.plot)
        if args.out:
            _write(args.out, result)
        return 0
    if cmd == "roofline":
        from orca_serve.bench.roofline import run_roofline

        run_roofline(args)
        return 0
    if cmd == "overhead":
        from orca_serve.bench.overhead import run_overhead

        result = run_overhead(args)
        if args.out:
            _write(args.out, result)
        return 0
    if cmd == "hf-dir":
        from orca_serve.bench.hf_model import hf_dir

        print(hf_dir(args.model))
        return 0
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from orca_serve.bench.runner import run_bench

    if args.num_requests < 1:
        raise ValueError("--num-requests must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_bench(args)
    if len(result["runs"]) > 1 and not args.quiet:
        from orca_serve.bench.report import print_sweep

        print_sweep(result)
    if args.out:
        _write(args.out, result)
    if args.plot:
        from orca_serve.bench.plot import plot

        plot([result], args.plot, title=f"{result['model']} · {args.workload} · {args.num_requests} requests")
    failed = sum(run["metrics"]["failed"] for run in result["runs"])
    if failed and failed == sum(run["metrics"]["num_requests"] for run in result["runs"]):
        # Nothing was measured: say why (a prompt over the model's length, a server that is down, ...).
        first = next(r["error"] for run in result["runs"] for r in run["requests"] if not r["success"])
        print(f"orca-serve bench: every request failed; the first: {first}", file=sys.stderr)
        return 1
    return 0


def _write(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(_finite(data), f, indent=1, allow_nan=False, default=str)


def _finite(x):
    """Strict JSON has no inf/NaN: write them as strings ("inf", like --request-rate)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
