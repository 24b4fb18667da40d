import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recmodels import MODELS, FAMEConfig, HM4SRConfig, ItemFeatures, SASRecConfig, create_model
from recmodels import base
from recmodels.base import (attend, attention_mask, chunked_cross_entropy, dot_product_cross_entropy, dropout, info_nce,
                            drop_mask, mask_padding_column, trim_padding)
from recmodels.hm4sr import interval_index, n_intervals_for, sample_placeholder_positions
from recmodels.metrics import finalize, full_ranking_metrics

N_ITEMS = 150
MAX_LEN = 12
SMALL = dict(hidden_size=16, n_layers=2, dropout=0.0, attn_dropout=0.0, max_seq_len=MAX_LEN)
# Each model with every part switched on: FAME with several heads and experts, HM4SR with all
# three modalities and all auxiliary losses.
FULL_MODELS = {
    "sasrec": ("sasrec", {}),
    "fame": ("fame", {"n_heads": 2, "n_experts": 3}),
    "fame-mos-slice": ("fame", {"n_heads": 2, "n_experts": 2, "mixture": "softmax", "sub_embeddings": "slice"}),
    "hm4sr": ("hm4sr", {"n_intervals": n_intervals_for(10**7)}),
}
VARIANTS = {
    **FULL_MODELS,
    "fame-E1": ("fame", {"n_heads": 2, "n_experts": 1}),
    "fame-H1-mos": ("fame", {"n_heads": 1, "n_experts": 2, "mixture": "softmax"}),
    "hm4sr-id-text": ("hm4sr", {"modalities": ["id", "text"]}),
    "hm4sr-image": ("hm4sr", {"modalities": ("image",), "idcl_weight": 0.0}),
}


def make_features(n_items=N_ITEMS, seed=0) -> ItemFeatures:
    rng = np.random.default_rng(seed)

    def with_padding_row(matrix):
        return np.vstack([np.zeros((1, matrix.shape[1])), matrix])

    return ItemFeatures.from_numpy({
        "text": with_padding_row(rng.normal(size=(n_items, 24))),
        "image": with_padding_row(rng.normal(size=(n_items, 12))),
        "categories": with_padding_row(rng.random((n_items, 6)) < 0.3),
    })


def make_batch(batch_size=8, length=MAX_LEN, n_items=N_ITEMS, min_len=4, seed=0) -> dict[str, torch.Tensor]:
    """Right-padded random histories with increasing timestamps and next-item targets."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, length + 1, (batch_size,), generator=g)
    valid = torch.arange(length) < lengths[:, None]
    item_seq = torch.randint(1, n_items + 1, (batch_size, length), generator=g) * valid
    time_seq = torch.cumsum(torch.randint(0, 10**6, (batch_size, length), generator=g), dim=1) * valid
    target = torch.randint(1, n_items + 1, (batch_size,), generator=g)
    # next item at every position: the history shifted left, the target after the last item
    target_seq = torch.roll(item_seq, -1, dims=1) * valid
    target_seq[torch.arange(batch_size), lengths - 1] = target
    return dict(item_seq=item_seq, time_seq=time_seq, seq_len=lengths, target=target, target_seq=target_seq)


def last_position_batch(batch):
    return {key: value for key, value in batch.items() if key != "target_seq"}


def build(variant, seed=0, **overrides):
    name, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    return create_model(name, {**SMALL, **extra, **overrides}, N_ITEMS, make_features())


def shift_padding(batch, left: int, right: int):
    """Move each row's valid items right by `left` and append `right` padding columns."""
    shifted = {}
    for key in ("item_seq", "time_seq"):
        shifted[key] = F.pad(batch[key], (left, right))
    shifted.update(seq_len=batch["seq_len"], target=batch["target"])
    return shifted


# ----------------------------------------------------------------------------- construction

def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="fame.*hm4sr.*sasrec"):
        create_model("bert4rec", {}, N_ITEMS)


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match="hidden_sise"):
        create_model("sasrec", {"hidden_sise": 32}, N_ITEMS)


def test_config_dataclass_is_accepted_and_other_models_configs_are_not():
    model = create_model("fame", FAMEConfig(hidden_size=32, n_heads=4), N_ITEMS)
    assert model.config.hidden_size == 32 and model.config.inner_size == 128
    with pytest.raises(TypeError, match="FAMEConfig"):
        create_model("fame", SASRecConfig(), N_ITEMS)


