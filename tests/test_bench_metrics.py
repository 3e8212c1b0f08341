"""Benchmark metric arithmetic against hand-computed cases, and the admission rule."""
import pytest

from orca_serve.bench.backends.base import Admission
from orca_serve.bench.metrics import SLO, RequestResult, distribution, summarize


def req(i, start, chunks, finish, out, prompt=10, ok=True):
    return RequestResult(index=i, prompt_len=prompt, success=ok, output_len=out, start=start,
                         chunk_times=list(chunks), finish=finish)


def test_per_request_definitions():
    r = req(0, 1.0, [1.5, 1.7, 2.0, 2.5], 2.5, out=4)
    assert r.ttft == pytest.approx(0.5)
    assert r.latency == pytest.approx(1.5)
    # TPOT leaves the first token out: (1.5 - 0.5) / 3
    assert r.tpot == pytest.approx(1.0 / 3)
    assert r.itls == pytest.approx([0.2, 0.3, 0.5])
    assert r.normalized_latency == pytest.approx(1.5 / 4)
    one = req(1, 0.0, [0.4], 0.4, out=1)
    assert one.tpot is None and one.itls == []


def test_percentiles_mean_median_in_ms():
    d = distribution([0.001, 0.002, 0.003, 0.004, 0.010], "x")
    assert d["mean_x_ms"] == pytest.approx(4.0)
    assert d["median_x_ms"] == pytest.approx(3.0)
    # Linear interpolation (numpy's default, as vLLM): rank 0.9*4 = 3.6 -> 4 + 0.6*(10-4)
    assert d["p90_x_ms"] == pytest.approx(7.6)
    assert d["p99_x_ms"] == pytest.approx(9.76)
    assert distribution([], "x")["median_x_ms"] is None


def test_summary_throughputs_and_latencies():
    results = [
        req(0, 0.0, [0.5, 1.0], 1.0, out=2, prompt=10),       # ttft .5, tpot .5, norm .5
        req(1, 0.5, [1.0, 1.5, 2.0, 2.5], 2.5, out=4, prompt=20),  # ttft .5, tpot .5, norm .5
        req(2, 1.0, [], 1.5, out=0, prompt=30, ok=False),     # failed: excluded from tokens
        req(3, 1.0, [3.0], 4.0, out=1, prompt=40),            # ttft 2, no tpot, norm 3
    ]
    m = summarize(results, duration=4.0)
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["total_input_tokens"] == 70 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["output_throughput"] == pytest.approx(7 / 4)
    assert m["total_token_throughput"] == pytest.approx(77 / 4)
    assert m["mean_ttft_ms"] == pytest.approx(1000.0)  # (.5 + .5 + 2) / 3
    assert m["median_ttft_ms"] == pytest.approx(500.0)
    assert m["mean_tpot_ms"] == pytest.approx(500.0)  # only requests with >1 token
    assert m["median_e2el_ms"] == pytest.approx(2000.0)  # latencies 1, 2, 3
    assert m["median_normalized_latency_ms"] == pytest.approx(500.0)  # .5, .5, 3
    assert m["mean_normalized_latency_ms"] == pytest.approx(4000.0 / 3)
    assert m["mean_itl_ms"] == pytest.approx(500.0)  # gaps .5 / .5 .5 .5
    assert m["slo_attainment"] is None and m["request_goodput"] is None


def test_goodput_and_slo_attainment():
    results = [
        req(0, 0.0, [0.1, 0.2, 0.3], 0.3, out=3),   # ttft 100ms, tpot 100ms
        req(1, 0.0, [0.5, 0.6], 0.6, out=2),        # ttft 500ms: misses the TTFT target
        req(2, 0.0, [0.1, 0.5], 0.5, out=2),        # tpot 400ms: misses the TPOT target
        req(3, 0.0, [0.2], 0.2, out=1),             # one token: no TPOT to miss
        req(4, 0.0, [], 0.2, out=0, ok=False),      # failed: counts as missed
    ]
    slo = SLO(ttft=0.25, tpot=0.2)
    m = summarize(results, duration=2.0, slo=slo)
    assert m["slo_attainment"] == pytest.approx(2 / 5)
    assert m["request_goodput"] == pytest.approx(1.0)  # 2 good / 2 s
    assert m["slo"] == {"ttft_ms": 250.0, "tpot_ms": 200.0, "normalized_latency_ms": None}
    norm = summarize(results, duration=2.0, slo=SLO(normalized_latency=0.15))
    assert norm["slo_attainment"] == pytest.approx(1 / 5)  # only request 0 (0.1 s/token)


def test_summary_rejects_zero_duration():
    with pytest.raises(ValueError):
        summarize([], 0.0)


def test_admission_releases_at_arrival_times():
    adm = Admission([0.0, 1.0, 0.5], None, t0=100.0)
    assert adm.due(100.0) == [(0, 100.0)]
    assert adm.wait_hint(100.1) == pytest.approx(0.4)
    # Noticed late (the driver was busy): the start is still the arrival time.
    assert adm.due(101.2) == [(2, 100.5), (1, 101.0)]
    assert adm.exhausted and adm.wait_hint(101.2) is None


def test_admission_concurrency_cap_starts_when_a_slot_frees():
    adm = Admission([0.0, 0.0, 0.0, 5.0], 2, t0=0.0)
    assert adm.due(0.0) == [(0, 0.0), (1, 0.0)]
    assert adm.due(1.0) == [] and adm.wait_hint(1.0) is None  # both slots busy
    adm.done(2.0)
    assert adm.due(3.0) == [(2, 2.0)]  # sent when the slot freed, not when noticed
    adm.done(4.0)
    assert adm.due(4.5) == []  # a slot is free, but the next request arrives at 5
    assert adm.due(6.0) == [(3, 5.0)]
