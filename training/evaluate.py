"""Full-ranking evaluation that adds up across batches and workers.

Every worker sums recmodels.metrics over its share of the users; one all_reduce adds the sums and
the counts; `finalize` divides once. So the result equals a single-process evaluation of all users,
however the rows were shared out (a worker with no rows contributes zeros).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from recmodels import SequentialRecommender
from recmodels.metrics import finalize, full_ranking_metrics, rank_sums, target_ranks


def zero_sums(ks: Iterable[int]) -> dict[str, float]:
    """The metric sums of no rows: every key present, so workers all-reduce the same keys."""
    return full_ranking_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), ks)


@torch.no_grad()
def ranking_sums(model: SequentialRecommender, batches: Iterable[Mapping[str, torch.Tensor]],
                 ks: Iterable[int], mask_history: bool = False) -> dict[str, float]:
    """Sums of HR/NDCG/MRR@ks (and "count") over the batches, every item a candidate."""
    return protocol_sums(model, batches, ks, (mask_history,))[0][0]


@torch.no_grad()
def protocol_sums(model: SequentialRecommender, batches: Iterable[Mapping[str, torch.Tensor]], ks: Iterable[int],
                  masks: Sequence[bool], keep_ranks: bool = False) -> tuple[list[dict[str, float]], dict | None]:
    """ranking_sums under each mask_history value of `masks`, every batch scored once; with keep_ranks also
    every row's "user_key" and its target's 0-based rank under each protocol ("rank_<i>" for masks[i]), numpy
    arrays in the order scored (the batches must carry user_key)."""
    model.eval()
    ks = tuple(ks)
    sums = [zero_sums(ks) for _ in masks]
    kept: dict[str, list] = {"user_key": [], **{f"rank_{i}": [] for i in range(len(masks))}} if keep_ranks else {}
    for batch in batches:
        scores = model.score_all(batch)
        for i, mask_history in enumerate(masks):
            rank, nonfinite = target_ranks(scores, batch["target"], batch["item_seq"], mask_history)
            for name, value in rank_sums(rank, nonfinite, ks).items():
                sums[i][name] += value
            if keep_ranks:
                kept[f"rank_{i}"].append(rank.to("cpu", torch.int32).numpy())
        if keep_ranks:
            kept["user_key"].append(batch["user_key"].cpu().numpy())
    ranks = {name: np.concatenate(parts) if parts else np.zeros(0, np.int64 if name == "user_key" else np.int32)
             for name, parts in kept.items()} if keep_ranks else None
    return sums, ranks


def all_reduce_sums(sums: Mapping[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Each value summed over the workers (one collective; a no-op outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(sums)
    names = sorted(sums)  # the same order on every worker
    values = torch.tensor([float(sums[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(names, values.tolist()))


def prefixed_means(sums: Mapping[str, float], prefix: str) -> dict[str, float]:
    """finalize(sums) with keys "<prefix>_<metric>"."""
    return {f"{prefix}_{name}": value for name, value in finalize(sums).items()}


def numpy_batches(examples: Mapping[str, np.ndarray], batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """make_examples output as torch batches, in order (single-process evaluation, tests)."""
    rows = len(examples["target"])
    for start in range(0, rows, batch_size):
        yield {name: torch.as_tensor(array[start:start + batch_size]) for name, array in examples.items()}
