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
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
# The fused dot-product cross-entropy on CPU: chunks of about this many logits stay in cache
# between the matmul, the softmax and the gradient matmuls (measured fastest at 1-4 MB, 2.7x the
# unfused loss at 13.7k rows x 3.9k items); at least this many rows keep the matmuls efficient.
CPU_LOGIT_ELEMENTS_PER_CHUNK = 2**20
CPU_MIN_ROWS_PER_CHUNK = 64


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


# ----------------------------------------------------------------------------- configs and the data

# Field metadata {"from_data": ...}: "always", the data sets the field (never a user); "unless_given", the data
# sets it when the user does not. {"cli": False} keeps a field off the command line (training.cli).
SET_BY_DATA = {"from_data": "always", "cli": False}


@dataclass(frozen=True)
class StoreNeeds:
    """What a model config asks of the feature store besides the item sequences."""

    features: tuple[str, ...] = ()  # item feature matrices it may use: "text", "image", "categories"
    max_gap: bool = False  # the largest gap (seconds) between consecutive items of a training history


@dataclass(frozen=True)
class DataFacts:
    """What the store holds, as far as a config's StoreNeeds asked."""

    max_len: int  # the run's history length L
    features: tuple[str, ...] = ()  # of the features asked for, those the items have
    max_gap_s: int | None = None  # when asked for


@dataclass
class EncoderConfig:
    """Transformer settings every model shares (RecBole SASRec defaults).

    A config owns what its model needs from the data: `store_needs` says what to read, `from_data` sets the
    fields the data decides, and `item_features` names the feature matrices the model is built with, so the
    training flow and the store hold no model-specific branch.
    """

    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int | None = field(default=None, metadata={"shown_default": "4 x hidden size"})  # FFN width
    dropout: float = 0.5  # embeddings and hidden states
    attn_dropout: float = 0.5  # attention probabilities
    max_seq_len: int = field(default=50, metadata=SET_BY_DATA)  # rows of the position table: the longest history
    init_std: float = 0.02
    layer_norm_eps: float = 1e-12  # RecBole's (the authors' code for FAME and HM4SR builds on it)

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        if self.inner_size is None:
            self.inner_size = 4 * self.hidden_size

    @classmethod
    def data_keys(cls, when: tuple[str, ...] = ("always", "unless_given")) -> frozenset[str]:
        """The fields the data decides: always (never given), and by default also those it decides unless given."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("from_data") in when)

    @classmethod
    def store_needs(cls, given: Mapping[str, Any]) -> StoreNeeds:
        """What a model of these hyper-parameters (a model_config dict) needs from the store."""
        return StoreNeeds(build_config(cls, given).item_features())

    @classmethod
    def from_data(cls, given: Mapping[str, Any], facts: DataFacts):
        """The config of `given` hyper-parameters with what the data decides set; bad values raise here."""
        refused = cls.data_keys(("always",)) & set(given)
        if refused:
            raise ValueError(f"model_config may not set {sorted(refused)}: the run and its data decide them")
        return build_config(cls, {**given, "max_seq_len": facts.max_len})

    def item_features(self) -> tuple[str, ...]:
        """The item feature matrices ("text", "image", "categories") a model of this config is built with."""
        return ()


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


def trim_padding(batch: Batch) -> dict[str, torch.Tensor]:
    """The batch without the history columns that are padding in every row (either padding side).

    Scores do not depend on padding, so a batch of short histories costs what its longest one needs.
    Every 2-D tensor of the batch contract is (B, L) and is cut the same way.
    """
    used = (batch["item_seq"] > 0).any(dim=0).nonzero().flatten()
    if len(used) == 0 or len(used) == batch["item_seq"].shape[1]:
        return dict(batch)
    columns = slice(int(used[0]), int(used[-1]) + 1)
    return {name: value[:, columns] if value.ndim == 2 else value for name, value in batch.items()}


def mask_padding_column(logits: torch.Tensor) -> torch.Tensor:
    """Set the padding item's column (0) to -inf so it is never predicted nor ranked."""
    return logits.index_fill(-1, torch.zeros(1, dtype=torch.long, device=logits.device), float("-inf"))


# ----------------------------------------------------------------------------- transformer

def drop_mask(shape: torch.Size, rate: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(bool mask, True = dropped, keep probability): Bernoulli(rate) per element from 16 random bits.

    On CPU torch's dropout draws each element's uniform separately (bernoulli_): at attention-map
    sizes that was a quarter of a SASRec training step. Filling int64 words at random and reading
    them as four int16 each is 8x cheaper; the rate is rounded to a multiple of 1/65536.
    """
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    levels = round(rate * 2**16)
    dropped = words.view(torch.int16)[:count].view(shape) < levels - 2**15
    return dropped, 1.0 - levels / 2**16


def dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """F.dropout, with CPU masks from drop_mask."""
    if not training or rate == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, rate, training=True)
    dropped, keep = drop_mask(x.shape, rate, x.device)
    return x.masked_fill(dropped, 0.0) / keep


class Dropout(nn.Module):
    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           dropout: float) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, Lq, d') x (B, H, L, d') with a bool mask.

    With attention dropout on CPU, torch's SDPA takes its unfused path with bernoulli_ masks;
    the same computation written out with drop_mask is faster.
    """
    if dropout == 0.0 or query.device.type != "cpu":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout)
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5  # (B, H, Lq, L)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    dropped, keep = drop_mask(weights.shape, dropout, weights.device)
    return weights.masked_fill(dropped, 0.0) @ value / keep  # scaling the (B, H, Lq, d') output, not the map


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
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(h + self.dropout(self.ffn(h)))


