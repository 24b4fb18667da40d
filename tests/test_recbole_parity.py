"""Our SASRec against RecBole's (1.2.1), the library users compare us with: same weights, same numbers.

RecBole trains SASRec on every prefix of every history (one sample per prefix, CE at its last position);
our train_mode "all" does one causal pass per history with CE at every position. With the same weights and
dropout off, the states, the full-ranking scores and the training loss must agree. The one deliberate
difference: RecBole's training softmax includes the padding item 0, ours excludes it (RecBole's evaluation
excludes it too), so RecBole's loss is recomputed from its states over the real items. The metrics are
compared with RecBole's evaluator.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender import sasrec as recbole_sasrec  # `make setup` installs it

from recmodels import create_model

N_ITEMS, MAX_LEN, HIDDEN, HEADS, LAYERS = 40, 12, 32, 2, 2


class ItemCount:
    """The one thing RecBole's model reads from its dataset object."""

    def num(self, field: str) -> int:
        return N_ITEMS + 1


def recbole_model() -> torch.nn.Module:
    config = {  # RecBole's SASRec defaults, smaller widths
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "NEG_PREFIX": "neg_", "MAX_ITEM_LIST_LENGTH": MAX_LEN,
        "device": "cpu", "n_layers": LAYERS, "n_heads": HEADS, "hidden_size": HIDDEN, "inner_size": 4 * HIDDEN,
        "hidden_dropout_prob": 0.5, "attn_dropout_prob": 0.5, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "initializer_range": 0.02, "loss_type": "CE",
    }
    return recbole_sasrec.SASRec(config, ItemCount())


