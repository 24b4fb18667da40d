"""A training run from a settings dict: check everything, fit a TorchTrainer, write what the run produced.

    from training import run_training
    result = run_training({"model": "sasrec", "db": "./lancedb", "epochs": 50, "num_workers": 2})

Order matters: settings, the store (pinned table versions), the frozen features, the model config and a
probe model, a resumed run's checkpoint and the CPU/GPU plan are all checked in the driver, so a bad
input is a clear error before any worker starts. Then the TorchTrainer runs training.loop.train_loop
on every worker with Ray datasets of the pinned sequences. At the end the driver reads the latest
checkpoint (it holds the best weights and the per-epoch metrics), writes the trained item vectors to
`item_vectors`, the learning curves beside the checkpoints, and the record to `runs`.
`callbacks` go to RunConfig (a Ray Tune trial passes TuneReportCallback there); `shared_splits` are example
datasets computed once for many runs (training.data.shared_splits: a sweep's, for its trials), used where
they match the run's split keys instead of computing the run's own.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from featurestore import objectstore, store
from featurestore.raycluster import ensure_ray
from featurestore.sequences import load_item_features
from recmodels import MODELS, DataFacts, EncoderConfig, ItemFeatures, StoreNeeds, create_model
from training import checkpoint, records
from training.config import TrainConfig
from training.data import StoreSnapshot, data_config, ensure_dataset, example_datasets, snapshot_store
from training.resources import WORKER_ENV_VARS, WorkerPlan, plan_for_cluster

SETTINGS_FILE = "train_config.json"
# Ray Train retries a worker group that does not start (60 s each, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
# forever by default: a placement group a stopped Tune trial never released then hangs the next run. After
# this many attempts the run fails with Ray's WorkerGroupStartupTimeoutError instead.
WORKER_GROUP_START_ATTEMPTS = 5
PLOT_FILE = "learning_curves.png"
TEST_RANKS = "test_ranks"  # the folder of the workers' per-user test ranks
WORKER_NODES = "worker_nodes"  # the key of the workers' node ids in rank 0's result
# rank 0 writes the id of its worker group's placement group here: a sweep removes a stopped trial's
# (tuning.sweep.TrialEnds), which Ray Train itself does not reliably
PLACEMENT_GROUP_FILE = "placement_group"


class RunDir:
    """storage/name: where Ray Train keeps the run's checkpoints and we keep its settings and plot.

    A local directory or a URI (s3://, gs://...), read and written through pyarrow's file systems: the one
    featurestore.objectstore builds from the AWS environment for s3://, which Ray Train gets too (its workers
    then need no environment of their own).
    """

    def __init__(self, storage: str, name: str):
        self.storage = storage if "://" in storage else str(Path(storage).expanduser().resolve())
        self.name = name
        self.fs, self.root = objectstore.filesystem(self.storage)
        self.path = f"{self.root.rstrip('/')}/{name}"
        self.uri = f"{self.storage.rstrip('/')}/{name}"

    def exists(self, filename: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{filename}").type != pyarrow.fs.FileType.NotFound

    def read_text(self, filename: str) -> str:
        with self.fs.open_input_stream(f"{self.path}/{filename}") as stream:
            return stream.read().decode()

    def write_bytes(self, filename: str, data: bytes) -> str:
        self.fs.create_dir(f"{self.path}/{filename}".rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{filename}") as stream:
            stream.write(data)
        return f"{self.uri}/{filename}"

    def write_test_ranks(self, columns: dict[str, np.ndarray], rank: int, world_size: int) -> str:
        """A worker's per-user test ranks (training.steps.test_rank_columns) as its own Parquet file: the
        workers write their shares side by side, no gather. Under a folder per world size, so a run resumed
        with fewer workers leaves no stale shares among its files."""
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.table(columns), buffer)
        return self.write_bytes(f"{TEST_RANKS}/{world_size}-workers/worker-{rank:05d}.parquet",
                                buffer.getvalue().to_pybytes())

    def read_test_ranks(self, world_size: int) -> pa.Table:
        """The run's per-user test ranks (user_key, rank, rank_masked), every worker's share, sorted by user_key."""
        folder = f"{self.path}/{TEST_RANKS}/{world_size}-workers"
        files = sorted(info.path for info in self.fs.get_file_info(pyarrow.fs.FileSelector(folder))
                       if info.path.endswith(".parquet"))
        if len(files) != world_size:
            raise FileNotFoundError(f"{self.uri}: {len(files)} of {world_size} workers' test ranks in {folder}")
        return pa.concat_tables(pq.read_table(path, filesystem=self.fs) for path in files).sort_by("user_key")

    def latest_checkpoint(self):
        """Ray Train's latest committed checkpoint of the run, or None."""
        from ray.train import Result

        try:
            return Result.from_path(self.path, storage_filesystem=self.fs).checkpoint
        except RuntimeError:  # no run there, or it never committed a checkpoint
            return None


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    checkpoint: str  # the latest checkpoint: last weights, best weights, per-epoch metrics
    history: list[dict]
    best_epoch: int
    stop_reason: str
    test: dict[str, float]
    wall_time_s: float
    worker_nodes: list[str]  # the Ray node id of each worker, in rank order
    plot: str | None  # None: the run was told not to write it (save_plot, save_item_vectors)
    vectors_table: str | None
    vectors_indexed: bool

    def lines(self) -> list[str]:
        best = self.history[self.best_epoch - 1]
        epoch_s = np.mean([m["epoch_s"] for m in self.history])
        per_worker = np.mean([m["sequences_per_s_per_worker"] for m in self.history])
        test = " ".join(f"{k[5:]} {v:.4f}" for k, v in self.test.items() if k.endswith(("@10", "@20")))
        nonfinite = sum(m.get("val_nonfinite_rows", 0) for m in self.history)
        return [
            f"run {self.run_id}: {len(self.history)} epochs (stopped by {self.stop_reason}), best epoch {self.best_epoch}, "
            f"{self.wall_time_s:.0f} s wall, {epoch_s:.1f} s/epoch, {per_worker:,.0f} sequences/s per worker",
            "valid " + " ".join(f"{k[4:]} {v:.4f}" for k, v in best.items() if k.startswith("val_") and "@" in k),
            *([f"warning: {nonfinite} validation rows over the epochs scored non-finite (counted as misses)"]
              if nonfinite else []),
            f"test  {test}",
            f"checkpoint {self.checkpoint}",
            f"workers ran on {len(set(self.worker_nodes))} node(s): " + " ".join(self.worker_nodes),
            *([f"item vectors in table {self.vectors_table}" + (" (indexed)" if self.vectors_indexed else "")]
              if self.vectors_table else []),
            *([f"learning curves {self.plot}"] if self.plot else []),
        ]


