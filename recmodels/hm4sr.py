"""HM4SR: Hierarchical time-aware Mixture of Experts for multi-modal Sequential Recommendation
(WWW 2025, arXiv 2501.14269), restated from the authors' code with this project's fixes.

Streams: any subset M of {id, text, image}. id = trained embedding; text/image = Linear(D, d) of
frozen item features. A shared position table is added to every stream. Then, per position:
  1. interactive MoE: K experts Linear(M*d, M*d) see all modalities; modality m's gate reads only
     its own stream; stream_m += w_m * sum_k g_{m,k} Expert_k(x)[m], w initialised to (0, 1, 1).
  2. temporal MoE: tau = concat(interval embedding, cos((a t + b) * omega)) with t in days;
     r = softmax(Linear(2d, K)(tau)); x <- x * sum_k r_k u_k with expert vectors u_k in R^{M*d}.
     Bug fix: the experts u_k are registered, trained parameters. The authors keep them in a
     plain Python list, so they are never trained nor moved with the model.
  3. one Transformer encoder per stream on Dropout(LayerNorm_m(stream_m)); user state h_m at the
     last valid position; score y = sum_m h_m . C_m(v), C = (id embedding, projected features).
  0 experts removes a MoE (the ablations): n_interactive_experts=0 applies no update, n_temporal_experts=0 no
  rescale, and neither has parameters then (one expert is still a learned update or rescale). tau stays
  while PCL's placeholders need it.
Auxiliary losses (each weight 0 switches it off and skips its computation):
  * cp   - BCE of Linear(M*d, C) on every valid history item's raw representation vs its
           multi-hot categories (per item, as in the authors' code);
  * idcl - cosine InfoNCE between h_id and the target's id embedding, in-batch negatives, other
           rows with the same target removed from the negatives (not the authors' exp(0) quirk);
  * pcl  - text/image streams: floor(beta * len) random valid positions get a placeholder
           Linear_m(2d, d)(tau), re-encoded -> h~_m; InfoNCE(h_m, h~_m); mean over the streams.
           Positions are sampled on the device, one draw shared by the streams (as upstream).
With target_seq (all-positions training) the CE covers every position, while IDCL and PCL use
the last valid position (they are defined on the sequence's user state) and CP every valid item.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from recmodels.base import (SET_BY_DATA, Batch, DataFacts, EncoderConfig, ItemFeatures, SequentialRecommender,
                            StoreNeeds, TransformerEncoder, attention_mask, gather_last, info_nce, init_weights,
                            position_ids)

MODALITIES = ("id", "text", "image")
FEATURE_MODALITIES = ("text", "image")


def n_intervals_for(max_interval_s: float, interval_scale: float = 100.0) -> int:
    """Interval table size covering gaps up to max_interval_s seconds (largest index + 1)."""
    return math.floor(interval_scale * math.log2(max_interval_s + 1)) + 1


@dataclass
class HM4SRConfig(EncoderConfig):
    modalities: tuple[str, ...] = field(default=MODALITIES, metadata={
        "from_data": "unless_given", "shown_default": "id plus the feature modalities the items have"})
    n_interactive_experts: int = 4  # 0: no interactive MoE
    n_temporal_experts: int = 4  # 0: no temporal MoE
    time_scale_s: float = 86400.0  # absolute time enters the cosine embedding in days
    interval_scale: float = 100.0  # s in floor(s * log2(gap_seconds + 1))
    # the data sets it from its largest gap; the default covers 68 years
    n_intervals: int = field(default=n_intervals_for(2**31 - 1), metadata=SET_BY_DATA)
    temporal_expert_std: float = 0.1  # init of the expert vectors u_k (authors' value)
    cp_weight: float = 1.0
    idcl_weight: float = 1.0
    pcl_weight: float = 1.0
    idcl_temperature: float = 0.2
    pcl_temperature: float = 1.0
    pcl_ratio: float = 0.3  # beta: share of valid positions replaced by placeholders

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {self.modalities!r}")
        self.modalities = tuple(m for m in MODALITIES if m in self.modalities)  # canonical order
        if self.idcl_weight and "id" not in self.modalities:
            raise ValueError("idcl_weight > 0 needs the 'id' modality; set idcl_weight=0")
        if self.pcl_weight and not set(FEATURE_MODALITIES) & set(self.modalities):
            raise ValueError("pcl_weight > 0 needs a 'text' or 'image' modality; set pcl_weight=0")
        if min(self.n_interactive_experts, self.n_temporal_experts) < 0:
            raise ValueError("n_interactive_experts and n_temporal_experts must be >= 0 (0: that MoE is off)")
        if min(self.cp_weight, self.idcl_weight, self.pcl_weight) < 0 or not 0 <= self.pcl_ratio < 1:
            raise ValueError("auxiliary weights must be >= 0 and pcl_ratio in [0, 1)")

    @classmethod
    def store_needs(cls, given: Mapping[str, Any]) -> StoreNeeds:
        """Its features (the items may lack some streams: from_data then leaves them out) and the largest gap."""
        return dataclasses.replace(super().store_needs(given), max_gap=True)

    @classmethod
    def from_data(cls, given: Mapping[str, Any], facts: DataFacts) -> HM4SRConfig:
        """Modalities: id plus the feature streams the items have, unless given; the interval table sized to
        the largest training gap."""
        given = dict(given)
        given.setdefault("modalities", tuple(m for m in MODALITIES if m == "id" or m in facts.features))
        config = super().from_data(given, facts)
        if config.cp_weight and "categories" not in facts.features:
            raise ValueError("the items have no categories, which the category loss needs: set cp_weight 0")
        config.n_intervals = n_intervals_for(facts.max_gap_s, config.interval_scale)
        return config

    def item_features(self) -> tuple[str, ...]:
        """The feature streams among its modalities, and the category labels when the category loss is on."""
        streams = tuple(m for m in FEATURE_MODALITIES if m in self.modalities)
        return streams + (("categories",) if self.cp_weight else ())


def interval_index(time_seq: torch.Tensor, valid: torch.Tensor, interval_scale: float,
                   n_intervals: int) -> torch.Tensor:
    """(B, L) seconds -> (B, L) floor(s * log2(t_i - t_{i-1} + 1)), clamped to the table.

    0 at each sequence's first valid item and on padding, whichever side the padding is on.
    """
    gaps = (time_seq[:, 1:] - time_seq[:, :-1]).clamp(min=0)
    index = torch.floor(interval_scale * torch.log2(gaps.double() + 1)).long()
    index = index.masked_fill(~(valid[:, 1:] & valid[:, :-1]), 0)
    return F.pad(index, (1, 0)).clamp(max=n_intervals - 1)


def sample_placeholder_positions(valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, L) bool -> (B, L) bool: floor(ratio * len) distinct valid positions per row, uniformly."""
    n_chosen = torch.floor(valid.sum(dim=1).double() * ratio).long()  # (B,)
    noise = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)  # padding sorts last
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each position in a random order of its row
    return rank < n_chosen[:, None]


