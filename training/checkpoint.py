"""Checkpoint layout and the training progress it carries.

A checkpoint directory holds:
    meta.json        model name, resolved model config, n_items, frozen feature dimensions
    progress.json    epochs done, per-epoch metrics, best epoch, patience counter, finished flag
    model.pt         the weights after the checkpoint's epoch
    best_model.pt    the best epoch's weights, when that is an earlier epoch (else model.pt is the best)
    optimizer.pt     optimizer state
Every checkpoint is self-sufficient: a resumed run restores training and its best weights from the
latest one alone, and the driver reads the final results from it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from recmodels import ItemFeatures, SequentialRecommender, create_model
from training.config import TrainConfig

META, PROGRESS, MODEL, BEST_MODEL, OPTIMIZER = "meta.json", "progress.json", "model.pt", "best_model.pt", "optimizer.pt"
LEGACY_LAYER_NORM_EPS = 1e-5  # torch's default, which checkpoints written before the setting existed used


@dataclass
class Progress:
    """Where training stands; identical on every worker (it only holds all-reduced numbers)."""

    epoch: int = 0  # epochs done
    history: list[dict[str, Any]] = field(default_factory=list)  # one reported metrics dict per epoch
    best_epoch: int = 0
    best_value: float = -math.inf
    epochs_without_gain: int = 0
    stop_reason: str | None = None  # "epochs", "patience" (early stop), "time budget", "target" (stop_at); None: on
    restored_at: list[int] = field(default_factory=list)  # epochs training was restored from (failures, --resume)

    @property
    def finished(self) -> bool:
        """Training is over: what remains is the test evaluation."""
        return self.stop_reason is not None

    def record(self, metrics: dict[str, Any], settings: TrainConfig) -> bool:
        """Add an epoch's metrics; True when its monitored metric is the best so far."""
        self.epoch += 1
        monitored = metrics[settings.monitor_key]
        improved = monitored > self.best_value
        if improved:
            self.best_epoch, self.best_value, self.epochs_without_gain = self.epoch, monitored, 0
        else:
            self.epochs_without_gain += 1
        self.history.append(metrics)
        self.update_stop(settings)
        return improved

    def update_stop(self, settings: TrainConfig) -> None:
        """Decide whether training stops, under these limits (a resumed run may have been given more)."""
        train_s = sum(m["train_s"] for m in self.history)  # all-reduced: the same on every worker
        if self.epoch >= settings.epochs:
            self.stop_reason = "epochs"
        elif self.epochs_without_gain >= settings.patience:
            self.stop_reason = "patience"
        elif settings.time_budget_s is not None and train_s >= settings.time_budget_s:
            self.stop_reason = "time budget"
        elif settings.stop_at is not None and self.best_value >= settings.stop_at:
            self.stop_reason = "target"
        else:
            self.stop_reason = None


def feature_dims(features: ItemFeatures | None) -> dict[str, int]:
    """Width of each frozen feature matrix a model was built with (what a checkpoint must match)."""
    return {} if features is None else {name: int(m.shape[1]) for name, m in features.present().items()}


def save(directory: str | Path, meta: dict, progress: Progress, model: SequentialRecommender,
         optimizer: torch.optim.Optimizer, best_weights: dict[str, torch.Tensor] | None) -> None:
    """Write a checkpoint; best_weights None means this epoch is the best one."""
    directory = Path(directory)
    (directory / META).write_text(json.dumps(meta, indent=1))
    (directory / PROGRESS).write_text(json.dumps(asdict(progress), indent=1))
    torch.save(model.state_dict(), directory / MODEL)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER)
    if best_weights is not None:
        torch.save(best_weights, directory / BEST_MODEL)


def read_meta(directory: str | Path) -> dict:
    meta = json.loads((Path(directory) / META).read_text())
    meta["model_config"].setdefault("layer_norm_eps", LEGACY_LAYER_NORM_EPS)
    return meta


def read_progress(directory: str | Path) -> Progress:
    return Progress(**json.loads((Path(directory) / PROGRESS).read_text()))


def load_weights(directory: str | Path, best: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint epoch's weights, or (best=True) the best epoch's."""
    directory = Path(directory)
    path = directory / BEST_MODEL if best and (directory / BEST_MODEL).exists() else directory / MODEL
    return torch.load(path, map_location="cpu", weights_only=True)


def load_optimizer_state(directory: str | Path) -> dict:
    return torch.load(Path(directory) / OPTIMIZER, map_location="cpu", weights_only=True)


def check_features(meta: dict, features: ItemFeatures | None, n_items: int, where: str) -> None:
    """A clear error when the store's items no longer fit the checkpoint's model."""
    if meta["n_items"] != n_items:
        raise ValueError(f"the items table now holds {n_items} items; checkpoint {where} was trained on "
                         f"{meta['n_items']}: start a new run")
    now = feature_dims(features)
    for name, width in meta["feature_dims"].items():
        if now.get(name) != width:
            found = f"{now[name]}-d" if name in now else "missing"
            raise ValueError(f"item feature {name!r} is {found} in the items table, but checkpoint {where} was "
                             f"trained on {width}-d {name} features: re-encode the items with the same encoder "
                             f"or start a new run")


def load_model(directory: str | Path, features: ItemFeatures | None, best: bool = True) -> SequentialRecommender:
    """The checkpoint's model with its best (or last) weights, in eval mode, on the CPU."""
    meta = read_meta(directory)
    check_features(meta, features, meta["n_items"], str(directory))
    model = create_model(meta["model"], meta["model_config"], meta["n_items"], features)
    model.load_state_dict(load_weights(directory, best=best))
    return model.eval()
