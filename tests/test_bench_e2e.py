"""Short end-to-end bench runs: the in-process engine, our server over HTTP,
the transformers peers, and the roofline; the JSON must have every field and
its counts must add up."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from orca_serve import kernels
from orca_serve.bench import workloads as wl
from orca_serve.bench.__main__ import run as bench
from orca_serve.bench.metrics import summarize

N = 10
WORKLOAD = ["--num-requests", str(N), "--input-len", "4:24", "--output-len", "1:8", "--seed", "3",
            "--num-warmups", "1", "--no-progress", "--quiet", "--threads", "1"]
RUN_KEYS = {"label", "backend", "scheduling_policy", "request_rate", "burstiness", "max_concurrency",
            "metrics", "backend_stats", "requests"}
ROW_KEYS = {"index", "success", "prompt_len", "output_len", "ttft_ms", "tpot_ms", "e2el_ms",
            "normalized_latency_ms", "num_chunks", "num_preemptions", "error"}


@pytest.fixture(autouse=True)
def one_thread():
    """--threads 1 below: on a shared 2-core box, OpenMP barriers under contention
    cost far more than a tiny model's matmuls. Restored for the tests after these."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from server_helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bench-model"))


def _expected_lengths(vocab_size, special, salt=0):
    specs = wl.generate("orca", N, wl.allowed_token_ids(vocab_size, special), seed=3, salt=salt,
                        params=wl.WorkloadParams(input_len=(4, 24), output_len=(1, 8)))
    return [(s.prompt_len, s.output_len) for s in specs]


def check_run(run: dict, lengths: list[tuple[int, int]]) -> None:
    assert RUN_KEYS <= set(run)
    m = run["metrics"]
    expected_metric_keys = set(summarize([], 1.0))
    assert expected_metric_keys <= set(m)
    assert m["num_requests"] == m["completed"] == N and m["failed"] == 0
    rows = sorted(run["requests"], key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(N)) and all(ROW_KEYS <= set(r) for r in rows)
    assert all(r["success"] and r["error"] is None for r in rows)
    # EOS is ignored: every request produced exactly its output length, on the prompt it was given.
    assert [(r["prompt_len"], r["output_len"]) for r in rows] == lengths
    assert m["total_input_tokens"] == sum(p for p, _ in lengths)
    assert m["total_output_tokens"] == sum(o for _, o in lengths)
    assert m["output_throughput"] == pytest.approx(m["total_output_tokens"] / m["duration_s"])
    for r in rows:
        assert 0 < r["ttft_ms"] <= r["e2el_ms"] + 1e-6
        assert r["normalized_latency_ms"] == pytest.approx(r["e2el_ms"] / r["output_len"], rel=1e-3)
        assert (r["tpot_ms"] is None) == (r["output_len"] == 1)


def test_engine_backend_policies_and_rates(model_dir, tmp_path):
    out, fig = tmp_path / "engine.json", tmp_path / "fig.png"
    rc = bench(["--model", str(model_dir), *WORKLOAD, "--scheduling-policy", "fcfs,request-level",
                "--max-batch-size", "4", "--rates", "inf,40", "--slo-normalized-latency-ms", "1000",
                "--out", str(out), "--plot", str(fig)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"version", "created", "command", "machine", "model", "config", "runs"} <= set(data)
    assert {"model_name", "vector_isa"} <= set(data["machine"]["cpu"])  # results from two CPUs must not pass as one
    assert [(r["label"], r["request_rate"]) for r in data["runs"]] == [
        ("fcfs", "inf"), ("fcfs", 40.0), ("request-level", "inf"), ("request-level", 40.0)]
    from orca_serve.config import EngineConfig
    from orca_serve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(model=str(model_dir)))
    special = list(engine.tokenizer.all_special_ids) + list(engine.eos_token_ids)
    for run in data["runs"]:
        salt = 0 if run["request_rate"] == "inf" else 1  # one prompt stream per rate
        check_run(run, _expected_lengths(engine.vocab_size, special, salt))
        stats = run["backend_stats"]
        assert stats["num_iterations"] > 0 and 0.0 <= stats["mean_kv_usage"] <= stats["max_kv_usage"] <= 1.0
        assert stats["num_preemptions_total"] == run["metrics"]["num_preemptions"]
        assert stats["cpu_kernel_isa"] == kernels.load().isa  # what the runner used: AVX2 and AVX-512 builds differ
        assert run["metrics"]["slo_attainment"] is not None
    # The baseline hands a request back only when its batch ends: one chunk each.
    baseline = [r for run in data["runs"] if run["label"] == "request-level" for r in run["requests"]]
    assert all(r["num_chunks"] == 1 for r in baseline)
    assert fig.read_bytes()[:4] == b"\x89PNG"


