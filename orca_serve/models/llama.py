"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2).

Pre-norm blocks: RMSNorm -> attention (fused QKV, RoPE, GQA) -> residual ->
RMSNorm -> SwiGLU MLP (fused gate/up) -> residual; each residual add is done
in one pass with the norm after it (as vLLM does). Qwen2 differs only by a
bias on the QKV projection. Selective batching: every op but attention runs
once on the flattened [num_tokens, hidden] batch.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from orca_serve.distributed.parallel_state import is_first_stage, is_last_stage
from orca_serve.layers.activation import get_act_fn
from orca_serve.layers.attention import Attention, AttentionMetadata
from orca_serve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from orca_serve.layers.linear import GateUpSiluAndMul, QKVParallelLinear, RowParallelLinear
from orca_serve.layers.norm import RMSNorm
from orca_serve.layers.rotary import get_rope
from orca_serve.models.stages import PPMissingLayer, make_layers, sampled_only_layer
from orca_serve.models.weights import load_params

# checkpoint name piece -> (our fused parameter piece, shard id)
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        head_dim = _head_dim(config)
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          num_kv, bias=qkv_bias, dtype=dtype)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=o_bias, dtype=dtype)
        self.rotary_emb = get_rope(config, head_dim, config.max_position_embeddings)
        p = self.qkv_proj
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, p.num_heads, p.num_kv_heads
        self.attn = Attention(p.num_heads, head_dim, head_dim ** -0.5, p.num_kv_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                sampled_only: bool = False) -> torch.Tensor:
        q, k, v = self.rotary_emb.rotate_qkv(positions, self.qkv_proj(x), self.num_heads, self.num_kv_heads)
        return self.o_proj(self.attn(q, k, v, meta, sampled_only))


