"""Rotary position embeddings (RoPE), NeoX/HF "rotate half" layout.

cos/sin are precomputed once for every position up to ``max_position`` and
looked up by each token's absolute position, so a batch mixing prompts and
decode steps at different positions needs no special handling.

Configs come in two shapes: transformers >= 5 keeps everything in
``config.rope_parameters`` (``rope_theta``, ``rope_type``, scaling fields);
older ones use ``config.rope_theta`` plus an optional ``config.rope_scaling``
dict keyed by ``type`` or ``rope_type``. ``rope_parameters`` reads both.
"""
from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config) -> dict:
    """The RoPE settings of a HF config as one dict with ``rope_theta`` and ``rope_type``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type")) or "default"
    return params


def _inv_freq(dim: int, params: dict) -> torch.Tensor:
    base = float(params["rope_theta"])
    # Same op sequence as HF (int64 arange, then float) so the values are identical.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, params)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low frequencies by `factor`, and
    # interpolate smoothly in between (by wavelength relative to the original context).
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = _inv_freq(head_dim, params)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        # [max_position, 2, head_dim]: one gather per forward fetches both.
        cache = torch.stack((emb.cos(), emb.sin()), dim=1).to(dtype)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.cpu_ops = None  # native kernels, bound by the model runner when they apply

    def rotate_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, num_heads: int, num_kv_heads: int):
        """Split a fused projection [T, (H + 2 Hkv) * D] into rotated q, rotated k and v.

        With the native kernels the rotation happens in place on ``qkv`` and q,
        k, v are views of it; otherwise it is ``forward`` on the split pieces."""
        n, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        if self.cpu_ops is not None and qkv.stride(-1) == 1:
            self.cpu_ops.rotary_embedding(qkv, positions, self.cos_sin_cache, num_heads + num_kv_heads, d)
            return q, k, v
        q, k = self.forward(positions, q.view(n, num_heads, d), k.view(n, num_kv_heads, d))
        return q.reshape(n, -1), k.reshape(n, -1), v

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotate q [T, Hq, D] and k [T, Hk, D] by each token's position [T]."""
        # In the model's dtype (as transformers does): a float32 cache would promote
        # half-precision q and k to float32, which the half-precision KV pool refuses.
        cos_sin = self.cos_sin_cache[positions].to(q.dtype)
        cos, sin = cos_sin[:, 0].unsqueeze(1), cos_sin[:, 1].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def get_rope(config, head_dim: int, max_position: int, dtype: torch.dtype = torch.float32) -> RotaryEmbedding:
    """Build the RoPE module a HF config asks for (``ValueError`` if unsupported)."""
    params = rope_parameters(config)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    return RotaryEmbedding(head_dim, max_position, params, dtype=dtype)