def test_invalid_config_values_raise():
    with pytest.raises(ValueError, match="divisible"):
        SASRecConfig(hidden_size=30, n_heads=4)
    with pytest.raises(ValueError, match="mixture"):
        FAMEConfig(mixture="product")
    with pytest.raises(ValueError, match="modalities"):
        HM4SRConfig(modalities=("id", "audio"))
    with pytest.raises(ValueError, match="idcl_weight"):
        HM4SRConfig(modalities=("text",))
    with pytest.raises(ValueError, match="pcl_weight"):
        HM4SRConfig(modalities=("id",))


def test_hm4sr_names_the_missing_feature():
    with pytest.raises(ValueError, match="ItemFeatures.image"):
        create_model("hm4sr", {}, N_ITEMS, dataclasses.replace(make_features(), image=None))
    with pytest.raises(ValueError, match="ItemFeatures.categories"):
        create_model("hm4sr", {}, N_ITEMS, dataclasses.replace(make_features(), categories=None))
    with pytest.raises(ValueError, match="rows"):
        create_model("hm4sr", {}, N_ITEMS + 1, make_features())
    # without category prediction, categories are not needed
    create_model("hm4sr", {"cp_weight": 0.0}, N_ITEMS, dataclasses.replace(make_features(), categories=None))


def test_item_features_from_numpy_validates():
    features = ItemFeatures.from_numpy({"text": np.zeros((4, 3))})
    assert features.text.dtype == torch.float32 and features.image is None
    with pytest.raises(ValueError, match="row 0"):
        ItemFeatures.from_numpy({"text": np.ones((4, 3))})
    with pytest.raises(ValueError, match="rows"):
        ItemFeatures.from_numpy({"text": np.zeros((4, 3)), "image": np.zeros((5, 3))})
    with pytest.raises(ValueError, match="audio"):
        ItemFeatures.from_numpy({"audio": np.zeros((4, 3))})


def test_features_are_buffers_that_follow_the_model():
    model = build("hm4sr")
    buffers = dict(model.named_buffers())
    assert {"text_features", "image_features", "item_categories"} <= buffers.keys()
    assert model.to(torch.float64).text_features.dtype == torch.float64


@pytest.mark.parametrize("variant", VARIANTS)
def test_item_representations_and_padding_column(variant):
    model = build(variant).eval()
    batch = make_batch()
    scores = model.score_all(batch)
    assert scores.shape == (8, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    n_streams = len(model.config.modalities) if variant.startswith("hm4sr") else 1
    assert model.item_representations().shape == (N_ITEMS + 1, 16 * n_streams)


# ----------------------------------------------------------------------------- training signal

@pytest.mark.parametrize("variant", FULL_MODELS)
def test_every_parameter_gets_a_gradient(variant):
    model = build(variant).train()
    total, _ = model.loss(make_batch(batch_size=16))
    total.backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, f"parameters without gradient: {silent}"


def test_hm4sr_temporal_experts_are_trained_parameters():
    # upstream keeps them in a Python list: untrained and left behind by .to()
    model = build("hm4sr")
    assert "temporal_experts" in dict(model.named_parameters())
    before = model.temporal_experts.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.loss(make_batch())[0].backward()
    optimizer.step()
    assert not torch.equal(before, model.temporal_experts.detach())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["all_positions", "last_position"])
def test_both_training_modes_give_finite_loss_and_gradients(variant, mode):
    model = build(variant).train()
    batch = make_batch()
    batch = batch if mode == "all_positions" else last_position_batch(batch)
    total, parts = model.loss(batch)
    total.backward()
    assert torch.isfinite(total) and "ce" in parts
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_all_positions_loss_is_the_mean_ce_over_positions_with_a_target():
    model = build("sasrec").eval()
    batch = make_batch()
    logits = model.sequence_logits(batch)  # (B, L, N+1)
    has_target = batch["target_seq"] > 0
    expected = F.cross_entropy(logits[has_target], batch["target_seq"][has_target])
    assert model.loss(batch)[0].item() == pytest.approx(expected.item(), rel=1e-5)
    expected_last = F.cross_entropy(model.score_all(batch), batch["target"])
    assert model.loss(last_position_batch(batch))[0].item() == pytest.approx(expected_last.item(), rel=1e-5)


