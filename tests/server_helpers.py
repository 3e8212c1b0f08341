"""Shared by the server tests: a tiny random llama with a real tokenizer, and
the real server started on a free loopback port (subprocess or thread).

The tokenizer is a byte-level BPE trained in memory on a few words, wrapped
in PreTrainedTokenizerFast with a ChatML template: random weights then give
text with partial UTF-8 characters, which exercises incremental
detokenization the way a real byte-level model does. Nothing touches a hub.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

API_KEY = "sk-orca-test"
MAX_MODEL_LEN = 256
_WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from "
          "or had by word but what some we can out other were all there when up use your how said an each "
          "she which do their time if will way about many then them write would like so these her long make "
          "thing see him two has look more day could go come did number sound no most people my over know "
          "water than call first who may down side been now find Hello world! How are you? 0123456789 .,;:'")
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ROOT = Path(__file__).resolve().parent.parent


def build_tiny_model(path: Path) -> Path:
    """Save a random 2-layer llama and a matching tokenizer (same vocab) to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_WORDS] * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", chat_template=_CHAT_TEMPLATE)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=MAX_MODEL_LEN, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.08, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    hf_tok.save_pretrained(str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {base_url} not healthy after {timeout}s")


class ServerProcess:
    """``python -m orca_serve.entrypoints.openai.server`` in a subprocess."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str, api_key: str | None = API_KEY,
                 module: tuple[str, ...] = ("orca_serve.entrypoints.openai.server",)) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", *module, "--model", str(model_dir), "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        # A file, not a pipe: a pipe nobody drains would block the server once full.
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(self.url, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text()


class ServerThread:
    """The real app and engine in this process (uvicorn on a thread), so a test
    can reach into the engine to inject faults."""

    def __init__(self, model_dir: Path, api_key: str | None = None, **engine_kwargs) -> None:
        import torch
        import uvicorn

        from orca_serve.config import EngineConfig
        from orca_serve.engine.async_engine import AsyncLLMEngine
        from orca_serve.entrypoints.openai.server import build_app

        # One intra-op thread, as the subprocess servers get (OMP_NUM_THREADS=1): on a
        # small shared CPU, torch's spinning worker threads make tiny matmuls crawl.
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        config = EngineConfig.from_kwargs(model=str(model_dir), **engine_kwargs)
        self.engine = AsyncLLMEngine.from_config(config)
        self.app = build_app(self.engine, api_key=api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)
        self.thread.start()
        wait_healthy(self.url)

    def stop(self) -> None:
        import torch

        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown(timeout=10)
        torch.set_num_threads(self._torch_threads)


def metric(text: str, name: str, label: str = "") -> float:
    """A sample's value in /metrics text; ``label`` (e.g. 'finish_reason="abort"') must
    appear in its labels. 0 for a labeled counter that has not been created yet."""
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line:
            return float(line.rsplit(" ", 1)[1])
    if label:
        return 0.0
    raise KeyError(name)


def get_metrics(base_url: str) -> str:
    return httpx.get(f"{base_url}/metrics", timeout=5).text


def wait_idle(base_url: str, timeout: float = 10.0) -> str:
    """Wait until no request runs or waits and every KV block is free; the /metrics text."""
    deadline = time.monotonic() + timeout
    while True:
        text = get_metrics(base_url)
        busy = (metric(text, "orca_serve_num_requests_running") + metric(text, "orca_serve_num_requests_waiting")
                + metric(text, "orca_serve_kv_blocks_used"))
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.05)
