"""bench compare: capacity at equal latency by interpolation, plain metric ratios, the plot."""
import asyncio
import json
from pathlib import Path

import pytest

from orca_serve.bench import report


def test_throughput_at_latency_interpolates_the_crossing():
    pts = [(1.0, 10.0), (2.0, 20.0), (3.0, 60.0)]
    assert report.throughput_at_latency(pts, 40.0) == (pytest.approx(2.5), False)
    assert report.throughput_at_latency(pts, 20.0) == (pytest.approx(2.0), False)
    assert report.throughput_at_latency(pts, 5.0) == (None, False)  # over the bound even at light load
    assert report.throughput_at_latency(pts, 100.0) == (3.0, True)  # never reached: a lower bound


def test_throughput_at_latency_non_monotonic_curve_takes_the_highest_crossing():
    pts = [(1.0, 10.0), (2.0, 30.0), (3.0, 15.0), (4.0, 50.0)]
    # 20 is crossed twice (1->2 at 1.5, 3->4 at 3 + 5/35); the highest wins.
    value, lower = report.throughput_at_latency(pts, 20.0)
    assert value == pytest.approx(3.0 + 5.0 / 35.0) and not lower


def test_capacity_ratios_at_the_baselines_latencies():
    ours = [(1.0, 5.0), (4.0, 8.0), (8.0, 40.0)]
    base = [(0.5, 20.0), (1.0, 40.0)]
    rows = report.capacity_ratios(ours, base)
    assert [r["normalized_latency_ms"] for r in rows] == [20.0, 40.0]
    # At 20 ms/token: ours crosses 20 between (4, 8) and (8, 40) at 4 + 4*12/32 = 5.5; base 0.5
    assert rows[0]["candidate_req_s"] == pytest.approx(5.5) and rows[0]["ratio"] == pytest.approx(11.0)
    # At 40 both curves end under the bound: neither capacity is exact, so no lower-bound claim.
    assert rows[1]["ratio"] == pytest.approx(8.0) and not rows[1]["ratio_is_lower_bound"]


def _run(label, rate, thr, norm, out_tok=100.0):
    metrics = {k: None for k in report._HEADLINE}
    metrics.update(request_throughput=thr, output_throughput=out_tok, median_normalized_latency_ms=norm,
                   median_ttft_ms=norm * 2, total_token_throughput=out_tok * 3)
    return {"label": label, "request_rate": rate, "metrics": metrics, "requests": []}


def test_compare_files_prints_ratios(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"runs": [_run("fcfs", 1.0, 1.0, 5.0, 200.0), _run("fcfs", 4.0, 4.0, 10.0)]}))
    b.write_text(json.dumps({"runs": [_run("request-level", 1.0, 0.5, 20.0), _run("request-level", 4.0, 0.6, 80.0)]}))
    lines = []
    rep = report.compare([str(a), str(b)], out=lines.append)
    assert rep["baseline"] == "request-level"
    cap = rep["capacity"]["fcfs"]
    assert cap[0]["ratio"] == pytest.approx(4.0 / 0.5) and cap[0]["ratio_is_lower_bound"]
    assert rep["metrics"]["fcfs @ 1.0"]["output_throughput"] == pytest.approx(2.0)
    assert rep["metrics"]["fcfs @ 1.0"]["median_normalized_latency_ms"] == pytest.approx(0.25)
    assert any(">=8.00x" in line for line in lines)


def _sweep_file(path, label: str, attainment: dict) -> str:
    """A rate sweep of ``label``: {rate: SLO attainment (None: run without an SLO)}."""
    runs = []
    for rate, share in attainment.items():
        run = _run(label, rate, 1.0, 10.0)
        run["metrics"]["slo_attainment"] = share
        runs.append(run)
    path.write_text(json.dumps({"runs": runs}))
    return str(path)


@pytest.mark.parametrize("ours,base,found,line", [
    # Rates out of order in both files; the baseline is at 42% or below at 2.0 and 3.0 (2.0 is the
    # lightest), lowest at 3.0; 5.0 has no baseline run, and 0.5 a baseline run only.
    ({3.0: 0.9, 1.0: 1.0, 2.0: 0.98, 5.0: 0.5}, {2.0: 0.42, 1.0: 0.8, 3.0: 0.2, 0.5: 0.9},
     {"rate": 2.0, "baseline": 0.42, "candidate": 0.98, "reached": True},
     "SLO attainment at the lightest load where request-level meets the SLO for at most 42% of requests "
     "(2 req/s): request-level 42%, fcfs 98%"),
    # Never that low: the lightest of the rates where it came lowest.
    ({1.0: 1.0, 2.0: 0.95, 3.0: 0.6}, {1.0: 0.8, 2.0: 0.5, 3.0: 0.5},
     {"rate": 2.0, "baseline": 0.5, "candidate": 0.95, "reached": False},
     "SLO attainment: request-level's never fell to 42% or below; at its lowest (2 req/s): "
     "request-level 50%, fcfs 95%"),
    # Runs without an SLO: nothing to report.
    ({1.0: None}, {1.0: None}, None, None),
])
def test_compare_reports_attainment_where_the_baseline_meets_its_slo_for_at_most_42_percent(
        tmp_path, ours, base, found, line):
    lines = []
    rep = report.compare([_sweep_file(tmp_path / "ours.json", "fcfs", ours),
                          _sweep_file(tmp_path / "base.json", "request-level", base)], out=lines.append)
    if found is None:
        assert rep["slo_at_baseline_low"] == {} and not any("SLO attainment" in s for s in lines)
        return
    assert rep["slo_at_baseline_low"]["fcfs"] == {**found, "at_most": 0.42}
    assert line in lines


