"""The study's state in the repository: its store's `runs` and `sweeps` rows, its runs' test ranks, and its
storage folder's sweeps and runs in flight.

A machine's disk may not outlive the session that ran the study, and the study takes many sessions; the
repository outlives them. `export` writes what the study's store holds to a folder of JSON lines and CSV files,
and a copy of the storage folder (`storage/`): every sweep's Tune directory, and each run with the weights of
its latest checkpoint while the run is in flight (a run that finished, or a trial Tune ended, keeps its
settings and progress only). `load` puts the rows into the store of a fresh machine and the copy into its
storage folder, so bench/study.sh continues there as if the disk had survived: Tune restores each sweep and
resumes the trials that were running from their last epoch's checkpoint (without the copy a sweep continues
from its rows in `sweeps`, and its trials in flight start anew). A trial in the last-mode HM4SR corner can
outlast a session; this is what lets it finish. bench/study_table.py rebuilds the table from the rows.

    python bench/study_ledger.py export --db data/study/db --storage data/study/runs
    python bench/study_ledger.py load --db data/study/db --storage data/study/runs

The rows write the store's and the storage's own paths as ${db} and ${storage}, so the ledger loads anywhere;
Tune moves a restored sweep to where its directory now is, and a resumed run takes the storage and store it is
given. Test ranks are kept for the runs the table pairs (every run that is not a sweep's trial). The copy
holds Tune's own pickles (the tuner, the searcher's state): the study's files, loaded by the study alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featurestore import store  # noqa: E402
from training.records import RUNS, RUNS_SCHEMA  # noqa: E402
from training.checkpoint import BEST_MODEL, MODEL, OPTIMIZER  # noqa: E402
from training.run import SETTINGS_FILE, TEST_RANKS, RunDir  # noqa: E402
from tuning.records import SWEEPS, SWEEPS_SCHEMA  # noqa: E402

LEDGER = REPO / "bench" / "results" / "study" / "ledger"
TABLES = {RUNS: (RUNS_SCHEMA, ["run_id"]), SWEEPS: (SWEEPS_SCHEMA, ["sweep_id", "trial_id"])}
# the columns that date a row, the first set one counting: of two versions of a row the later one stands
WRITTEN = {RUNS: ["finished_at", "started_at"], SWEEPS: ["recorded_at"]}
RANKS = "test_ranks"
STORAGE = "storage"  # the ledger's copy of the storage folder
WEIGHTS = {MODEL, BEST_MODEL, OPTIMIZER}  # what a checkpoint holds beside its settings and progress
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints
ENDED = ("TERMINATED", "ERROR")  # Tune's statuses of trials a restore does not run again


def places(db_uri: str, storage: str) -> dict[str, str]:
    """Placeholder -> this machine's path, the longer first (storage may lie inside the store's folder)."""
    found = {"${db}": str(Path(db_uri).resolve()), "${storage}": RunDir(storage, "").storage}
    return dict(sorted(found.items(), key=lambda item: -len(item[1])))


def portable(value, paths: dict[str, str]):
    """A row value as the ledger writes it: timestamps in ISO form, this machine's paths as placeholders."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        for placeholder, path in paths.items():
            value = value.replace(path, placeholder)
    return value


def local(value, field: pa.Field, paths: dict[str, str]):
    """The inverse of portable, for a field of the table's schema."""
    if value is not None and pa.types.is_timestamp(field.type):
        return datetime.fromisoformat(value)
    if isinstance(value, str):
        for placeholder, path in paths.items():
            value = value.replace(placeholder, path)
    return value


def export(db_uri: str, storage: str, ledger: Path) -> dict[str, int]:
    """Write the store's runs and sweeps rows and the paired runs' test ranks under `ledger`; the counts."""
    db, paths = store.connect(db_uri), places(db_uri, storage)
    counts, tables = {}, {}
    for name, (schema, keys) in TABLES.items():
        rows = tables[name] = store.read_columns(db, name).to_pylist() if name in store.table_names(db) else []
        rows.sort(key=lambda row: [row[key] for key in keys])
        ledger.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({k: portable(row.get(k), paths) for k in schema.names}, sort_keys=True) for row in rows]
        (ledger / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
        counts[name] = len(rows)
    trial_runs = {row["run_id"] for row in tables[SWEEPS]}
    counts[RANKS] = 0
    for run in tables[RUNS]:
        if run["status"] != "finished" or run["run_id"] in trial_runs:
            continue
        try:
            ranks = RunDir(run["run_dir"].rsplit("/", 1)[0], run["run_id"]).read_test_ranks(int(run["num_workers"]))
        except FileNotFoundError:  # a run from before test ranks were written
            continue
        (ledger / RANKS).mkdir(exist_ok=True)
        pacsv.write_csv(ranks, ledger / RANKS / f"{run['run_id']}.csv")
        counts[RANKS] += 1
    # after the rows: a run that finishes meanwhile is copied with its weights, as one in flight
    finished = {row["run_id"] for row in tables[RUNS] if row["status"] == "finished"}
    counts[STORAGE] = copy_storage(Path(RunDir(storage, "").storage), ledger / STORAGE, finished)
    return counts


def copy_storage(storage: Path, target: Path, finished: set[str]) -> int:
    """A copy of the storage folder under `target` (replaced whole): Tune's files, and of each run its files
    and the checkpoints its Ray Train snapshot names, whose weights only while the run is in flight (not
    finished in `runs`, nor a trial its sweep's Tune state ended); not its test ranks (kept as CSV). The count
    of files copied."""
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    runs = []  # the run folders: copied once the Tune state that decides their weights is
    for folder, folders, files in os.walk(storage):
        folder = Path(folder)
        if (folder / SETTINGS_FILE).exists():
            runs.append(folder)
            folders.clear()
            continue
        folders[:] = [name for name in folders if name != TEST_RANKS]
        for name in files:
            copy = staging / folder.relative_to(storage) / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, copy)
    ended = ended_trial_runs(staging)
    for source in runs:
        copy = staging / source.relative_to(storage)
        copy_run(source, copy, weights=source.name not in finished and copy not in ended)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return sum(1 for path in target.rglob("*") if path.is_file())