def recbole_weights(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our SASRec's state dict under RecBole's names (our fused qkv split into query, key, value)."""
    mapped = {"item_embedding.weight": ours["item_embedding.weight"],
              "position_embedding.weight": ours["position_embedding.weight"],
              "LayerNorm.weight": ours["encoder.input_norm.weight"],
              "LayerNorm.bias": ours["encoder.input_norm.bias"]}
    for layer in range(LAYERS):
        src, dst = f"encoder.blocks.{layer}.", f"trm_encoder.layer.{layer}."
        attention, ffn = dst + "multi_head_attention.", dst + "feed_forward."
        for kind in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), ours[src + f"attention.qkv.{kind}"].chunk(3)):
                mapped[attention + f"{name}.{kind}"] = part
            mapped[attention + f"dense.{kind}"] = ours[src + f"attention.output.{kind}"]
            mapped[attention + f"LayerNorm.{kind}"] = ours[src + f"attention_norm.{kind}"]
            mapped[ffn + f"dense_1.{kind}"] = ours[src + f"ffn.0.{kind}"]
            mapped[ffn + f"dense_2.{kind}"] = ours[src + f"ffn.2.{kind}"]
            mapped[ffn + f"LayerNorm.{kind}"] = ours[src + f"ffn_norm.{kind}"]
    return mapped


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(3)
    ours = create_model("sasrec", {"hidden_size": HIDDEN, "n_heads": HEADS, "n_layers": LAYERS,
                                   "max_seq_len": MAX_LEN}, N_ITEMS)
    with torch.no_grad():  # non-trivial norms, so a swapped or skipped LayerNorm shows
        for name, value in ours.named_parameters():
            if "norm" in name:
                value.add_(0.3 * torch.randn_like(value))
    theirs = recbole_model()
    theirs.load_state_dict(recbole_weights(ours.state_dict()), strict=True)
    return ours.eval(), theirs.eval()


@pytest.fixture(scope="module")
def histories():
    """Right-padded histories (RecBole's layout) of lengths 1..MAX_LEN, plus each one's next item."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.tensor([1, 2, 5, MAX_LEN, 7, MAX_LEN - 1])
    items = torch.randint(1, N_ITEMS + 1, (len(lengths), MAX_LEN + 1), generator=generator)
    target = items[torch.arange(len(lengths)), lengths]  # the item right after each history
    item_seq = items[:, :MAX_LEN]
    item_seq[torch.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0
    return item_seq, lengths, target


def test_last_states_and_full_ranking_scores_equal_recbole(models, histories):
    ours, theirs = models
    item_seq, lengths, target = histories
    batch = {"item_seq": item_seq, "seq_len": lengths, "target": target}
    with torch.no_grad():
        their_states = theirs.forward(item_seq, lengths)  # (B, d) at the last valid position
        our_states = ours(batch)[torch.arange(len(lengths)), lengths - 1]
        their_scores = theirs.full_sort_predict({"item_id_list": item_seq, "item_length": lengths})
        our_scores = ours.score_all(batch)
    torch.testing.assert_close(our_states, their_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_scores[:, 1:], their_scores[:, 1:], rtol=1e-5, atol=1e-5)
    assert torch.isinf(our_scores[:, 0]).all()  # RecBole's trainer sets the padding column to -inf too


def test_all_positions_loss_is_recbole_prefix_training(models, histories):
    """One causal pass with CE at every position = RecBole's loss over all prefixes (its data augmentation)."""
    ours, theirs = models
    item_seq, lengths, target = histories
    target_seq = torch.cat([item_seq[:, 1:], torch.zeros_like(item_seq[:, :1])], dim=1)
    target_seq[torch.arange(len(lengths)), lengths - 1] = target
    ours.zero_grad()
    our_loss, _ = ours.loss({"item_seq": item_seq, "seq_len": lengths, "target": target, "target_seq": target_seq})
    our_loss.backward()

    # RecBole's augmentation: every prefix of length k with the item at k as the sample's target
    prefix_seq, prefix_len = [], []
    for row, length in zip(item_seq, lengths.tolist()):
        for k in range(1, length + 1):
            prefix_seq.append(torch.cat([row[:k], torch.zeros(MAX_LEN - k, dtype=row.dtype)]))
            prefix_len.append(k)
    prefix_target = target_seq[target_seq > 0]  # row-major: the same (row, position) order as the loop
    theirs.zero_grad()
    states = theirs.forward(torch.stack(prefix_seq), torch.tensor(prefix_len))
    logits = states @ theirs.item_embedding.weight.T
    their_loss = F.cross_entropy(logits[:, 1:], prefix_target - 1)  # over the real items only
    their_loss.backward()

    assert len(prefix_target) == int(lengths.sum())
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-5, atol=1e-6)
    our_grad = ours.item_embedding.weight.grad
    their_grad = theirs.item_embedding.weight.grad
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.encoder.blocks[0].attention.qkv.weight.grad[:HIDDEN],
                               theirs.trm_encoder.layer[0].multi_head_attention.query.weight.grad,
                               rtol=1e-4, atol=1e-7)


def test_last_position_loss_is_recbole_ce_over_the_real_items(models, histories):
    """Training on the last position only (train_mode "last") is RecBole's CE without the padding item, which
    its own calculate_loss also normalises over (the documented difference)."""
    ours, theirs = models
    item_seq, lengths, target = histories
    with torch.no_grad():
        our_loss, _ = ours.loss({"item_seq": item_seq, "seq_len": lengths, "target": target})
        their_logits = theirs.forward(item_seq, lengths) @ theirs.item_embedding.weight.T
        recbole_loss = theirs.calculate_loss({"item_id_list": item_seq, "item_length": lengths, "item_id": target})
    torch.testing.assert_close(our_loss, F.cross_entropy(their_logits[:, 1:], target - 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recbole_loss, F.cross_entropy(their_logits, target))
    assert recbole_loss > our_loss  # one more term in every normaliser


def test_full_ranking_metrics_equal_recbole_evaluator(monkeypatch):
    """Our HR/NDCG/MRR@K against RecBole's evaluator on the same scores and top-k."""
    import numpy as np
    from recbole.evaluator.metrics import MRR, NDCG, Hit

    from recmodels.metrics import finalize, full_ranking_metrics

    monkeypatch.setattr(np, "float", float, raising=False)  # RecBole 1.2.1 still uses the alias NumPy 2 removed
    ks = (1, 5, 10, 20)
    generator = torch.Generator().manual_seed(11)
    scores = torch.randn(300, N_ITEMS + 1, generator=generator)
    target = torch.randint(1, N_ITEMS + 1, (300,), generator=generator)
    ours = finalize(full_ranking_metrics(scores, target, ks))

    masked = scores.clone()
    masked[:, 0] = float("-inf")  # what RecBole's trainer does before its top-k
    top = masked.topk(max(ks), dim=1).indices
    pos_index = (top == target[:, None]).numpy()  # (B, K): is the i-th ranked item the target
    pos_len = np.ones(len(target), dtype=np.int64)  # leave-one-out: one relevant item per user
    config = {"topk": list(ks), "metric_decimal_place": 8}
    theirs = {"hr": Hit(config).metric_info(pos_index), "mrr": MRR(config).metric_info(pos_index),
              "ndcg": NDCG(config).metric_info(pos_index, pos_len)}  # (B, K) each, cumulative over ranks
    for k in ks:
        for name, values in theirs.items():
            assert ours[f"{name}@{k}"] == pytest.approx(values[:, k - 1].mean(), abs=1e-12), (name, k)
    assert 0 < ours["hr@20"] < 1  # the check is not vacuous
