"""The study's runs beyond the sweeps: seeds of ablations and of the authors' protocol, through flows/train.py.

The sweeps (flows/tune.py, one per model and data set, named by sweep_name) train their best configuration
with seeds 1..N themselves; this trains, for each row of STUDY_ROWS, that configuration (the sweep's
`-final-seed1` run's settings) with the row's changes, or the row's own settings, with seeds 1..N:

    python bench/study_runs.py --db data/study/db --storage data/study/runs --dataset ml-100k --rows fame-E1 --seeds 3
    python bench/study_runs.py ... --dry-run      # the flows/train.py commands, nothing run
    python bench/study_runs.py ... --parallel 2   # two runs at once (a core each on 2 cores)

Each run is named study-<data set>-<row>-seed<N> and goes through flows/train.py in its own process: a finished
run is skipped, an interrupted one continues with --resume, so the command can be repeated until all are done.
bench/study_table.py reads them back from the store.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featurestore import store  # noqa: E402
from training.cli import argv_from  # noqa: E402
from training.records import RUNS, read_runs  # noqa: E402


TTQ_TARGET = 0.07  # validation NDCG@10 of time to quality (RecBole's SASRec peaks at 0.0719 on ML-100k)


@dataclass(frozen=True)
class StudyRow:
    """Runs of `model` with `changes` on top of the tuned configuration (base "tuned") or of the defaults."""

    key: str
    model: str
    protocol: str  # the table's protocol cell
    changes: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys, model hyper-parameters in model_config
    base: str = "tuned"  # "tuned": the sweep's best configuration; "defaults": the flow's defaults
    datasets: tuple[str, ...] = ("ml-100k",)  # the data sets the study runs it on
    kind: str = "study"  # "study": a row of study.md; "time to quality": bench/time_to_quality.py's


STUDY_ROWS = {row.key: row for row in [
    StudyRow("fame-E1", "fame", "ablation: one expert per head (no MoE)", {"model_config": {"n_experts": 1}}),
    StudyRow("fame-H1", "fame", "ablation: one head (no facets)", {"model_config": {"n_heads": 1}}),
    StudyRow("fame-H1-E1", "fame", "ablation: one head, one expert (neither)",
             {"model_config": {"n_heads": 1, "n_experts": 1}}),
    StudyRow("hm4sr-no-temporal", "hm4sr", "ablation: temporal MoE off", {"model_config": {"n_temporal_experts": 0}}),
    StudyRow("hm4sr-no-interactive", "hm4sr", "ablation: interactive MoE off",
             {"model_config": {"n_interactive_experts": 0}}),
    # the authors' Games configuration (L 50, last-item training, batch 1024, dropout 0.5, auxiliary weights 1)
    StudyRow("hm4sr-authors", "hm4sr", "authors' Games config", {
        "max_len": 50, "train_mode": "last", "batch_size": 1024, "model_config": {
            "modalities": ["id", "text"], "dropout": 0.5, "attn_dropout": 0.5, "cp_weight": 1.0, "idcl_weight": 1.0,
            "pcl_weight": 1.0}}, base="defaults", datasets=("ml-100k", "ml-1m")),
    # time to quality: the tuned configuration in each training mode, stopped once validation reaches the target
    *(StudyRow(f"ttq-{model}-{mode}", model, f"time to quality: train_mode {mode}",
               {"train_mode": mode, "stop_at": TTQ_TARGET}, kind="time to quality")
      for model in ("sasrec", "fame", "hm4sr") for mode in ("all", "last")),
]}
# the protocol every study run and sweep shares (the sweeps: flows/tune.py --max-len 50 --epochs 100 --patience 10
# --monitor ndcg@10); a "defaults" row starts from it
PROTOCOL = {"max_len": 50, "epochs": 100, "patience": 10, "monitor": "ndcg@10"}
# what a sweep's trial settings hold that a study run sets itself
RUN_OWN = ("name", "resume", "seed", "db", "dataset", "storage", "cpus_per_worker", "save_item_vectors", "save_plot")


def short_name(dataset: str) -> str:
    return dataset.replace("-", "")


def sweep_name(dataset: str, model: str) -> str:
    """The study's sweep of `model` on `dataset` (flows/tune.py --sweep-name)."""
    return f"study-{short_name(dataset)}-{model}"


