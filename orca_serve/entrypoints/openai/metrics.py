"""Prometheus metrics and the per-request log line, fed by the engine thread.

``ServerMetrics.on_step`` is the async engine's observer: it runs on the
engine thread after every pass with the engine's stats and that pass's
outputs. prometheus-client objects are thread-safe, so /metrics reads them
from the event loop without a lock. A registry of our own (not the global
one) keeps two servers in one process (tests) from colliding.

Latencies come from each request's ``RequestMetrics`` (scheduler clock,
``time.monotonic``); the arrival time is taken when the HTTP request came in,
so queue time and TTFT include the server's own overhead.

CPU: ``process_cpu_seconds_total`` (Prometheus' standard process collector)
counts the whole process, model included; ``orca_serve_event_loop_cpu_seconds_total``
counts the thread that serves HTTP (parsing, JSON, SSE framing, fan-out),
what a client's requests cost on top of the model and tokenizer. On a
machine with few cores it takes CPU from the model's threads, so it is what
bounds the HTTP path against the engine in-process.
"""
from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily

from orca_serve.outputs import RequestOutput

request_logger = logging.getLogger("orca_serve.requests")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self, model_name: str, request_log_level: int = logging.INFO) -> None:
        self.registry = CollectorRegistry()
        self.request_log_level = request_log_level
        r, lbl = self.registry, ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(f"orca_serve_{name}", doc, lbl, buckets=buckets, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(f"orca_serve_{name}", doc, lbl, registry=r).labels(model_name)

        def counter(name, doc):
            return Counter(f"orca_serve_{name}", doc, lbl, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first output token.", _LATENCY_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "Mean time between output tokens of a request.",
                         _TPOT_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS)
        self.batch_size = hist("iteration_batch_size", "Requests in one iteration.", _BATCH_BUCKETS)
        self.batch_tokens = hist("iteration_tokens", "Tokens computed in one iteration.",
                                 _BATCH_BUCKETS + (1024, 2048, 4096, 8192))
        self.iteration_time = hist("iteration_seconds", "Wall time of one iteration.", _TPOT_BUCKETS)
        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests in the waiting queue.")
        self.kv_total = gauge("kv_blocks_total", "KV cache blocks in the pool.")
        self.kv_used = gauge("kv_blocks_used", "KV cache blocks held by requests or cached prefixes.")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Used / total KV blocks (0-1).")
        # Engine totals exported as counters: stats field -> counter (fed by deltas).
        self._totals = {
            "num_preemptions_total": counter("num_preemptions", "Requests preempted to free KV blocks."),
            "num_swaps_total": counter("num_swaps", "KV swaps between GPU and CPU (swap preemption)."),
            "num_slo_met_total": counter("requests_slo_met", "Finished requests that met their TTFT/TPOT targets."),
        }
        self._last_totals = dict.fromkeys(self._totals, 0)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that produced output.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.iterations = counter("iterations", "Engine iterations.")
        self._finished = Counter("orca_serve_requests_finished", "Finished requests by finish reason.",
                                 ["model_name", "finish_reason"], registry=r)
        self._model_name = model_name
        self._last_iterations = 0
        ProcessCollector(registry=r)  # process_cpu_seconds_total, memory; empty where /proc is absent
        self._event_loop_cpu = _EventLoopCPU(model_name)
        r.register(self._event_loop_cpu)

    def serving_started(self) -> None:
        """Call on the event loop's thread when it starts serving (the app's
        lifespan): that thread ran the imports and the start-up before (the
        CLI's main thread), seconds that are not serving."""
        self._event_loop_cpu.start = time.thread_time()

    def render(self) -> bytes:
        """The metrics text. Call it on the event loop's thread (the /metrics
        handler is async): that thread's CPU time is read there."""
        return generate_latest(self.registry)

    def on_step(self, stats, outputs: list[RequestOutput]) -> None:
        """Engine observer: update gauges and counters, observe finished requests."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        used = stats.num_kv_blocks_total - stats.num_kv_blocks_free
        self.kv_total.set(stats.num_kv_blocks_total)
        self.kv_used.set(used)
        self.kv_usage.set(used / stats.num_kv_blocks_total if stats.num_kv_blocks_total else 0.0)
        for field, counter in self._totals.items():
            value = getattr(stats, field, 0)
            if value > self._last_totals[field]:
                counter.inc(value - self._last_totals[field])
            self._last_totals[field] = value
        if stats.num_iterations > self._last_iterations:
            self.iterations.inc(stats.num_iterations - self._last_iterations)
            if stats.last_num_reqs:
                self.batch_size.observe(stats.last_num_reqs)
                self.batch_tokens.observe(stats.last_num_batched_tokens)
                self.iteration_time.observe(stats.last_iteration_seconds)
        self._last_iterations = stats.num_iterations
        for out in outputs:
            new = len(out.delta_token_ids)
            if new:
                self.generation_tokens.inc(new)
                if len(out.token_ids) == new:  # its first tokens: the prompt is done
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
            if out.finished:
                self._on_finished(out)

    def _on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        self._finished.labels(self._model_name, out.finish_reason or "unknown").inc()
        end = m.finished_time if m.finished_time is not None else m.last_token_time
        ttft = m.first_token_time - m.arrival_time if m.first_token_time is not None else None
        latency = end - m.arrival_time if end is not None else None
        if ttft is not None:
            self.ttft.observe(ttft)
        if latency is not None:
            self.e2e.observe(latency)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)
        n = len(out.token_ids)
        if n > 1 and m.first_token_time is not None and m.last_token_time is not None:
            self.tpot.observe((m.last_token_time - m.first_token_time) / (n - 1))
        if request_logger.isEnabledFor(self.request_log_level):
            request_logger.log(
                self.request_log_level,
                "request finished id=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d "
                "ttft_s=%s latency_s=%s preemptions=%d finish_reason=%s%s",
                out.request_id, len(out.prompt_token_ids), n, out.num_cached_tokens,
                _fmt(ttft), _fmt(latency), m.num_preemptions, out.finish_reason,
                f" error={out.error!r}" if out.error else "")


class _EventLoopCPU:
    """``orca_serve_event_loop_cpu_seconds_total``: CPU time of the thread
    that collects it, the event loop's (``ServerMetrics.render``). One loop
    (uvicorn's) serves HTTP; the engine thread and the model's threads are not
    in it, nor the worker threads that tokenize text prompts and apply chat
    templates (the engine in-process tokenizes too). Under a test client that
    runs each request on a thread of its own it reads that thread's."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.start = 0.0  # the thread's CPU time when it began serving (ServerMetrics.serving_started)

    def collect(self):
        family = CounterMetricFamily("orca_serve_event_loop_cpu_seconds", "CPU time of the thread serving "
                                     "HTTP (the event loop) since it began: parsing, JSON, SSE framing.",
                                     labels=["model_name"])
        # max: a test client may serve a request on a thread other than its lifespan's.
        family.add_metric([self.model_name], max(0.0, time.thread_time() - self.start))
        yield family

    def describe(self):
        return []  # collected fresh on each scrape; nothing to check at registration


def _fmt(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds:.4f}"
