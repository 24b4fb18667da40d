"""Shared pieces of the sequential recommenders (SASRec, FAME, HM4SR).

Batch contract (a dict of tensors; B batch, L sequence length, N real items, id 0 = padding):
    item_seq   (B, L) int64  item ids, 0 = padding; left or right padding give the same scores
    time_seq   (B, L) int64  seconds since the dataset's first interaction, 0 on padding
    seq_len    (B,)   int64  informational only: the mask (item_seq > 0) is the source of truth
    target     (B,)   int64  next item after the last valid position
    target_seq (B, L) int64  optional: next item at every position, 0 where there is none.
                             When present, `loss` trains on all positions in one causal pass.

Every model maps a batch to per-position user states (B, L, S) in `forward`, and scores states
against a candidate matrix (N+1, S') in `logits`; the padding column always scores -inf.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Batch = Mapping[str, torch.Tensor]

# The all-positions loss builds logits for up to B*L rows over N+1 items (B=256, L=200,
# N=100k: 20 GB in float32). Above this many logit elements per chunk, the cross-entropy
# runs in checkpointed chunks so only one chunk's logits are alive at a time.
MAX_LOGIT_ELEMENTS_PER_CHUNK = 2**26


# ----------------------------------------------------------------------------- item features

@dataclass(frozen=True, eq=False)
class ItemFeatures:
    """Frozen per-item feature matrices, row i = item i, row 0 = padding item (all zeros).

    text (N+1, D_txt) and image (N+1, D_img) are float32 encoder outputs; categories (N+1, C)
    is a multi-hot float matrix. Any of them may be None. An item without a modality has a
    zero row there.
    """

    text: torch.Tensor | None = None
    image: torch.Tensor | None = None
    categories: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows = {}
        for name, matrix in self.present().items():
            if matrix.ndim != 2 or not matrix.is_floating_point():
                raise ValueError(f"ItemFeatures.{name} must be a 2-D float matrix, got "
                                 f"{tuple(matrix.shape)} {matrix.dtype}")
            if matrix[0].abs().sum() != 0:
                raise ValueError(f"ItemFeatures.{name}: row 0 is the padding item and must be zeros")
            rows[name] = matrix.shape[0]
        if len(set(rows.values())) > 1:
            raise ValueError(f"ItemFeatures matrices disagree on the number of rows: {rows}")

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, np.ndarray]) -> ItemFeatures:
        """Build from numpy arrays under the keys "text", "image", "categories" (each optional)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(arrays) - known
        if unknown:
            raise ValueError(f"unknown item feature(s) {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**{name: torch.as_tensor(np.asarray(array, dtype=np.float32))
                      for name, array in arrays.items() if array is not None})

    def present(self) -> dict[str, torch.Tensor]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if getattr(self, field.name) is not None}

    def require(self, name: str, n_items: int, why: str) -> torch.Tensor:
        """The matrix `name`, checked to have n_items + 1 rows; a clear error if it is missing."""
        matrix = getattr(self, name)
        if matrix is None:
            raise ValueError(f"{why} needs ItemFeatures.{name}, which was not given")
        if matrix.shape[0] != n_items + 1:
            raise ValueError(f"ItemFeatures.{name} has {matrix.shape[0]} rows; expected n_items + 1 = "
                             f"{n_items + 1} (row 0 is padding)")
        return matrix


# ----------------------------------------------------------------------------- configs

@dataclass
class EncoderConfig:
    """Transformer settings every model shares (RecBole SASRec defaults)."""

    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int | None = None  # feed-forward width; None -> 4 * hidden_size
    dropout: float = 0.5  # embeddings and hidden states
    attn_dropout: float = 0.5  # attention probabilities
    max_seq_len: int = 50  # rows of the position table: the longest history a model accepts
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if self.inner_size is None:
            self.inner_size = 4 * self.hidden_size


ConfigT = TypeVar("ConfigT", bound=EncoderConfig)


