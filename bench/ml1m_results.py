"""MovieLens-1M results: SASRec, FAME and HM4SR (id + text) trained end to end through the training flow.

    python bench/ml1m_results.py --db /tmp/ml1m/db --storage /tmp/ml1m/runs --out bench/results/ml1m.md
    python bench/ml1m_results.py --models sasrec --epochs 2          # a quick look
    python bench/ml1m_results.py --time-budget-s 1800                # training seconds per model

Protocol: leave-one-out, full ranking over all 3,883 catalog items (3,706 of them rated; history not
masked), L = 200, d = 64,
train_mode "all" (cross-entropy at every position), Adam, early stopping on validation NDCG@20;
test metrics of the best validation epoch. Items carry MiniLM text features (the encoding flow's
default text template), interactions are the ML-1M ratings. Results go to a
markdown table, rewritten after every model so a cut-short run keeps what it finished.
The training flow builds the store on first use (`dataset` ml-1m).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore.raycluster import ensure_ray  # noqa: E402 - after the path insert; before anything imports ray
from training.config import TrainConfig  # noqa: E402
from training.precision import PRECISIONS  # noqa: E402

from ml1m_one_process import TABLE_COLUMNS as COLUMNS  # noqa: E402 - the runner's table has the same columns

MODELS = ("sasrec", "fame", "hm4sr")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="/tmp/ml1m/db")
    p.add_argument("--storage", default="/tmp/ml1m/runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ml1m.md"))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--time-budget-s", type=float, default=None, help="training seconds per model")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.2, help="hidden and attention dropout, every model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sort-window", type=int, default=TrainConfig().sort_window,
                   help="batches sorted by history length together")
    p.add_argument("--precision", default=TrainConfig().precision, choices=list(PRECISIONS))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--model-config", type=json.loads, default={},
                   help='JSON merged into every listed model\'s config, e.g. \'{"idcl_weight": 0}\'')
    p.add_argument("--attempts", type=int, default=4, help="runs resumed after the Ray cluster died, per model")
    return p.parse_args(argv)


def settings_for(model: str, args, stamp: str) -> dict:
    return {
        "model": model, "dataset": "ml-1m", "db": args.db, "storage": args.storage, "name": f"ml1m-{model}-{stamp}",
        "epochs": args.epochs, "time_budget_s": args.time_budget_s, "patience": args.patience,
        "max_len": args.max_len, "batch_size": args.batch_size, "sort_window": args.sort_window, "lr": args.lr,
        "train_mode": "all", "precision": args.precision,
        "num_workers": args.num_workers, "vectors_table": f"item_vectors_ml1m_{model}",
        "model_config": {"hidden_size": args.hidden_size, "dropout": args.dropout, "attn_dropout": args.dropout,
                         **args.model_config},  # HM4SR: id + text, the modalities ML-1M's items have
    }


def train_resuming(settings: dict, attempts: int):
    """run_training; when the Ray cluster dies under it (on a shared machine another user's `ray stop`
    takes every local cluster down), start Ray again and resume the run from its last checkpoint."""
    import ray

    from featurestore.store import StoreError
    from training import run_training
    from training.run import SETTINGS_FILE, RunDir

    for attempt in range(1, attempts + 1):
        started = RunDir(settings["storage"], settings["name"]).exists(SETTINGS_FILE)  # local or s3://...
        try:
            return run_training({**settings, "resume": True} if started else settings)
        except (ValueError, StoreError):
            raise  # a bad setting or store: another attempt cannot help
        except Exception as error:  # noqa: BLE001 - the cluster or a worker died
            if attempt == attempts:
                raise
            print(f"attempt {attempt} of {settings['name']} failed ({type(error).__name__}); "
                  f"restarting Ray and resuming", flush=True)
            ray.shutdown()
            ensure_ray()


def table_row(model: str, result, wall_s: float) -> str:
    epoch_s = sum(m["epoch_s"] for m in result.history) / len(result.history)
    per_worker = sum(m["sequences_per_s_per_worker"] for m in result.history) / len(result.history)
    metrics = " | ".join(f"{result.test['test_' + name]:.4f}" for name in COLUMNS)
    return (f"| {model} | {metrics} | {result.best_epoch} / {len(result.history)} ({result.stop_reason}) | "
            f"{wall_s / 60:.1f} | {epoch_s:.1f} | {per_worker:,.0f} |")


def write_markdown(path: str, command: str, args, rows: list[str]) -> None:
    header = "| model | " + " | ".join(c.upper() for c in COLUMNS)
    lines = [
        "# MovieLens-1M: SASRec, FAME, HM4SR through the training flow",
        "",
        f"Made by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; load average when "
        f"this table was written (1/5/15 min): {' / '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        f"Leave-one-out, full ranking over all items (history not masked), L = {args.max_len}, "
        f"d = {args.hidden_size}, dropout {args.dropout}, train_mode all, {args.precision}, Adam lr {args.lr}, "
        f"batch {args.batch_size} "
        f"(sorted by history length in windows of {args.sort_window} batches), "
        f"{args.num_workers} Ray Train worker(s); test metrics of the best validation-NDCG@20 epoch. "
        f"Epoch limit {args.epochs}, patience {args.patience}"
        + (f", training time budget {args.time_budget_s:.0f} s per model." if args.time_budget_s else ".")
        + (f" Model config changes: `{json.dumps(args.model_config)}`." if args.model_config else ""),
        "",
        header + " | best / run epochs (stop) | wall min (all attempts) | s / epoch | sequences/s per worker |",
        "|" + "---|" * (len(COLUMNS) + 5),
        *rows,
        "",
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_ray()
    command = "python bench/ml1m_results.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    for model in args.models:
        started = time.perf_counter()
        result = train_resuming(settings_for(model, args, stamp), args.attempts)
        print("\n".join(result.lines()), flush=True)
        rows.append(table_row(model, result, time.perf_counter() - started))
        write_markdown(args.out, command, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
