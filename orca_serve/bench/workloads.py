"""Fixed-seed benchmark workloads: what each request asks for, never when.

Prompts are token-id lists drawn from the vocabulary (special ids left out),
so a workload needs no tokenizer and no data download; a text form is attached
afterwards for backends that only take text. Lengths, prompt contents and
arrival times come from separate random streams derived from one seed, so a
rate sweep replays exactly the same requests at every rate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orca_serve.shown import shown

WORKLOADS = ("orca", "random", "sharegpt-like", "shared-prefix")

# Defaults per workload: (input length range, output length range), inclusive.
DEFAULT_LENGTHS = {
    "orca": ((32, 512), (1, 128)),  # Orca §6.1: uniform input [32, 512], max output [1, 128]
    "random": ((256, 256), (128, 128)),
    "sharegpt-like": ((4, 1024), (4, 1024)),  # clip range of the log-normal draws
    "shared-prefix": ((32, 128), (32, 128)),  # per-request suffix after the shared prefix
}

# Stream ids for np.random.default_rng([seed, stream]); keep them stable so old
# results stay reproducible.
_LENGTHS, _TOKENS, _ARRIVALS, _PREFIXES = 0, 1, 2, 3


@dataclass
class RequestSpec:
    """One benchmark request. ``prompt_token_ids`` is None only for JSONL text prompts."""

    index: int
    prompt_token_ids: list[int] | None
    output_len: int
    prompt_text: str | None = None
    ignore_eos: bool = True

    @property
    def prompt_len(self) -> int | None:
        return None if self.prompt_token_ids is None else len(self.prompt_token_ids)


@dataclass(frozen=True)
class WorkloadParams:
    """Knobs shared by the synthetic workloads; None means the workload's default."""

    input_len: tuple[int, int] | None = None
    output_len: tuple[int, int] | None = None
    # sharegpt-like: medians and log-space sigma of the log-normal length draws.
    input_median: float = 128.0
    output_median: float = 192.0
    sigma: float = 1.0
    # shared-prefix: how many distinct system prompts, and how long each is.
    num_prefixes: int = 4
    prefix_len: int = 256
    ignore_eos: bool = True


def parse_range(text: str) -> tuple[int, int]:
    """``"32:512"`` -> (32, 512); ``"128"`` -> (128, 128)."""
    lo, _, hi = str(text).partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if lo_i < 1 or hi_i < lo_i:
        raise ValueError(f"length range must be 1 <= lo <= hi, got {shown(text)}")
    return lo_i, hi_i


def allowed_token_ids(vocab_size: int, special_ids=()) -> np.ndarray:
    """Vocabulary ids a random prompt may use: everything but special tokens."""
    mask = np.ones(vocab_size, dtype=bool)
    special = [i for i in special_ids if i is not None and 0 <= i < vocab_size]
    mask[special] = False
    ids = np.nonzero(mask)[0]
    if ids.size == 0:
        raise ValueError("no usable token ids in the vocabulary")
    return ids


def generate(name: str, num_requests: int, vocab: np.ndarray, seed: int = 0,
             params: WorkloadParams | None = None, salt: int = 0) -> list[RequestSpec]:
    """Build ``num_requests`` requests of a named synthetic workload.

    ``salt`` changes the prompt contents but not the lengths: the same trace
    with prompts no prefix cache has seen (for repeated runs on one server).
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} or a .jsonl file")
    p = params or WorkloadParams()
    in_range = p.input_len or DEFAULT_LENGTHS[name][0]
    out_range = p.output_len or DEFAULT_LENGTHS[name][1]
    len_rng = np.random.default_rng([seed, _LENGTHS])
    tok_rng = np.random.default_rng([seed, _TOKENS, salt])
    if name == "sharegpt-like":
        in_lens = _lognormal(len_rng, p.input_median, p.sigma, in_range, num_requests)
        out_lens = _lognormal(len_rng, p.output_median, p.sigma, out_range, num_requests)
    else:
        in_lens = len_rng.integers(in_range[0], in_range[1] + 1, num_requests)
        out_lens = len_rng.integers(out_range[0], out_range[1] + 1, num_requests)
    prefixes = None
    if name == "shared-prefix":
        pre_rng = np.random.default_rng([seed, _PREFIXES, salt])
        prefixes = [vocab[pre_rng.integers(0, vocab.size, p.prefix_len)].tolist()
                    for _ in range(p.num_prefixes)]
    specs = []
    for i in range(num_requests):
        ids = vocab[tok_rng.integers(0, vocab.size, int(in_lens[i]))].tolist()
        if prefixes is not None:
            ids = prefixes[i % len(prefixes)] + ids
        specs.append(RequestSpec(i, ids, int(out_lens[i]), ignore_eos=p.ignore_eos))
    return specs


def _lognormal(rng, median: float, sigma: float, clip: tuple[int, int], n: int) -> np.ndarray:
    # ln X ~ N(ln median, sigma): the median is the parameter people can read off a trace.
    draws = rng.lognormal(np.log(median), sigma, n)
    return np.clip(np.rint(draws), clip[0], clip[1]).astype(np.int64)


def load_jsonl(path: str | Path, num_requests: int | None = None,
               default_output_len: int = 128, ignore_eos: bool = True) -> list[RequestSpec]:
    """Read ``{"prompt": str | "prompt_token_ids": [...], "output_len": n}`` lines.

    ``max_tokens`` is accepted for ``output_len``. The first ``num_requests``
    lines are used (all when None or when the file is shorter).
    """
    specs: list[RequestSpec] = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if num_requests is not None and len(specs) >= num_requests:
                break
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: needs a JSON object, got {type(row).__name__}")
            ids, text = row.get("prompt_token_ids"), row.get("prompt")
            if ids is None and not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: needs 'prompt' (str) or 'prompt_token_ids' (list)")
            try:
                out = int(row.get("output_len", row.get("max_tokens", default_output_len)))
                ids = None if ids is None else [int(t) for t in ids]
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: output_len and prompt_token_ids must be integers ({e})") from None
            if out < 1:
                raise ValueError(f"{path}:{line_no}: output_len must be >= 1")
            specs.append(RequestSpec(len(specs), ids, out,
                                     prompt_text=text, ignore_eos=bool(row.get("ignore_eos", ignore_eos))))
    if not specs:
        raise ValueError(f"{path}: no requests")
    return specs


def attach_text(specs: list[RequestSpec], tokenizer) -> None:
    """Fill the text form (for text-only backends) and token ids (for text-only rows)."""
    for s in specs:
        if s.prompt_text is None and s.prompt_token_ids is not None:
            s.prompt_text = tokenizer.decode(s.prompt_token_ids)
        elif s.prompt_token_ids is None and s.prompt_text is not None:
            s.prompt_token_ids = tokenizer.encode(s.prompt_text, add_special_tokens=False)


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0,
                  seed: int = 0) -> list[float]:
    """Seconds after the start at which each request arrives.

    ``request_rate`` inf: all at t=0 (offline). Otherwise gaps are gamma
    distributed with shape ``burstiness`` and mean ``1/rate``: burstiness 1 is
    a Poisson process, below 1 burstier, above 1 more regular (vLLM's scheme).
    """
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 (inf for offline), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if np.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng([seed, _ARRIVALS])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    gaps[0] = 0.0  # the first request opens the run
    return np.cumsum(gaps).tolist()
