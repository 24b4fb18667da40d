"""MovieLens-1M to convergence in one process, for a GPU machine that has torch but not Ray or LanceDB.

The GPU machines lent to this project carry torch but not Ray (Ray's wheel alone is larger than what may
travel to them), so this runs the training flow's own parts without Ray Train: the model configs the flow
resolves (training.run.resolve_model), its leave-one-out examples (featurestore.sequences.make_examples),
training steps and length-sorted batching (training.steps), early stopping (training.checkpoint.Progress)
and full-ranking metrics (training.evaluate), under bench/ml1m_results.py's protocol and defaults. Left out:
Ray Data sharding, DDP, checkpoints and the runs table; it is one worker (the whole batch per step), and
each epoch shuffles all rows where the flow shuffles within a buffer of 8 windows. Test metrics are
reported under the run's mask_history (default: history items ranked) and with history masked.

    # here, from the store the flow builds (bench/ml1m_results.py's protocol options apply):
    python bench/ml1m_one_process.py export --out .device/ml1m.npz
    # there:
    python bench/ml1m_one_process.py train --data .device/ml1m.npz --precision bf16 --out results.json
    python bench/ml1m_one_process.py train ... --models hm4sr --label hm4sr_no_pcl --model-config '{"pcl_weight": 0}'
    # a markdown table of result files:
    python bench/ml1m_one_process.py table results.json ...
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from recmodels import ItemFeatures, create_model  # noqa: E402 - after the path insert
from training.checkpoint import Progress  # noqa: E402
from training.config import SET_BY_THE_RUN, TrainConfig  # noqa: E402
from training.evaluate import prefixed_means, ranking_sums  # noqa: E402
from training.precision import PRECISIONS, grad_scaler  # noqa: E402
from training.steps import (EVAL_SORT_WINDOW, LossModel, epoch_line, length_sorted_batches,  # noqa: E402
                            train_epoch, weights_copy, worker_seed)

SPLITS = ("train", "valid", "test")


def export(argv: list[str]) -> None:
    """Write the examples, item features and each model's resolved settings and meta to one .npz."""
    import lance

    import ml1m_results
    from featurestore import store
    from featurestore.sequences import SEQUENCES, make_examples
    from training.data import SEQUENCE_COLUMNS, ensure_dataset, snapshot_store
    from training.run import interval_scale, model_features, resolve_model

    parser = argparse.ArgumentParser(prog="ml1m_one_process.py export")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dataset", default="ml-1m", help="the interaction source the store holds")
    own, rest = parser.parse_known_args(argv)
    args = ml1m_results.parse_args(rest)
    db = store.connect(args.db)
    ensure_dataset(db, own.dataset)
    snapshot, index = snapshot_store(db, args.max_len, "all", 1, interval_scale(args.model_config))
    rows = lance.dataset(snapshot.sequences_uri, version=snapshot.versions[SEQUENCES]).to_table(
        columns=SEQUENCE_COLUMNS)
    arrays, models = {}, {}
    for split in SPLITS:
        for name, array in make_examples(rows, split, args.max_len, "all").items():
            arrays[f"{split}__{name}"] = array
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for model in args.models:
        settings = TrainConfig.from_dict({**ml1m_results.settings_for(model, args, stamp), "dataset": own.dataset})
        features, modalities = model_features(db, index, settings)
        meta, n_parameters, _ = resolve_model(settings, snapshot, features, modalities)
        models[model] = {"settings": settings.to_dict(), "meta": meta, "n_parameters": n_parameters}
        arrays.update({f"feature__{name}": matrix for name, matrix in (features or {}).items()})
    info = {"models": models, "dataset": own.dataset, "store_versions": snapshot.versions, "users": snapshot.users,
            "n_items": snapshot.n_items, "made_by": "python bench/ml1m_one_process.py export " + " ".join(argv)}
    Path(own.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(own.out, info=np.array(json.dumps(info)), **arrays)
    print(f"wrote {own.out}: {', '.join(models)}; {snapshot.users} users, {snapshot.n_items} items", flush=True)


def windows(split: dict[str, torch.Tensor], rows: int, generator: torch.Generator | None) -> Iterator[dict]:
    """The split's rows in windows of `rows` (shuffled when a generator is given), for length_sorted_batches."""
    count = len(split["target"])
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for chunk in order.to(split["target"].device).split(rows):
        yield {name: value[chunk] for name, value in split.items()}


def evaluate(model, split: dict[str, torch.Tensor], prefix: str, settings: TrainConfig,
             mask_history: bool) -> dict[str, float]:
    batches = length_sorted_batches(windows(split, EVAL_SORT_WINDOW * settings.eval_batch_size, None),
                                    settings.eval_batch_size, shuffle=False)
    return prefixed_means(ranking_sums(model, batches, settings.ks, mask_history), prefix)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_model(entry: dict, data, device: torch.device, overrides: dict, model_config: dict) -> dict:
    """Train one model to its stop (epochs, patience or time budget); its per-epoch history and test metrics.

    `model_config` changes hyper-parameters of the exported model config (an ablation); what the data
    decided at export (training.config.SET_BY_THE_RUN, and interval_scale, which sets n_intervals) stays.
    """
    settings = TrainConfig.from_dict({**entry["settings"], **overrides})
    fixed = (SET_BY_THE_RUN | {"interval_scale"}) & set(model_config)
    if fixed:
        raise ValueError(f"--model-config may not set {sorted(fixed)}: the export fixed them")
    meta = {**entry["meta"], "model_config": {**entry["meta"]["model_config"], **model_config}}
    features = (ItemFeatures.from_numpy({name: data[f"feature__{name}"] for name in meta["feature_dims"]})
                if meta["feature_dims"] else None)
    torch.manual_seed(settings.seed)  # as training.loop: the initial weights, then rank 0's stream
    model = create_model(meta["model"], meta["model_config"], meta["n_items"], features).to(device)
    torch.manual_seed(worker_seed(settings, rank=0, epoch=0))
    splits = {split: {name[len(split) + 2:]: torch.as_tensor(data[name], dtype=torch.int64).to(device)
                      for name in data.files if name.startswith(f"{split}__")} for split in SPLITS}
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = grad_scaler(settings.precision, device)
    generator = torch.Generator().manual_seed(settings.seed)
    trainer_model, progress, best_weights = LossModel(model), Progress(), weights_copy(model)
    while not progress.finished:
        started = time.perf_counter()
        batches = length_sorted_batches(windows(splits["train"], settings.sort_window * settings.batch_size,
                                                generator), settings.batch_size, shuffle=True)
        train = train_epoch(trainer_model, optimizer, batches, lambda step: None, settings.precision, scaler)
        synchronize(device)
        trained = time.perf_counter()
        validation = evaluate(model, splits["valid"], "val", settings, settings.mask_history)
        rows = train.pop("rows")
        per_s = rows / (trained - started)  # one worker: the per-worker rate is the rate
        metrics = {"epoch": progress.epoch + 1, **{name: value / rows for name, value in train.items()},
                   **validation, "epoch_s": time.perf_counter() - started, "train_s": trained - started,
                   "eval_s": time.perf_counter() - trained, "sequences": rows,
                   "sequences_per_s": per_s, "sequences_per_s_per_worker": per_s}
        if progress.record(metrics, settings):
            best_weights = weights_copy(model)
        metrics |= {"best_epoch": progress.best_epoch, "is_best": progress.best_epoch == metrics["epoch"]}
        print(f"{meta['model']}: " + epoch_line(metrics, settings), flush=True)
    model.load_state_dict(best_weights)
    test = evaluate(model, splits["test"], "test", settings, settings.mask_history)
    masked = evaluate(model, splits["test"], "test_masked", settings, mask_history=True)
    return {"settings": settings.to_dict(), "meta": meta, "n_parameters": sum(p.numel() for p in model.parameters()),
            "best_epoch": progress.best_epoch, "epochs": progress.epoch, "stop_reason": progress.stop_reason,
            "model_config_changes": model_config, "history": progress.history, **test, **masked}


def train(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ml1m_one_process.py train")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="JSON, rewritten after every model")
    parser.add_argument("--models", nargs="+", default=None, help="default: every model the export holds")
    parser.add_argument("--precision", default=None, choices=list(PRECISIONS), help="default: the export's")
    parser.add_argument("--time-budget-s", type=float, default=None, help="training seconds per model")
    parser.add_argument("--epochs", type=int, default=None, help="default: the export's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-config", type=json.loads, default={},
                        help='JSON merged into each model\'s config, e.g. \'{"pcl_weight": 0}\'')
    parser.add_argument("--label", default=None, help="result key (default: the model name)")
    args = parser.parse_args(argv)
    data = np.load(args.data)
    info = json.loads(str(data["info"]))
    device = torch.device(args.device)
    given = {"precision": args.precision, "time_budget_s": args.time_budget_s, "epochs": args.epochs}
    overrides = {"gpus_per_worker": 1.0 if device.type == "cuda" else 0.0,
                 **{name: value for name, value in given.items() if value is not None}}
    models = args.models or list(info["models"])
    if args.label and len(models) != 1:
        parser.error(f"--label names one model's result; {len(models)} models were given")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "export": {k: v for k, v in info.items() if k != "models"}, "models": {}}
    for model in models:
        started = time.perf_counter()
        label = args.label or model
        results["models"][label] = train_model(info["models"][model], data, device, overrides, args.model_config)
        results["models"][label]["wall_s"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(results, indent=1))


TABLE_COLUMNS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10")


def table(argv: list[str]) -> None:
    """Print a markdown table of train's result files (every model of each, in order)."""
    parser = argparse.ArgumentParser(prog="ml1m_one_process.py table")
    parser.add_argument("results", nargs="+", help="JSON files written by train")
    args = parser.parse_args(argv)
    print("| run | model config changes | " + " | ".join(c.upper() for c in TABLE_COLUMNS)
          + " | NDCG@10 / HR@10, history masked | best / run epochs (stop) | train s / epoch | wall s |")
    print("|" + "---|" * (len(TABLE_COLUMNS) + 6))
    for path in args.results:
        for label, result in json.loads(Path(path).read_text())["models"].items():
            history = result["history"]
            changes = json.dumps(result["model_config_changes"]) if result["model_config_changes"] else "-"
            metrics = " | ".join(f"{result['test_' + name]:.4f}" for name in TABLE_COLUMNS)
            print(f"| {label} | {changes} | {metrics} | {result['test_masked_ndcg@10']:.4f} / "
                  f"{result['test_masked_hr@10']:.4f} | {result['best_epoch']} / {result['epochs']} "
                  f"({result['stop_reason']}) | {sum(m['train_s'] for m in history) / len(history):.2f} | "
                  f"{result['wall_s']:.0f} |")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"export": export, "train": train, "table": table}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    commands[argv[0]](argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