def ended_trial_runs(storage: Path) -> set[Path]:
    """The run folders (under `storage`) of the trials each sweep's Tune state there holds as ended."""
    from ray import tune

    from tuning.sweep import run_id, trials_storage

    ended = set()
    for state in storage.rglob("tuner.pkl"):
        sweep = state.parent
        for trial in tune.ExperimentAnalysis(str(sweep)).trials:
            if trial.status in ENDED:
                ended.add(Path(trials_storage(str(sweep.parent), sweep.name)) / run_id(sweep.name, trial.trial_id))
    return ended


def copy_run(source: Path, copy: Path, weights: bool, attempts: int = 5) -> None:
    """A run folder: its files and the checkpoints its Ray Train snapshot names, the latest with its weights if
    `weights`. The run may write a checkpoint meanwhile and drop the one before: then again, from the new
    snapshot."""
    for _ in range(attempts):
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir(parents=True)
        try:
            for path in source.iterdir():  # the snapshot before the checkpoints it names
                if path.is_file():
                    shutil.copy2(path, copy / path.name)
            snapshot = json.loads((copy / SNAPSHOT).read_text()) if (copy / SNAPSHOT).exists() else {}
            latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            for name in [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]:
                # the latest checkpoint holds the best weights too: a resumed run needs no other's
                kept = weights and name == latest
                shutil.copytree(source / name, copy / name,
                                ignore=lambda folder, files, kept=kept: [] if kept else [f for f in files if f in WEIGHTS])
            return
        except FileNotFoundError:  # a checkpoint removed as we copied: its successor is in the snapshot now
            continue
    raise RuntimeError(f"{source}: its checkpoints kept changing while it was copied")


def load(db_uri: str, storage: str, ledger: Path) -> dict[str, int]:
    """Put the ledger's rows into the store where the store lacks them or holds an older version (a row dated
    later in the store, or not dated at all, stays: that store went on from the ledger), its copy of the
    storage folder where that lacks them, and the runs' test ranks beside the runs; the counts of what was
    loaded."""
    db, paths = store.connect(db_uri), places(db_uri, storage)
    counts, loaded_runs = {}, {}
    for name, (schema, keys) in TABLES.items():
        source = ledger / f"{name}.jsonl"
        lines = [json.loads(line) for line in source.read_text().splitlines()] if source.exists() else []
        held = ({tuple(row[k] for k in keys): written(row, name)
                 for row in store.read_columns(db, name, keys + WRITTEN[name]).to_pylist()}
                if name in store.table_names(db) else {})
        rows = [{f.name: local(line.get(f.name), f, paths) for f in schema} for line in lines]
        rows = [row for row in rows if newer(written(row, name), held, tuple(row[k] for k in keys))]
        if rows:
            store.add_missing_fields(db, name, schema)
            store.upsert(db, name, pa.Table.from_pylist(rows, schema=schema), keys)
        counts[name] = len(rows)
        if name == RUNS:
            loaded_runs = {row["run_id"]: row for row in rows}
    counts[STORAGE] = load_storage(ledger / STORAGE, Path(RunDir(storage, "").storage))  # the ranks go in its runs
    files = [path for path in sorted((ledger / RANKS).glob("*.csv")) if path.stem in loaded_runs]
    for path in files:
        run = loaded_runs[path.stem]
        ranks, workers = pacsv.read_csv(path), int(run["num_workers"])
        run_dir = RunDir(run["run_dir"].rsplit("/", 1)[0], run["run_id"])
        for rank, rows in enumerate(np.array_split(np.arange(ranks.num_rows), workers)):  # as the workers wrote
            part = ranks.take(rows)
            run_dir.write_test_ranks({name: part[name].to_numpy() for name in part.column_names}, rank, workers)
    counts[RANKS] = len(files)
    return counts


def load_storage(copy: Path, storage: Path) -> int:
    """The ledger's copy of the storage folder, each sweep and run of it that `storage` does not hold yet (one
    it holds went on from there, or was never lost); the count of folders put there."""
    if not copy.is_dir():
        return 0
    storage.mkdir(parents=True, exist_ok=True)
    missing = [entry for entry in sorted(copy.iterdir()) if not (storage / entry.name).exists()]
    for entry in missing:
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, storage / entry.name)
    return len(missing)


def written(row: dict, table: str) -> datetime | None:
    return next((row[column] for column in WRITTEN[table] if row.get(column) is not None), None)


def newer(stamp: datetime | None, held: dict, key: tuple) -> bool:
    """Whether a ledger row dated `stamp` goes into a store that holds `held` (key -> date)."""
    if key not in held:
        return True
    return stamp is not None and held[key] is not None and stamp > held[key]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["export", "load"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--storage", required=True)
    parser.add_argument("--ledger", type=Path, default=LEDGER)
    args = parser.parse_args(argv)
    counts = (export if args.action == "export" else load)(args.db, args.storage, args.ledger)
    print(f"{args.action}: " + ", ".join(f"{n} {name}" for name, n in counts.items()) + f" ({args.ledger})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