def run_name(dataset: str, row: str, seed: int) -> str:
    return f"study-{short_name(dataset)}-{row}-seed{seed}"


def finished_runs(runs, names) -> list:
    """The records (rows of read_runs indexed by run_id) of the runs among `names` that finished, in order."""
    return [runs.loc[name] for name in names if name in runs.index and runs.loc[name].status == "finished"]


def tuned_settings(runs, dataset: str, model: str) -> dict:
    """The settings of the sweep's best configuration: its first final seed's, less what each run sets itself."""
    seed_run = f"{sweep_name(dataset, model)}-final-seed1"
    found = finished_runs(runs, [seed_run])
    if not found:
        raise SystemExit(f"error: no finished run {seed_run}: run the sweep {sweep_name(dataset, model)} first")
    settings = dict(found[0].config["settings"])
    return {key: value for key, value in settings.items() if key not in RUN_OWN}


def row_settings(row: StudyRow, runs, dataset: str) -> dict:
    base = tuned_settings(runs, dataset, row.model) if row.base == "tuned" else {"model": row.model, **PROTOCOL}
    changed = {**base, **{k: v for k, v in row.changes.items() if k != "model_config"}}
    changed["model_config"] = {**base.get("model_config", {}), **row.changes.get("model_config", {})}
    return changed


def commands(args) -> list[tuple[str, list[str], str]]:
    """(run name, flows/train.py argv, state: "done" | "resume" | "new") for every run of the chosen rows."""
    db = store.connect(args.db)
    runs = read_runs(db).set_index("run_id") if RUNS in store.table_names(db) else None
    if runs is None:
        raise SystemExit(f"error: {args.db} holds no runs: run the sweeps first")
    planned = []
    for key in args.rows:
        settings = row_settings(STUDY_ROWS[key], runs, args.dataset)
        for seed in range(1, args.seeds + 1):
            name = run_name(args.dataset, key, seed)
            state = ("done" if finished_runs(runs, [name])
                     else "resume" if (Path(args.storage) / name / "train_config.json").exists() else "new")
            run = {**settings, "name": name, "seed": seed, "db": args.db, "dataset": args.dataset,
                   "storage": args.storage, "save_item_vectors": False, "resume": state == "resume"}
            planned.append((name, argv_from(run), state))
    return planned


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--dataset", required=True, choices=["ml-100k", "ml-1m"])
    parser.add_argument("--rows", nargs="+", required=True, choices=list(STUDY_ROWS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once, each a flows/train.py process (its output in <storage>/<run>.log)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    pending = []
    for name, flags, state in commands(args):
        print(f"{name} ({state}): python flows/train.py {' '.join(flags)}", flush=True)
        if state != "done" and not args.dry_run:
            pending.append((name, [sys.executable, "flows/train.py", *flags]))
    failed = run_all(pending, max(args.parallel, 1), Path(args.storage))
    for name, code in failed:
        print(f"{name}: flows/train.py exited {code}; rerun this command to continue", flush=True)
    return 1 if failed else 0


def run_all(pending: list[tuple[str, list[str]]], parallel: int, logs: Path) -> list[tuple[str, int]]:
    """Run the commands, `parallel` at once, each one's output in logs/<name>.log; (name, exit status) of those
    that failed."""
    logs.mkdir(parents=True, exist_ok=True)

    def run(item: tuple[str, list[str]]) -> tuple[str, int]:
        name, command = item
        with open(logs / f"{name}.log", "ab") as log:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name}: exited {code}", flush=True)
        return name, code

    with ThreadPoolExecutor(parallel) as pool:
        return [(name, code) for name, code in pool.map(run, pending) if code]


if __name__ == "__main__":
    sys.exit(main())
