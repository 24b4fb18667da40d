"""One training pass and the batching it uses, free of Ray: the Ray Train loop (training.loop) and a
plain single-process loop (bench/ml1m_one_process.py, for a GPU machine without Ray) run the same steps.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from recmodels import SequentialRecommender
from recmodels.base import trim_padding
from training.config import TrainConfig
from training.precision import autocast

EVAL_SORT_WINDOW = 8  # evaluation rows are sorted by length within this many batches (metrics do not change)


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
    """One pass over the batches: "loss" and each part as "loss_<part>", summed over rows, and "rows".

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
    return {name: float(value) for name, value in sums.items()} | {"rows": rows}


def length_sorted_batches(windows: Iterable[dict[str, torch.Tensor]], batch_size: int,
                          shuffle: bool) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of `batch_size` rows of similar history length, each cut to its longest history.

    Attention costs L^2 and ML-1M's histories at L = 200 are half padding: sorting the rows of a window
    (several batches of shuffled rows) by length and trimming each batch's padding made a training step
    about 1.8x faster. `shuffle`: a window's batches come in random order, so lengths do not rise within it.
    """
    for window in windows:
        order = torch.argsort((window["item_seq"] > 0).sum(dim=1), stable=True)
        chunks = order.split(batch_size)
        for chunk in (chunks[i] for i in torch.randperm(len(chunks)).tolist()) if shuffle else chunks:
            yield trim_padding({name: value[chunk] for name, value in window.items()})


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
