"""What one benchmark run measured, reduced to vLLM benchmark_serving's names.

Every backend fills one ``RequestResult`` per request with times on one clock
(``time.perf_counter``, seconds); ``summarize`` turns them into the figures.
Definitions (the same as vLLM's, plus Orca's normalized latency):

- TTFT: first output chunk - start; E2E latency: finish - start, where start
  is when the client sent the request (its arrival time, or later when a
  concurrency limit held it back).
- TPOT: (latency - TTFT) / (output tokens - 1), per request with >1 tokens;
  the first token is excluded because it pays for the prompt.
- ITL: gaps between consecutive output chunks, pooled over all requests.
- Normalized latency (Orca): latency / output tokens, in ms/token.
- Goodput: requests/s that met every SLO given; SLO attainment: the share of
  all requests (failed ones count as missed) that met them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    success: bool = False
    output_len: int = 0
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # one per streamed chunk with tokens
    finish: float = 0.0
    num_preemptions: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def latency(self) -> float:
        return self.finish - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2 or self.ttft is None:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def normalized_latency(self) -> float | None:
        return self.latency / self.output_len if self.output_len else None


@dataclass(frozen=True)
class SLO:
    """Per-request targets in seconds; None leaves that target out."""

    ttft: float | None = None
    tpot: float | None = None
    normalized_latency: float | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft, self.tpot, self.normalized_latency))

    def met(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        checks = ((self.ttft, r.ttft), (self.tpot, r.tpot), (self.normalized_latency, r.normalized_latency))
        # A one-token request has no TPOT: nothing to violate.
        return all(target is None or value is None or value <= target for target, value in checks)


def distribution(values_s: list[float], prefix: str) -> dict[str, float | None]:
    """mean/median/std/p90/p99 in milliseconds, keyed like ``mean_ttft_ms``."""
    out: dict[str, float | None] = {}
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    empty = arr.size == 0
    out[f"mean_{prefix}_ms"] = None if empty else float(arr.mean())
    out[f"median_{prefix}_ms"] = None if empty else float(np.median(arr))
    out[f"std_{prefix}_ms"] = None if empty else float(arr.std())
    for p in PERCENTILES[1:]:
        out[f"p{p}_{prefix}_ms"] = None if empty else float(np.percentile(arr, p))
    return out


def summarize(results: list[RequestResult], duration: float, slo: SLO | None = None) -> dict:
    """The headline figures of one run, as a flat JSON-ready dict."""
    if not duration > 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    m: dict = {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    m.update(distribution([r.ttft for r in ok if r.ttft is not None], "ttft"))
    m.update(distribution([r.tpot for r in ok if r.tpot is not None], "tpot"))
    m.update(distribution([x for r in ok for x in r.itls], "itl"))
    m.update(distribution([r.latency for r in ok], "e2el"))
    m.update(distribution([r.normalized_latency for r in ok if r.output_len], "normalized_latency"))
    m["num_preemptions"] = sum(r.num_preemptions for r in results)
    slo = slo or SLO()
    m["slo"] = {"ttft_ms": _ms(slo.ttft), "tpot_ms": _ms(slo.tpot),
                "normalized_latency_ms": _ms(slo.normalized_latency)}
    if slo.given:
        good = sum(slo.met(r) for r in results)
        m["slo_attainment"] = good / len(results) if results else None
        m["request_goodput"] = good / duration
    else:
        m["slo_attainment"] = None
        m["request_goodput"] = None
    return m


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0

