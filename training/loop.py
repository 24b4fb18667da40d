"""The per-worker training loop: what Ray Train's TorchTrainer runs on every worker.

`train_loop(config)` takes one dict (built by training.run.worker_config, no argparse):
    settings      TrainConfig.to_dict()
    run_dir       training.run.RunDir of the run (the driver's file system): the workers write their test ranks there
    meta          model name, resolved model config, n_items, feature dims (also saved in checkpoints)
    features      object ref of the frozen item feature matrices, or None: fetched once per worker
    threads       torch intra-op threads for this worker
    batch_size    training rows per worker and step (the global batch size / num_workers)
    clock         the driver's wall-clock times: run_training's start and the trainer's construction
The epochs are training.steps.fit's, the same loop every caller runs; this module gives it the Ray edges.
Each epoch every worker trains on its shard of "train" (DDP keeps the replicas identical), scores its
share of "valid" against every item, and the sums are all-reduced, so all workers hold the same
metrics; all of them call ray.train.report with those, rank 0 attaching the checkpoint. Training ends
after `epochs`, after `patience` epochs without a gain in the monitored metric, or once the training
seconds reach `time_budget_s`; then the best weights are scored on "test" the same way (history items
ranked and masked), reported once more and returned.
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

from recmodels import ItemFeatures, SequentialRecommender, create_model
from training import checkpoint
from training.checkpoint import Progress
from training.config import TrainConfig
from training.evaluate import all_reduce_sums
from training.precision import grad_scaler
from training.steps import EVAL_SORT_WINDOW, EpochData, LossModel, Reporting, fit, weights_copy, worker_seed

SHUFFLE_BUFFER_BATCHES = 8  # training rows are shuffled within a buffer of this many batches


def train_loop(config: dict) -> dict:
    worker_started_at = time.time()
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

    # every report carries where the run's time went before its first epoch (bench/tune_overhead.py reads them)
    clock = config["clock"] | {"worker_started_at": worker_started_at, "fit_started_at": time.time()}

    def epoch_done(metrics: dict, progress: Progress, best_weights: dict) -> None:
        report(metrics | clock, progress, model, optimizer, best_weights, meta, rank)

    def test_ranks(columns: dict) -> None:
        config["run_dir"].write_test_ranks(columns, rank, ray.train.get_context().get_world_size())

    reporting = Reporting(line=write_line, epoch_done=epoch_done, test_ranks=test_ranks,
                          step_hook=lambda epoch: failure_injector(settings.fail_at, epoch, rank))
    final = fit(model, trainer_model, optimizer, scaler, settings, shard_data(settings, config["batch_size"], rank),
                progress, best_weights, reporting)
    ray.train.report(final | clock)  # for Ray Tune; the driver gets rank 0's return value (Result.return_value)
    return final


def write_line(line: str) -> None:
    """Not print(): Ray Train's patched print would show the line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def shard_data(settings: TrainConfig, batch_size: int, rank: int) -> EpochData:
    """This worker's Ray Data shards of the splits, and an all-reduce over the workers."""
    device = ray.train.torch.get_device()

    def train_windows(epoch: int):
        return ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=settings.sort_window * batch_size, device=device,
            local_shuffle_buffer_size=max(SHUFFLE_BUFFER_BATCHES, settings.sort_window) * batch_size,
            local_shuffle_seed=worker_seed(settings, rank, epoch))

    def eval_windows(split: str):
        return ray.train.get_dataset_shard(split).iter_torch_batches(
            batch_size=EVAL_SORT_WINDOW * settings.eval_batch_size, device=device)

    return EpochData(train_windows, eval_windows, batch_size, reduce=lambda sums: all_reduce_sums(sums, device),
                     world_size=ray.train.get_context().get_world_size(), rank=rank)


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
    """Tests only: a step hook that, at fail_at's (epoch, step, rank), once, kills this worker process, or with
    fail_at["block"] stops it there for good (a test then brings the failure itself, killing the worker's node:
    that death is the run's only failure).

    The marker file says it happened (a restarted worker must not fail again). Either waits until Ray Train has
    committed the checkpoints reported so far, so the restart point is deterministic.
    """
    if not fail_at or (fail_at["epoch"], fail_at["rank"]) != (epoch, rank) or os.path.exists(fail_at["marker"]):
        return lambda step: None

    def fail(step: int) -> None:
        if step == fail_at["step"]:
            ray.train.get_all_reported_checkpoints()
            Path(fail_at["marker"]).touch()
            while fail_at.get("block"):
                time.sleep(1)
            os._exit(1)

    return fail
