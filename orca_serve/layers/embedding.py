"""Token embedding and LM head, split over the vocabulary across TP ranks.

Each rank owns a contiguous range of (padded) vocabulary rows. The embedding
looks up only ids in its range and all-reduces; the LM head computes logits
for its range and all-gathers them. Tied models share one parameter, which
works because both layers use the same partition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orca_serve.distributed.parallel_state import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from orca_serve.kernels import packed_gemm
from orca_serve.layers.weight_slice import WeightSlice, materialize


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // self.tp_size)  # ceil: the last rank is padded
        self.vocab_start = self.tp_rank * self.per_rank
        self.vocab_end = min(self.vocab_start + self.per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor | WeightSlice) -> None:
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape mismatch: expected ({self.num_embeddings}, {param.shape[1]}), "
                             f"checkpoint {tuple(loaded.shape)}")
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(materialize(loaded[self.vocab_start:self.vocab_end]))
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        out.mul_(mine.unsqueeze(-1).to(out.dtype))
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; call ``compute_logits``."""

    tied = False  # shares the embedding's weight (tie_to)
    packed_weight: packed_gemm.PackedWeight | None = None  # set by pack_weight

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.per_rank, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self._bias_loader

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor | WeightSlice) -> None:
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(materialize(loaded[self.vocab_start:self.vocab_end]))
        param.data[n:].zero_()

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tied input/output embeddings)."""
        self.weight = embedding.weight
        self.tied = True

    def pack_weight(self, cpu_ops=None, arena: packed_gemm.PanelArena | None = None) -> None:
        """Use a prepacked copy (``packed_gemm``); a tied weight stays for the embedding lookup."""
        self.packed_weight = packed_gemm.PackedWeight(self.weight, cpu_ops, arena)
        if not self.tied:
            self.register_parameter("weight", None)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = packed_gemm.matmul(hidden_states, self.weight, self.packed_weight, self.bias)
        if self.tp_size > 1:
            logits = tp_all_gather(logits, dim=-1)[..., :self.num_embeddings]
        return logits

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden_states)