def transformer_block(config: EncoderConfig) -> PostNormBlock:
    d = config.hidden_size
    return PostNormBlock(MultiHeadSelfAttention(d, config.n_heads, config.attn_dropout),
                         feed_forward(d, config.inner_size), nn.LayerNorm(d, config.layer_norm_eps),
                         nn.LayerNorm(d, config.layer_norm_eps),
                         config.dropout)


class TransformerEncoder(nn.Module):
    """Dropout(LayerNorm(x)) followed by `n_layers` post-LN blocks under a causal+padding mask."""

    def __init__(self, config: EncoderConfig, n_layers: int | None = None):
        super().__init__()
        self.input_norm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.input_dropout = Dropout(config.dropout)
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


class _DotProductCrossEntropy(torch.autograd.Function):
    """Mean CE of (queries @ candidates.T with column 0 at -inf) against targets, chunk by chunk.

    The loss is the end of the graph, so the gradients are computed in forward while each chunk's
    logits are still at hand (softmax in place, minus one at the target, two matmuls) and only
    scaled in backward: no (M, N+1) tensor is kept or recomputed.
    """

    @staticmethod
    def forward(ctx, queries, candidates, targets, rows_per_chunk):
        want_queries, want_candidates = ctx.needs_input_grad[:2]
        grad_queries = torch.empty_like(queries) if want_queries else None
        grad_candidates = torch.zeros_like(candidates, dtype=torch.float32) if want_candidates else None
        total = queries.new_zeros((), dtype=torch.float32)
        candidates_f32 = candidates.float()  # once, not per chunk (a no-op in float32; autocast recasts it)
        autocasting = torch.is_autocast_enabled(queries.device.type)
        for start in range(0, queries.shape[0], rows_per_chunk):
            chunk = slice(start, start + rows_per_chunk)
            rows, chunk_targets = queries[chunk], targets[chunk]
            logits = (rows @ candidates.T).float()  # (m, N+1); float32 under autocast too
            logits[:, 0] = float("-inf")
            target_logits = logits.gather(1, chunk_targets[:, None])  # (m, 1)
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # unnormalised softmax in place: one exp per logit, not two
            sums = probs.sum(dim=1, keepdim=True)
            total += (row_max + sums.log() - target_logits).sum()  # log-sum-exp minus the target's logit
            if not (want_queries or want_candidates):
                continue
            probs.mul_(sums.reciprocal_())
            probs[torch.arange(len(chunk_targets), device=probs.device), chunk_targets] -= 1.0  # dCE/dlogits
            if want_queries:
                grad_queries[chunk] = (probs @ candidates_f32).to(queries.dtype)
            if want_candidates:
                if autocasting:  # in-place ops skip autocast: a low-precision matmul, then a float32 sum
                    grad_candidates += probs.T @ rows
                else:  # in place: no (N+1, S) temporary per chunk
                    grad_candidates.addmm_(probs.T, rows.float())
        ctx.rows = queries.shape[0]
        ctx.candidates_dtype = candidates.dtype
        ctx.save_for_backward(grad_queries, grad_candidates)
        return total / queries.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_queries, grad_candidates = ctx.saved_tensors
        scale = grad_loss / ctx.rows
        return (None if grad_queries is None else grad_queries * scale.to(grad_queries.dtype),
                None if grad_candidates is None else (grad_candidates * scale).to(ctx.candidates_dtype),
                None, None)


def dot_product_cross_entropy(queries: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                              rows_per_chunk: int | None = None) -> torch.Tensor:
    """Mean CE of logits queries (M, S) @ candidates (N+1, S).T, padding column 0 excluded, against
    targets (M,); the fast path of `next_item_loss` for every model whose logits are dot products.

    Chunks: cache-sized on CPU, memory-sized (MAX_LOGIT_ELEMENTS_PER_CHUNK) on accelerators.
    Not twice differentiable.
    """
    if rows_per_chunk is None:
        columns = candidates.shape[0]
        if queries.device.type == "cpu":
            rows_per_chunk = max(CPU_MIN_ROWS_PER_CHUNK, CPU_LOGIT_ELEMENTS_PER_CHUNK // columns)
        else:
            rows_per_chunk = max(1, MAX_LOGIT_ELEMENTS_PER_CHUNK // columns)
    return _DotProductCrossEntropy.apply(queries, candidates, targets, rows_per_chunk)


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
    query_vectors(states (..., S)) -> (..., S') whose dot products with the candidates are the logits
        (default: the states), or None for a model whose logits are not dot products
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

    def query_vectors(self, states: torch.Tensor) -> torch.Tensor | None:
        return states

    def logits(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return mask_padding_column(self.query_vectors(states) @ candidates.T)

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
        queries = self.query_vectors(rows)
        if queries is not None:
            return dot_product_cross_entropy(queries, candidates, targets)
        rows_per_chunk = max(1, MAX_LOGIT_ELEMENTS_PER_CHUNK // self.logit_elements_per_row())
        return chunked_cross_entropy(lambda r: self.logits(r, candidates), rows, targets, rows_per_chunk)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, parts): parts hold each loss's raw (unweighted, detached) value."""
        ce = self.next_item_loss(self(batch), batch, self.candidate_matrix())
        return ce, {"ce": ce.detach()}
