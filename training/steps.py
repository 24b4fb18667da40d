"""The training loop, free of Ray: `fit` trains to a stop and scores the best weights on the test split.

Ray stays at the edges: the Ray Train workers (training.loop) give `fit` their data shards, an all-reduce
and a checkpointing report; the one-process runner (bench/ml1m_one_process.py, for a GPU machine without
Ray) gives it tensors in memory. A Ray Tune trial drives it through training.run. So every caller runs the
same epochs, metrics, early stopping, best weights and epoch line.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from recmodels import SequentialRecommender
from recmodels.base import trim_padding
from training.checkpoint import Progress
from training.config import TrainConfig
from training.evaluate import prefixed_means, protocol_sums, ranking_sums
from training.precision import autocast

EVAL_SORT_WINDOW = 8  # evaluation rows are sorted by length within this many batches (metrics do not change)
Batch = dict[str, torch.Tensor]


@dataclass
class EpochData:
    """Where `fit` gets its rows and how one worker's sums become everyone's.

    train_windows(epoch): this worker's training rows, shuffled, in windows of sort_window x batch_size rows
    eval_windows(split):  this worker's share of "valid" or "test", in windows of EVAL_SORT_WINDOW x eval_batch_size
    batch_size:           training rows per step on this worker
    reduce:               sums over all workers (an all-reduce); one process: the sums as they are
    """

    train_windows: Callable[[int], Iterable[Batch]]
    eval_windows: Callable[[str], Iterable[Batch]]
    batch_size: int
    reduce: Callable[[dict[str, float]], dict[str, float]] = dict
    world_size: int = 1
    rank: int = 0


@dataclass
class Reporting:
    """What `fit` tells its caller: each epoch's line (rank 0), each epoch's metrics and state (Ray: with a
    checkpoint), a hook before every training step (tests inject failures there), and this worker's per-user
    test ranks (test_rank_columns: user_key, rank with history items ranked, rank_masked)."""

    line: Callable[[str], None] = print
    epoch_done: Callable[[dict, Progress, dict], None] = lambda metrics, progress, best_weights: None
    step_hook: Callable[[int], Callable[[int], None]] = lambda epoch: (lambda step: None)
    test_ranks: Callable[[dict[str, np.ndarray]], None] = lambda ranks: None


def fit(model: SequentialRecommender, trainer_model: nn.Module, optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler, settings: TrainConfig, data: EpochData, progress: Progress,
        best_weights: dict[str, torch.Tensor], reporting: Reporting) -> dict:
    """Train until `progress` says stop (epochs, patience, time budget, target), then score the best weights on "test".

    `trainer_model` is what the optimizer steps through (LossModel(model), DDP-wrapped under Ray Train);
    `progress` and `best_weights` are a fresh start's or a restored checkpoint's. Returns the final metrics:
    the stop, the best validation value, and test metrics under the run's mask_history ("test_...") and
    with history items masked ("test_masked_..."), both from one scoring pass that also hands
    reporting.test_ranks this worker's per-user ranks (paired comparisons of runs need them).
    """
    while not progress.finished:
        epoch = progress.epoch + 1
        metrics = train_and_validate(model, trainer_model, optimizer, scaler, settings, data, epoch,
                                     reporting.step_hook(epoch))
        # a clock that epochs are not when batch size or training mode differ between runs (ASHA's time)
        metrics["total_steps"] = sum(m.get("steps", 0) for m in progress.history) + metrics["steps"]
        if progress.record(metrics, settings):
            best_weights = weights_copy(model)
        # the stop reason too: a reporter (a Tune trial) then knows the run ended by itself, not by its scheduler
        metrics |= {"best_epoch": progress.best_epoch, "is_best": progress.best_epoch == epoch,
                    "stop_reason": progress.stop_reason}
        if data.rank == 0:
            reporting.line(epoch_line(metrics, settings))
        reporting.epoch_done(metrics, progress, best_weights)
    model.load_state_dict(best_weights)
    scoring_started_at = time.time()
    batches = length_sorted_batches(data.eval_windows("test"), settings.eval_batch_size, shuffle=False)
    (ranked, masked), ranks = protocol_sums(model, batches, settings.ks, (False, True), keep_ranks=True)
    reporting.test_ranks(test_rank_columns(ranks))
    test = prefixed_means(data.reduce(masked if settings.mask_history else ranked), "test")
    masked = prefixed_means(data.reduce(masked), "test_masked")
    return {"epoch": progress.epoch, "best_epoch": progress.best_epoch, settings.monitor_key: progress.best_value,
            "stop_reason": progress.stop_reason, **test, **masked, "scoring_started_at": scoring_started_at,
            "scoring_s": time.time() - scoring_started_at}


def test_rank_columns(ranks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """protocol_sums' ranks of masks (False, True) under the names a run's test_ranks files use."""
    return {"user_key": ranks["user_key"], "rank": ranks["rank_0"], "rank_masked": ranks["rank_1"]}


def train_and_validate(model: SequentialRecommender, trainer_model: nn.Module, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler, settings: TrainConfig, data: EpochData, epoch: int,
                       before_step: Callable[[int], None]) -> dict:
    """One epoch: train on this worker's rows, validate, and return the metrics of all workers together."""
    device = next(model.parameters()).device
    started, started_at = time.perf_counter(), time.time()
    batches = length_sorted_batches(data.train_windows(epoch), data.batch_size, shuffle=True)
    train = train_epoch(trainer_model, optimizer, batches, before_step, settings.precision, scaler)
    if device.type == "cuda":  # the seconds are the work's, not the kernel launches'
        torch.cuda.synchronize(device)
    train = data.reduce(train | {"seconds": time.perf_counter() - started})
    trained = time.perf_counter()
    validation = evaluate(model, data, "valid", "val", settings, settings.mask_history)
    rows, train_s = train.pop("rows"), train.pop("seconds") / data.world_size  # mean over the workers
    steps = round(train.pop("steps") / data.world_size)  # DDP: every worker takes the same steps
    return {
        "epoch": epoch,
        **{name: value / rows for name, value in train.items()},
        **validation,
        "epoch_started_at": started_at,  # wall clock, comparable with the driver's (checkpoint time sits between)
        "epoch_s": time.perf_counter() - started,
        "train_s": train_s,
        "eval_s": time.perf_counter() - trained,
        "sequences": int(rows),
        "steps": steps,
        "sequences_per_s": rows / train_s,
        "sequences_per_s_per_worker": rows / train_s / data.world_size,
    }


