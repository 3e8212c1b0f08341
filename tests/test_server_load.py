"""Load: 200 concurrent requests against the real server, a third streaming,
a tenth cancelled mid-stream. Every other request completes with exactly its
max_tokens (EOS ignored); afterwards no request is left and every KV block
is free again, as /metrics reports."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from server_helpers import API_KEY, ServerProcess, build_tiny_model, get_metrics, metric, wait_idle

N_REQUESTS = 200
N_STREAMING = N_REQUESTS // 3
N_CANCELLED = N_REQUESTS // 10  # all streaming: cancelled after their first chunk
WORDS = "the people water world Hello how are you first call time day number sound".split()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    srv = ServerProcess(model_dir, tmp_path_factory.mktemp("server") / "server.log",
                        "--num-kv-blocks", "2048", "--block-size", "16", "--max-num-seqs", "256")
    yield srv
    assert srv.stop() == 0


async def _plain(c: httpx.AsyncClient, body: dict) -> tuple[str, int]:
    r = await c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    return data["choices"][0]["finish_reason"], data["usage"]["completion_tokens"]


async def _streaming(c: httpx.AsyncClient, body: dict, cancel: bool) -> tuple[str, int]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    finish, tokens = None, None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if cancel:
                return "cancelled", 0  # leaving the block closes the connection mid-stream
            chunk = json.loads(line[6:])
            for ch in chunk["choices"]:
                finish = ch["finish_reason"] or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return finish, tokens


def test_200_concurrent_requests(server):
    rng = random.Random(0)
    jobs = []
    for i in range(N_REQUESTS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        cancel = i < N_CANCELLED
        body = {"prompt": prompt, "max_tokens": 160 if cancel else rng.randint(4, 24), "ignore_eos": True,
                "temperature": rng.choice([0.0, 1.0]), "seed": i}
        jobs.append((body, i < N_STREAMING, cancel))
    rng.shuffle(jobs)
    before = get_metrics(server.url)

    async def run():
        limits = httpx.Limits(max_connections=N_REQUESTS + 10, max_keepalive_connections=N_REQUESTS + 10)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            return await asyncio.gather(*[_streaming(c, body, cancel) if streaming else _plain(c, body)
                                          for body, streaming, cancel in jobs])

    results = asyncio.run(run())
    for (body, _, cancel), (finish, tokens) in zip(jobs, results):
        if cancel:
            assert finish == "cancelled"
        else:
            assert (finish, tokens) == ("length", body["max_tokens"])
    after = wait_idle(server.url, timeout=20)
    assert metric(after, "orca_serve_num_requests_running") == 0
    assert metric(after, "orca_serve_num_requests_waiting") == 0
    assert metric(after, "orca_serve_kv_blocks_used") == 0
    assert metric(after, "orca_serve_kv_blocks_total") == 2048

    def delta(name, label=""):
        return metric(after, name, label) - metric(before, name, label)

    finished = "orca_serve_requests_finished_total"
    # A cancelled request ends as "abort" when the server sees the disconnect
    # first, else as "length": on two busy cores the event loop can lag the
    # engine by their 160 tokens (seen in CI: 5 of 20 aborted, and once none).
    # Either way it finishes once and frees its blocks (above); test_server.py
    # checks that a lone disconnect aborts.
    aborted = delta(finished, 'finish_reason="abort"')
    assert aborted <= N_CANCELLED
    assert aborted + delta(finished, 'finish_reason="length"') == N_REQUESTS
    assert delta("orca_serve_e2e_request_latency_seconds_count") == N_REQUESTS
    # Iteration-level batching: many requests shared iterations.
    assert delta("orca_serve_iteration_batch_size_sum") / delta("orca_serve_iteration_batch_size_count") > 10
