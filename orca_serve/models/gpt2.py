"""GPT-2 architecture (also the GPT-3 shapes of the Orca paper, see registry).

Learned absolute position embeddings, pre-LayerNorm blocks, fused QKV
(``c_attn``), gelu_new MLP. HF stores these projections as ``Conv1D`` with
weights shaped [in, out], the transpose of ``nn.Linear``; ``load_weights``
transposes them. Selective batching as in llama.py: only attention looks at
request boundaries.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from orca_serve.distributed.parallel_state import is_first_stage, is_last_stage
from orca_serve.layers.activation import get_act_fn
from orca_serve.layers.attention import Attention, AttentionMetadata
from orca_serve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from orca_serve.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from orca_serve.layers.norm import LayerNorm
from orca_serve.models.stages import PPMissingLayer, make_layers, sampled_only_layer
from orca_serve.models.weights import load_params

_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads = config.n_embd, config.n_head
        head_dim = hidden // heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, heads, heads, bias=True, dtype=dtype)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True, dtype=dtype)
        scale = head_dim ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.q_size = self.c_attn.q_size
        self.attn = Attention(self.c_attn.num_heads, head_dim, scale, self.c_attn.num_kv_heads)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, sampled_only: bool = False) -> torch.Tensor:
        q, k, v = self.c_attn(x).split([self.q_size] * 3, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta, sampled_only))


class GPT2MLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        inner = getattr(config, "n_inner", None) or 4 * config.n_embd
        self.c_fc = ColumnParallelLinear(config.n_embd, inner, bias=True, dtype=dtype)
        self.c_proj = RowParallelLinear(inner, config.n_embd, bias=True, dtype=dtype)
        self.act = get_act_fn(config.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps, dtype=dtype)
        self.attn = GPT2Attention(config, layer_idx, dtype)
        self.ln_2 = LayerNorm(config.n_embd, eps, dtype=dtype)
        self.mlp = GPT2MLP(config, dtype)

    def forward(self, x, meta, sampled_only: bool = False):
        """``sampled_only``: return just the rows ``meta.sample_rows`` (see GPT2Model)."""
        h = self.attn(self.ln_1(x), meta, sampled_only)
        x = (x.index_select(0, meta.sample_rows) if sampled_only else x) + h
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """This pipeline stage's part: embeddings on the first stage, its block
    range, the final LayerNorm on the last stage."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        first = is_first_stage()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd, dtype=dtype) if first else PPMissingLayer()
        # Positions are few and small: every TP rank keeps the whole table.
        self.wpe = nn.Embedding(config.n_positions, config.n_embd, dtype=dtype) if first else PPMissingLayer()
        self.wpe.requires_grad_(False)
        self.start, self.end, self.h = make_layers(config.n_layer, lambda i: GPT2Block(config, i, dtype))
        self.ln_f = (LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype=dtype)
                     if is_last_stage() else PPMissingLayer())

    def forward(self, input_ids, positions, meta, hidden_states=None):
        """Hidden states [T, H], or only ``meta.sample_rows`` when set on the stage
        with the last block, which runs its projections and MLP on those rows alone
        (as in LlamaModel)."""
        x = self.wte(input_ids) + self.wpe(positions) if hidden_states is None else hidden_states
        last = sampled_only_layer(self.end, len(self.h), meta)
        for i in range(self.start, self.end):
            x = self.h[i](x, meta, sampled_only=i == last)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2. ``forward`` -> hidden [T, H]; ``compute_logits`` on sampled rows.
    Pipeline stages as in llama.py (``hidden_states`` from the previous stage)."""

    def __init__(self, config, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, dtype)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.n_embd, dtype=dtype)
                        if is_last_stage() else PPMissingLayer())
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.shares_embedding = self.tied and is_first_stage() and is_last_stage()
        if self.shares_embedding:
            self.lm_head.tie_to(self.transformer.wte)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(input_ids, positions, attn_metadata, hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF GPT-2 tensors (with or without the ``transformer.`` prefix)."""
        def route(name: str, tensor: torch.Tensor):
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                return []  # causal-mask buffers of old checkpoints, not weights
            if name == "lm_head.weight":
                return [] if self.tied else [(name, None, tensor)]
            if not name.startswith("transformer."):
                name = "transformer." + name
            if name.endswith(_CONV1D):
                tensor = tensor.t()
            if ".c_attn." in name:
                return [(name, shard, part) for shard, part in zip("qkv", tensor.chunk(3, dim=0))]
            if self.tied and not self.shares_embedding and name == "transformer.wte.weight":
                return [(name, None, tensor), ("lm_head.weight", None, tensor)]
            return [(name, None, tensor)]

        load_params(self, weights, route)
