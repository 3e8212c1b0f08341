"""Server behaviour under faults and at the edges of its life: an engine
failure for one request, a full waiting queue, a dead engine, an idle engine
thread, a slow iteration, and graceful shutdown on SIGTERM/SIGINT.

Fault tests run the real app and engine in-process (uvicorn on a thread) so
they can inject the failure into the engine; shutdown tests use a subprocess.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from server_helpers import API_KEY, ServerProcess, ServerThread, build_tiny_model, metric, wait_idle

POISON = [9, 9, 9, 9, 9, 9]  # a prompt the injected fault recognises
CMPL = "/v1/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerThread(model_dir, num_kv_blocks=256, max_num_seqs=2, max_waiting_requests=2)
    yield srv
    srv.stop()


def _post(url: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(url + CMPL, json=body, timeout=timeout)


def test_engine_failure_fails_only_that_request(server):
    runner = server.engine.engine.executor.runner
    original = runner.execute_model_async

    def failing(so):
        if any(r.prompt_token_ids[:len(POISON)] == POISON for r in so.scheduled_new_reqs):
            raise RuntimeError("injected fault")
        return original(so)

    runner.execute_model_async = failing
    try:
        r = _post(server.url, {"prompt": POISON, "max_tokens": 4})
        assert r.status_code == 500, r.text
        assert "injected fault" in r.json()["error"]["message"]
        with httpx.stream("POST", server.url + CMPL, json={"prompt": POISON, "max_tokens": 4, "stream": True},
                          timeout=30) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert "injected fault" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
        ok = _post(server.url, {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    finally:
        runner.execute_model_async = original
    assert httpx.get(server.url + "/health").status_code == 200


def test_full_waiting_queue_is_503_with_retry_after(server):
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            body = {"prompt": "Hello", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*[c.post(CMPL, json=body) for _ in range(8)])

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 40
    wait_idle(server.url)
    assert _post(server.url, {"prompt": "Hello", "max_tokens": 2}).status_code == 200


def test_async_engine_generate_and_early_exit_aborts(server):
    from orca_serve.sampling_params import SamplingParams

    async def run():
        params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0)
        outs = [o async for o in server.engine.generate("gen-full", [5, 6, 7], params)]
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        async for first in server.engine.generate("gen-early", [5, 6, 7], long):
            break  # closing the generator aborts the request
        return outs, first

    outs, first = asyncio.run(run())
    assert outs[-1].finished and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 5
    assert sum(len(o.delta_token_ids) for o in outs) == 5 and not first.finished
    text = wait_idle(server.url)
    assert metric(text, "orca_serve_requests_finished_total", 'finish_reason="abort"') >= 1


def test_async_engine_survives_a_request_id_that_is_not_a_string(server):
    """An unhashable id was refused by add_request, but generate's clean-up then
    aborted it, and the engine thread died on ``id in routes``: every request failed."""
    from orca_serve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=3, ignore_eos=True)

    async def run():
        for bad in (["x"], None, 7):
            with pytest.raises(ValueError, match="request_id must be a string"):
                async for _ in server.engine.generate(bad, [5, 6, 7], params):
                    pass
        server.engine.abort(["y"])
        return [o async for o in server.engine.generate("after-bad-ids", [5, 6, 7], params)]

    outs = asyncio.run(run())
    assert server.engine.is_healthy and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 3


def test_a_fan_out_past_the_queue_is_refused_before_any_prompt_is_tokenized(server, monkeypatch):
    """Prompts × n past --max-waiting-requests can never be queued. It was found
    out only after every prompt had been tokenized (one thread hop each): a
    ~750 KB body of 150k one-token prompts, under the default 1 MiB limit, held
    the server ~20 s before its 400, which named ``n`` even with n = 1."""
    calls = []
    monkeypatch.setattr(server.engine, "tokenize", lambda prompt: calls.append(prompt) or [5])
    for body, param in (({"prompt": ["a", "b", "c"]}, "prompt"), ({"prompt": [[5]] * 3}, "prompt"),
                        ({"prompt": ["a", "b"], "n": 2}, "n")):
        r = _post(server.url, {**body, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert "the server queues at most 2 at a time" in r.json()["error"]["message"]
    assert calls == []
    monkeypatch.undo()
    assert _post(server.url, {"prompt": ["a", "b"], "max_tokens": 2}).status_code == 200


def _thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_app_s_lifespan_starts_the_event_loop_s_cpu_count(server):
    """uvicorn runs the lifespan on the loop's thread before it serves: the
    count starts there (ServerMetrics.serving_started), not at the thread's birth."""
    assert server.app.state.metrics._event_loop_cpu.start > 0


