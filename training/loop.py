"""The per-worker training loop: what Ray Train's TorchTrainer runs on every worker.

`train_loop(config)` takes one dict (built by training.run.worker_config, no argparse):
    settings      TrainConfig.to_dict()
    meta          model name, resolved model config, n_items, feature dims (also saved in checkpoints)
    features      object ref of the frozen item feature matrices, or None: fetched once per worker
    threads       torch intra-op threads for this worker
    batch_size    training rows per worker and step (the global batch size / num_workers)
Each epoch every worker trains on its shard of "train" (DDP keeps the replicas identical), scores its
share of "valid" against every item, and the sums are all-reduced, so all workers hold the same
metrics; all of them call ray.train.report with those, rank 0 attaching the checkpoint. Training ends
after `epochs`, after `patience` epochs without a gain in the monitored metric, or once the training
seconds reach `time_budget_s`; then the best weights
are scored on "test" the same way, reported once more and returned.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from recmodels import ItemFeatures, SequentialRecommender, create_model
from training import checkpoint
from training.checkpoint import Progress
from training.config import TrainConfig
from training.evaluate import all_reduce_sums, prefixed_means, ranking_sums
from training.precision import grad_scaler
from training.steps import (EVAL_SORT_WINDOW, LossModel, epoch_line, length_sorted_batches, train_epoch, weights_copy,
                            worker_seed)

SHUFFLE_BUFFER_BATCHES = 8  # training rows are shuffled within a buffer of this many batches


def train_loop(config: dict) -> dict:
    settings = TrainConfig.from_dict(config["settings"])
    meta, rank = config["meta"], ray.train.get_context().get_world_rank()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(settings.seed)  # identical initial weights on every worker
    features = None if config["features"] is None else ItemFeatures.from_numpy(ray.get(config["features"]))
    model = create_model(meta["model"], meta["model_config"], meta["n_items"], features)
    progress, best_weights, optimizer_state = restore(ray.train.get_checkpoint(), model, settings)
    torch.manual_seed(worker_seed(settings, rank, progress.epoch))  # dropout and sampling differ per worker
    trainer_model = ray.train.torch.prepare_model(
        LossModel(model), parallel_strategy_kwargs={"forward_sync_buffers": False})  # buffers: frozen features
    optimizer = torch.optim.Adam(trainer_model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scaler = grad_scaler(settings.precision, ray.train.torch.get_device())  # fp16 only; restarts on resume

    while not progress.finished:
        epoch = progress.epoch + 1
        failure = failure_injector(settings.fail_at, epoch, rank)
        metrics = run_epoch(settings, model, trainer_model, optimizer, scaler, config["batch_size"], epoch, rank,
                            failure)
        if progress.record(metrics, settings):
            best_weights = weights_copy(model)
        metrics |= {"best_epoch": progress.best_epoch, "is_best": progress.best_epoch == epoch}
        if rank == 0:  # not print(): Ray Train's patched print would show the line twice
            sys.stdout.write(epoch_line(metrics, settings) + "\n")
            sys.stdout.flush()
        report(metrics, progress, model, optimizer, best_weights, meta, rank)

    model.load_state_dict(best_weights)
    final = {"epoch": progress.epoch, "best_epoch": progress.best_epoch, settings.monitor_key: progress.best_value,
             "stop_reason": progress.stop_reason, **evaluate_split(model, "test", "test", settings)}
    ray.train.report(final)  # for Ray Tune; the driver gets rank 0's return value (Result.return_value)
    return final


def restore(saved, model: SequentialRecommender, settings: TrainConfig) -> tuple[Progress, dict, dict | None]:
    """(progress, best weights, optimizer state) from the latest checkpoint, loading its weights into
    `model`; a fresh start when there is none."""
    if saved is None:
        return Progress(), weights_copy(model), None
    with saved.as_directory() as directory:
        progress = checkpoint.read_progress(directory)
        model.load_state_dict(checkpoint.load_weights(directory))
        best_weights = checkpoint.load_weights(directory, best=True)
        optimizer_state = checkpoint.load_optimizer_state(directory)
    progress.restored_at.append(progress.epoch)
    progress.update_stop(settings)
    return progress, best_weights, optimizer_state


def run_epoch(settings: TrainConfig, model: SequentialRecommender, trainer_model: nn.Module,
              optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch_size: int, epoch: int,
              rank: int, before_step: Callable[[int], None]) -> dict:
    """Train on this worker's shard, validate, and return the metrics of all workers together."""
    world = ray.train.get_context().get_world_size()
    started = time.perf_counter()
    windows = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=settings.sort_window * batch_size, device=ray.train.torch.get_device(),
        local_shuffle_buffer_size=max(SHUFFLE_BUFFER_BATCHES, settings.sort_window) * batch_size,
        local_shuffle_seed=worker_seed(settings, rank, epoch))
    batches = length_sorted_batches(windows, batch_size, shuffle=True)
    train = all_reduce_sums(train_epoch(trainer_model, optimizer, batches, before_step, settings.precision, scaler)
                            | {"seconds": time.perf_counter() - started}, ray.train.torch.get_device())
    trained = time.perf_counter()
    validation = evaluate_split(model, "valid", "val", settings)
    rows, train_s = train.pop("rows"), train.pop("seconds") / world  # mean over the workers
    return {
        "epoch": epoch,
        **{name: value / rows for name, value in train.items()},
        **validation,
        "epoch_s": time.perf_counter() - started,
        "train_s": train_s,
        "eval_s": time.perf_counter() - trained,
        "sequences": int(rows),
        "sequences_per_s": rows / train_s,
        "sequences_per_s_per_worker": rows / train_s / world,
    }


def evaluate_split(model: SequentialRecommender, split: str, prefix: str, settings: TrainConfig) -> dict[str, float]:
    """Full-ranking metrics of `split` over all workers' shares, keys "<prefix>_<metric>".

    Always in float32, whatever the training precision: bf16 scores (8-bit mantissa) would tie many items
    and move the ranks.
    """
    device = ray.train.torch.get_device()
    windows = ray.train.get_dataset_shard(split).iter_torch_batches(
        batch_size=EVAL_SORT_WINDOW * settings.eval_batch_size, device=device)
    batches = length_sorted_batches(windows, settings.eval_batch_size, shuffle=False)
    sums = ranking_sums(model, batches, settings.ks, settings.mask_history)
    return prefixed_means(all_reduce_sums(sums, device), prefix)


def report(metrics: dict, progress: Progress, model: SequentialRecommender, optimizer: torch.optim.Optimizer,
           best_weights: dict, meta: dict, rank: int) -> None:
    """Every worker reports the (identical) metrics; rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        earlier_best = None if progress.best_epoch == progress.epoch else best_weights
        checkpoint.save(directory, meta, progress, model, optimizer, earlier_best)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def failure_injector(fail_at: dict | None, epoch: int, rank: int) -> Callable[[int], None]:
    """Tests only: a step hook that kills this worker process at fail_at's (epoch, step, rank), once.

    The marker file says it happened (a restarted worker must not fail again). The crash waits until
    Ray Train has committed the checkpoints reported so far, so the restart point is deterministic.
    """
    if not fail_at or (fail_at["epoch"], fail_at["rank"]) != (epoch, rank) or os.path.exists(fail_at["marker"]):
        return lambda step: None

    def fail(step: int) -> None:
        if step == fail_at["step"]:
            ray.train.get_all_reported_checkpoints()
            Path(fail_at["marker"]).touch()
            os._exit(1)

    return fail
