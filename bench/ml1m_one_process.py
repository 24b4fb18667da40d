"""MovieLens-1M to convergence in one process, for a GPU machine that has torch but not Ray or LanceDB.

The GPU machines lent to this project carry torch but not Ray (Ray's wheel alone is larger than what may
travel to them), so this runs the training flow's own parts without Ray Train: the model configs the flow
resolves from the data (training.run.model_inputs), its leave-one-out examples
(featurestore.sequences.make_examples) and its training loop (training.steps.fit: steps, length-sorted
batching, early stopping, full-ranking metrics), under bench/ml1m_results.py's protocol and defaults. Left
out: Ray Data sharding, DDP, checkpoints and the runs table; it is one worker (the whole batch per step), and
each epoch shuffles all rows where the flow shuffles within a buffer of 8 windows. Test metrics are
reported under the run's mask_history (default: history items ranked) and with history masked, and each test
user's rank under both (`test_ranks`, keyed by user_key: the paired comparisons of bench/study_table.py).

    # here, from the store the flow builds (bench/ml1m_results.py's protocol options apply):
    python bench/ml1m_one_process.py export --out .device/ml1m.npz
    # there:
    python bench/ml1m_one_process.py train --data .device/ml1m.npz --precision bf16 --out results.json
    python bench/ml1m_one_process.py train ... --models hm4sr --label hm4sr_no_pcl --model-config '{"pcl_weight": 0}'
    python bench/ml1m_one_process.py train ... --models sasrec --label sasrec_seed2 --settings '{"seed": 2}'
    # a markdown table of result files:
    python bench/ml1m_one_process.py table results.json ...
"""
from __future__ import annotations

import argparse
import dataclasses
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

from recmodels import MODELS, DataFacts, ItemFeatures, create_model  # noqa: E402 - after the path insert
from training.checkpoint import Progress  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.precision import PRECISIONS, grad_scaler  # noqa: E402
from training.steps import (EVAL_SORT_WINDOW, EpochData, LossModel, Reporting, fit, weights_copy,  # noqa: E402
                            worker_seed)

SPLITS = ("train", "valid", "test")


def export(argv: list[str]) -> None:
    """Write the examples, item features, and each model's settings, meta and data facts to one .npz."""
    import lance

    import ml1m_results
    from featurestore import store
    from featurestore.sequences import SEQUENCES, make_examples
    from training.data import SEQUENCE_COLUMNS, ensure_dataset, snapshot_store
    from training.run import model_inputs, probe_model

    parser = argparse.ArgumentParser(prog="ml1m_one_process.py export")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dataset", default="ml-1m", help="the interaction source the store holds")
    own, rest = parser.parse_known_args(argv)
    args = ml1m_results.parse_args(rest)
    db = store.connect(args.db)
    ensure_dataset(db, own.dataset)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    every = [TrainConfig.from_dict({**ml1m_results.settings_for(model, args, stamp), "dataset": own.dataset})
             for model in args.models]
    protocol = every[0]  # ml1m_results gives every model the same history length and training mode
    snapshot, index = snapshot_store(db, protocol.max_len, protocol.train_mode, 1, protocol.stride, max_gap=True)
    rows = lance.dataset(snapshot.sequences_uri, version=snapshot.versions[SEQUENCES]).to_table(
        columns=SEQUENCE_COLUMNS)
    arrays, models = {}, {}
    for split in SPLITS:
        for name, array in make_examples(rows, split, protocol.max_len, protocol.train_mode,
                                         stride=protocol.stride).items():
            arrays[f"{split}__{name}"] = array
    for settings in every:
        needs = MODELS[settings.model].config_class.store_needs(settings.model_config)
        config, features, facts = model_inputs(db, index, settings, snapshot, needs)
        meta, n_parameters, _ = probe_model(settings, snapshot.n_items, config, features)
        models[settings.model] = {"settings": settings.to_dict(), "meta": meta, "n_parameters": n_parameters,
                                  "facts": dataclasses.asdict(facts)}
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


def train_model(entry: dict, data, device: torch.device, overrides: dict, model_config: dict) -> dict:
    """Train one model with training.steps.fit to its stop (epochs, patience or time budget); its per-epoch
    history and test metrics.

    `model_config` changes hyper-parameters of the exported settings (an ablation); the config is resolved
    from the export's data facts again, as the flow resolves it from the store.
    """
    settings = TrainConfig.from_dict({**entry["settings"], **overrides,
                                      "model_config": {**entry["settings"]["model_config"], **model_config}})
    name = entry["meta"]["model"]
    facts = entry["facts"]
    config = MODELS[name].config_class.from_data(
        settings.model_config, DataFacts(facts["max_len"], tuple(facts["features"]), facts["max_gap_s"]))
    missing = [f for f in config.item_features() if f"feature__{f}" not in data.files]
    if missing:
        raise ValueError(f"--model-config {model_config} needs item features {missing}, which the export lacks")
    features = (ItemFeatures.from_numpy({f: data[f"feature__{f}"] for f in config.item_features()})
                if config.item_features() else None)
    torch.manual_seed(settings.seed)  # as training.loop: the initial weights, then rank 0's stream
    model = create_model(name, config, entry["meta"]["n_items"], features).to(device)
    torch.manual_seed(worker_seed(settings, rank=0, epoch=0))
    splits = {split: {key[len(split) + 2:]: torch.as_tensor(data[key], dtype=torch.int64).to(device)
                      for key in data.files if key.startswith(f"{split}__")} for split in SPLITS}
    generator = torch.Generator().manual_seed(settings.seed)
    epochs = EpochData(
        train_windows=lambda epoch: windows(splits["train"], settings.sort_window * settings.batch_size, generator),
        eval_windows=lambda split: windows(splits[split], EVAL_SORT_WINDOW * settings.eval_batch_size, None),
        batch_size=settings.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    progress, test_ranks = Progress(), {}
    final = fit(model, LossModel(model), optimizer, grad_scaler(settings.precision, device), settings, epochs,
                progress, weights_copy(model), Reporting(line=lambda line: print(f"{name}: {line}", flush=True),
                                                         test_ranks=test_ranks.update))
    return {"settings": settings.to_dict(), "meta": {**entry["meta"], "model_config": dataclasses.asdict(config)},
            "n_parameters": sum(p.numel() for p in model.parameters()), "epochs": progress.epoch,
            "model_config_changes": model_config, "history": progress.history, **final,
            "test_ranks": {column: values.tolist() for column, values in test_ranks.items()}}


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
    parser.add_argument("--settings", type=json.loads, default={},
                        help='JSON of training settings (TrainConfig fields) over the export\'s, e.g. '
                             '\'{"seed": 2, "lr": 0.001, "monitor": "ndcg@10"}\'')
    parser.add_argument("--label", default=None, help="result key (default: the model name)")
    args = parser.parse_args(argv)
    if "model_config" in args.settings:
        parser.error("--settings: give the model's hyper-parameters with --model-config")
    try:
        TrainConfig.from_dict(args.settings)  # unknown or invalid settings fail here, before any model trains
    except (TypeError, ValueError) as error:
        parser.error(f"--settings: {error}")
    data = np.load(args.data)
    info = json.loads(str(data["info"]))
    device = torch.device(args.device)
    given = {"precision": args.precision, "time_budget_s": args.time_budget_s, "epochs": args.epochs}
    overrides = {"gpus_per_worker": 1.0 if device.type == "cuda" else 0.0, **args.settings,
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