@pytest.mark.parametrize("text,match", [
    ("not json", "not an orca-serve bench result \\(not JSON: Expecting value"),  # named no file
    ('{"runs": 5}', "'runs' is not a list of runs"),  # a TypeError traceback
    ('{"runs": [1]}', "'runs' is not a list of runs"),
    ('{"runs": []}', "'runs' is not a list of runs"),
    ("[1, 2]", "no 'runs'"),
])
def test_a_file_that_is_not_a_bench_result_is_named(tmp_path, text, match):
    f = tmp_path / "x.json"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"{f}: .*{match}"):
        report.compare([str(f)], out=lambda line: None)


def test_compare_same_label_in_two_files_and_single_runs(tmp_path):
    a, b = tmp_path / "ours.json", tmp_path / "vllm.json"
    a.write_text(json.dumps({"runs": [_run("openai", "inf", 2.0, 10.0, 300.0)]}))
    b.write_text(json.dumps({"runs": [_run("openai", "inf", 1.0, 20.0, 200.0)]}))
    rep = report.compare([str(a), str(b)], out=lambda _: None)
    assert rep["baseline"] == f"openai ({b})"
    (key,) = rep["metrics"]
    assert rep["metrics"][key]["output_throughput"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="baseline"):
        report.compare([str(a), str(b)], baseline="nope", out=lambda _: None)


def _write_repeat(path, label: str, tok: float, norm: float = 10.0, created: str | None = None) -> str:
    """One repeat's result file: a run of ``label`` at ``tok`` output tok/s (and
    tok / 100 req/s), started at ``created`` (None: the file records no start)."""
    data = {"runs": [_run(label, "inf", tok / 100, norm, tok)]}
    if created is not None:
        data["created"] = created
    path.write_text(json.dumps(data))
    return str(path)


def test_compare_median_of_repeats(tmp_path):
    paths = []
    for i, (ours, vllm) in enumerate([(300.0, 200.0), (100.0, 220.0), (280.0, 400.0)]):
        for label, tok in (("orca-serve", ours), ("vllm", vllm)):
            paths.append(_write_repeat(tmp_path / f"{label}-{i}.json", label, tok, norm=10.0 + i))
    lines = []
    rep = report.compare(paths, baseline="vllm", out=lines.append, median=True)
    # Medians: ours 280, vLLM 220 output tok/s; latency medians 11 and 11.
    assert rep["metrics"]["orca-serve @ inf"]["output_throughput"] == pytest.approx(280.0 / 220.0)
    assert rep["metrics"]["orca-serve @ inf"]["median_normalized_latency_ms"] == pytest.approx(1.0)
    assert "orca-serve: median of 3 run(s) per rate" in lines


def test_compare_median_pairs_the_repeats_round_by_round_in_the_order_they_started(tmp_path):
    # Round i ran ours then vLLM minutes apart; the host slowed through the
    # sitting. The files are named so that their path order is not the
    # rounds' (ours) and pairs the wrong runs (ours against vLLM's).
    rounds = [("2026-12-07T10:00:00", 400.0, 300.0), ("2026-12-07T10:20:00", 330.0, 300.0),
              ("2026-12-07T10:40:00", 200.0, 160.0)]
    paths = []
    for i, (created, ours, vllm) in enumerate(rounds):
        for label, tok in (("orca-serve", ours), ("vllm", vllm)):
            name = f"{label}-{('cba' if label == 'orca-serve' else 'abc')[i]}.json"
            paths.append(_write_repeat(tmp_path / name, label, tok, created=created))
    lines = []
    rep = report.compare(sorted(paths), baseline="vllm", out=lines.append, median=True)
    # Each side's own median: 330 against 300. Round by round: 4/3, 1.1, 1.25.
    assert rep["metrics"]["orca-serve @ inf"]["output_throughput"] == pytest.approx(1.1)
    paired = rep["paired"]["orca-serve @ inf"]
    assert paired["pairs"] == 3 and paired["alternated"] is True
    assert paired["metrics"]["output_throughput"]["ratios"] == pytest.approx([4 / 3, 1.1, 1.25])
    assert paired["metrics"]["output_throughput"]["median"] == pytest.approx(1.25)
    assert "median_tpot_ms" not in paired["metrics"]  # not measured in these files: no ratio made up
    assert any(line.startswith("output_throughput") and "1.33 / 1.10 / 1.25" in line and line.endswith("1.25x")
               for line in lines)


