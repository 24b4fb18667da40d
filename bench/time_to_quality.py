"""Time to quality against RecBole on ML-100k: how soon each model's tuned configuration, in each training mode,
reaches validation NDCG@10 >= 0.0700, and its test metrics there.

    python bench/study_runs.py --db data/study/db --storage data/study/runs --dataset ml-100k \
        --rows ttq-sasrec-all ttq-sasrec-last --seeds 3          # the runs (flows/train.py --stop-at 0.07)
    python bench/time_to_quality.py --db data/study/db           # the table (markdown) and JSON

A run with --stop-at stops after the first epoch that reaches the target, so its test metrics are that
epoch's weights'. Times: from the run's first training step to the end of that epoch (its validation
included), and from the run's launch (run_training's start: store check, splits, worker start-up; the store
itself was built before). The median over the seeds that reached it; "not reached" where none did.
RecBole's side is the figure measured on this machine's 2 cores (RecBole 1.2.1 SASRec, batch 256, dropout 0.5,
lr 1e-3: best validation NDCG@10 0.0719 at epoch 18, 80-94 s an epoch, about 25 minutes from its first step,
test NDCG@10 0.0640); it was not run again here (it needs its own environment: numpy < 2, a stub for its Ray
import).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from featurestore import store  # noqa: E402
from study_pause import paused_s, read_pauses  # noqa: E402 - bench/
from study_runs import STUDY_ROWS, TTQ_TARGET, finished_runs, run_name  # noqa: E402 - bench/
from training.records import RUNS, read_runs  # noqa: E402

RECBOLE_S = 25 * 60  # RecBole 1.2.1 SASRec to its best validation NDCG@10 (0.0719), from its first step
RECBOLE_TEST_NDCG = 0.0640
TARGET_SPEEDUP = 10
MONITOR = "val_ndcg@10"


def reach(run, pauses: list[tuple[float, float]] = ()) -> dict:
    """When the run's validation first reached the target: epoch, seconds from the first step and from launch,
    the study's pauses within them taken out."""
    epochs = run.epochs
    first = epochs[0]
    for metrics in epochs:
        if metrics[MONITOR] >= TTQ_TARGET:
            end = metrics["epoch_started_at"] + metrics["epoch_s"]
            first_step, launch = first["epoch_started_at"], run.started_at.timestamp()  # a resumed run: its last launch
            return {"epoch": metrics["epoch"], "from_first_step_s": end - first_step - paused_s(pauses, first_step, end),
                    "from_launch_s": end - launch - paused_s(pauses, launch, end),
                    "resumed": bool(run.restored_at is not None and len(run.restored_at))}
    return {"epoch": None, "best": max(m[MONITOR] for m in epochs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", type=int, default=5, help="look for seeds 1..N")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "time_to_quality.json"))
    parser.add_argument("--storage", help="the study's storage folder: its pauses (bench/study_pause.py) are "
                                          "taken out of the seconds")
    args = parser.parse_args(argv)
    pauses = read_pauses(args.storage) if args.storage else []
    db = store.connect(args.db)
    if RUNS not in store.table_names(db):
        parser.exit(2, f"error: {args.db} holds no runs\n")
    runs = read_runs(db).set_index("run_id")
    print(f"Validation NDCG@10 >= {TTQ_TARGET} on {args.dataset}; RecBole 1.2.1 SASRec: about {RECBOLE_S / 60:.0f} "
          f"min from its first step (test NDCG@10 {RECBOLE_TEST_NDCG}); target {TARGET_SPEEDUP}x sooner.\n")
    print("| model | train_mode | seeds reached / run | median s from first step | median s from launch | "
          "epoch | test NDCG@10 | test HR@10 | test NDCG@10 masked | vs RecBole |")
    print("|" + "---|" * 10)
    results = []
    for key, row in STUDY_ROWS.items():
        if row.kind != "time to quality":
            continue
        finished = finished_runs(runs, [run_name(args.dataset, key, seed) for seed in range(1, args.seeds + 1)])
        mode = row.changes["train_mode"]
        if not finished:
            print(f"| {row.model} | {mode} | 0 / 0 | not run | | | | | | |")
            results.append({"row": key, "runs": []})
            continue
        reached = [(run, reach(run, pauses)) for run in finished]
        hits = [(run, r) for run, r in reached if r["epoch"] is not None]
        entry = {"row": key, "model": row.model, "train_mode": mode,
                 "runs": [{"run": run.name, **r, "test": run.test_metrics} for run, r in reached]}
        if hits:
            first_step = float(np.median([r["from_first_step_s"] for _, r in hits]))
            launch = float(np.median([r["from_launch_s"] for _, r in hits]))
            tests = {m: float(np.median([run.test_metrics[m] for run, _ in hits]))
                     for m in ("test_ndcg@10", "test_hr@10", "test_masked_ndcg@10")}
            epoch = float(np.median([r["epoch"] for _, r in hits]))
            entry |= {"median_from_first_step_s": first_step, "median_from_launch_s": launch, **tests}
            print(f"| {row.model} | {mode} | {len(hits)} / {len(finished)} | {first_step:.0f} | {launch:.0f} | "
                  f"{epoch:.0f} | {tests['test_ndcg@10']:.4f} | {tests['test_hr@10']:.4f} | "
                  f"{tests['test_masked_ndcg@10']:.4f} | {RECBOLE_S / first_step:.1f}x sooner |")
        else:
            best = max(r["best"] for _, r in reached)
            print(f"| {row.model} | {mode} | 0 / {len(finished)} | not reached (best {best:.4f}) | | | | | | |")
        results.append(entry)
    Path(args.json).write_text(json.dumps({"target": TTQ_TARGET, "recbole_s": RECBOLE_S, "rows": results}, indent=1,
                                          default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