def test_an_unhandled_error_is_a_500_logged_once(server, monkeypatch, caplog):
    """An exception no handler maps answers the OpenAI-style 500 and is logged
    by us alone: it must not escape the app (Starlette's handler for Exception
    raised it again, and uvicorn logged it a second time). The app is called
    directly, where an escaping exception reaches the client as itself."""

    def broken_render():
        raise RuntimeError("injected render bug")

    monkeypatch.setattr(server.app.state.metrics, "render", broken_render)

    async def get():
        transport = httpx.ASGITransport(app=server.app)  # raises whatever escapes the app
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get("/metrics")

    with caplog.at_level("ERROR", logger="orca_serve.server"):
        r = asyncio.run(get())
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "RuntimeError: injected render bug", "type": "server_error",
                                 "param": None, "code": "internal_error"}
    logged = [rec for rec in caplog.records if rec.name == "orca_serve.server"]
    assert len(logged) == 1 and logged[0].exc_info[1].args == ("injected render bug",)


def test_a_content_length_of_non_ascii_digits_is_no_server_error(server):
    """"²" is a digit to str.isdigit() but not to int(): the body-size check
    raised ValueError, a 500. Now the header is ignored as a missing one is (the
    body is counted as it arrives). uvicorn refuses such a header itself, so
    the app is called directly, as any ASGI server or test client may call it."""
    async def post():
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post(CMPL, content=b'{"prompt": "hi", "max_tokens": 2}',
                                     headers={"Content-Type": "application/json", "Content-Length": b"\xb2"})

    r = asyncio.run(post())
    assert r.status_code == 200, r.text