def test_compare_median_notes_when_the_sides_did_not_alternate(tmp_path):
    # All of ours, then all of vLLM's: round 2 of ours started before round 1 of vLLM's.
    paths = []
    for label, start, toks in (("orca-serve", 0, (300.0, 310.0)), ("vllm", 20, (200.0, 210.0))):
        for i, tok in enumerate(toks):
            paths.append(_write_repeat(tmp_path / f"{label}-{i}.json", label, tok,
                                       created=f"2026-12-07T10:{start + 5 * i:02d}:00"))
    lines = []
    rep = report.compare(paths, baseline="vllm", out=lines.append, median=True)
    paired = rep["paired"]["orca-serve @ inf"]
    assert paired["alternated"] is False
    assert paired["metrics"]["output_throughput"]["ratios"] == pytest.approx([1.5, 310.0 / 210.0])
    assert any(line.startswith("NOTE: the two sides' runs did not alternate") for line in lines)
    # Files that record no start: whether they alternated is not known, and no note is made up.
    for path, (label, tok) in zip(paths, [("orca-serve", 300.0), ("orca-serve", 310.0), ("vllm", 200.0),
                                          ("vllm", 210.0)]):
        _write_repeat(Path(path), label, tok)
    lines.clear()
    assert report.compare(paths, baseline="vllm", out=lines.append, median=True)["paired"][
        "orca-serve @ inf"]["alternated"] is None
    assert not any(line.startswith("NOTE") for line in lines)


def test_compare_median_says_why_repeats_do_not_pair(tmp_path):
    paths = []
    for label, toks in (("orca-serve", (300.0, 310.0, 320.0)), ("vllm", (200.0, 210.0))):
        for i, tok in enumerate(toks):
            paths.append(_write_repeat(tmp_path / f"{label}-{i}.json", label, tok))
    lines = []
    rep = report.compare(paths, baseline="vllm", out=lines.append, median=True)
    assert rep["paired"]["orca-serve @ inf"] == {
        "unpaired": "3 run(s) against 2: rounds pair only when both sides have the same number, two or more"}
    assert any("not paired by round: 3 run(s) against 2" in line for line in lines)
    assert rep["metrics"]["orca-serve @ inf"]["output_throughput"] == pytest.approx(310.0 / 205.0)


def test_compare_warns_when_the_results_come_from_different_cpus(tmp_path):
    zen3 = {"model_name": "AMD EPYC", "family": "25", "model": "1", "vector_isa": ["avx2", "fma"]}
    zen4 = {**zen3, "model": "17", "vector_isa": ["avx2", "fma", "avx512f"]}
    paths = {}
    for name, cpu in (("ours", zen4), ("vllm", zen3), ("old", None)):
        data = {"runs": [_run(name, "inf", 1.0, 10.0)]}
        if cpu is not None:
            data["machine"] = {"cpu": cpu}
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    lines = []
    rep = report.compare([str(paths["ours"]), str(paths["vllm"])], out=lines.append)
    assert rep["mixed_cpus"] == lines[0]
    assert lines[0] == (f"WARNING: these results come from 2 different CPUs (AMD EPYC (family 25, model 17; "
                        f"avx2, fma, avx512f): {paths['ours']}; AMD EPYC (family 25, model 1; avx2, fma): "
                        f"{paths['vllm']}); ratios between them compare the machines as well as the systems")
    # One CPU, or files from before the CPU was recorded: nothing to warn of.
    assert report.compare([str(paths["vllm"]), str(paths["old"])], out=lambda _: None)["mixed_cpus"] is None


def test_cpu_info_reads_the_first_processor_and_its_vector_extensions(tmp_path):
    from orca_serve.bench.machine import cpu_info

    block = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
             "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx fma avx2 avx512f avx512bw avx512_bf16\n\n")
    f = tmp_path / "cpuinfo"
    f.write_text(block.format(n=0) + block.format(n=1).replace("9R14", "other"))
    assert cpu_info(str(f)) == {"model_name": "AMD EPYC 9R14", "family": "25", "model": "17",
                                "vector_isa": ["avx2", "fma", "avx512f", "avx512_bf16"]}
    assert cpu_info(str(tmp_path / "missing"))["model_name"]  # not Linux: what platform knows


