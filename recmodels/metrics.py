"""Full-ranking evaluation: every item is a candidate, the padding column (0) never is.

`full_ranking_metrics` returns SUMS over the batch plus "count", so batches and distributed
workers add (or all-reduce) them and `finalize` divides once. Keys: "hr@K", "ndcg@K", "mrr@K", and
"nonfinite_rows": rows whose target score is not finite or whose item scores hold a NaN. Such a row is a
miss (a diverged model must not look perfect: a NaN target would otherwise rank first) and is counted,
so a run can say its validation had them. History items are not masked by default (RecBole convention);
mask_history=True removes them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

DEFAULT_KS = (5, 10, 20, 50)
COUNTS = ("count", "nonfinite_rows")  # summed like the metrics, but totals, not means


def rank_of_target(scores: torch.Tensor, target: torch.Tensor, miss: torch.Tensor | None = None) -> torch.Tensor:
    """scores (B, N+1), target (B,) -> (B,) 0-based rank of the target among items 1..N.

    Pessimistic on ties: a target tied with other items ranks after all of them. Rows in `miss` (B,) bool,
    by default the non-finite rows, rank N: below every item, a miss at every K.
    """
    items = scores[:, 1:]  # column 0 is padding
    target_score = scores.gather(1, target[:, None])  # (B, 1)
    at_least = (items >= target_score).sum(dim=1)  # includes the target itself
    miss = nonfinite_rows(scores, target) if miss is None else miss
    return torch.where(miss, items.shape[1], at_least - 1)


def nonfinite_rows(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the target's score is NaN or +-inf, or some item 1..N scores NaN.

    -inf of other items is legitimate (masked history, a log-probability that underflowed) and ranks last.
    """
    return ~scores.gather(1, target[:, None]).squeeze(1).isfinite() | scores[:, 1:].isnan().any(dim=1)


def full_ranking_metrics(scores: torch.Tensor, target: torch.Tensor, ks: Iterable[int] = DEFAULT_KS,
                         history: torch.Tensor | None = None, mask_history: bool = False) -> dict[str, float]:
    """Sums of HR@K, NDCG@K, MRR@K over the batch, and "count".

    scores (B, N+1); target (B,); history (B, L) item ids with 0 = padding, used only with
    mask_history=True: history items other than the target then score -inf.
    """
    return rank_sums(*target_ranks(scores, target, history, mask_history), ks)


def target_ranks(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor | None = None,
                 mask_history: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) 0-based rank of each row's target (N for a non-finite row: a miss at every K) and (B,) bool
    non-finite rows; mask_history as in full_ranking_metrics."""
    nonfinite = nonfinite_rows(scores, target)  # on the model's scores, before masking sets -inf
    if mask_history:
        if history is None:
            raise ValueError("mask_history=True needs the history item ids")
        target_score = scores.gather(1, target[:, None])
        scores = scores.scatter(1, history, float("-inf")).scatter(1, target[:, None], target_score)
    return rank_of_target(scores, target, miss=nonfinite), nonfinite


def rank_sums(rank: torch.Tensor, nonfinite: torch.Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """The sums full_ranking_metrics returns, from target_ranks' ranks."""
    rank = rank.double()
    names, values = [], []
    for k in ks:  # a handful of cut-offs; one device sync at the end
        hit = (rank < k).double()
        names += [f"hr@{k}", f"ndcg@{k}", f"mrr@{k}"]
        values += [hit.sum(), (hit / torch.log2(rank + 2)).sum(), (hit / (rank + 1)).sum()]
    names.append("nonfinite_rows")
    values.append(nonfinite.sum().double())
    sums = dict(zip(names, torch.stack(values).tolist()))
    sums["count"] = float(rank.shape[0])
    return sums


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """Summed metrics (with "count") -> means, and "nonfinite_rows" as the total it is."""
    count = sums["count"]
    if count <= 0:
        raise ValueError("no evaluated rows (count is 0)")
    means = {name: value / count for name, value in sums.items() if name not in COUNTS}
    return means | {"nonfinite_rows": int(sums["nonfinite_rows"])}