def run_training(config: Mapping[str, Any], callbacks: Sequence = (),
                 shared_splits: Mapping[tuple, Any] | None = None) -> RunResult:
    started, started_at, run_started_at = time.perf_counter(), records.now(), time.time()
    settings, run_dir = resolve_settings(config)
    ensure_ray()
    db = store.connect(settings.db)
    if settings.dataset:
        ensure_dataset(db, settings.dataset)
    needs = MODELS[settings.model].config_class.store_needs(settings.model_config)
    snapshot, index = snapshot_store(db, settings.max_len, settings.train_mode, settings.num_workers,
                                     settings.stride, needs.max_gap)
    model_config, features, _ = model_inputs(db, index, settings, snapshot, needs)
    snapshot.check_unchanged(db, store.ITEMS)
    meta, n_parameters, vector_dim = probe_model(settings, snapshot.n_items, model_config, features)
    if settings.resume:
        meta = resumed_meta(run_dir, meta, features, snapshot.n_items)
    vectors_table = settings.vectors_table or records.vectors_table_for(db, vector_dim)
    if settings.save_item_vectors:
        records.ensure_vectors_table(db, vectors_table, vector_dim)
    records.ensure_runs_table(db)
    plan = plan_for_cluster(settings.num_workers, settings.cpus_per_worker, settings.gpus_per_worker,
                            settings.threads_per_worker)
    print(f"run {run_dir.name}: {settings.model}, {snapshot.n_items} items, {snapshot.users} users, "
          f"{snapshot.train_examples(settings.train_mode)} training sequences per epoch "
          f"({snapshot.train_examples('last')} targets); {plan}", flush=True)

    trainer = build_trainer(settings, run_dir, plan, snapshot, meta, features, callbacks, run_started_at,
                            shared_splits)
    run_dir.write_bytes(SETTINGS_FILE, json.dumps(settings.to_dict(), indent=1).encode())
    base = {"run_id": run_dir.name, "model": settings.model, "started_at": started_at, "run_dir": run_dir.uri,
            "config": json.dumps({"settings": settings.to_dict(), "model": meta}), "monitor": settings.monitor_key,
            "db_uri": snapshot.db_uri, "num_workers": plan.num_workers, "n_items": snapshot.n_items,
            "n_parameters": n_parameters, "vectors_table": vectors_table,
            **{f"{name}_version": v for name, v in snapshot.versions.items()}}
    try:
        result = trainer.fit()
    except Exception as error:
        records.write_run(db, base | {"status": "failed", "error": f"{type(error).__name__}: {error}"[:4000],
                                      "finished_at": records.now(), "wall_time_s": time.perf_counter() - started})
        raise
    return finish(db, settings, run_dir, result, features, index, base, started)