def test_plot_writes_png(tmp_path):
    from orca_serve.bench.plot import plot

    data = {"runs": [_run("fcfs", 1.0, 1.0, 5.0), _run("fcfs", 2.0, 2.0, 6.0), _run("request-level", 1.0, 0.5, 30.0)]}
    for r in data["runs"]:
        r["metrics"]["slo_attainment"] = 0.5
    path = tmp_path / "fig.png"
    plot([data], str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_cpu_reads_what_a_server_s_metrics_have():
    from orca_serve.bench.backends.openai import metrics_url, server_cpu

    assert metrics_url("http://h:8000/v1/") == metrics_url("http://h:8000") == "http://h:8000/metrics"
    ours = ('# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n'
            '# TYPE orca_serve_event_loop_cpu_seconds_total counter\n'
            'orca_serve_event_loop_cpu_seconds_total{model_name="m"} 0.75\n'
            '# TYPE orca_serve_iterations_total counter\norca_serve_iterations_total{model_name="m"} 9.0\n')
    assert server_cpu(ours) == {"server_process_cpu_s": 12.5, "server_event_loop_cpu_s": 0.75}
    # vLLM's has the process (its API server) only; a server may have neither.
    assert server_cpu("process_cpu_seconds_total 3.0\n") == {"server_process_cpu_s": 3.0}
    assert server_cpu("vllm:num_requests_running 0.0\n") == {}


def test_a_server_s_odd_metrics_never_end_the_run():
    """The CPU counters are a side figure read before and after the run: a
    /metrics the parser chokes on (it raises IndexError on some text, not only
    ValueError) or one that never answers must cost the figure, not the run."""
    import httpx

    from orca_serve.bench.backends.openai import OpenAIBackend

    backend = OpenAIBackend("http://server", model="m")
    timeouts = []

    def answer(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        return httpx.Response(200, text='ea# TYPE {, =t}tr\n')

    async def scrape():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer), timeout=backend.timeout_s) as client:
            return await backend._server_cpu(client)

    assert asyncio.run(scrape()) == {}
    # Not the run's timeout (an hour): a server that holds /metrics open must not hold the run back.
    assert timeouts and timeouts[0] <= 30


def _sse_server(events: list[bytes], status: int = 200):
    """A one-shot HTTP server on 127.0.0.1 answering every request with ``events``
    as a chunked body, each event in three chunks (so lines arrive cut up)."""
    async def handle(reader, writer):
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        # Read the body too: closing with it unread would reset the connection.
        await reader.readexactly(length)
        head = (f"HTTP/1.1 {status} X\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                "connection: close\r\n\r\n")
        writer.write(head.encode())
        for event in events:
            # Three pieces: a line cut across reads, and a long one in many reads.
            for piece in (event[:len(event) // 3], event[len(event) // 3:-3], event[-3:]):
                if piece:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0)


def _stream_one(events: list[bytes], status: int = 200):
    from orca_serve.bench.backends.openai import OpenAIBackend
    from orca_serve.bench.workloads import RequestSpec

    async def go():
        server = await _sse_server(events, status)
        port = server.sockets[0].getsockname()[1]
        backend = OpenAIBackend(f"http://127.0.0.1:{port}", model="m", vocab_size=10)
        async with server:
            run = await backend._run([RequestSpec(0, [1, 2, 3], 3)], [0.0], None, lambda: None)
        return run.results[0]

    return asyncio.run(go())


def test_openai_client_reads_crlf_events_and_one_longer_than_its_reader_buffer():
    """The stream is split into lines by the client itself: aiohttp's readline
    refuses a line past twice its read buffer (512 KiB in aiohttp 3.14, 128 KiB
    in 3.9), and SSE allows CRLF line ends."""
    long_text = "y" * 1_000_000
    events = [b'data: {"choices":[{"text":"a"}]}\r\n\r\n',
              b'data: {"choices":[{"text":"%s"}]}\n\n' % long_text.encode(),
              b'data: {"choices":[{"text":"b"}],"usage":{"prompt_tokens":3,"completion_tokens":3}}\r\n\r\n',
              b"data: [DONE]\r\n\r\n"]
    r = _stream_one(events)
    assert r.success and r.error is None
    assert r.output_len == 3 and r.prompt_len == 3 and len(r.chunk_times) == 3


def test_openai_client_reports_an_error_event_and_a_refusal_as_the_request_s_failure():
    r = _stream_one([b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"error":{"message":"engine died"}}\n\n'])
    assert not r.success and r.error == "RuntimeError: {'message': 'engine died'}"
    r = _stream_one([b'{"error":"no such model"}'], status=404)
    assert not r.success and r.error == 'RuntimeError: HTTP 404: {"error":"no such model"}'