class LlamaMLP(nn.Module):
    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        if get_act_fn(config.hidden_act) is not torch.nn.functional.silu:
            raise ValueError(f"Llama MLP needs hidden_act silu, got {config.hidden_act!r}")
        # silu(gate) * up comes out of the gate/up layer itself (fused into its matmul by the
        # native CPU kernels).
        self.gate_up_proj = GateUpSiluAndMul(config.hidden_size, config.intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, qkv_bias, o_bias, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(config, dtype)

    def forward(self, positions, x, residual, meta, sampled_only: bool = False):
        """(MLP output, residual stream before it): the block's output is their
        sum, which the next block's input norm (or the model's final norm)
        forms in the same pass as the norm (``RMSNorm.add_and_norm``).
        ``residual`` None: x is the stream itself (the stage's first block).
        ``sampled_only``: return just the rows ``meta.sample_rows`` (see LlamaModel)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(positions, h, meta, sampled_only)
        if sampled_only:
            residual = residual.index_select(0, meta.sample_rows)
        residual, h = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """This pipeline stage's part of the decoder: the embedding on the first
    stage, its layer range, the final norm on the last stage.

    With the native CPU kernels bound to every piece of its layers, the
    layers run as one native call (``bind_native_stack``): the same kernels in
    the same order, without a return to Python between them."""

    native_stack = None  # the kernels' DecoderStack over this stage's layers

    def __init__(self, config, qkv_bias: bool, o_bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
                             if is_first_stage() else PPMissingLayer())
        self.start, self.end, self.layers = make_layers(
            config.num_hidden_layers, lambda i: LlamaDecoderLayer(config, qkv_bias, o_bias, dtype))
        self.norm = (RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
                     if is_last_stage() else PPMissingLayer())

    def forward(self, input_ids, positions, meta, hidden_states=None):
        """Hidden states [T, H]; with ``meta.sample_rows`` on the stage that holds
        the last layer, only those rows [S, H]: the last layer needs every
        row's K/V but its attention output, o_proj and MLP only for the rows
        that are sampled (a prompt's other rows are never read again)."""
        x = self.embed_tokens(input_ids) if hidden_states is None else hidden_states
        last = sampled_only_layer(self.end, len(self.layers), meta)
        residual = None
        if self.native_stack is not None and meta.block_table is not None:
            x, residual = self._native_layers(positions, x, meta, last)
        else:
            for i in range(self.start, self.end):
                x, residual = self.layers[i](positions, x, residual, meta, sampled_only=i == last)
        if residual is None:  # a stage without layers
            return self.norm(x)
        if isinstance(self.norm, PPMissingLayer):  # the next stage takes the stream as it is
            return x + residual
        return self.norm.add_and_norm(x, residual)[1]

    def _native_layers(self, positions, x, meta, last: int):
        """(x, residual) after this stage's layers, run by ``native_stack``."""
        caches = [self.layers[i].self_attn.attn.kv_cache for i in range(self.start, self.end)]
        if any(c is None for c in caches):
            raise RuntimeError("attention layer has no KV cache bound; see ModelRunner")
        return self.native_stack.forward(x, positions, caches, meta.slot_mapping, meta.block_table,
                                         meta.query_start_loc, meta.seq_lens, meta.sample_rows,
                                         meta.sample_query_start_loc, last - self.start if last >= 0 else -1)

    def bind_native_stack(self, cpu_ops) -> bool:
        """Run this stage's layers as one native call (``cpu_ops.DecoderStack``)
        when each of their pieces runs the native kernel: the norms, RoPE, the
        K/V write and paged attention, every matmul on panels (gate/up fused
        with SiLU), on one tensor-parallel rank (the row-parallel layers'
        all-reduce stays in Python). Whether it does; if not, the layers run
        one by one as before. The stack holds the weights and kernels it was
        bound with: a piece changed afterwards (a kernel swapped for a spy in
        a test) is not seen until this is called again."""
        layers = [self.layers[i] for i in range(self.start, self.end)]
        self.native_stack = None
        if cpu_ops is None or not layers or not all(_runs_natively(layer, cpu_ops) for layer in layers):
            return False
        first = layers[0]
        if any(layer.input_layernorm.eps != first.input_layernorm.eps
               or layer.post_attention_layernorm.eps != first.input_layernorm.eps for layer in layers):
            return False
        attn = first.self_attn
        stack = cpu_ops.DecoderStack(attn.num_heads, attn.num_kv_heads, attn.head_dim, first.input_layernorm.eps,
                                     attn.attn.scale)
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            stack.add_layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                            a.qkv_proj.packed_weight.panels, a.qkv_proj.bias,
                            a.o_proj.packed_weight.panels, a.o_proj.bias,
                            mlp.gate_up_proj.packed_weight.panels, mlp.gate_up_proj.gated_bias,
                            mlp.down_proj.packed_weight.panels, mlp.down_proj.bias,
                            a.rotary_emb.cos_sin_cache)
        self.native_stack = stack
        return True


def _runs_natively(layer: LlamaDecoderLayer, cpu_ops) -> bool:
    """Whether every piece of ``layer`` runs ``cpu_ops``' kernels (see
    ``LlamaModel.bind_native_stack``)."""
    a, mlp = layer.self_attn, layer.mlp
    linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
    return (all(m.cpu_ops is cpu_ops for m in (layer.input_layernorm, layer.post_attention_layernorm,
                                               a.rotary_emb, a.attn))
            and a.attn.attention_kernel is cpu_ops.paged_attention
            and mlp.gate_up_proj.fused
            and all(m.tp_size == 1 and m.packed_weight is not None and m.packed_weight.panels is not None
                    for m in linears))


class LlamaForCausalLM(nn.Module):
    """Llama/Mistral/SmolLM2. ``forward`` -> hidden [T, H] (or the sampled rows, see
    LlamaModel); ``compute_logits`` on sampled rows.

    Under pipeline parallelism ``forward`` takes the previous stage's output as
    ``hidden_states`` (None on the first stage); only the last stage has the LM head.
    """

    qkv_bias_always = False

    def __init__(self, config, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
                and config.sliding_window < config.max_position_embeddings:
            raise ValueError("sliding-window attention is not supported")
        self.config = config
        qkv_bias = self.qkv_bias_always or bool(getattr(config, "attention_bias", False))
        o_bias = not self.qkv_bias_always and bool(getattr(config, "attention_bias", False))
        self.model = LlamaModel(config, qkv_bias, o_bias, dtype)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype)
                        if is_last_stage() else PPMissingLayer())
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        # Tied embeddings on one stage share a parameter; on different stages
        # the last stage loads the embedding tensor into its own LM head.
        self.shares_embedding = self.tied and is_first_stage() and is_last_stage()
        if self.shares_embedding:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata, hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; q/k/v and gate/up go into their fused parameters."""
        def route(name: str, tensor: torch.Tensor):
            if "rotary_emb.inv_freq" in name or (self.tied and name == "lm_head.weight"):
                return []
            if self.tied and not self.shares_embedding and name == "model.embed_tokens.weight":
                return [(name, None, tensor), ("lm_head.weight", None, tensor)]
            for piece, fused, shard in _STACKED:
                if piece in name:
                    return [(name.replace(piece, fused), shard, tensor)]
            return [(name, None, tensor)]

        load_params(self, weights, route)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama layout with a bias on q/k/v (not on o_proj)."""

    qkv_bias_always = True
