"""The study's store as text in the repository: its `runs` and `sweeps` rows and its runs' test ranks.

A machine's disk may not outlive the session that ran the study, and the study takes many sessions; the
repository outlives them. `export` writes what the study's store holds to a folder of JSON lines and CSV files,
committed beside the results; `load` puts it into the store of a fresh machine. bench/study.sh then continues
(a sweep from its rows in `sweeps`, flows/tune.py --sweep-resume; finished runs are skipped) and
bench/study_table.py rebuilds the table from it.

    python bench/study_ledger.py export --db data/study/db --storage data/study/runs
    python bench/study_ledger.py load --db data/study/db --storage data/study/runs

The store's and the storage's own paths are written as ${db} and ${storage}, so the ledger loads anywhere.
Test ranks are kept for the runs the table pairs (every run that is not a sweep's trial).
"""
from __future__ import annotations

import argparse
import json
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
from training.run import RunDir  # noqa: E402
from tuning.records import SWEEPS, SWEEPS_SCHEMA  # noqa: E402

LEDGER = REPO / "bench" / "results" / "study" / "ledger"
TABLES = {RUNS: (RUNS_SCHEMA, ["run_id"]), SWEEPS: (SWEEPS_SCHEMA, ["sweep_id", "trial_id"])}
# the columns that date a row, the first set one counting: of two versions of a row the later one stands
WRITTEN = {RUNS: ["finished_at", "started_at"], SWEEPS: ["recorded_at"]}
RANKS = "test_ranks"


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
    return counts


def load(db_uri: str, storage: str, ledger: Path) -> dict[str, int]:
    """Put the ledger's rows into the store where the store lacks them or holds an older version (a row dated
    later in the store, or not dated at all, stays: that store went on from the ledger), and their runs' test
    ranks beside the runs; the counts of what was loaded."""
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
