"""Train a sequential recommender on the LanceDB feature store with Ray Train (DDP over --num-workers).

    python flows/train.py --model sasrec --dataset ml-1m --db /data/ml1m --max-len 200 --epochs 200
    python flows/train.py --model hm4sr --num-workers 2 --hidden-size 64 --cp-weight 0.5 --name hm4sr-a
    python flows/train.py --resume --name hm4sr-a            # continue an interrupted run
    ray job submit --working-dir . -- python flows/train.py --model fame --storage s3://bucket/runs

Needs the tables `items` (flows/encode_items.py), `interactions` and `sequences`
(flows/import_interactions.py); with --dataset ml-1m or ml-100k an empty store is built first. Writes checkpoints and learning curves under --storage/--name, the run
record to the table `runs` and the trained item vectors to --vectors-table. Model hyper-parameters left
unset take the model's defaults (shown per model); with --resume, settings left unset keep the run's.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from featurestore.sequences import MODES  # noqa: E402
from recmodels import MODELS  # noqa: E402
from training.config import SET_BY_THE_RUN, TrainConfig  # noqa: E402
from training.precision import PRECISIONS  # noqa: E402

DEFAULTS = TrainConfig()
DERIVED_DEFAULTS = {  # defaults the model or the run derive from other settings
    "inner_size": "4 x hidden size",
    "modalities": "id plus the feature modalities the items table has",
}


def model_fields() -> dict[str, list[str]]:
    """Every model hyper-parameter -> the models that have it."""
    fields: dict[str, list[str]] = {}
    for name, model in MODELS.items():
        for field in dataclasses.fields(model.config_class):
            if field.name not in SET_BY_THE_RUN:
                fields.setdefault(field.name, []).append(name)
    return fields


def add_model_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """--hidden-size, --n-experts, --cp-weight ...: one flag per model config field, typed by its default."""
    group = parser.add_argument_group("model hyper-parameters (unset: the model's default)")
    for name, models in model_fields().items():
        values = {model: getattr(MODELS[model].config_class(), name) for model in models}
        if name in DERIVED_DEFAULTS or len(set(map(str, values.values()))) == 1:
            shown = DERIVED_DEFAULTS.get(name) or next(iter(values.values()))
            help_text = f"{'/'.join(values)}; default: {shown}"
        else:
            help_text = "default: " + ", ".join(f"{model} {value}" for model, value in values.items())
        default = next(iter(values.values()))
        kwargs = {"nargs": "+"} if isinstance(default, tuple) else {"type": type(default)}
        group.add_argument("--" + name.replace("_", "-"), dest=f"model.{name}", metavar=name.upper(),
                           help=help_text, **kwargs)
    return list(model_fields())


def parse_args(argv=None) -> dict:
    """The settings the command line sets (others stay unset, so defaults or a resumed run's apply)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    d = DEFAULTS
    p.add_argument("--model", choices=sorted(MODELS), help=f"default: {d.model}")
    p.add_argument("--db", help=f"LanceDB URI (default: {d.db})")
    p.add_argument("--dataset", help="the interaction source the store must hold; a built-in one (ml-1m, ml-100k) "
                                     "is built into a store without interactions")
    p.add_argument("--storage", help=f"checkpoints and results: a directory or URI (default: {d.storage})")
    p.add_argument("--name", help="run name and id (default: <model>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", default=None, help="continue run --name from its last checkpoint")
    p.add_argument("--epochs", type=int, help=f"default: {d.epochs}")
    p.add_argument("--batch-size", type=int, help=f"global, split across the workers (default: {d.batch_size})")
    p.add_argument("--sort-window", type=int,
                   help=f"batches of shuffled training rows sorted by history length together, so each batch "
                        f"is cut to its longest history; 1: batches as shuffled (default: {d.sort_window})")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help=f"training autocast: bf16 (GPUs, and CPUs with AVX512-BF16/AMX; others emulate it "
                        f"slowly) or fp16 (GPUs); evaluation always scores in float32 (default: {d.precision})")
    p.add_argument("--eval-batch-size", type=int, help=f"per worker (default: {d.eval_batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {d.lr})")
    p.add_argument("--weight-decay", type=float, help=f"default: {d.weight_decay}")
    p.add_argument("--max-len", type=int, help=f"history length L (default: {d.max_len})")
    p.add_argument("--seed", type=int, help=f"default: {d.seed}")
    p.add_argument("--train-mode", choices=MODES, help=f"all: CE at every position of one pass per user; "
                                                        f"last: every prefix is an example (default: {d.train_mode})")
    p.add_argument("--patience", type=int, help=f"early stop after this many epochs without a gain (default: {d.patience})")
    p.add_argument("--time-budget-s", type=float, help="stop after the epoch in which training time reaches this")
    p.add_argument("--monitor", help=f"validation metric for early stopping and the best checkpoint (default: {d.monitor})")
    p.add_argument("--ks", type=int, nargs="+", help=f"metric cut-offs (default: {' '.join(map(str, d.ks))})")
    p.add_argument("--mask-history", action="store_true", default=None, help="rank history items last at evaluation")
    p.add_argument("--num-workers", type=int, help=f"Ray Train workers (default: {d.num_workers})")
    p.add_argument("--cpus-per-worker", type=float, help="default: the cluster's CPUs minus Ray Data's share, evenly")
    p.add_argument("--gpus-per-worker", type=float, help=f"0 on CPU machines (default: {d.gpus_per_worker:g})")
    p.add_argument("--threads-per-worker", type=int, help="torch threads per worker (default: its CPUs, rounded)")
    p.add_argument("--max-failures", type=int, help=f"restarts from the last checkpoint (default: {d.max_failures})")
    p.add_argument("--vectors-table", help="table for the trained item vectors (default: item_vectors, or "
                                           "item_vectors_<D> when item_vectors holds another width D)")
    model_names = add_model_arguments(p)
    args = vars(p.parse_args(argv))
    settings = {k: v for k, v in args.items() if v is not None and not k.startswith("model.")}
    model_config = {name: args[f"model.{name}"] for name in model_names if args[f"model.{name}"] is not None}
    if model_config:
        settings["model_config"] = model_config
    return settings


def main(argv=None) -> int:
    settings = parse_args(argv)
    from featurestore.store import StoreError
    from training import run_training

    try:
        result = run_training(settings)
    except (ValueError, StoreError) as e:  # bad settings or store: nothing was trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    sys.exit(main())
