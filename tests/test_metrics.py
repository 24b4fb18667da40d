import math

import pytest
import torch

from recmodels.metrics import finalize, full_ranking_metrics, rank_of_target

NEG_INF = float("-inf")


def test_rank_counts_higher_scores_only_among_real_items():
    # column 0 is padding: its huge score must not push the target down
    scores = torch.tensor([[100.0, 0.9, 0.5, 0.7, 0.1]])
    assert rank_of_target(scores, torch.tensor([3])).tolist() == [1]
    assert rank_of_target(scores, torch.tensor([1])).tolist() == [0]
    assert rank_of_target(scores, torch.tensor([4])).tolist() == [3]


def test_tied_target_ranks_after_every_tied_item():
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.1, 0.9]])
    # item 5 beats the target, items 1 and 3 tie with target 2: rank = 1 + 2
    assert rank_of_target(scores, torch.tensor([2])).tolist() == [3]
    all_equal = torch.zeros(1, 6)
    assert rank_of_target(all_equal, torch.tensor([1])).tolist() == [4]


def test_metrics_hand_computed_sums_and_count():
    scores = torch.tensor([
        [0.0, 0.9, 0.5, 0.7, 0.1],  # target 3 -> rank 1
        [0.0, 0.2, 0.8, 0.3, 0.4],  # target 2 -> rank 0
        [0.0, 0.9, 0.8, 0.7, 0.1],  # target 4 -> rank 3
    ])
    target = torch.tensor([3, 2, 4])
    sums = full_ranking_metrics(scores, target, ks=(1, 2, 5))
    assert sums["count"] == 3
    assert sums["hr@1"] == 1
    assert sums["hr@2"] == 2
    assert sums["hr@5"] == 3
    assert sums["ndcg@1"] == pytest.approx(1.0)
    assert sums["ndcg@2"] == pytest.approx(1.0 + 1 / math.log2(3))
    assert sums["ndcg@5"] == pytest.approx(1.0 + 1 / math.log2(3) + 1 / math.log2(5))
    assert sums["mrr@2"] == pytest.approx(1.0 + 1 / 2)
    assert sums["mrr@5"] == pytest.approx(1.0 + 1 / 2 + 1 / 4)
    means = finalize(sums)
    assert "count" not in means
    assert means["hr@2"] == pytest.approx(2 / 3)
    assert means["mrr@5"] == pytest.approx((1.0 + 1 / 2 + 1 / 4) / 3)


def test_sums_from_split_batches_add_up_to_the_whole_batch():
    torch.manual_seed(0)
    scores, target = torch.randn(10, 30), torch.randint(1, 30, (10,))
    whole = full_ranking_metrics(scores, target)
    first, second = full_ranking_metrics(scores[:4], target[:4]), full_ranking_metrics(scores[4:], target[4:])
    assert whole.keys() == first.keys()
    for name in whole:
        assert first[name] + second[name] == pytest.approx(whole[name])


def test_history_masking_removes_seen_items_but_not_the_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6, 0.1]])
    target = torch.tensor([4])  # rank 3 unmasked
    history = torch.tensor([[0, 0, 1, 2, 4]])  # padding, two seen items beating the target, the target
    assert full_ranking_metrics(scores, target, ks=(2,), history=history)["hr@2"] == 0  # default: no masking
    masked = full_ranking_metrics(scores, target, ks=(2,), history=history, mask_history=True)
    assert masked["hr@2"] == 1  # only item 3 remains above the target: rank 1
    assert masked["mrr@2"] == pytest.approx(1 / 2)
    assert scores[0, 1] == 0.9  # the caller's scores are untouched


def test_history_masking_needs_history():
    with pytest.raises(ValueError, match="history"):
        full_ranking_metrics(torch.zeros(1, 3), torch.tensor([1]), mask_history=True)


def test_finalize_rejects_empty_sums():
    with pytest.raises(ValueError, match="count"):
        finalize({"hr@10": 0.0, "count": 0.0})


def test_a_non_finite_target_score_is_a_counted_miss_not_a_hit():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([
        [NEG_INF, nan, 0.5, 0.7],  # NaN target: would rank -1 (HR 1, NDCG inf) without the rule
        [NEG_INF, 0.1, inf, 0.2],  # +inf target
        [NEG_INF, 0.9, NEG_INF, 0.2],  # -inf target
        [NEG_INF, 0.9, 0.1, nan],  # a NaN among the other items would otherwise be ignored
        [NEG_INF, 0.9, 0.1, 0.2],  # a finite row: target 1 ranks first
    ])
    target = torch.tensor([1, 2, 2, 1, 1])
    assert rank_of_target(scores, target).tolist() == [3, 3, 3, 3, 0]
    sums = full_ranking_metrics(scores, target, ks=(1, 3))
    assert sums["nonfinite_rows"] == 4
    assert sums["hr@3"] == 1 and sums["ndcg@3"] == pytest.approx(1.0) and sums["mrr@3"] == pytest.approx(1.0)
    means = finalize(sums)
    assert means["hr@3"] == pytest.approx(1 / 5) and all(math.isfinite(v) for v in means.values())
    assert means["nonfinite_rows"] == 4  # a total, not a mean


def test_masked_history_is_not_a_non_finite_row_but_a_nan_history_item_is():
    scores = torch.tensor([[NEG_INF, 0.9, 0.8, 0.7], [NEG_INF, float("nan"), 0.8, 0.7]])
    target, history = torch.tensor([3, 3]), torch.tensor([[1, 2], [1, 2]])
    sums = full_ranking_metrics(scores, target, ks=(1,), history=history, mask_history=True)
    assert sums["nonfinite_rows"] == 1  # row 2's NaN is found before masking turns it into -inf
    assert sums["hr@1"] == 1  # row 1: both items above the target are history


def test_one_scoring_pass_gives_each_protocols_sums_and_every_rows_rank():
    from training.evaluate import protocol_sums, ranking_sums

    class Fixed:  # a "model" whose scores are the batch's own
        def eval(self):
            return self

        def score_all(self, batch):
            return batch["scores"]

    torch.manual_seed(0)
    scores = torch.randn(12, 9)
    scores[:, 0] = float("-inf")
    target, history = torch.randint(1, 9, (12,)), torch.randint(0, 9, (12, 4))
    batches = [{"scores": scores[i:i + 5], "target": target[i:i + 5], "item_seq": history[i:i + 5],
                "user_key": torch.arange(i, min(i + 5, 12))} for i in range(0, 12, 5)]
    (ranked, masked), ranks = protocol_sums(Fixed(), batches, (1, 5), (False, True), keep_ranks=True)
    assert ranked == ranking_sums(Fixed(), batches, (1, 5)) and masked == ranking_sums(Fixed(), batches, (1, 5), True)
    assert ranks["user_key"].tolist() == list(range(12))
    for i, batch in enumerate(batches):
        rows = slice(5 * i, 5 * i + len(batch["target"]))
        assert ranks["rank_0"][rows].tolist() == rank_of_target(batch["scores"], batch["target"]).tolist()
    assert (ranks["rank_1"] <= ranks["rank_0"]).all() and (ranks["rank_1"] < ranks["rank_0"]).any()
    assert ranked["hr@5"] == float((ranks["rank_0"] < 5).sum())