def evaluate(model: SequentialRecommender, data: EpochData, split: str, prefix: str, settings: TrainConfig,
             mask_history: bool) -> dict[str, float]:
    """Full-ranking metrics of `split` over all workers' shares, keys "<prefix>_<metric>".

    Always in float32, whatever the training precision: bf16 scores (8-bit mantissa) would tie many items
    and move the ranks.
    """
    batches = length_sorted_batches(data.eval_windows(split), settings.eval_batch_size, shuffle=False)
    return prefixed_means(data.reduce(ranking_sums(model, batches, settings.ks, mask_history)), prefix)


class LossModel(nn.Module):
    """DDP synchronises the gradients of what runs through forward(), so forward() is the model's loss."""

    def __init__(self, model: SequentialRecommender):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def train_epoch(trainer_model: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Iterable[dict[str, torch.Tensor]], before_step: Callable[[int], None],
                precision: str, scaler: torch.amp.GradScaler) -> dict[str, float]:
    """One pass over the batches: "loss" and each part as "loss_<part>", summed over rows, "rows" and "steps".

    The forward pass runs under `precision`'s autocast; `scaler` (training.precision.grad_scaler) scales
    fp16 losses and passes other steps straight through.
    """
    trainer_model.train()
    device = next(trainer_model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    rows = 0
    for step, batch in enumerate(batches):
        before_step(step)
        with autocast(precision, device):
            total, parts = trainer_model(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        size = batch["target"].shape[0]
        for name, value in {"loss": total.detach(), **{f"loss_{part}": v for part, v in parts.items()}}.items():
            sums[name] = sums.get(name, 0.0) + value * size  # tensors: no device sync per step
        rows += size
    return {name: float(value) for name, value in sums.items()} | {"rows": rows, "steps": step + 1 if rows else 0}


def length_sorted_batches(windows: Iterable[dict[str, torch.Tensor]], batch_size: int,
                          shuffle: bool) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of `batch_size` rows of similar history length, each cut to its longest history.

    Attention costs L^2 and ML-1M's histories at L = 200 are half padding: sorting the rows of a window
    (several batches of shuffled rows) by length and trimming each batch's padding made a training step
    about 1.8x faster. `shuffle`: a window's batches come in random order, so lengths do not rise within it.
    Rows short of a whole batch wait for the next window, so only the last batch is short and the count of
    batches follows from the count of rows alone: DDP workers with equal shards take equal steps, however
    their data iterators cut the windows.
    """
    waiting: dict[str, torch.Tensor] | None = None
    for window in windows:
        if waiting is not None:
            window = {name: torch.cat([waiting[name], value]) for name, value in window.items()}
        order = torch.argsort((window["item_seq"] > 0).sum(dim=1), stable=True)
        chunks = list(order.split(batch_size))
        waiting = None
        if len(chunks[-1]) < batch_size:
            rest = chunks.pop()
            waiting = {name: value[rest] for name, value in window.items()}
        for chunk in (chunks[i] for i in torch.randperm(len(chunks)).tolist()) if shuffle else chunks:
            yield trim_padding({name: value[chunk] for name, value in window.items()})
    if waiting is not None:
        yield trim_padding(waiting)


def worker_seed(settings: TrainConfig, rank: int, epoch: int) -> int:
    return settings.seed + 1_000_003 * rank + epoch


def weights_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def epoch_line(metrics: dict, settings: TrainConfig) -> str:
    """One readable line: losses, validation metrics, time, throughput."""
    losses = ", ".join(f"{name[5:]} {value:.4f}" for name, value in metrics.items() if name.startswith("loss_"))
    shown = dict.fromkeys(["val_hr@10", "val_ndcg@10", settings.monitor_key])
    validation = " ".join(f"{name[4:]} {metrics[name]:.4f}" for name in shown if name in metrics)
    best = " *best*" if metrics["is_best"] else ""
    nonfinite = metrics.get("val_nonfinite_rows", 0)
    warning = f" | {nonfinite} validation rows scored non-finite (counted as misses)" if nonfinite else ""
    return (f"epoch {metrics['epoch']:>3}/{settings.epochs} | loss {metrics['loss']:.4f} ({losses}) | "
            f"val {validation}{best} | {metrics['epoch_s']:.1f} s (train {metrics['train_s']:.1f}, "
            f"eval {metrics['eval_s']:.1f}) | {metrics['sequences_per_s']:,.0f} seq/s, "
            f"{metrics['sequences_per_s_per_worker']:,.0f}/worker{warning}")
