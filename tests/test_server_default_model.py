"""The README's serve command on the embedded model, used by the official client."""
import os
import signal
import subprocess
import sys

import openai

from server_helpers import ROOT, free_port, wait_healthy


def test_serve_default_model_chat(orca_cache_dir, default_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "ORCA_SERVE_CACHE": orca_cache_dir, "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orca_serve.entrypoints.cli", "serve", "--port", str(port),
                             "--num-kv-blocks", "128"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=180, proc=proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                              max_tokens=16, temperature=0)
        assert "Paris" in resp.choices[0].message.content
        assert resp.usage.completion_tokens <= 16 and resp.usage.prompt_tokens > 10
        chunks = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                                max_tokens=16, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == resp.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        log.close()
    assert "finish_reason" in (tmp_path / "serve.log").read_text()  # one log line per request