def build_config(config_class: type[ConfigT], config: Mapping[str, Any] | ConfigT | None) -> ConfigT:
    """A model's config from a dict (unknown keys are an error naming them) or its own dataclass."""
    if config is None:
        return config_class()
    if type(config) is config_class:
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a dict or {config_class.__name__}, got {type(config).__name__}")
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} key(s) {unknown}; valid keys: {sorted(known)}")
    return config_class(**config)


def init_weights(module: nn.Module, std: float) -> None:
    """Normal(0, std) Linear/Embedding weights (padding row zero), zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- masks and positions

def position_ids(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, L) int64: 0 at the first valid item, whatever the padding side."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B,) index of the last valid position (0 for an empty row)."""
    arange = torch.arange(valid.shape[1], device=valid.device)
    return (valid.long() * arange).argmax(dim=1)


def gather_last(states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) states at the last valid position -> (B, ...)."""
    rows = torch.arange(states.shape[0], device=states.device)
    return states[rows, last_valid_index(valid)]


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, 1, L, L) bool, True = query i may attend key j.

    Causal and padding mask. Every query also sees itself, so padding queries (whose keys are
    all masked otherwise) get a finite softmax instead of NaN; no valid query ever sees padding.
    """
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (causal & valid[:, None, None, :]) | diagonal


def mask_padding_column(logits: torch.Tensor) -> torch.Tensor:
    """Set the padding item's column (0) to -inf so it is never predicted nor ranked."""
    return logits.index_fill(-1, torch.zeros(1, dtype=torch.long, device=logits.device), float("-inf"))


# ----------------------------------------------------------------------------- transformer

def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           dropout: float) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, Lq, d') x (B, H, L, d') with a bool mask."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, L, H*d') -> (B, H, L, d')."""
    return x.unflatten(-1, (n_heads, -1)).transpose(1, 2)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, attn_dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query, key, value = (split_heads(part, self.n_heads) for part in self.qkv(x).chunk(3, dim=-1))
        heads = attend(query, key, value, mask, self.attn_dropout if self.training else 0.0)  # (B, H, L, d')
        return self.output(heads.transpose(1, 2).flatten(2))  # (B, L, d)


def feed_forward(width: int, inner: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, inner), nn.GELU(), nn.Linear(inner, width))


class PostNormBlock(nn.Module):
    """x -> h = LN(x + Drop(attention(x))) -> LN(h + Drop(FFN(h))) (post-LN, RecBole style).

    The sub-layers are given, so FAME's facet block reuses the same wiring with per-head parts.
    """

    def __init__(self, attention: nn.Module, ffn: nn.Module, attention_norm: nn.Module,
                 ffn_norm: nn.Module, dropout: float):
        super().__init__()
        self.attention, self.ffn = attention, ffn
        self.attention_norm, self.ffn_norm = attention_norm, ffn_norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(h + self.dropout(self.ffn(h)))


def transformer_block(config: EncoderConfig) -> PostNormBlock:
    d = config.hidden_size
    return PostNormBlock(MultiHeadSelfAttention(d, config.n_heads, config.attn_dropout),
                         feed_forward(d, config.inner_size), nn.LayerNorm(d), nn.LayerNorm(d),
                         config.dropout)


