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
from featurestore.sequences import MODES, default_stride
from recmodels import MODELS
from recmodels.metrics import DEFAULT_KS
from training.precision import PRECISIONS, precision_problem

DEFAULT_STORAGE = os.environ.get("MMREC_RUNS", str(Path.home() / "mmrec_runs"))
# Ray's placement-group strategies for the workers' bundles (ray.train.ScalingConfig.placement_strategy)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# What `--resume` may change; every other setting must equal the interrupted run's.
CHANGEABLE_ON_RESUME = frozenset({
    "db", "storage", "name", "resume", "epochs", "patience", "time_budget_s", "stop_at", "eval_batch_size", "num_workers",
    "cpus_per_worker", "gpus_per_worker", "threads_per_worker", "placement_strategy", "max_failures", "fail_at",
    "save_item_vectors", "save_plot",
    "precision",  # weights and optimizer state stay float32 whatever the autocast: checkpoints are the same
})


@dataclass
class TrainConfig:
    """Every field is a flag of flows/train.py (training.cli): the type from its annotation, the help and any
    choices from its metadata; metadata {"cli": False} keeps a field off the command line."""

    model: str = field(default="sasrec", metadata={"help": "the sequential recommender", "choices": sorted(MODELS)})
    model_config: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})  # the model flags fill it
    db: str = field(default=store.DEFAULT_DB,
                    metadata={"help": "LanceDB URI with the tables items, interactions and sequences"})
    dataset: str | None = field(default=None, metadata={
        "help": "the interaction source the store must hold; a built-in one (ml-1m, ml-100k) is built into a store "
                "without interactions"})
    storage: str = field(default=DEFAULT_STORAGE,
                         metadata={"help": "checkpoints and results: a directory or URI (s3://, gs://)"})
    name: str | None = field(default=None,
                             metadata={"help": "run name and id", "shown_default": "<model>-<date>-<time>"})
    resume: bool = field(default=False, metadata={"help": "continue run --name from its last checkpoint"})
    epochs: int = field(default=200, metadata={"help": "most training epochs"})
    batch_size: int = field(default=256, metadata={"help": "global, split across the workers"})
    sort_window: int = field(default=8, metadata={
        "help": "batches of shuffled training rows sorted by history length together, so each batch is cut to "
                "its longest history; 1: batches as shuffled"})
    precision: str = field(default="fp32", metadata={
        "help": "training autocast: bf16 (GPUs, and CPUs with AVX512-BF16/AMX; others emulate it slowly) or fp16 "
                "(GPUs); evaluation always scores in float32", "choices": list(PRECISIONS)})
    eval_batch_size: int = field(default=256, metadata={
        "help": "per worker; a batch scores all items for each of its rows"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    max_len: int = field(default=50, metadata={"help": "history length L (also the model's position table)"})
    seed: int = field(default=42, metadata={
        "help": "the initial weights; with the worker rank and epoch, shuffling and dropout"})
    train_mode: str = field(default="all", metadata={
        "help": "all: CE at every position of windows of --max-len items, each training target in one window; "
                "last: every prefix is an example",
        "choices": MODES})
    window_stride: int | None = field(default=None, metadata={
        "help": "train_mode all: targets each window adds to the later one's; a target keeps at least max_len - "
                "stride + 1 items of context (1: last mode's contexts, max_len: windows that do not overlap)",
        "shown_default": "max_len // 2"})
    patience: int = field(default=10, metadata={
        "help": "early stop after this many epochs without a gain in the monitored metric"})
    time_budget_s: float | None = field(default=None, metadata={
        "help": "stop after the epoch in which training time reaches this many seconds"})
    stop_at: float | None = field(default=None, metadata={
        "help": "stop after the first epoch whose monitored validation metric reaches this value (time-to-quality "
                "runs: the test split is then scored with that epoch's weights)"})
    monitor: str = field(default="ndcg@20", metadata={
        "help": "validation metric for early stopping and the best checkpoint: hr, ndcg or mrr @ one of --ks"})
    ks: tuple[int, ...] = field(default=DEFAULT_KS, metadata={"help": "cut-offs of the HR/NDCG/MRR metrics"})
    mask_history: bool = field(default=False, metadata={
        "help": "rank history items last at evaluation (unset: RecBole's convention, history items still rank)"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    cpus_per_worker: float | None = field(default=None, metadata={
        "help": "CPUs each worker reserves", "shown_default": "the cluster's CPUs minus Ray Data's share, evenly"})
    gpus_per_worker: float = field(default=0.0, metadata={"help": "GPUs each worker reserves; 0 on CPU machines"})
    threads_per_worker: int | None = field(default=None, metadata={
        "help": "torch intra-op threads per worker", "shown_default": "its CPUs, rounded"})
    placement_strategy: str = field(default="PACK", metadata={
        "help": "where Ray places the workers: PACK (as few nodes as they fit on), SPREAD (across nodes where it "
                "can), STRICT_PACK (one node), STRICT_SPREAD (a node each, or the run waits for nodes)",
        "choices": list(PLACEMENT_STRATEGIES)})
    max_failures: int = field(default=1, metadata={
        "help": "worker-group restarts from the last checkpoint before the run fails"})
    vectors_table: str | None = field(default=None, metadata={
        "help": "table for the trained item vectors",
        "shown_default": "item_vectors, or item_vectors_<D> when item_vectors holds another width D"})
    save_item_vectors: bool = field(default=True, metadata={
        "help": "write the trained item vectors to --vectors-table (a sweep's trials do not)"})
    save_plot: bool = field(default=True, metadata={"help": "write the learning-curve PNG beside the checkpoints"})
    # tests only: {"epoch", "step", "rank", "marker"[, "block"]}, see training.loop
    fail_at: dict[str, Any] | None = field(default=None, metadata={"cli": False})

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
        if self.window_stride is not None and not 1 <= self.window_stride <= self.max_len:
            found.append(f"window_stride must be in 1..max_len ({self.max_len}), got {self.window_stride}")
        if self.batch_size < self.num_workers:
            found.append(f"batch_size {self.batch_size} is smaller than num_workers {self.num_workers}")
        if self.lr <= 0 or self.weight_decay < 0:
            found.append(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.monitor not in self.metric_names():
            found.append(f"monitor {self.monitor!r} is not one of {self.metric_names()} (set by ks={self.ks})")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            found.append(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        if self.gpus_per_worker < 0 or (self.cpus_per_worker is not None and self.cpus_per_worker <= 0):
            found.append("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        problem = precision_problem(self.precision, self.gpus_per_worker > 0)
        if problem:
            found.append(problem)
        if self.resume and not self.name:
            found.append("resume needs the name of the run to continue")
        reserved = MODELS[self.model].config_class.data_keys(("always",)) & set(self.model_config) \
            if self.model in MODELS else set()
        if reserved:
            found.append(f"model_config may not set {sorted(reserved)}: max_len and the data decide them")
        return found

    @property
    def stride(self) -> int:
        """train_mode all's window stride, the default resolved."""
        return default_stride(self.max_len) if self.window_stride is None else self.window_stride

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
