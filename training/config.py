"""The settings of a training run: one JSON-able dict in, defaults filled, checked before anything starts.

The same dict drives `flows/train.py` (argparse fills it) and, later, a Ray Tune trial (the param space
fills it). Model hyper-parameters sit in `model_config` and go to `recmodels.create_model` unchanged, so
each model's own dataclass supplies the defaults and rejects keys it does not know.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore import store
from featurestore.sequences import MODES
from recmodels import MODELS
from recmodels.metrics import DEFAULT_KS
from training.precision import precision_problem

DEFAULT_STORAGE = os.environ.get("MMREC_RUNS", str(Path.home() / "mmrec_runs"))

# Model settings a run resolves itself (from --max-len and the data), never taken from model_config.
SET_BY_THE_RUN = frozenset({"max_seq_len", "n_intervals"})

# What `--resume` may change; every other setting must equal the interrupted run's.
CHANGEABLE_ON_RESUME = frozenset({
    "db", "storage", "name", "resume", "epochs", "patience", "time_budget_s", "eval_batch_size", "num_workers",
    "cpus_per_worker", "gpus_per_worker", "threads_per_worker", "max_failures", "fail_at",
    "precision",  # weights and optimizer state stay float32 whatever the autocast: checkpoints are the same
})


@dataclass
class TrainConfig:
    model: str = "sasrec"
    model_config: dict[str, Any] = field(default_factory=dict)  # hidden_size, n_layers, dropout, ...
    db: str = store.DEFAULT_DB  # LanceDB URI with items, interactions, sequences
    dataset: str | None = None  # the interaction source the store must hold; ml-1m/ml-100k: built if absent
    storage: str = DEFAULT_STORAGE  # results and checkpoints: a directory or a URI (s3://, gs://)
    name: str | None = None  # run name = run id; None -> "<model>-<timestamp>"
    resume: bool = False  # continue the run `name` from its last checkpoint
    epochs: int = 200
    batch_size: int = 256  # global: each worker takes batch_size / num_workers
    sort_window: int = 8  # training rows are sorted by history length within windows of this many batches
    precision: str = "fp32"  # training autocast "bf16" or "fp16" (CUDA only); see training.precision
    eval_batch_size: int = 256  # per worker; memory is eval_batch_size x n_items scores
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int = 50  # history length L (also the model's position table)
    seed: int = 42
    train_mode: str = "all"  # "all": one causal pass per user, CE at every position; "last": every prefix
    patience: int = 10  # epochs without a gain in the monitored validation metric before stopping
    time_budget_s: float | None = None  # stop after the epoch in which the training seconds reach this
    monitor: str = "ndcg@20"  # validation metric for early stopping and the best checkpoint
    ks: tuple[int, ...] = DEFAULT_KS  # cut-offs of HR/NDCG/MRR
    mask_history: bool = False  # False = RecBole convention: items already in the history still rank
    num_workers: int = 1
    cpus_per_worker: float | None = None  # None: what the cluster has, minus Ray Data's share, evenly
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None  # torch intra-op threads; None: the worker's CPU count, rounded
    max_failures: int = 1  # worker-group restarts from the last checkpoint before the run fails
    vectors_table: str | None = None  # None: item_vectors, or item_vectors_<D> if that holds another width
    fail_at: dict[str, Any] | None = None  # tests only: {"epoch", "step", "rank", "marker"}, see training.loop

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        self.model_config = dict(self.model_config)
        problems = self.problems()
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    def problems(self) -> list[str]:
        found = []
        if self.model not in MODELS:
            found.append(f"unknown model {self.model!r}; valid models: {sorted(MODELS)}")
        if self.train_mode not in MODES:
            found.append(f"train_mode must be one of {MODES}, got {self.train_mode!r}")
        for name in ("epochs", "batch_size", "sort_window", "eval_batch_size", "max_len", "patience", "num_workers"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < self.num_workers:
            found.append(f"batch_size {self.batch_size} is smaller than num_workers {self.num_workers}")
        if self.lr <= 0 or self.weight_decay < 0:
            found.append(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.monitor not in self.metric_names():
            found.append(f"monitor {self.monitor!r} is not one of {self.metric_names()} (set by ks={self.ks})")
        if self.gpus_per_worker < 0 or (self.cpus_per_worker is not None and self.cpus_per_worker <= 0):
            found.append("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        problem = precision_problem(self.precision, self.gpus_per_worker > 0)
        if problem:
            found.append(problem)
        if self.resume and not self.name:
            found.append("resume needs the name of the run to continue")
        reserved = SET_BY_THE_RUN & set(self.model_config)
        if reserved:
            found.append(f"model_config may not set {sorted(reserved)}: max_len and the data decide them")
        return found

    def metric_names(self) -> list[str]:
        return [f"{metric}@{k}" for k in self.ks for metric in ("hr", "ndcg", "mrr")]

    @property
    def monitor_key(self) -> str:
        """The reported key the early stopping and the best checkpoint follow."""
        return f"val_{self.monitor}"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Settings from a (partial) dict; missing keys take the defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; valid settings: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["ks"] = list(self.ks)
        return values

    def resumed_with(self, given: Mapping[str, Any]) -> TrainConfig:
        """These saved settings updated by the keys a `--resume` call sets; changing the experiment is an error."""
        saved = self.to_dict()
        merged = TrainConfig.from_dict({**saved, **given}).to_dict()  # normalised: ks as a list, checked
        conflicts = sorted(k for k in given if merged[k] != saved[k] and k not in CHANGEABLE_ON_RESUME)
        if conflicts:
            listed = ", ".join(f"{k} (run: {saved[k]!r}, given: {merged[k]!r})" for k in conflicts)
            raise ValueError(f"--resume continues run {self.name!r} as it was set up; these settings differ: {listed}")
        return TrainConfig.from_dict(merged)
