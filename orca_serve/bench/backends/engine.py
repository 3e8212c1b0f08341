"""The in-process engine, driven from the benchmark thread.

Requests are added at their arrival times between iterations; each step's
outputs are stamped when ``step()`` returns, which is when a caller of the
engine could first see them. The request-level policy holds outputs until its
batch ends, so its requests show one chunk at the batch's end, as a client of
Triton + a static-batch engine would see them.
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from orca_serve.bench.backends.base import Admission, BackendRun, fail_unfinished, new_result, sleep_until
from orca_serve.bench.metrics import SLO
from orca_serve.bench.workloads import RequestSpec
from orca_serve.sampling_params import SamplingParams

_run_ids = itertools.count()


class EngineBackend:
    name = "engine"

    def __init__(self, engine_kwargs: dict, slo: SLO | None = None) -> None:
        from orca_serve.config import EngineConfig
        from orca_serve.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs))
        self.slo = slo or SLO()
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len

    def vocab(self) -> tuple[int, list[int]]:
        special = list(getattr(self.tokenizer, "all_special_ids", None) or [])
        return self.engine.vocab_size, special + list(self.engine.eos_token_ids)

    def close(self) -> None:
        self.engine.shutdown()

    def run(self, specs: list[RequestSpec], arrivals: list[float], max_concurrency: int | None = None,
            progress=lambda: None) -> BackendRun:
        eng, run_id = self.engine, next(_run_ids)
        before, graphs_before = eng.stats(), _graph_counts(eng)
        results, index_of, samples = {}, {}, []
        finished = 0
        t0 = time.perf_counter()
        # The engine keeps arrival times on time.monotonic(); map ours onto it.
        to_monotonic = time.monotonic() - t0
        adm = Admission(arrivals, max_concurrency, t0)
        while finished < len(specs):
            now = time.perf_counter()
            for i, start in adm.due(now):
                spec, rid = specs[i], f"bench{run_id}-{i}"
                results[i] = r = new_result(spec, start)
                index_of[rid] = i
                try:
                    eng.add_request(rid, _prompt(spec), _params(spec), arrival_time=start + to_monotonic,
                                    ttft_slo=self.slo.ttft, tpot_slo=self.slo.tpot)
                except Exception as exc:  # a rejected request is a failed one, not a failed run
                    r.error, r.finish = f"{type(exc).__name__}: {exc}", now
                    finished += 1
                    adm.done(now)
                    progress()
            if not eng.has_unfinished_requests():
                hint = adm.wait_hint()
                if hint is None:
                    if adm.exhausted:
                        break
                    continue
                sleep_until(time.perf_counter() + hint)
                continue
            outputs = eng.step()
            t = time.perf_counter()
            samples.append(_sample(eng.stats()))
            for o in outputs:
                r = results[index_of[o.request_id]]
                if o.delta_token_ids:
                    r.chunk_times.append(t)
                if o.finished:
                    r.output_len, r.finish = len(o.token_ids), t
                    r.success = o.finish_reason in ("stop", "length")
                    r.error = o.error or (None if r.success else o.finish_reason)
                    r.num_preemptions = o.metrics.num_preemptions
                    finished += 1
                    adm.done(t)
                    progress()
        end = time.perf_counter()
        out = fail_unfinished(results, specs, "never finished", end)
        extra = _engine_extra(samples, before, eng.stats())
        extra["cpu_kernel_isa"] = _kernel_isa(eng)
        if graphs_before is not None:
            steps, capture_s, captured, off = _graph_counts(eng)
            extra.update(decode_graph_steps=steps - graphs_before[0], graph_capture_s=capture_s - graphs_before[1],
                         decode_graphs_captured=captured, decode_graphs_off=off)
        return BackendRun(out, t0, end, extra)


def _prompt(spec: RequestSpec):
    return spec.prompt_token_ids if spec.prompt_token_ids is not None else spec.prompt_text


def _params(spec: RequestSpec) -> SamplingParams:
    return SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=spec.ignore_eos)


def _sample(st) -> tuple:
    used = 1.0 - st.num_kv_blocks_free / st.num_kv_blocks_total if st.num_kv_blocks_total else 0.0
    return (used, st.num_running, st.num_waiting, st.last_num_batched_tokens, st.last_num_reqs,
            st.last_iteration_seconds)


def _graph_counts(eng) -> tuple | None:
    """The in-process runner's decode-graph counters (None: no decode graphs):
    steps served, seconds capturing, graphs held, why they were switched off."""
    graphs = getattr(getattr(eng.executor, "runner", None), "decode_graphs", None)
    if graphs is None:
        return None
    return graphs.num_steps, graphs.capture_s, len(graphs.graphs), graphs.disabled_reason


def _kernel_isa(eng) -> str | None:
    """The ISA of the native CPU kernels the in-process runner's layers use
    ("avx512", "avx2", "generic"), "none" when they run the PyTorch path, and
    None when the runner is in other processes (it cannot be asked)."""
    model = getattr(getattr(eng.executor, "runner", None), "model", None)
    if model is None:
        return None
    ops = next((m.cpu_ops for m in model.modules() if getattr(m, "cpu_ops", None) is not None), None)
    return ops.isa if ops is not None else "none"


def _engine_extra(samples: list[tuple], before, after) -> dict:
    """Per-iteration engine figures over the run: KV usage, batch shape, preemptions."""
    extra = {"num_iterations": after.num_iterations - before.num_iterations,
             "num_preemptions_total": after.num_preemptions_total - before.num_preemptions_total,
             "num_kv_blocks_total": after.num_kv_blocks_total}
    if not samples:
        return extra
    a = np.asarray(samples, dtype=np.float64)
    extra.update({
        "mean_kv_usage": float(a[:, 0].mean()), "max_kv_usage": float(a[:, 0].max()),
        "mean_num_running": float(a[:, 1].mean()), "max_num_running": int(a[:, 1].max()),
        "mean_num_waiting": float(a[:, 2].mean()), "max_num_waiting": int(a[:, 2].max()),
        "mean_batched_tokens": float(a[:, 3].mean()), "mean_batch_reqs": float(a[:, 4].mean()),
        "mean_iteration_ms": float(a[:, 5].mean() * 1000.0),
        "total_iteration_s": float(a[:, 5].sum()),
    })
    return extra
