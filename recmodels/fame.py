"""FAME: Facet-Aware Multi-Head Mixture-of-Experts for sequential recommendation (WSDM 2025).

A SASRec backbone whose last block is the FAME block:
  * inside every attention head, E expert queries share the head's keys and values; a per-head
    router on the experts' outputs mixes them (dense softmax, no top-k, no balancing loss);
  * the heads are not concatenated nor projected: each head's output, after a per-head residual,
    LayerNorm(d') and a d'->d'->d' feed-forward shared by the heads, is a facet F^h (d');
  * item v is scored per head against a sub-embedding e_v^h (projected: e_v W_f^h, or sliced),
    and a gate softmax(Linear(d, H)(concat_h F^h)) mixes the heads' logits (or, with
    mixture="softmax", their softmaxes).
Flags cover the paper's ablations: n_experts=1 (no MoE), n_heads=1, mixture, sub_embeddings.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recmodels.base import ItemFeatures, PostNormBlock, attend, feed_forward, init_weights, split_heads
from recmodels.sasrec import SASRec, SASRecConfig

MIXTURES = ("logits", "softmax")
SUB_EMBEDDINGS = ("project", "slice")


@dataclass
class FAMEConfig(SASRecConfig):
    n_heads: int = 4
    n_experts: int = 4  # query experts per head in the last block; 1 = no MoE
    mixture: str = "logits"  # "logits": gate mixes head logits; "softmax": mixture of head softmaxes
    sub_embeddings: str = "project"  # "project": e_v W_f^h; "slice": h-th d'-slice of e_v

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 1 or self.n_experts < 1:
            raise ValueError("FAME needs n_layers >= 1 (the last one is the FAME block) and n_experts >= 1")
        if self.mixture not in MIXTURES:
            raise ValueError(f"mixture must be one of {MIXTURES}, got {self.mixture!r}")
        if self.sub_embeddings not in SUB_EMBEDDINGS:
            raise ValueError(f"sub_embeddings must be one of {SUB_EMBEDDINGS}, got {self.sub_embeddings!r}")


class MixtureOfQueriesAttention(nn.Module):
    """Multi-head attention where each head has E expert queries and a router mixing their outputs.

    Returns the heads' outputs concatenated, (B, L, H*d'), with no output projection.
    """

    def __init__(self, hidden_size: int, n_heads: int, n_experts: int, attn_dropout: float):
        super().__init__()
        self.n_heads, self.n_experts, self.attn_dropout = n_heads, n_experts, attn_dropout
        head_size = hidden_size // n_heads
        self.key_value = nn.Linear(hidden_size, 2 * hidden_size)  # W_K^h, W_V^h of every head
        self.queries = nn.Linear(hidden_size, n_experts * hidden_size)  # W_Q^{h,e} of every head and expert
        # W_r^h: concat_e f^{h,e} (E*d') -> E logits, no bias; a single expert needs no router.
        self.router = nn.Parameter(torch.empty(n_heads, n_experts * head_size, n_experts)) if n_experts > 1 else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, experts = self.n_heads, self.n_experts
        key, value = (split_heads(part, heads) for part in self.key_value(x).chunk(2, dim=-1))  # (B, H, L, d')
        # The experts' queries are stacked along the query axis so one attention call serves
        # them all: (B, L, H, E, d') -> (B, H, E*L, d'); every expert query gets its position's mask row.
        query = self.queries(x).view(batch, length, heads, experts, -1).permute(0, 2, 3, 1, 4).flatten(2, 3)
        dropout = self.attn_dropout if self.training else 0.0
        expert_outputs = attend(query, key, value, mask.repeat(1, 1, experts, 1), dropout)
        expert_outputs = expert_outputs.view(batch, heads, experts, length, -1)  # (B, H, E, L, d')
        if self.router is None:
            mixed = expert_outputs[:, :, 0]
        else:
            router = self.router.view(heads, experts, -1, experts)  # (H, E_in, d', E_out)
            route = torch.einsum("bhild,hido->bhlo", expert_outputs, router).softmax(dim=-1)  # (B, H, L, E)
            mixed = torch.einsum("bhle,bheld->bhld", route, expert_outputs)  # (B, H, L, d')
        return mixed.transpose(1, 2).flatten(2)  # (B, L, H*d')


class PerHead(nn.Module):
    """Apply a d'-wide module to each head's slice of a (..., H*d') tensor (weights shared by heads)."""

    def __init__(self, module: nn.Module, n_heads: int):
        super().__init__()
        self.module, self.n_heads = module, n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.unflatten(-1, (self.n_heads, -1))).flatten(-2)