def test_a_failing_chat_template_is_a_400_naming_messages(server, monkeypatch):
    """A template that fails on a well-formed conversation with anything but
    jinja's TemplateError (a TypeError here) was a 500 "internal_error"."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    monkeypatch.setattr(server.engine.engine.tokenizer, "chat_template", "{{ messages[0]['content'] + 1 }}")
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and err["message"].startswith("messages: the chat template failed: TypeError")
    monkeypatch.undo()
    ok = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc")
def test_idle_engine_thread_sleeps(server):
    wait_idle(server.url)
    tid = server.engine._thread.native_id
    before = _thread_cpu_seconds(tid)
    time.sleep(1.0)
    assert _thread_cpu_seconds(tid) - before < 0.05


def test_http_is_not_stalled_by_a_slow_iteration(server):
    runner = server.engine.engine.executor.runner
    original = runner.execute_model_async

    slowed = []

    def slow(so):
        slowed.append(so.iteration)
        time.sleep(2.0)
        return original(so)

    runner.execute_model_async = slow
    try:
        t = threading.Thread(target=_post, args=(server.url, {"prompt": "Hello", "max_tokens": 3}))
        t.start()
        time.sleep(0.2)  # the engine thread is now inside a 2 s iteration
        start = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert httpx.get(server.url + "/metrics", timeout=5).status_code == 200
        # Stalled, they would answer only when the iteration ends, >= 1.8 s from now;
        # the margin absorbs this shared machine's noise.
        assert time.monotonic() - start < 1.0
        t.join()
        assert slowed  # the iterations did run through the slow path
    finally:
        runner.execute_model_async = original


def test_dead_engine_fails_in_flight_and_reports_unhealthy(model_dir):
    srv = ServerThread(model_dir, num_kv_blocks=64)
    try:
        engine = srv.engine.engine
        step = engine.step
        started = threading.Event()

        def dying_step():
            if started.is_set():
                raise RuntimeError("injected engine crash")
            started.set()
            return step()

        engine.step = dying_step
        r = _post(srv.url, {"prompt": "Hello", "max_tokens": 50, "ignore_eos": True})
        assert r.status_code == 500 and "injected engine crash" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 503
        again = _post(srv.url, {"prompt": "Hello", "max_tokens": 2})
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
    finally:
        srv.stop()


@pytest.mark.parametrize("sig,entry", [(signal.SIGTERM, "server-module"), (signal.SIGINT, "cli-serve")])
def test_graceful_shutdown(model_dir, tmp_path, sig, entry):
    module = (("orca_serve.entrypoints.openai.server",) if entry == "server-module"
              else ("orca_serve.entrypoints.cli", "serve"))
    srv = ServerProcess(model_dir, tmp_path / "server.log", "--num-kv-blocks", "64", module=module)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    results = {}

    def non_streaming():
        results["plain"] = httpx.post(srv.url + CMPL, headers=headers, timeout=30,
                                      json={"prompt": "Hello", "max_tokens": 240, "ignore_eos": True})

    try:
        t = threading.Thread(target=non_streaming)
        t.start()
        body = {"prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + CMPL, json=body, headers=headers, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            # The plain request is sent from another thread: signal only once the
            # engine runs both, or it may reach a server that stopped accepting.
            deadline = time.monotonic() + 15
            while metric(httpx.get(srv.url + "/metrics", timeout=5).text, "orca_serve_num_requests_running") < 2:
                assert time.monotonic() < deadline, "the non-streaming request never started running"
                time.sleep(0.05)
            srv.signal(sig)
            t0 = time.monotonic()
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        assert srv.proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 15
        t.join(15)
        assert results["plain"].status_code == 200
        assert results["plain"].json()["choices"][0]["finish_reason"] == "abort"
    finally:
        srv.stop()


@pytest.mark.parametrize("flags,message", [
    # Each of these started the server: a port out of range crashed after the model
    # loaded (OverflowError from bind), the others served and then refused or
    # mishandled every request, or hung up the shutdown.
    (["--port", "70000"], "--port: must be an integer in [0, 65535], got 70000"),
    (["--port", "-1"], "--port: must be an integer in [0, 65535], got -1"),
    (["--max-body-bytes", "0"], "--max-body-bytes: must be an integer >= 1, got 0"),
    (["--api-key", ""], "--api-key: must not be empty (an empty key would let every request in)"),
    (["--api-key", " key"], "--api-key: must be printable ASCII with no spaces at either end"),
    (["--api-key", "clé"], "--api-key: must be printable ASCII"),
    (["--shutdown-timeout-s", "inf"], "--shutdown-timeout-s: must be a finite number > 0, got inf"),
    (["--shutdown-timeout-s", "nan"], "--shutdown-timeout-s: must be a finite number > 0, got nan"),
    (["--shutdown-timeout-s", "-1"], "--shutdown-timeout-s: must be a finite number > 0, got -1"),
    (["--served-model-name", ""], "--served-model-name: must not be empty"),
    (["--host", " "], "--host: must not be empty"),
])
def test_bad_server_flag_is_refused_while_parsing(flags, message, capsys):
    from orca_serve.entrypoints.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", *flags])
    assert exit_.value.code == 2
    assert f"orca-serve serve: error: argument {message}" in capsys.readouterr().err


def test_an_address_it_cannot_listen_on_fails_before_the_model_loads(tmp_path, capsys):
    # A port in use, a host that does not resolve or is not this machine's: uvicorn
    # said so only once the model had loaded (minutes, for a large one).
    from orca_serve.entrypoints.cli import main
    from orca_serve.entrypoints.openai.server import main as server_main

    nope = str(tmp_path / "nope")  # never reached: the model would fail to load
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", nope, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"orca-serve: error: cannot listen on --host 127.0.0.1 --port {port}: " in err and "in use" in err
    assert main(["serve", "--model", nope, "--port", "0", "--host", "10.255.255.1"]) == 2
    assert "cannot listen on --host 10.255.255.1 --port 0" in capsys.readouterr().err
    # python -m orca_serve.entrypoints.openai.server: the same one line, not a traceback.
    assert server_main(["--model", nope, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"error: model path does not exist: {nope}" in err and "Traceback" not in err


def test_an_empty_api_key_is_refused_by_every_entry_not_only_the_cli(server, tmp_path):
    """The empty token matched an empty key: a server built with api_key="" let
    every request in. The CLI refused it; build_app and run_server now do too."""
    from orca_serve.config import EngineConfig
    from orca_serve.entrypoints.openai.server import build_app, run_server

    for key, why in (("", "must not be empty"), (" k", "must be printable ASCII"), ("kéy", "must be printable ASCII")):
        with pytest.raises(ValueError, match=f"api_key {why}"):
            build_app(server.engine, api_key=key)
        with pytest.raises(ValueError, match=f"api_key {why}"):  # before any model loads
            run_server(EngineConfig.from_kwargs(model=str(tmp_path / "nope")), port=0, api_key=key)