class Encoded(NamedTuple):
    states: torch.Tensor  # (B, L, M*d) encoder outputs, streams concatenated
    streams: torch.Tensor  # (B, L, M, d) encoder inputs (after both MoEs, before LayerNorm)
    time_context: torch.Tensor | None  # (B, L, 2d) tau; None when neither the temporal MoE nor PCL uses it
    valid: torch.Tensor  # (B, L) bool
    mask: torch.Tensor  # (B, 1, L, L) attention mask


class HM4SR(SequentialRecommender):
    config_class = HM4SRConfig

    def __init__(self, config: Mapping[str, Any] | HM4SRConfig | None, n_items: int,
                 features: ItemFeatures | None = None):
        super().__init__(config, n_items)
        c = self.config
        features = features or ItemFeatures()
        d, n_streams = c.hidden_size, len(c.modalities)
        width = n_streams * d

        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=0) if "id" in c.modalities else None
        self.feature_projections = nn.ModuleDict()
        for name in FEATURE_MODALITIES:
            if name in c.modalities:
                matrix = features.require(name, n_items, f"HM4SR with modality {name!r}")
                self.register_buffer(f"{name}_features", matrix.float(), persistent=False)
                self.feature_projections[name] = nn.Linear(matrix.shape[1], d)
        self.position_embedding = nn.Embedding(c.max_seq_len, d)

        # interactive MoE: K dense experts stacked in one Linear; one gate Linear(d, K) per stream
        k_interactive = c.n_interactive_experts
        if k_interactive:
            self.interactive_experts = nn.Linear(width, k_interactive * width)
            self.stream_gate_weight = nn.Parameter(torch.empty(n_streams, d, k_interactive))
            self.stream_gate_bias = nn.Parameter(torch.zeros(n_streams, k_interactive))
            self.stream_update_weight = nn.Parameter(torch.tensor([0.0 if m == "id" else 1.0 for m in c.modalities]))

        # tau, the time context: the temporal MoE's router input and PCL's placeholders' source
        self.uses_time = bool(c.n_temporal_experts or c.pcl_weight)
        if self.uses_time:
            self.absolute_time = nn.Linear(1, d)  # a * t + b
            self.register_buffer("time_frequencies", 10000.0 ** (-torch.arange(d) / d), persistent=False)
            self.interval_embedding = nn.Embedding(c.n_intervals, d)
        if c.n_temporal_experts:  # temporal MoE
            self.temporal_gate = nn.Linear(2 * d, c.n_temporal_experts)
            self.temporal_experts = nn.Parameter(torch.empty(c.n_temporal_experts, width))  # u_k, trained

        self.encoders = nn.ModuleList(TransformerEncoder(c) for _ in c.modalities)

        # auxiliary heads exist only when their loss is on (no untrained parameters)
        if c.cp_weight:
            categories = features.require("categories", n_items, "HM4SR's category prediction (cp_weight > 0)")
            self.register_buffer("item_categories", categories.float(), persistent=False)
            self.category_head = nn.Linear(width, categories.shape[1])
        self.placeholder_streams = [c.modalities.index(m) for m in FEATURE_MODALITIES if m in c.modalities]
        if c.pcl_weight:
            self.placeholder_weight = nn.Parameter(torch.empty(len(self.placeholder_streams), 2 * d, d))
            self.placeholder_bias = nn.Parameter(torch.zeros(len(self.placeholder_streams), d))

        self.apply(partial(init_weights, std=c.init_std))
        if k_interactive:
            nn.init.normal_(self.stream_gate_weight, std=c.init_std)
        if c.n_temporal_experts:
            nn.init.normal_(self.temporal_experts, std=c.temporal_expert_std)
        if c.pcl_weight:
            nn.init.normal_(self.placeholder_weight, std=c.init_std)

    # ------------------------------------------------------------------ representations

    def item_representations(self) -> torch.Tensor:
        """(N+1, M*d): id embedding and projected frozen features, concatenated in stream order."""
        parts = [] if self.item_embedding is None else [self.item_embedding.weight]
        parts += [projection(getattr(self, f"{name}_features")) for name, projection in self.feature_projections.items()]
        return torch.cat(parts, dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """-> (B, L, M*d) user states of every stream at every position."""
        return self._encode(batch, self.item_representations()).states

    def _encode(self, batch: Batch, items: torch.Tensor) -> Encoded:
        item_seq = batch["item_seq"]  # (B, L)
        valid = item_seq > 0
        n_streams = len(self.config.modalities)
        positions = self.position_embedding(position_ids(valid))  # (B, L, d)
        streams = items[item_seq].unflatten(-1, (n_streams, -1)) + positions.unsqueeze(2)  # (B, L, M, d)
        if self.config.n_interactive_experts:
            streams = streams + self._interactive_update(streams)
        time_context = self._time_context(batch["time_seq"], valid) if self.uses_time else None  # (B, L, 2d)
        if self.config.n_temporal_experts:
            streams = self._temporal_rescale(streams, time_context)
        mask = attention_mask(valid)
        states = self._encode_streams(streams, mask, range(n_streams))
        return Encoded(states, streams, time_context, valid, mask)

    def _interactive_update(self, streams: torch.Tensor) -> torch.Tensor:
        """(B, L, M, d) -> (B, L, M, d): w_m * sum_k g_{m,k} Expert_k(concat streams)[m]."""
        n_streams = streams.shape[2]
        expert_outputs = self.interactive_experts(streams.flatten(2))  # (B, L, K*M*d)
        expert_outputs = expert_outputs.unflatten(-1, (-1, n_streams, streams.shape[3]))  # (B, L, K, M, d)
        gate_logits = torch.einsum("blmd,mdk->blmk", streams, self.stream_gate_weight) + self.stream_gate_bias
        update = torch.einsum("blmk,blkmd->blmd", gate_logits.softmax(dim=-1), expert_outputs)
        return self.stream_update_weight[:, None] * update

    def _time_context(self, time_seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, L) seconds -> tau (B, L, 2d) = concat(interval embedding, absolute-time embedding)."""
        c = self.config
        days = (time_seq / c.time_scale_s).unsqueeze(-1)  # (B, L, 1) float32
        absolute = torch.cos(self.absolute_time(days) * self.time_frequencies)  # (B, L, d)
        intervals = self.interval_embedding(interval_index(time_seq, valid, c.interval_scale, c.n_intervals))
        return torch.cat([intervals, absolute], dim=-1)

    def _temporal_rescale(self, streams: torch.Tensor, time_context: torch.Tensor) -> torch.Tensor:
        """x * sum_k r_k u_k: a time-dependent per-dimension rescaling of every stream (no residual)."""
        route = self.temporal_gate(time_context).softmax(dim=-1)  # (B, L, K)
        return streams * (route @ self.temporal_experts).unflatten(-1, streams.shape[2:])

    def _encode_streams(self, streams: torch.Tensor, mask: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Run stream i of (B, L, M', d) through encoder indices[i] -> (B, L, M'*d)."""
        return torch.cat([self.encoders[i](streams[:, :, j], mask) for j, i in enumerate(indices)], dim=-1)

    # ------------------------------------------------------------------ losses

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        items = self.item_representations()
        encoded = self._encode(batch, items)
        ce = self.next_item_loss(encoded.states, batch, items)
        auxiliary = {"cp": self._category_loss, "idcl": self._id_contrastive_loss,
                     "pcl": self._placeholder_contrastive_loss}
        parts = {name: loss_fn(batch, items, encoded)
                 for name, loss_fn in auxiliary.items() if getattr(self.config, f"{name}_weight")}
        total = ce + sum(getattr(self.config, f"{name}_weight") * value for name, value in parts.items())
        return total, {"ce": ce.detach(), **{name: value.detach() for name, value in parts.items()}}

    def _category_loss(self, batch: Batch, items: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        history = batch["item_seq"][encoded.valid]  # (V,) every valid history item
        logits = self.category_head(items[history])  # raw representation: no MoE, no position
        return F.binary_cross_entropy_with_logits(logits, self.item_categories[history])

    def _id_contrastive_loss(self, batch: Batch, items: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        id_state = gather_last(encoded.states, encoded.valid)[:, : self.config.hidden_size]  # id stream is first
        target = batch["target"]
        return info_nce(id_state, self.item_embedding(target), self.config.idcl_temperature, labels=target)

    def _placeholder_contrastive_loss(self, batch: Batch, items: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        c, indices = self.config, self.placeholder_streams
        chosen = sample_placeholder_positions(encoded.valid, c.pcl_ratio)  # (B, L)
        placeholders = torch.einsum("bls,psd->blpd", encoded.time_context, self.placeholder_weight)
        placeholders = placeholders + self.placeholder_bias  # (B, L, P, d)
        augmented = torch.where(chosen[:, :, None, None], placeholders, encoded.streams[:, :, indices])
        augmented_states = self._encode_streams(augmented, encoded.mask, indices)  # (B, L, P*d)
        last = partial(gather_last, valid=encoded.valid)
        original = last(encoded.states).unflatten(-1, (len(c.modalities), -1))[:, indices]  # (B, P, d)
        augmented_last = last(augmented_states).unflatten(-1, (len(indices), -1))  # (B, P, d)
        # one InfoNCE problem per stream, averaged: (L_txt + L_img) / 2
        return info_nce(original.transpose(0, 1), augmented_last.transpose(0, 1), c.pcl_temperature,
                        labels=batch["target"])