class FAME(SASRec):
    config_class = FAMEConfig

    def __init__(self, config: Mapping[str, Any] | FAMEConfig | None, n_items: int,
                 features: ItemFeatures | None = None):  # features unused: FAME is id-only
        super().__init__(config, n_items)
        c = self.config
        d, heads, head_size = c.hidden_size, c.n_heads, c.hidden_size // c.n_heads
        # The backbone's last block becomes the FAME block; its output is concat_h F^h (B, L, d).
        self.encoder.blocks[-1] = PostNormBlock(
            MixtureOfQueriesAttention(d, heads, c.n_experts, c.attn_dropout),
            PerHead(feed_forward(head_size, head_size), heads),
            PerHead(nn.LayerNorm(head_size, c.layer_norm_eps), heads),
            PerHead(nn.LayerNorm(head_size, c.layer_norm_eps), heads), c.dropout)
        self.facet_projection = nn.Linear(d, d, bias=False) if c.sub_embeddings == "project" else None  # W_f^h stacked
        self.facet_gate = nn.Linear(d, heads) if heads > 1 else None
        for module in (self.encoder.blocks[-1], self.facet_projection, self.facet_gate):
            if module is not None:
                module.apply(partial(init_weights, std=c.init_std))
        if self.encoder.blocks[-1].attention.router is not None:
            nn.init.normal_(self.encoder.blocks[-1].attention.router, std=c.init_std)

    def candidate_matrix(self) -> torch.Tensor:
        """(N+1, H*d'): item sub-embeddings e_v^h, heads concatenated."""
        if self.facet_projection is None:
            return self.item_embedding.weight
        return self.facet_projection(self.item_embedding.weight)

    def _log_gate(self, states: torch.Tensor) -> torch.Tensor:
        """(..., H*d') facets -> (..., H) log mixture weights of the heads."""
        if self.facet_gate is None:
            return states.new_zeros(states.shape[:-1] + (1,))
        return F.log_softmax(self.facet_gate(states), dim=-1)

    def query_vectors(self, states: torch.Tensor) -> torch.Tensor | None:
        """Mixture of logits: sum_h g_h F^h . e^h == (g * F) flattened . e flattened, a dot product."""
        if self.config.mixture != "logits":
            return None
        facets = states.unflatten(-1, (self.config.n_heads, -1))  # (..., H, d')
        return (facets * self._log_gate(states).exp().unsqueeze(-1)).flatten(-2)

    def logits(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """states (..., H*d') facets -> (..., N+1) scores (log-probabilities for mixture="softmax")."""
        if self.config.mixture == "logits":
            return super().logits(states, candidates)
        heads = self.config.n_heads
        facets = states.unflatten(-1, (heads, -1))  # (..., H, d')
        # Mixture of softmaxes over the real items only (a padding column at -inf in every head
        # would give logsumexp a NaN gradient); the padding column is prepended afterwards.
        per_head = torch.einsum("...hk,vhk->...hv", facets, candidates[1:].unflatten(-1, (heads, -1)))
        log_probs = torch.logsumexp(self._log_gate(states).unsqueeze(-1) + F.log_softmax(per_head, dim=-1), dim=-2)
        return F.pad(log_probs, (1, 0), value=float("-inf"))  # (..., N+1)

    def logit_elements_per_row(self) -> int:
        return (self.n_items + 1) * (self.config.n_heads if self.config.mixture == "softmax" else 1)