def resolve_settings(config: Mapping[str, Any]) -> tuple[TrainConfig, RunDir]:
    """The run's settings (a resumed run: its saved ones, updated by what the call changes) and its directory."""
    settings = TrainConfig.from_dict(config)
    name = settings.name or f"{settings.model}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = RunDir(settings.storage, name)
    if settings.resume:
        if not run_dir.exists(SETTINGS_FILE):
            raise ValueError(f"nothing to resume: no run {name!r} in {run_dir.storage}")
        saved = TrainConfig.from_dict(json.loads(run_dir.read_text(SETTINGS_FILE)))
        settings = saved.resumed_with(config)
    elif run_dir.exists(SETTINGS_FILE):
        raise ValueError(f"run {name!r} already exists in {run_dir.storage}: continue it with --resume "
                         f"or choose another --name")
    return dataclasses.replace(settings, name=name), run_dir


def model_inputs(db, index, settings: TrainConfig, snapshot: StoreSnapshot,
                 needs: StoreNeeds) -> tuple[EncoderConfig, dict[str, np.ndarray] | None, DataFacts]:
    """The model's config with what the data decides (its config class's from_data), the frozen item
    feature matrices it is built with (None for a model that uses none), and the facts it was resolved from."""
    stored = load_item_features(db, index) if needs.features else {}
    matrices = {"text": stored.get("text"), "image": stored.get("image"),
                "categories": stored["categories"] if stored.get("category_vocab") else None}
    facts = DataFacts(settings.max_len, tuple(name for name in needs.features if matrices[name] is not None),
                      snapshot.max_gap_s)
    config = MODELS[settings.model].config_class.from_data(settings.model_config, facts)
    return config, {name: matrices[name] for name in config.item_features()} or None, facts


def probe_model(settings: TrainConfig, n_items: int, model_config: EncoderConfig,
                features: dict[str, np.ndarray] | None) -> tuple[dict, int, int]:
    """(checkpoint meta with the full model config, parameter count, item vector width) from a probe model.

    Building the model here turns a bad hyper-parameter or a missing feature into an error now.
    """
    item_features = None if features is None else ItemFeatures.from_numpy(features)
    probe = create_model(settings.model, model_config, n_items, item_features)
    meta = {"model": settings.model, "model_config": json.loads(json.dumps(dataclasses.asdict(probe.config))),
            "n_items": n_items, "feature_dims": checkpoint.feature_dims(item_features)}
    return meta, sum(p.numel() for p in probe.parameters()), int(probe.item_representations().shape[1])


def resumed_meta(run_dir: RunDir, meta: dict, features: dict | None, n_items: int) -> dict:
    """The meta a resumed run continues with: the checkpoint's model config, once the store still fits it.

    The checkpoint's config wins over today's defaults (a default changed since, like layer_norm_eps, must
    not change a model half way); what the store decides (the config's data_keys) must still match.
    """
    latest = run_dir.latest_checkpoint()
    if latest is None:
        print(f"run {run_dir.name} has no checkpoint yet: it starts from epoch 1", flush=True)
        return meta
    with latest.as_directory() as directory:
        saved = checkpoint.read_meta(directory)
    item_features = None if features is None else ItemFeatures.from_numpy(features)
    checkpoint.check_features(saved, item_features, n_items, latest.path)
    changed = [f"{key} (checkpoint: {saved['model_config'].get(key)!r}, store now: {meta['model_config'].get(key)!r})"
               for key in sorted(MODELS[meta["model"]].config_class.data_keys())
               if saved["model_config"].get(key) != meta["model_config"].get(key)]
    if changed:
        raise ValueError(f"the store no longer fits checkpoint {latest.path}: {', '.join(changed)}; start a new run")
    return {**meta, "model_config": saved["model_config"]}


