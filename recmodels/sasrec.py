"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over item + position embeddings.

Scores are dot products with the (tied) item embedding table.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from recmodels.base import (Batch, EncoderConfig, ItemFeatures, SequentialRecommender, TransformerEncoder,
                            attention_mask, init_weights, position_ids)


@dataclass
class SASRecConfig(EncoderConfig):
    """RecBole defaults: d 64, 2 layers, 2 heads, inner 4d, dropout 0.5, L 50."""


class SASRec(SequentialRecommender):
    config_class = SASRecConfig

    def __init__(self, config: Mapping[str, Any] | SASRecConfig | None, n_items: int,
                 features: ItemFeatures | None = None):  # features unused: SASRec is id-only
        super().__init__(config, n_items)
        c = self.config
        self.item_embedding = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(c.max_seq_len, c.hidden_size)
        self.encoder = TransformerEncoder(c)
        self.apply(partial(init_weights, std=c.init_std))

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> (B, L, d) hidden state at every position."""
        item_seq = batch["item_seq"]  # (B, L)
        valid = item_seq > 0
        x = self.item_embedding(item_seq) + self.position_embedding(position_ids(valid))  # (B, L, d)
        return self.encoder(x, attention_mask(valid))

    def item_representations(self) -> torch.Tensor:
        return self.item_embedding.weight  # (N+1, d)
