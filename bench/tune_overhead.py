"""Where a Ray Tune sweep's wall time goes: training epochs, evaluation, trial start-up, worker-group start-up,
worker set-up, checkpoint reports, run records, and what is left (Tune scheduling and trial launch, the sweep's
own start and records).

    python bench/tune_overhead.py --cases ml100k ml1m --out bench/out/tune_overhead.json

ml100k: 8 SASRec trials on MovieLens-100k (Optuna, ASHA, 5 epochs at most, L 50).
ml1m:   2 SASRec trials on MovieLens-1M, 3 epochs each (random search, no scheduler, L 200).
Each case runs a real sweep (tuning.run_sweep, no final seeds) into a fresh store and storage. The phases come
from the clocks every training report carries (training.loop: the run's start, the trainer's construction,
the worker's start, fit's start; training.steps: each epoch's start, its train and eval seconds, the test
scoring) as Tune recorded them, so nothing in the flow is patched. Trials run one at a time, so the phases of
all trials and the gaps between them add up to the sweep's wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuning import SweepConfig, run_sweep  # noqa: E402 - after the path insert
from tuning.sweep import run_id  # noqa: E402

CASES = {
    "ml100k": {
        "settings": {"model": "sasrec", "dataset": "ml-100k", "epochs": 5, "patience": 5, "max_len": 50,
                     "monitor": "ndcg@10"},
        "space": {"lr": {"loguniform": [3e-4, 3e-3]}, "dropout": {"uniform": [0.2, 0.5], "also": ["attn_dropout"]},
                  "n_heads": {"choice": [1, 2]}, "n_layers": {"choice": [1, 2]},
                  "batch_size": {"choice": [64, 128, 256]}},
        "sweep": {"num_samples": 8, "search": "optuna", "scheduler": "asha", "grace_period": 2},
    },
    "ml1m": {
        "settings": {"model": "sasrec", "dataset": "ml-1m", "epochs": 3, "patience": 3, "max_len": 200,
                     "monitor": "ndcg@10"},
        "space": {"lr": {"loguniform": [3e-4, 3e-3]}, "dropout": {"uniform": [0.2, 0.5], "also": ["attn_dropout"]}},
        "sweep": {"num_samples": 2, "search": "random", "scheduler": "none"},
    },
}
CLOCK_FILE = "sweep_clock.json"  # the sweep's start and end, beside its store and runs
PHASES = ("train", "eval", "trial_startup", "worker_group_startup", "worker_setup", "checkpoint_reports",
          "run_records", "between_trials", "sweep_startup", "sweep_records")
PHASE_MEANING = {
    "train": "training steps (train_s of every epoch)",
    "eval": "validation every epoch and the test scoring at the end",
    "trial_startup": "run_training before the trainer: the store's snapshot, features, probe model (the splits are the sweep's)",
    "worker_group_startup": "trainer built -> train_loop entered on rank 0 (Ray Train's worker group, datasets)",
    "worker_setup": "train_loop entered -> first epoch (model, restore, DDP wrap)",
    "checkpoint_reports": "between epochs: the checkpoint write and ray.train.report",
    "run_records": "after the test scoring: the run's record in `runs` and Train's shutdown",
    "between_trials": "one trial's end -> the next one's run_training (Tune scheduling, trial launch)",
    "sweep_startup": "sweep start -> first trial's run_training (Ray, the store, the trials' splits, Tune's set-up)",
    "sweep_records": "last trial's end -> sweep end (Tune's shutdown, `sweeps`, leaderboard, plots)",
}


def reported(row: dict, key: str) -> bool:
    """Tune's table has a column for every key any report had: NaN where this one had none."""
    value = row.get(key)
    return value is not None and value == value


def trial_phases(rows: list[dict], finished_at: float | None) -> dict:
    """One trial's phases from its reports (epoch rows, then the final row once the run ended by itself)."""
    clocks = {row["run_started_at"] for row in rows}
    if len(clocks) != 1:
        raise RuntimeError("a trial restarted mid-sweep: its phases do not add up; run the benchmark again")
    first = rows[0]
    epochs = [row for row in rows if reported(row, "steps")]
    final = next((row for row in rows if reported(row, "scoring_started_at")), None)
    ends = [row["epoch_started_at"] + row["epoch_s"] for row in epochs]
    starts = [row["epoch_started_at"] for row in epochs[1:]] + ([final["scoring_started_at"]] if final else [])
    last_end = final["scoring_started_at"] + final["scoring_s"] if final else ends[-1]
    return {
        "epochs": len(epochs), "epochs_s": sum(row["epoch_s"] for row in epochs), "steps": int(epochs[-1]["total_steps"]), "stopped_by_asha": final is None,
        "started_at": first["run_started_at"], "ended_at": finished_at or last_end,
        "train": sum(row["train_s"] for row in epochs),
        "eval": sum(row["eval_s"] for row in epochs) + (final["scoring_s"] if final else 0.0),
        "trial_startup": first["trainer_built_at"] - first["run_started_at"],
        "worker_group_startup": first["worker_started_at"] - first["trainer_built_at"],
        "worker_setup": epochs[0]["epoch_started_at"] - first["worker_started_at"],
        "checkpoint_reports": sum(start - end for start, end in zip(starts, ends)),
        "run_records": (finished_at - last_end) if finished_at else 0.0,
    }