def worker_config(settings: TrainConfig, run_dir: RunDir, plan: WorkerPlan, meta: dict, features: dict | None,
                  run_started_at: float) -> dict:
    """train_loop's config: the features travel once through the object store, not with every worker's config;
    the run directory with the driver's file system (a worker's environment may lack the storage's settings)."""
    import ray

    return {"settings": settings.to_dict(), "run_dir": run_dir, "meta": meta, "threads": plan.threads_per_worker,
            "features": None if features is None else ray.put(features),
            "batch_size": -(-settings.batch_size // settings.num_workers),
            "clock": {"run_started_at": run_started_at, "trainer_built_at": time.time()}}


def build_trainer(settings: TrainConfig, run_dir: RunDir, plan: WorkerPlan, snapshot: StoreSnapshot, meta: dict,
                  features: dict | None, callbacks: Sequence, run_started_at: float,
                  shared_splits: Mapping[tuple, Any] | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name=run_dir.name, storage_path=run_dir.root, storage_filesystem=run_dir.fs, callbacks=list(callbacks),
        # the best checkpoint by the monitored metric; Ray Train always keeps the latest one as well
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=settings.monitor_key,
                                           checkpoint_score_order="max"),
        failure_config=FailureConfig(max_failures=settings.max_failures,
                                     controller_failure_limit=WORKER_GROUP_START_ATTEMPTS),
        worker_runtime_env={"env_vars": WORKER_ENV_VARS},
    )
    # the datasets first: small splits not shared are computed here, and worker_config stamps the time after that
    datasets = example_datasets(snapshot, settings.max_len, settings.train_mode, settings.num_workers, settings.stride,
                                shared_splits)
    return TorchTrainer(train_loop_on_nodes,
                        train_loop_config=worker_config(settings, run_dir, plan, meta, features, run_started_at),
                        scaling_config=plan.scaling_config(settings.placement_strategy), run_config=run_config,
                        dataset_config=data_config(), datasets=datasets)


def train_loop_on_nodes(config: dict) -> dict:
    """training.loop.train_loop, with the Ray node id of every rank (in rank order) added to its result: rank 0's
    result is what the driver gets, and the run record names the nodes from it."""
    import ray
    import torch.distributed as dist

    from training.loop import train_loop

    group = ray.util.get_current_placement_group()
    if group is not None and ray.train.get_context().get_world_rank() == 0:
        config["run_dir"].write_bytes(PLACEMENT_GROUP_FILE, group.id.hex().encode())
    node = ray.get_runtime_context().get_node_id()
    nodes = [node]
    if dist.is_initialized():
        nodes = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, node)
    return {**train_loop(config), WORKER_NODES: nodes}


def finish(db, settings: TrainConfig, run_dir: RunDir, result, features: dict | None, index, base: dict,
           started: float) -> RunResult:
    """Item vectors, learning curves and the `runs` record from the latest checkpoint and the final report."""
    with result.checkpoint.as_directory() as directory:
        progress = checkpoint.read_progress(directory)
        model = checkpoint.load_model(directory, None if features is None else ItemFeatures.from_numpy(features))
    indexed, plot = False, None
    if settings.save_item_vectors:
        vectors = model.item_representations().detach().numpy()[1:]  # row 0 is padding
        indexed = records.write_item_vectors(db, base["vectors_table"], run_dir.name, index.ids, vectors)
    if settings.save_plot:
        plot = run_dir.write_bytes(PLOT_FILE, records.learning_curves_png(
            progress.history, settings.monitor_key, f"{run_dir.name} ({settings.model})"))
    test = {k: v for k, v in result.return_value.items() if k.startswith("test_")}
    history = progress.history
    latest = objectstore.uri_of(run_dir.storage, result.checkpoint.path)  # s3://... (Ray's path drops the scheme)
    wall = time.perf_counter() - started
    records.write_run(db, base | {
        "status": "finished", "finished_at": records.now(), "epochs": json.dumps(history),
        "epochs_run": progress.epoch, "best_epoch": progress.best_epoch, "stop_reason": progress.stop_reason,
        "restored_at": progress.restored_at, "best_value": progress.best_value, "test_metrics": json.dumps(test),
        "worker_nodes": result.return_value[WORKER_NODES],
        "checkpoint": latest, "plot": plot, "wall_time_s": wall,
        "train_time_s": sum(m["epoch_s"] for m in history),
        "mean_epoch_s": float(np.mean([m["epoch_s"] for m in history])),
        "sequences_per_s": float(np.mean([m["sequences_per_s"] for m in history])),
        "sequences_per_s_per_worker": float(np.mean([m["sequences_per_s_per_worker"] for m in history])),
    })
    return RunResult(run_id=run_dir.name, run_dir=run_dir.uri, checkpoint=latest, history=history,
                     best_epoch=progress.best_epoch, stop_reason=progress.stop_reason, test=test,
                     wall_time_s=wall, worker_nodes=result.return_value[WORKER_NODES], plot=plot,
                     vectors_indexed=indexed,
                     vectors_table=base["vectors_table"] if settings.save_item_vectors else None)
