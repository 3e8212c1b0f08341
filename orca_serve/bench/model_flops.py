"""A model's arithmetic for ``bench roofline``, with nothing measured: its
dimensions (``Dims``, from its HF config), the weight GEMMs one iteration
runs (``gemm_shapes``, ``layer_shapes``), the FLOPs and seconds of such
shapes, and the FLOPs a benchmark trace needs at least (``trace_flops``).

Plain Python: no torch, no model built.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool  # llama-style gate/up/down; False: GPT-2 fc/proj

    @classmethod
    def from_hf_config(cls, c) -> "Dims":
        if hasattr(c, "n_embd"):  # GPT-2 family
            return cls(c.n_embd, c.n_inner or 4 * c.n_embd, c.n_layer, c.n_head, c.n_head,
                       c.n_embd // c.n_head, c.vocab_size, False)
        heads = c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, heads,
                   getattr(c, "num_key_value_heads", None) or heads,
                   getattr(c, "head_dim", None) or c.hidden_size // heads, c.vocab_size, True)


# (name, M, K, N, times per iteration)
Shape = tuple[str, int, int, int, int]


def gemm_shapes(d: Dims, tokens: int) -> list[Shape]:
    """(name, M, K, N, times per iteration) of every weight GEMM for ``tokens`` rows."""
    q, kv = d.heads * d.head_dim, 2 * d.kv_heads * d.head_dim
    mlp_up = 2 * d.intermediate if d.gated_mlp else d.intermediate
    return [("qkv", tokens, d.hidden, q + kv, d.layers), ("attn_out", tokens, q, d.hidden, d.layers),
            ("mlp_up", tokens, d.hidden, mlp_up, d.layers), ("mlp_down", tokens, d.intermediate, d.hidden, d.layers),
            ("lm_head", tokens, d.hidden, d.vocab, 1)]


def total_flops(shapes: list[Shape]) -> float:
    """FLOPs of ``shapes``, each counted as often as an iteration runs it."""
    return sum(2 * m * k * n * count for _, m, k, n, count in shapes)


def total_seconds(shapes: list[Shape], times: dict[str, float]) -> float:
    """Seconds of ``shapes`` at ``times`` (per shape), each counted as often as an iteration runs it."""
    return sum(times[name] * count for name, _, _, _, count in shapes)


def gemm_rate(shapes: list[Shape], times: dict[str, float]) -> float:
    """FLOP/s of ``shapes`` at ``times``."""
    return total_flops(shapes) / total_seconds(shapes, times)


def layer_shapes(d: Dims, rows: int) -> list[Shape]:
    """The decoder layers' GEMMs (no LM head) at ``rows`` tokens."""
    return [s for s in gemm_shapes(d, rows) if s[0] != "lm_head"]


def trace_flops(d: Dims, requests: list[dict]) -> tuple[float, float]:
    """(prompt-side, decode-side) FLOPs the trace needs at least.

    A request of p prompt and o output tokens runs p prompt tokens and o - 1
    decode tokens through the layers (the last sampled token is never fed
    back) and the LM head o times (each output token is sampled once); every
    token attends to the context up to itself (4 * ctx * heads * head_dim per
    layer: QK^T and PV). In the last layer only the prompt's last row, which
    is sampled, needs more than its K/V projection: the other rows' outputs
    are never read (the engine skips them too, see ``LlamaModel``).
    """
    per_token = total_flops(layer_shapes(d, 1))
    per_layer = per_token / d.layers
    kv_proj = 2 * d.hidden * 2 * d.kv_heads * d.head_dim
    lm_head = 2 * d.hidden * d.vocab
    attn_layer = 4 * d.heads * d.head_dim
    attn = attn_layer * d.layers
    prompt = decode = 0.0
    for r in requests:
        p, o = r["prompt_len"], r["output_len"]
        if p:
            prompt += ((d.layers - 1) * (p * per_layer + attn_layer * p * (p + 1) / 2)
                       + (p - 1) * kv_proj + per_layer + attn_layer * p)
        decode += o * lm_head + (o - 1) * per_token + attn * ((p + o - 1) * (p + o) / 2 - p * (p + 1) / 2)
    return prompt, decode