class TransformerEncoder(nn.Module):
    """Dropout(LayerNorm(x)) followed by `n_layers` post-LN blocks under a causal+padding mask."""

    def __init__(self, config: EncoderConfig, n_layers: int | None = None):
        super().__init__()
        self.input_norm = nn.LayerNorm(config.hidden_size)
        self.input_dropout = nn.Dropout(config.dropout)
        n_layers = config.n_layers if n_layers is None else n_layers
        self.blocks = nn.ModuleList(transformer_block(config) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), mask (B, 1, L, L) -> (B, L, d)."""
        x = self.input_dropout(self.input_norm(x))
        for block in self.blocks:
            x = block(x, mask)
        return x


# ----------------------------------------------------------------------------- losses

def chunked_cross_entropy(logits_fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
                          targets: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """Mean CE of logits_fn(rows) (M, N+1) against targets (M,), never holding all M logit rows.

    Each chunk is checkpointed: its logits are recomputed in backward instead of kept.
    """
    if rows.shape[0] <= rows_per_chunk:
        return F.cross_entropy(logits_fn(rows), targets)

    def chunk_loss(chunk_rows: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(chunk_rows), chunk_targets, reduction="sum")

    total = sum(checkpoint(chunk_loss, chunk_rows, chunk_targets, use_reentrant=False)
                for chunk_rows, chunk_targets in zip(rows.split(rows_per_chunk), targets.split(rows_per_chunk)))
    return total / rows.shape[0]


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine InfoNCE with in-batch negatives: anchor, positive (..., B, d) -> mean loss.

    Row i's positive is positive[i]; the other rows are negatives, except rows whose `labels` (B,)
    equal row i's label: those are false negatives and are removed (logit -inf). Leading
    dimensions are independent problems (e.g. one per modality).
    """
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).transpose(-1, -2) / temperature
    batch = anchor.shape[-2]
    if labels is not None:
        same_label = labels[:, None] == labels[None, :]  # (B, B)
        same_label.fill_diagonal_(False)
        logits = logits.masked_fill(same_label, float("-inf"))
    rows = torch.arange(batch, device=anchor.device).expand(logits.shape[:-1])
    return F.cross_entropy(logits.flatten(0, -2), rows.flatten())


# ----------------------------------------------------------------------------- model interface

class SequentialRecommender(nn.Module):
    """RecBole-like interface shared by the models; subclasses implement forward and item_representations.

    forward(batch) -> (B, L, S) per-position user states
    candidate_matrix() -> (N+1, S') what `logits` scores states against (default: item_representations())
    logits(states (..., S), candidates) -> (..., N+1) scores, padding column -inf
    """

    config_class: type[EncoderConfig] = EncoderConfig

    def __init__(self, config: Mapping[str, Any] | EncoderConfig | None, n_items: int):
        super().__init__()
        self.config = build_config(self.config_class, config)
        self.n_items = n_items

    def item_representations(self) -> torch.Tensor:
        """(N+1, d_out): the trained item vectors, e.g. to write to a vector store."""
        raise NotImplementedError

    def candidate_matrix(self) -> torch.Tensor:
        return self.item_representations()

    def logits(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return mask_padding_column(states @ candidates.T)

    def logit_elements_per_row(self) -> int:
        """Memory cost of one row of `logits`, in elements (sets the loss's chunk size)."""
        return self.n_items + 1

    def score_all(self, batch: Batch) -> torch.Tensor:
        """(B, N+1) scores at the last valid position; column 0 is -inf."""
        valid = batch["item_seq"] > 0
        return self.logits(gather_last(self(batch), valid), self.candidate_matrix())

    def sequence_logits(self, batch: Batch) -> torch.Tensor:
        """(B, L, N+1) scores at every position (for tests and analysis; large)."""
        return self.logits(self(batch), self.candidate_matrix())

    def next_item_loss(self, states: torch.Tensor, batch: Batch, candidates: torch.Tensor) -> torch.Tensor:
        """Full-softmax CE: over all positions with target_seq > 0 if given, else at the last one."""
        if "target_seq" in batch:
            has_target = batch["target_seq"] > 0
            rows, targets = states[has_target], batch["target_seq"][has_target]  # (M, S), (M,)
        else:
            rows, targets = gather_last(states, batch["item_seq"] > 0), batch["target"]
        rows_per_chunk = max(1, MAX_LOGIT_ELEMENTS_PER_CHUNK // self.logit_elements_per_row())
        return chunked_cross_entropy(lambda r: self.logits(r, candidates), rows, targets, rows_per_chunk)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, parts): parts hold each loss's raw (unweighted, detached) value."""
        ce = self.next_item_loss(self(batch), batch, self.candidate_matrix())
        return ce, {"ce": ce.detach()}
