"""Tiny random HF models for correctness tests (worker side).

Each builder saves a float32 model with ``save_pretrained`` (safetensors) to
a directory, so our loader reads it exactly as it would a real checkpoint.
Shapes are small (hidden 64, 2-3 layers, 4 heads / 2 KV heads) to keep CPU
tests fast; init std is raised above HF's default so logits are well
separated and greedy ties from float noise are implausible.
"""
from __future__ import annotations

import contextlib
import random

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from orca_serve.batch import CachedRequestData, NewRequestData, SchedulerOutput
from orca_serve.config import CacheConfig, EngineConfig, ModelConfig
from orca_serve.sampling_params import SamplingParams

_COMMON = dict(vocab_size=384, initializer_range=0.08, bos_token_id=1, eos_token_id=2)
_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, **_COMMON)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(tie_word_embeddings=False, **_LLAMA),
    "llama-tied-llama3rope": lambda: LlamaConfig(
        tie_word_embeddings=True, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **_LLAMA),
    "qwen2": lambda: Qwen2Config(tie_word_embeddings=True, **_LLAMA),
    # Biases on every projection (q/k/v, o, gate/up, down), which SmolLM2 and Qwen2 lack in part.
    "llama-bias": lambda: LlamaConfig(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, **_LLAMA),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **_COMMON),
    "gpt2-untied": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      tie_word_embeddings=False, **_COMMON),
}


def save_tiny_model(path, kind: str, seed: int = 0) -> str:
    """Build a random tiny HF model of ``kind`` (see TINY_CONFIGS) and save it to ``path``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind](), dtype=torch.float32)
    if kind in ("qwen2", "llama-bias"):
        # HF initializes biases to zero; make them matter.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(str(path))
    return str(path)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads (the native kernels' OpenMP team) at n, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF greedy continuation of one prompt, run alone (no padding), never
    stopping at EOS (``generate``'s min_new_tokens would mask EOS instead)."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens


def make_runner(path: str, num_blocks: int = 64, model_options: dict | None = None, **kw):
    """A ModelRunner for the model at ``path`` with MiniScheduler's block size;
    ``model_options``: ModelConfig fields (say, cpu_kernels), ``kw``: the runner's."""
    from orca_serve.worker.model_runner import ModelRunner

    cfg = EngineConfig(model=ModelConfig(model=path, **(model_options or {})),
                       cache=CacheConfig(block_size=MiniScheduler.block_size))
    return ModelRunner(cfg, num_kv_blocks=num_blocks, **kw)


class MiniScheduler:
    """Just enough scheduler for these tests: a token budget that closes each
    request's computed/known gap (decodes first, long prompts chunked), blocks
    from a shuffled free list, full data once then diffs."""

    block_size = 4

    def __init__(self, num_blocks: int, budget: int) -> None:
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)  # block tables are not contiguous
        self.budget = budget
        self.reqs: dict[str, dict] = {}
        self.finished: set[str] = set()
        self.iteration = 0
        self.outputs: dict[str, list] = {}

    def add(self, rid: str, prompt: list[int], sp: SamplingParams) -> None:
        self.reqs[rid] = dict(prompt=list(prompt), out=[], blocks=[], computed=0, sent=False,
                              unsent=[], new_blocks=[], sp=sp)

    def make_output(self) -> SchedulerOutput:
        order = sorted(self.reqs, key=lambda r: self._gap(r) != 1)  # decodes first
        new, cached, num, budget = [], [], {}, self.budget
        for rid in order:
            r = self.reqs[rid]
            n = min(self._gap(rid), budget)
            if n <= 0:
                continue
            while len(r["blocks"]) * self.block_size < r["computed"] + n:
                block = self.free.pop()
                r["blocks"].append(block)
                r["new_blocks"].append(block)
            if not r["sent"]:
                new.append(NewRequestData(rid, r["prompt"], list(r["out"]), r["sp"], list(r["blocks"]), r["computed"]))
                r["sent"] = True
            else:
                cached.append(CachedRequestData(rid, r["unsent"], r["new_blocks"], r["computed"]))
            r["unsent"], r["new_blocks"] = [], []
            num[rid] = n
            budget -= n
        so = SchedulerOutput(self.iteration, new, cached, num, sum(num.values()), finished_req_ids=self.finished)
        self.finished, self.iteration = set(), self.iteration + 1
        return so

    def step(self, runner):
        so = self.make_output()
        out = runner.execute_model(so)
        for rid, n in so.num_scheduled_tokens.items():
            r = self.reqs[rid]
            r["computed"] += n
            caught_up = r["computed"] == len(r["prompt"]) + len(r["out"])
            assert (rid in out.sampled_token_ids) == caught_up
            if caught_up:
                r["out"].append(out.sampled_token_ids[rid])
                r["unsent"].append(out.sampled_token_ids[rid])
                if len(r["out"]) == r["sp"].max_tokens:
                    self.free += r["blocks"]
                    self.finished.add(rid)
                    self.outputs[rid] = self.reqs.pop(rid)["out"]
        return so, out

    def _gap(self, rid: str) -> int:
        r = self.reqs[rid]
        return len(r["prompt"]) + len(r["out"]) - r["computed"]


def fail_next_forward(monkeypatch, runner) -> list:
    """Make ``runner``'s model raise RuntimeError("injected fault") in its next
    forward (say, out of memory); returns the list each fault is recorded in:
    clearing it arms the next forward again."""
    faults, forward = [], runner.model.forward

    def forward_or_fail(*args):
        if not faults:
            faults.append(1)
            raise RuntimeError("injected fault")
        return forward(*args)

    monkeypatch.setattr(runner.model, "forward", forward_or_fail)
    return faults