def test_openai_backend_against_our_server(model_dir, tmp_path):
    from server_helpers import ServerThread

    server = ServerThread(model_dir)
    try:
        out = tmp_path / "http.json"
        rc = bench(["--backend", "openai", "--base-url", server.url, "--tokenizer", str(model_dir), *WORKLOAD,
                    "--request-rate", "100", "--max-concurrency", "4", "--out", str(out)])
    finally:
        server.stop()
    assert rc == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["label"] == "openai" and run["max_concurrency"] == 4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    check_run(run, _expected_lengths(len(tok), tok.all_special_ids))
    assert all(r["num_chunks"] >= 1 for r in run["requests"])
    # What the HTTP path cost in CPU: this client's, and the server's from its
    # /metrics (the server runs in this process, so its process CPU holds the
    # model's and is far more than its event loop's).
    stats = run["backend_stats"]
    assert stats["client_cpu_s"] > 0
    assert 0 < stats["server_event_loop_cpu_s"] < stats["server_process_cpu_s"]
    duration = run["metrics"]["duration_s"]
    assert stats["http_path_cores"] == pytest.approx((stats["client_cpu_s"] + stats["server_event_loop_cpu_s"])
                                                     / duration, rel=1e-3)


def test_hf_peers(model_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = _expected_lengths(AutoConfig.from_pretrained(str(model_dir)).vocab_size, tok.all_special_ids + [2])
    for backend in ("hf-static", "hf-cb"):
        out = tmp_path / f"{backend}.json"
        assert bench(["--backend", backend, "--model", str(model_dir), "--hf-batch-sizes", "2,8", *WORKLOAD,
                      "--out", str(out)]) == 0
        run = json.loads(out.read_text())["runs"][0]
        check_run(run, lengths)
        if backend == "hf-static":
            assert run["backend_stats"]["batch_size"] in (2, 8)


def test_roofline_reports_a_ceiling_and_our_fraction(tmp_path, capsys):
    result = tmp_path / "r.json"
    # The runs came from another CPU than this one: the fraction says nothing, and the command says so.
    other_cpu = {"model_name": "Some Other CPU", "family": "99", "model": "9", "vector_isa": ["avx512f"]}
    result.write_text(json.dumps({"machine": {"cpu": other_cpu}, "runs": [{"label": "fcfs", "request_rate": "inf", "metrics": {
        "output_throughput": 50.0, "total_token_throughput": 200.0, "duration_s": 2.0},
        "requests": [{"success": True, "prompt_len": 20, "output_len": 10}]}]}))
    out = tmp_path / "roof.json"
    assert bench(["roofline", "--load-format", "dummy", "--dummy-config", "tiny-llama", "--num-tokens", "16",
                  "--prefill-tokens", "32", "--rounds", "2", "--round-gap", "0",
                  "--result", str(result), "--out", str(out)]) == 0
    roof = json.loads(out.read_text())
    assert roof["context"] == 25 and roof["ceiling_tokens_per_s"] > 0
    assert set(roof["gemm_ms"]) == {"qkv", "attn_out", "mlp_up", "mlp_down", "lm_head"}
    # Every shape is timed once per round; the ceiling takes each one's best round.
    assert len(roof["rounds"]) == 2
    for name, ms in roof["gemm_ms"].items():
        assert ms == min(r["decode"]["gemm_ms"][name] for r in roof["rounds"])
    assert set(roof["rounds"][0]["prefill"]["gemm_ms"]) == {"qkv", "attn_out", "mlp_up", "mlp_down"}
    assert roof["gemm_gflops"] >= max(r["decode"]["gemm_gflops"] for r in roof["rounds"]) * (1 - 1e-9)
    assert roof["trace"]["prefill_gemm_gflops"] >= max(r["prefill"]["gemm_gflops"] for r in roof["rounds"]) * (1 - 1e-9)
    (row,) = roof["runs"]
    assert row["total_fraction"] == pytest.approx(200.0 / roof["ceiling_tokens_per_s"])
    (trace,) = roof["trace"]["runs"]
    assert trace["fraction"] == pytest.approx(trace["ideal_s"] / 2.0) and trace["ideal_s"] > 0
    assert roof["trace"]["median_fraction"] == pytest.approx(trace["fraction"])
    out_text = capsys.readouterr().out
    assert "of the ceiling" in out_text and "median fraction of the matmul ceiling on this trace" in out_text
    assert "decode GEMMs by round: " in out_text and "prefill GEMMs by round: " in out_text
    assert {"model_name", "vector_isa"} <= set(roof["machine"]["cpu"])
    assert roof["mixed_cpus"].startswith("WARNING: these results come from 2 different CPUs")
    assert f"Some Other CPU (family 99, model 9; avx512f): {result}" in roof["mixed_cpus"]
    assert roof["mixed_cpus"] in out_text


def test_roofline_rejects_no_rounds(capsys):
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        bench(["roofline", "--load-format", "dummy", "--dummy-config", "tiny-llama", "--rounds", "0"])


def test_trace_flops_by_hand():
    from orca_serve.bench.model_flops import Dims, trace_flops

    d = Dims(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2, vocab=10, gated_mlp=True)
    # Per token and layer: qkv 2*4*8 + out 2*4*4 + gate/up 2*4*16 + down 2*8*4 = 288; 2 layers: 576.
    # LM head 2*4*10 = 80; attention 4*heads*head_dim = 16 per context token and layer.
    # p=3, o=2: prompt: layer 0 whole, 3*288 + 16*(1+2+3); the last layer projects K/V (2*4*4) for
    # the first 2 rows, and runs whole for the sampled last row: 288 + 16*3.
    # Decode: 2 LM heads + 1 token through both layers at context 4.
    prompt, decode = trace_flops(d, [{"prompt_len": 3, "output_len": 2}])
    assert prompt == 3 * 288 + 16 * 6 + 2 * 32 + 288 + 16 * 3
    assert decode == 2 * 80 + 576 + 32 * 4


def test_overhead_null_executor_runs_the_same_engine(tiny_model_dir):
    import argparse

    from orca_serve.bench.overhead import run_overhead

    args = argparse.Namespace(model=tiny_model_dir("llama"), load_format="auto", dummy_config=None,
                              num_requests=16, prompt_len=20, steps=4, seed=0, out=None)
    out = run_overhead(args)
    assert out["median_model_step_ms"] > 0 and out["median_null_step_ms"] > 0
    assert out["overhead_fraction"] == out["median_null_step_ms"] / out["median_model_step_ms"]


def test_null_executor_drives_requests_to_completion(tiny_model_dir):
    from orca_serve.bench.overhead import NullExecutor
    from orca_serve.config import EngineConfig
    from orca_serve.engine.llm_engine import LLMEngine
    from orca_serve.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_kwargs(model=tiny_model_dir("llama"), num_kv_blocks=64, block_size=4,
                                                max_num_batched_tokens=16))
    engine.executor = NullExecutor(token_id=7)
    for i in range(5):
        engine.add_request(str(i), list(range(3, 30 + i)), SamplingParams(max_tokens=3 + i, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[str(i)].token_ids for i in range(5)] == [[7] * (3 + i) for i in range(5)]
    assert engine.stats().num_kv_blocks_free == 64


def test_engine_backend_reports_decode_graph_counters(tiny_model_dir):
    """With decode graphs (their static path run eagerly here, as CI has no
    GPU) the engine backend's stats say how many steps they served in this run."""
    from orca_serve.bench.backends.engine import EngineBackend

    backend = EngineBackend(dict(model=tiny_model_dir("llama"), cpu_kernels="off", num_kv_blocks=64,
                                 block_size=4, enable_prefix_caching=False))
    first = backend.run([], []).extra
    assert "decode_graph_steps" not in first
    assert first["cpu_kernel_isa"] == "none"  # cpu_kernels="off": the PyTorch path
    backend.engine.executor.runner.use_decode_graphs(capture=False)
    specs = wl.generate("orca", 4, np.arange(3, 300), seed=1,
                        params=wl.WorkloadParams(input_len=(4, 12), output_len=(6, 10)))
    for _ in range(2):  # counted per run, not since start-up
        extra = backend.run(specs, [0.0] * len(specs)).extra
        assert 0 < extra["decode_graph_steps"] < extra["num_iterations"]
        assert extra["graph_capture_s"] == 0.0 and extra["decode_graphs_captured"] == 0
        assert extra["decode_graphs_off"] is None
    backend.close()


@pytest.mark.parametrize("flags,message", [
    # Each of these passed the parser: some failed after the model load with a
    # message naming no flag ("could not convert string to float: 'x'", "invalid
    # literal for int()", "expected non-negative integer", "max() arg is an empty
    # sequence", "integer modulo by zero" with a traceback), some were taken
    # silently (--max-concurrency 0 ran as 1, --threads 0 as the default, a
    # negative SLO made every request miss it), --threads -1 crashed.
    (["--rates", "1,x"], "--rates: expected a number, got 'x'"),
    (["--rates", ","], "--rates: expected a comma-separated list with no empty entries"),
    (["--rates", "0"], "--rates: must be a number > 0 or inf, got 0"),
    (["--request-rate", "nan"], "--request-rate: must be a number > 0 or inf, got nan"),
    (["--burstiness", "0"], "--burstiness: must be a finite number > 0"),
    (["--max-concurrency", "0"], "--max-concurrency: must be an integer >= 1, got 0"),
    (["--num-warmups", "-1"], "--num-warmups: must be an integer >= 0, got -1"),
    (["--num-requests", "0"], "--num-requests: must be an integer >= 1, got 0"),
    (["--input-len", "abc"], "--input-len: expected a length N or a range LO:HI, got 'abc'"),
    (["--workload", "orka"], "--workload: expected one of orca, random, sharegpt-like, shared-prefix or an "
                             "existing .jsonl file, got 'orka'"),
    (["--workload", "missing.jsonl"], "--workload: expected one of"),  # found missing after the model load
    (["--output-len", "5:2"], "--output-len: length range must be 1 <= lo <= hi, got '5:2'"),
    (["--scheduling-policy", "fcfs,lifo"], "--scheduling-policy: 'lifo' is not a scheduling policy"),
    (["--threads", "-1"], "--threads: must be an integer >= 1, got -1"),
    (["--threads", "0"], "--threads: must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed: must be an integer >= 0, got -1"),
    (["--prompt-salt", "-1"], "--prompt-salt: must be an integer >= 0, got -1"),
    (["--num-prefixes", "0"], "--num-prefixes: must be an integer >= 1, got 0"),
    (["--input-median", "0"], "--input-median: must be a finite number > 0"),
    (["--sigma", "-1"], "--sigma: must be a finite number >= 0"),
    (["--slo-ttft-ms", "-1"], "--slo-ttft-ms: must be a finite number > 0"),
    (["--slo-tpot-ms", "nan"], "--slo-tpot-ms: must be a finite number > 0"),
    (["--hf-batch-sizes", "0"], "--hf-batch-sizes: must be an integer >= 1, got 0"),
    (["--vocab-size", "0"], "--vocab-size: must be an integer >= 1, got 0"),
    (["--base-url", "localhost:8000"], "--base-url: expected an http:// or https:// URL"),
    (["overhead", "--steps", "0"], "--steps: must be an integer >= 1, got 0"),
    (["roofline", "--device", "gpu"], "--device: invalid choice: 'gpu'"),
])
def test_bad_bench_flag_is_refused_while_parsing(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench(flags)
    assert exit_.value.code == 2
    assert f"error: argument {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--workload", "--scheduling-policy", "--base-url", "--input-len"])