def test_hm4sr_auxiliary_losses_are_finite_non_negative_and_switch_off():
    batch = make_batch(batch_size=16)
    total, parts = build("hm4sr").train().loss(batch)
    assert parts.keys() == {"ce", "cp", "idcl", "pcl"}
    for value in parts.values():
        assert torch.isfinite(value) and value >= 0
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)

    weighted = build("hm4sr", cp_weight=0.5, idcl_weight=2.0, pcl_weight=0.0).train()
    total, parts = weighted.loss(batch)
    assert parts.keys() == {"ce", "cp", "idcl"}
    assert total.item() == pytest.approx((parts["ce"] + 0.5 * parts["cp"] + 2 * parts["idcl"]).item(), rel=1e-6)

    off = build("hm4sr", cp_weight=0.0, idcl_weight=0.0, pcl_weight=0.0).train()
    total, parts = off.loss(batch)
    assert parts.keys() == {"ce"} and total.item() == parts["ce"].item()
    assert not any("placeholder" in name or "category" in name for name, _ in off.named_parameters())


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_outputs_ignore_later_items(variant):
    model = build(variant).eval()
    batch = make_batch(min_len=MAX_LEN)  # full rows: every position is valid
    t = 4
    changed = dict(batch)
    changed["item_seq"] = batch["item_seq"].clone()
    changed["item_seq"][:, t + 1:] = torch.randint(1, N_ITEMS + 1, (8, MAX_LEN - t - 1))
    changed["time_seq"] = batch["time_seq"].clone()
    changed["time_seq"][:, t + 1:] += 12345
    with torch.no_grad():
        before, after = model.sequence_logits(batch), model.sequence_logits(changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_and_right_padding_change_no_score(variant):
    model = build(variant).eval()
    batch = make_batch(length=8)  # positions stay below max_seq_len under any padding
    with torch.no_grad():
        reference = model.score_all(batch)
        # right-padded rows become left-padded: roll each row so its last valid item is last
        left_padded = dict(batch)
        shifts = 8 - batch["seq_len"]
        columns = (torch.arange(8) - shifts[:, None]) % 8
        for key in ("item_seq", "time_seq"):
            left_padded[key] = batch[key].gather(1, columns)
        for padded in (left_padded, shift_padding(batch, 3, 0), shift_padding(batch, 0, 4),
                       shift_padding(left_padded, 2, 2)):
            torch.testing.assert_close(model.score_all(padded), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trimmed_padding_changes_no_score_nor_loss(variant):
    model = build(variant).eval()
    batch = make_batch(length=8)
    padded = shift_padding(batch, 2, 3)
    padded["target_seq"] = F.pad(batch["target_seq"], (2, 3))
    trimmed = trim_padding(padded)
    assert trimmed["item_seq"].shape[1] == int(batch["seq_len"].max())
    assert trimmed["target_seq"].shape == trimmed["item_seq"].shape and trimmed["target"] is padded["target"]
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(trimmed), model.score_all(padded), rtol=1e-5, atol=1e-5)
        torch.manual_seed(0)
        padded_ce = model.loss(padded)[1]["ce"]  # HM4SR's placeholder draws depend on the width
        torch.manual_seed(0)
        torch.testing.assert_close(model.loss(trimmed)[1]["ce"], padded_ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sasrec", "fame", "hm4sr"])
def test_each_model_overfits_64_sequences(variant):
    torch.set_num_threads(2)
    model = build(variant, n_layers=1, hidden_size=32)
    batch = last_position_batch(make_batch(batch_size=64, length=10, min_len=3, seed=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(200):
        model.train()
        optimizer.zero_grad()
        model.loss(batch)[0].backward()
        optimizer.step()
        if step % 20 == 19:
            model.eval()
            with torch.no_grad():
                hit_rate = finalize(full_ranking_metrics(model.score_all(batch), batch["target"], ks=(10,)))["hr@10"]
            if hit_rate > 0.9:
                return
    pytest.fail(f"{variant} reached only train HR@10 {hit_rate:.2f} after {step + 1} steps")


def test_fame_logit_mixing_is_the_gated_sum_of_head_scores():
    model = build("fame").eval()
    heads, head_size = 2, 8
    with torch.no_grad():
        facets = torch.randn(5, 16)
        scores = model.logits(facets, model.candidate_matrix())
        gate = model.facet_gate(facets).softmax(-1)
        sub_embeddings = model.facet_projection(model.item_embedding.weight)
        expected = sum(gate[:, h, None] * facets[:, h * head_size:(h + 1) * head_size]
                       @ sub_embeddings[:, h * head_size:(h + 1) * head_size].T for h in range(heads))
    torch.testing.assert_close(scores[:, 1:], expected[:, 1:])


def test_fame_mixture_of_softmaxes_gives_log_probabilities():
    model = build("fame-mos-slice").eval()
    with torch.no_grad():
        log_probs = model.score_all(make_batch())
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(8))


def test_fame_ablations_drop_router_and_gate():
    assert build("fame-E1").encoder.blocks[-1].attention.router is None
    assert build("fame-H1-mos").facet_gate is None


INTERACTIVE_MOE = {"interactive_experts.weight", "interactive_experts.bias", "stream_gate_weight", "stream_gate_bias",
                   "stream_update_weight"}
TEMPORAL_MOE = {"temporal_gate.weight", "temporal_gate.bias", "temporal_experts"}
TIME_CONTEXT = {"absolute_time.weight", "absolute_time.bias", "interval_embedding.weight"}


@pytest.mark.parametrize("off, removed", [
    ({"n_interactive_experts": 0}, INTERACTIVE_MOE),
    ({"n_temporal_experts": 0}, TEMPORAL_MOE),  # tau stays: PCL's placeholders read it
    ({"n_temporal_experts": 0, "pcl_weight": 0.0}, TEMPORAL_MOE | TIME_CONTEXT | {"placeholder_weight",
                                                                                "placeholder_bias"}),
])
def test_hm4sr_zero_experts_remove_that_moe_and_its_parameters(off, removed):
    full, ablated = build("hm4sr"), build("hm4sr", **off)
    names = set(dict(full.named_parameters()))
    assert removed <= names and set(dict(ablated.named_parameters())) == names - removed
    batch = make_batch(batch_size=16)
    total, _ = ablated.train().loss(batch)
    total.backward()  # what is left still trains, every parameter of it
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ablated.parameters())
    with torch.no_grad():  # and the stage is gone from the forward pass: no update / rescale applied
        assert torch.isfinite(ablated.eval().score_all(batch)[:, 1:]).all()


def test_hm4sr_without_either_moe_encodes_the_streams_as_given():
    model = build("hm4sr", n_interactive_experts=0, n_temporal_experts=0).eval()
    batch = make_batch()
    streams = model._encode(batch, model.item_representations()).streams
    positions = model.position_embedding(base.position_ids(batch["item_seq"] > 0))
    expected = model.item_representations()[batch["item_seq"]].unflatten(-1, (3, -1)) + positions.unsqueeze(2)
    torch.testing.assert_close(streams, expected)
    with pytest.raises(ValueError, match="must be >= 0"):
        HM4SRConfig(n_temporal_experts=-1)


# ----------------------------------------------------------------------------- helpers

def test_interval_index_ignores_padding_side_and_clamps():
    times = torch.tensor([[100, 101, 104, 0, 0], [0, 0, 100, 101, 104]])
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    index = interval_index(times, valid, interval_scale=100.0, n_intervals=1000)
    # gaps 1 s and 3 s: floor(100 * log2(2)) = 100, floor(100 * log2(4)) = 200
    assert index.tolist() == [[0, 100, 200, 0, 0], [0, 0, 0, 100, 200]]
    assert interval_index(times, valid, 100.0, n_intervals=150).max() == 149
    assert n_intervals_for(3) == 201


def test_placeholder_positions_are_valid_and_counted():
    valid = torch.arange(12) < torch.tensor([12, 10, 3, 7, 1])[:, None]
    valid = torch.cat([valid[:2], valid[2:].flip(1)])  # some rows left-padded
    chosen = sample_placeholder_positions(valid, ratio=0.3)
    assert chosen.sum(1).tolist() == [3, 3, 0, 2, 0]
    assert not (chosen & ~valid).any()


def test_chunked_cross_entropy_matches_the_plain_one():
    torch.manual_seed(0)
    table = torch.randn(40, 8, requires_grad=True)
    rows, targets = torch.randn(23, 8), torch.randint(1, 40, (23,))
    plain = chunked_cross_entropy(lambda r: r @ table.T, rows, targets, rows_per_chunk=100)
    (plain_grad,) = torch.autograd.grad(plain, table)
    chunked = chunked_cross_entropy(lambda r: r @ table.T, rows, targets, rows_per_chunk=5)
    (chunked_grad,) = torch.autograd.grad(chunked, table)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(chunked_grad, plain_grad)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_cpu_dropout_keeps_the_right_share_and_preserves_the_mean(rate):
    torch.manual_seed(0)
    dropped, keep = drop_mask(torch.Size([1000, 1000]), rate, torch.device("cpu"))
    assert abs(keep - (1 - rate)) < 1e-4
    assert abs(dropped.float().mean().item() - (1 - keep)) < 3e-3  # ~3 standard deviations at 1e6 draws
    x = torch.rand(1000, 1000) + 1.0
    dropped = dropout(x, rate, training=True)
    assert ((dropped == 0) == ~(dropped > 0)).all() and abs(dropped.mean() / x.mean() - 1) < 5e-3
    assert dropout(x, rate, training=False) is x


def test_attention_with_cpu_dropout_is_sdpa_when_nothing_is_dropped():
    """The written-out CPU path (taken whenever the rate is not 0) computes what SDPA computes."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(3, 2, 7, 4) for _ in range(3))
    mask = attention_mask(torch.arange(7) < torch.tensor([7, 4, 1])[:, None])
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(attend(query, key, value, mask, dropout=1e-9), reference)
    dropped = attend(query, key, value, mask, dropout=0.5)
    assert not torch.allclose(dropped, reference) and torch.isfinite(dropped).all()


@pytest.mark.parametrize("rows_per_chunk", [None, 5, 100])
@pytest.mark.parametrize("scale", [1.0, 50.0])  # 50: logits in the hundreds, where exp needs the max shift
def test_dot_product_cross_entropy_matches_autograd(rows_per_chunk, scale):
    torch.manual_seed(0)
    queries = (scale * torch.randn(23, 8)).requires_grad_()
    table = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(1, 40, (23,))
    plain = F.cross_entropy(mask_padding_column(queries @ table.T), targets)
    plain_grads = torch.autograd.grad(3.0 * plain, (queries, table))  # a non-unit upstream gradient
    fused = dot_product_cross_entropy(queries, table, targets, rows_per_chunk)
    fused_grads = torch.autograd.grad(3.0 * fused, (queries, table))
    torch.testing.assert_close(fused, plain)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):  # sums of `scale`-sized float32 terms
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-5, atol=1e-6 * scale)
    assert fused_grads[1][0].abs().sum() == 0  # the padding item is never a candidate
    with torch.no_grad():
        torch.testing.assert_close(dot_product_cross_entropy(queries, table, targets, rows_per_chunk), plain)


@pytest.mark.parametrize("variant", ["sasrec", "fame", "hm4sr"])
def test_fused_loss_matches_the_plain_loss_in_a_model(variant, monkeypatch):
    """The models whose logits are dot products train through dot_product_cross_entropy; it must
    give the loss and every gradient that cross-entropy over `logits` gives."""
    model = build(variant).train()
    batch = make_batch()

    def loss_and_grads():
        torch.manual_seed(0)  # the same dropout masks and placeholder draw
        model.zero_grad()
        total, _ = model.loss(batch)
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters()]

    fused, fused_grads = loss_and_grads()
    monkeypatch.setattr(base, "dot_product_cross_entropy",
                        lambda queries, candidates, targets: F.cross_entropy(
                            mask_padding_column(queries @ candidates.T), targets))
    plain, plain_grads = loss_and_grads()
    torch.testing.assert_close(fused, plain)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["fame-mos-slice", "fame-H1-mos"])
def test_chunked_loss_matches_unchunked_loss_in_a_model(variant, monkeypatch):
    model = build(variant).train()
    batch = make_batch()

    def loss_and_grads():
        torch.manual_seed(0)  # the same placeholder draw for HM4SR
        model.zero_grad()
        total, _ = model.loss(batch)
        total.backward()
        return total.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = loss_and_grads()
    monkeypatch.setattr(base, "MAX_LOGIT_ELEMENTS_PER_CHUNK", 10 * model.logit_elements_per_row())
    chunked, chunked_grads = loss_and_grads()
    torch.testing.assert_close(chunked, whole)
    for chunked_grad, whole_grad in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(chunked_grad, whole_grad, rtol=1e-4, atol=1e-6)


def test_info_nce_removes_same_label_negatives():
    torch.manual_seed(0)
    anchor, positive = torch.randn(3, 4), torch.randn(3, 4)
    labels = torch.tensor([7, 7, 9])
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / 0.5
    expected = torch.stack([
        -logits[0, 0] + torch.logsumexp(logits[0, [0, 2]], 0),  # row 1 shares row 0's label
        -logits[1, 1] + torch.logsumexp(logits[1, [1, 2]], 0),
        -logits[2, 2] + torch.logsumexp(logits[2], 0),
    ]).mean()
    torch.testing.assert_close(info_nce(anchor, positive, 0.5, labels), expected)
    stacked = info_nce(torch.stack([anchor, positive]), torch.stack([positive, anchor]), 0.5, labels)
    torch.testing.assert_close(stacked, (info_nce(anchor, positive, 0.5, labels)
                                         + info_nce(positive, anchor, 0.5, labels)) / 2)


def test_registry_covers_the_three_models():
    assert set(MODELS) == {"sasrec", "fame", "hm4sr"}
