"""Full-ranking evaluation: every item is a candidate, the padding column (0) never is.

`full_ranking_metrics` returns SUMS over the batch plus "count", so batches and distributed
workers add (or all-reduce) them and `finalize` divides once. Keys: "hr@K", "ndcg@K", "mrr@K".
History items are not masked by default (RecBole convention); mask_history=True removes them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

DEFAULT_KS = (5, 10, 20, 50)


def rank_of_target(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (B, N+1), target (B,) -> (B,) 0-based rank of the target among items 1..N.

    Pessimistic on ties: a target tied with other items ranks after all of them.
    """
    items = scores[:, 1:]  # column 0 is padding
    target_score = scores.gather(1, target[:, None])  # (B, 1)
    at_least = (items >= target_score).sum(dim=1)  # includes the target itself
    return at_least - 1


def full_ranking_metrics(scores: torch.Tensor, target: torch.Tensor, ks: Iterable[int] = DEFAULT_KS,
                         history: torch.Tensor | None = None, mask_history: bool = False) -> dict[str, float]:
    """Sums of HR@K, NDCG@K, MRR@K over the batch, and "count".

    scores (B, N+1); target (B,); history (B, L) item ids with 0 = padding, used only with
    mask_history=True: history items other than the target then score -inf.
    """
    if mask_history:
        if history is None:
            raise ValueError("mask_history=True needs the history item ids")
        target_score = scores.gather(1, target[:, None])
        scores = scores.scatter(1, history, float("-inf")).scatter(1, target[:, None], target_score)
    rank = rank_of_target(scores, target).double()  # (B,)
    names, values = [], []
    for k in ks:  # a handful of cut-offs; one device sync at the end
        hit = (rank < k).double()
        names += [f"hr@{k}", f"ndcg@{k}", f"mrr@{k}"]
        values += [hit.sum(), (hit / torch.log2(rank + 2)).sum(), (hit / (rank + 1)).sum()]
    sums = dict(zip(names, torch.stack(values).tolist()))
    sums["count"] = float(target.shape[0])
    return sums


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """Summed metrics (with "count") -> means."""
    count = sums["count"]
    if count <= 0:
        raise ValueError("no evaluated rows (count is 0)")
    return {name: value / count for name, value in sums.items() if name != "count"}