def test_a_long_bad_bench_flag_value_is_abbreviated_in_its_message(flag, capsys):
    # The whole value was echoed: a 100,000-character mistake made a 100 KB message.
    with pytest.raises(SystemExit):
        bench([flag, "1:" + "x" * 100_000])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert f"error: argument {flag}: " in error and "(a string of 100002 characters)" in error
    assert len(error) < 500


def test_a_run_in_which_every_request_failed_says_why(model_dir, capsys):
    # It exited 1 with nothing but "Failed requests: 2" (nothing at all with --quiet).
    assert bench(["--model", str(model_dir), "--num-requests", "2", "--input-len", "1000", "--output-len", "1",
                  "--num-warmups", "0", "--no-progress", "--quiet", "--threads", "1"]) == 1
    assert ("orca-serve bench: every request failed; the first: ValueError: prompt has 1000 tokens; the model's "
            "context length is 256") in capsys.readouterr().err


def test_openai_backend_without_a_server_is_one_line(capsys):
    # A --base-url nobody answers at was an httpx traceback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed, not listening: the connection is refused
    assert bench(["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--vocab-size", "100",
                  "--num-requests", "1", "--no-progress", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"orca-serve: error: cannot list the models at http://127.0.0.1:{port}/v1/models" in err
    assert "Traceback" not in err
