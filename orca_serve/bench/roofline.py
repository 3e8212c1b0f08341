"""``bench roofline``: this machine's ceiling for the model, and our fraction of it.

The ceiling for an iteration of T tokens (T decoding requests, each over a
context of c tokens) is T / max(compute time, memory time):

- compute time: the measured time of the model's own GEMMs at T rows (QKV,
  attention output, MLP, LM head; float32 on this process's CPU threads by
  default, or --device cuda --dtype bfloat16 for a GPU), by the fastest of
  ``F.linear`` and the prepacked matmuls the layers use on CPU float32
  (oneDNN's, and the native kernels' panels), each shape's best over
  several rounds spaced apart (see ``gemm_rounds``),
  plus attention's 4*c*heads*head_dim FLOPs per token and layer at the
  FLOP rate those GEMMs reached;
- memory time: weights read once per iteration plus every token's KV
  context, at the bandwidth of a large tensor copy.

Given a bench JSON, throughput is divided by that ceiling. Prompt tokens cost
the same GEMM FLOPs as decode tokens, so the total-token fraction is the
utilisation figure; the output-token fraction is printed beside it.

The model's side, which needs no measuring (its GEMM shapes, the FLOPs a
trace needs), is ``model_flops.py``; this module measures and compares.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

from orca_serve import kernels
from orca_serve.bench import report
from orca_serve.bench.machine import cpus_of, describe, machine_info, mixed_cpus_warning
from orca_serve.bench.model_flops import (Dims, Shape, gemm_rate, gemm_shapes, layer_shapes, total_flops,
                                          total_seconds, trace_flops)
from orca_serve.kernels import packed_gemm


def _timed(fn, device: torch.device) -> float:
    # GPU kernels run asynchronously: wait for them on both sides of the clock.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def time_gemm(m: int, k: int, n: int, dtype=torch.float32, device="cpu", reps: int = 10) -> float:
    """Best seconds of [m,k] x [n,k]^T by the fastest path the model layers can
    take here: ``F.linear``, or, where the runner prepacks (CPU float32), the
    native panel matmul and oneDNN's against a prepacked weight (what the
    layers use when the native kernels did not build).

    The best of several, not the median: a ceiling is what the machine can do,
    and interference from other processes only ever makes a run slower.
    """
    device = torch.device(device)
    x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    paths = [lambda: F.linear(x, w)]
    if packed_gemm.unavailable_reason(device, dtype) is None:
        onednn = packed_gemm.pack_onednn(w)
        paths.append(lambda: packed_gemm.linear_onednn(x, onednn, None))
        ops = kernels.load()
        if ops is not None:
            panels, out = ops.pack_panels(w), torch.empty(m, n)
            paths.append(lambda: ops.panel_linear(out, x, panels, None))
    best = math.inf
    for path in paths:
        for _ in range(3):
            _timed(path, device)
        best = min(best, *(_timed(path, device) for _ in range(reps)))
    return best


def memory_bandwidth(mib: int = 512, device="cpu", reps: int = 5) -> float:
    """Bytes/s of a large tensor copy (each copy reads and writes ``mib`` MiB)."""
    device = torch.device(device)
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(reps))
    return 2 * src.numel() * 4 / best


def ceiling(d: Dims, tokens: int, context: int, bandwidth: float, gemm_times: dict[str, float],
            dtype=torch.float32) -> dict:
    """Tokens/s this machine could process in iterations of ``tokens`` decode tokens,
    given the seconds of each of ``gemm_shapes(d, tokens)`` (see ``gemm_rounds``)."""
    shapes = gemm_shapes(d, tokens)
    elem_bytes = torch.tensor([], dtype=dtype).element_size()
    gemm_flops, gemm_s = total_flops(shapes), total_seconds(shapes, gemm_times)
    flop_rate = gemm_flops / gemm_s
    attn_flops = 4 * context * d.heads * d.head_dim * d.layers * tokens
    compute_s = gemm_s + attn_flops / flop_rate
    weight_bytes = sum(k * n * count for _, _, k, n, count in shapes) * elem_bytes
    kv_bytes = tokens * context * d.layers * 2 * d.kv_heads * d.head_dim * elem_bytes
    memory_s = (weight_bytes + kv_bytes) / bandwidth
    return {"tokens": tokens, "context": context, "gemm_gflops": flop_rate / 1e9,
            "gemm_ms": {k: v * 1000.0 for k, v in gemm_times.items()},
            "flops_per_token": (gemm_flops + attn_flops) / tokens, "compute_s": compute_s,
            "memory_s": memory_s, "bandwidth_gb_s": bandwidth / 1e9,
            "bound": "compute" if compute_s >= memory_s else "memory",
            "ceiling_tokens_per_s": tokens / max(compute_s, memory_s)}


def gemm_rounds(views: dict[str, list[Shape]], rounds: int, gap_s: float, dtype=torch.float32,
                device="cpu") -> list[dict[str, dict[str, float]]]:
    """Seconds of every GEMM shape of every view (by ``time_gemm``), measured
    ``rounds`` times: each round times every shape in turn, rounds ``gap_s``
    apart. On a shared machine one round's figures move with the minute it
    ran in (the same GEMMs measured 127-175 GFLOP/s at 2048 rows from one
    run of this command to the next on this project's 2-core machine); a
    ceiling taken from each shape's best over rounds spaced apart is what
    the machine can do, not what one minute let it do."""
    measured = []
    for r in range(rounds):
        if r and gap_s > 0:
            time.sleep(gap_s)
        measured.append({view: {name: time_gemm(m, k, n, dtype, device) for name, m, k, n, _ in shapes}
                         for view, shapes in views.items()})
    return measured


def best_times(measured: list[dict[str, dict[str, float]]], view: str) -> dict[str, float]:
    """Each shape's best seconds over the rounds of ``gemm_rounds``."""
    return {name: min(r[view][name] for r in measured) for name in measured[0][view]}


def trace_fraction(d: Dims, result: dict, prefill_rate: float, decode_rate: float) -> dict:
    """Our fraction of the matmul ceiling on the run's own trace: the time the
    trace's FLOPs take at the measured GEMM rates (prompt tokens at the
    prefill batch's row count, decode tokens and LM head at the decode batch's)
    over the time the run took."""
    rows = []
    for run in result["runs"]:
        reqs = [r for r in run["requests"] if r["success"]]
        prompt, decode = trace_flops(d, reqs)
        ideal_s = prompt / prefill_rate + decode / decode_rate
        duration = run["metrics"]["duration_s"]
        rows.append({"label": run["label"], "request_rate": run["request_rate"], "duration_s": duration,
                     "prompt_tflop": prompt / 1e12, "decode_tflop": decode / 1e12, "ideal_s": ideal_s,
                     "fraction": ideal_s / duration})
    return {"prefill_gemm_gflops": prefill_rate / 1e9, "decode_gemm_gflops": decode_rate / 1e9, "runs": rows}


def fractions(result: dict, ceiling_tok_s: float) -> list[dict]:
    rows = []
    for run in result["runs"]:
        m = run["metrics"]
        rows.append({"label": run["label"], "request_rate": run["request_rate"], "repeats": run.get("repeats", 1),
                     "output_throughput": m["output_throughput"],
                     "total_token_throughput": m["total_token_throughput"],
                     "output_fraction": m["output_throughput"] / ceiling_tok_s,
                     "total_fraction": m["total_token_throughput"] / ceiling_tok_s})
    return rows


def mean_context(result: dict) -> int:
    """Mean KV context a decode step saw in the run: prompt plus half the output."""
    reqs = [r for run in result["runs"] for r in run["requests"] if r["success"]]
    if not reqs:
        return 256
    return round(statistics.mean(r["prompt_len"] + r["output_len"] / 2 for r in reqs))


def run_roofline(args) -> dict:
    from orca_serve.config import ModelConfig
    from orca_serve.models.loader import load_hf_config

    if args.threads:
        torch.set_num_threads(args.threads)
    mc = ModelConfig(model=args.model, load_format=args.load_format or "auto", dummy_config=args.dummy_config)
    dims = Dims.from_hf_config(load_hf_config(mc))
    result = None
    context = args.context_len or 256
    if args.result:  # one or more repeats of a run: their per-metric medians are compared
        result = {"runs": [r for runs in report.median_runs(args.result).values() for r in runs]}
        context = args.context_len or mean_context(report.load(args.result[0]))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.rounds < 1 or not 0 <= args.round_gap < math.inf:  # NaN too
        raise SystemExit(f"--rounds must be at least 1 and --round-gap at least 0 and finite "
                         f"(got {args.rounds} and {args.round_gap})")
    views = {"decode": gemm_shapes(dims, args.num_tokens)}
    if result:  # the trace view's prompt-side rate, measured in the same rounds
        views["prefill"] = layer_shapes(dims, args.prefill_tokens)
    measured = gemm_rounds(views, args.rounds, args.round_gap, dtype, args.device)
    out = {"model": args.model or args.dummy_config or "default", "machine": machine_info(),
           "dims": asdict(dims), "device": args.device,
           "dtype": args.dtype, "threads": torch.get_num_threads(),
           "rounds": [{view: {"gemm_gflops": gemm_rate(views[view], r[view]) / 1e9,
                              "gemm_ms": {k: v * 1000.0 for k, v in r[view].items()}} for view in views}
                      for r in measured],
           **ceiling(dims, args.num_tokens, context, memory_bandwidth(device=args.device),
                     best_times(measured, "decode"), dtype)}
    if result:
        out["runs"] = fractions(result, out["ceiling_tokens_per_s"])
        # The trace view: each repeat's own requests and duration, median fraction.
        with_requests = {"runs": [r for p in args.result for r in report.load(p)["runs"]]}
        trace = trace_fraction(dims, with_requests, gemm_rate(views["prefill"], best_times(measured, "prefill")),
                               out["gemm_gflops"] * 1e9)
        trace["median_fraction"] = statistics.median(r["fraction"] for r in trace["runs"])
        trace["prefill_tokens"] = args.prefill_tokens
        out["trace"] = trace
        # A fraction of a ceiling measured on another CPU than the runs' means nothing.
        out["mixed_cpus"] = mixed_cpus_warning({**cpus_of({p: report.load(p) for p in args.result}),
                                                "this machine (the ceiling)": out["machine"]["cpu"]})
    _print(out)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


def _print(r: dict) -> None:
    print(f"{' roofline: ' + str(r['model']) + ' ':=^64}")
    print(f"{describe(r['machine']['cpu'])}, {r['device']}, {r['dtype']}, {r['threads']} threads; "
          f"{r['tokens']} tokens/iteration, context {r['context']}")
    for name, ms in r["gemm_ms"].items():
        print(f"  GEMM {name:<10}{ms:>10.3f} ms")
    print(f"GEMM rate            {r['gemm_gflops']:>10.1f} GFLOP/s (each shape's best of "
          f"{len(r['rounds'])} round{'s' if len(r['rounds']) > 1 else ''})")
    for view in r["rounds"][0]:
        rates = " / ".join(f"{rnd[view]['gemm_gflops']:.1f}" for rnd in r["rounds"])
        print(f"  {view} GEMMs by round: {rates} GFLOP/s")
    print(f"copy bandwidth       {r['bandwidth_gb_s']:>10.1f} GB/s")
    print(f"FLOPs per token      {r['flops_per_token'] / 1e6:>10.1f} MFLOP")
    print(f"iteration: compute {r['compute_s'] * 1e3:.2f} ms, memory {r['memory_s'] * 1e3:.2f} ms "
          f"({r['bound']}-bound)")
    print(f"ceiling              {r['ceiling_tokens_per_s']:>10.1f} tokens/s")
    for row in r.get("runs", []):
        print(f"  {row['label']} @ {row['request_rate']} (median of {row['repeats']}): "
              f"output {row['output_throughput']:.1f} tok/s "
              f"= {100 * row['output_fraction']:.1f}% ; total {row['total_token_throughput']:.1f} tok/s "
              f"= {100 * row['total_fraction']:.1f}% of the ceiling")
    if "trace" in r:
        t = r["trace"]
        print(f"trace: prompt tokens at {t['prefill_gemm_gflops']:.1f} GFLOP/s ({t['prefill_tokens']} rows), decode "
              f"and LM head at {r['gemm_gflops']:.1f} GFLOP/s ({r['tokens']} rows)")
        for row in t["runs"]:
            print(f"  {row['label']}: {row['prompt_tflop']:.2f} + {row['decode_tflop']:.2f} TFLOP -> ideal "
                  f"{row['ideal_s']:.1f} s, took {row['duration_s']:.1f} s = {100 * row['fraction']:.1f}%")
        print(f"median fraction of the matmul ceiling on this trace: {100 * t['median_fraction']:.1f}%")
    if r.get("mixed_cpus"):
        print(r["mixed_cpus"])