def case_settings(name: str, work: Path) -> dict:
    """The case's fixed training settings, with its own store and storage under `work`."""
    return CASES[name]["settings"] | {"db": str(work / "db"), "storage": str(work / "runs")}


def sweep_name(case: str) -> str:
    return f"overhead-{case}"


def run_case(name: str, work: Path) -> dict:
    case = CASES[name]
    settings = case_settings(name, work)
    started = time.time()
    result = run_sweep(settings, case["space"], SweepConfig(sweep_name=sweep_name(name), final_seeds=0,
                                                            max_concurrent=1, **case["sweep"]))
    ended = time.time()
    (work / CLOCK_FILE).write_text(json.dumps({"started": started, "ended": ended, "path": result.path}))
    return phases(name, work)


def phases(name: str, work: Path) -> dict:
    """The case's phases from the sweep in `work` (run_case's clock file, Tune's results, `runs`)."""
    import pandas as pd
    from ray import tune

    from featurestore import store
    from training.records import RUNS, read_runs

    case = CASES[name]
    settings = case_settings(name, work)
    clock = json.loads((work / CLOCK_FILE).read_text())
    started, ended = clock["started"], clock["ended"]
    db = store.connect(settings["db"])
    finished = read_runs(db).set_index("run_id") if RUNS in store.table_names(db) else pd.DataFrame()
    analysis = tune.ExperimentAnalysis(clock["path"])
    trials = []
    for trial_id, frame in analysis.trial_dataframes.items():
        run = run_id(sweep_name(name), trial_id)
        finished_at = finished.loc[run, "finished_at"].timestamp() if run in finished.index else None
        trials.append({"trial_id": trial_id} | trial_phases(frame.to_dict("records"), finished_at))
    trials.sort(key=lambda t: t["started_at"])
    totals = {phase: sum(t[phase] for t in trials) for phase in PHASES[:7]}
    totals["between_trials"] = sum(b["started_at"] - a["ended_at"] for a, b in zip(trials, trials[1:]))
    totals["sweep_startup"] = trials[0]["started_at"] - started
    totals["sweep_records"] = ended - trials[-1]["ended_at"]
    wall = ended - started
    trials_wall = trials[-1]["ended_at"] - trials[0]["started_at"]
    inside_epochs = sum(t["epochs_s"] for t in trials)  # training with each epoch's validation
    return {"case": name, "settings": settings, "space": case["space"], "sweep": case["sweep"], "wall_s": wall,
            "trials_wall_s": trials_wall, "phases_s": totals, "trials": trials,
            "outside_epochs_share": 1 - inside_epochs / trials_wall,
            "outside_epochs_share_of_sweep": 1 - inside_epochs / wall}


def table(results: list[dict]) -> str:
    lines = ["| phase | " + " | ".join(f"{r['case']} s | share" for r in results) + " | what it is |",
             "|---|" + "---|---|" * len(results) + "---|"]
    for phase in PHASES:
        cells = " | ".join(f"{r['phases_s'][phase]:.1f} | {r['phases_s'][phase] / r['wall_s']:.1%}" for r in results)
        lines.append(f"| {phase} | {cells} | {PHASE_MEANING[phase]} |")
    lines.append("| sweep wall | " + " | ".join(f"{r['wall_s']:.1f} | 100% " for r in results) + " | |")
    lines.append("| outside the epochs, first trial start -> last trial end | "
                 + " | ".join(f"{r['outside_epochs_share']:.1%} | " for r in results) + " | target <= 15 % (ml1m) |")
    lines.append("| outside the epochs, whole sweep | "
                 + " | ".join(f"{r['outside_epochs_share_of_sweep']:.1%} | " for r in results) + " | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=sorted(CASES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "tune_overhead.json")
    parser.add_argument("--work", type=Path, default=None, help="where the stores and sweeps go (default: a temp dir)")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="tune_overhead_") as scratch:
        for name in args.cases:
            results.append(run_case(name, (args.work or Path(scratch)) / name))
            print(table(results[-1:]), flush=True)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
