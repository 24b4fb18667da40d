"""What a sweep leaves behind: a row per trial in `sweeps`, a leaderboard, plots, and the final seeds' runs.

sweeps  one row per (sweep id, trial id): model, config JSON (the sampled values), status (finished: the run
        ended by its epochs, patience or time budget; stopped: ASHA stopped it; errored; unfinished: an
        interruption caught it running or pending), stop reason, epochs, optimizer steps, best validation metric,
        the validation curve, seconds (and when each epoch ran), the `runs` id of the trial, the sweep's settings JSON and the versions of
        the tables the sweep read. A trial that ASHA stops never reaches the end of run_training, so the sweep
        driver writes every row, from Tune's own results (which stay readable with tune.ExperimentAnalysis /
        ResultGrid): each trial's as it ends, all of them when the sweep ends.

The rows are the sweep's durable state: a sweep whose Tune directory is gone (another machine, a lost disk)
continues from them (tuning.sweep.carried_trials), so they hold what the searcher and ASHA need.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from featurestore import store
from ray import tune
from training.checkpoint import PROGRESS, Progress
from training.config import TrainConfig
from training.records import RUNS, now, read_runs
from training.run import RunDir
from tuning.space import searched_keys, trial_settings
from tuning.sweep import SweepResult, run_id, train_seeds, trials_storage

SWEEPS = "sweeps"
LEADERBOARD_FILE, TRIALS_PLOT, CURVES_PLOT, PARAMS_PLOT = ("leaderboard.md", "best_so_far.png", "learning_curves.png",
                                                          "metric_by_parameter.png")
LEADERBOARD_ROWS = 10
SWEEPS_SCHEMA = pa.schema([
    pa.field("sweep_id", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("model", pa.string()),
    pa.field("config", pa.string()),  # JSON: the trial's sampled values
    pa.field("status", pa.string()),  # finished | stopped | errored | unfinished
    pa.field("stop_reason", pa.string()),  # epochs | patience | time budget | ASHA | the error
    pa.field("epochs", pa.int32()),
    pa.field("steps", pa.int64()),
    pa.field("best_value", pa.float64()),  # the monitored validation metric, best epoch
    pa.field("curve", pa.string()),  # JSON: the monitored validation metric of every epoch (the run's record or
    # latest checkpoint; Tune's results only where there is neither)
    pa.field("time_s", pa.float64()),  # the trial's seconds: Tune's count, or its epochs' where more (below)
    pa.field("epoch_spans", pa.string()),  # JSON: [started at (Unix s), seconds] of each epoch of the curve
    pa.field("run_id", pa.string()),  # the trial's row in `runs` (runs live under the sweep's folder)
    pa.field("settings", pa.string()),  # JSON: the sweep's fixed training settings and its own settings
    pa.field("table_versions", pa.string()),  # JSON: the versions of items, interactions, sequences read
    pa.field("recorded_at", pa.timestamp("us", tz="UTC")),
    pa.field("reported_at", pa.timestamp("us", tz="UTC")),  # the trial's last report
])
LISTS = ("curve", "epoch_spans")  # a row's per-epoch lists, JSON in the table
STOPPED_BY = "stopped_by"  # in the last result of a trial that ASHA stopped: "ASHA"
DONE = ("finished", "stopped", "errored")  # the statuses of trials that will not run again (unless retried)


def trial_records(db, path: str, name: str, base: TrainConfig, sweep_settings: dict, versions: dict) -> list[dict]:
    """One record per trial of the Tune experiment in `path` (none if there is no experiment there)."""
    if not tune.Tuner.can_restore(path):
        return []
    analysis = tune.ExperimentAnalysis(path)
    finished = finished_runs(db)
    records = []
    for trial in analysis.trials:
        history = analysis.trial_dataframes.get(trial.trial_id)
        reports = [] if history is None else history.to_dict("records")
        records.append(trial_record(trial, trial.status, reports, finished.get(run_id(name, trial.trial_id)), name,
                                    base, sweep_settings, versions))
    return records


def finished_runs(db) -> dict:
    """run_id -> record of every finished run in `runs`."""
    if RUNS not in store.table_names(db):
        return {}
    runs = read_runs(db)
    return {row.run_id: row for row in runs[runs.status == "finished"].itertuples()}


def trial_record(trial, tune_status: str, reports: list[dict], run, name: str, base: TrainConfig,
                 sweep_settings: dict, versions: dict) -> dict:
    """A trial's row: `reports` are Tune's results of it in order, `run` its finished run's record or None.
    A trial finished when its run wrote its record (one that ASHA stops never gets that far)."""
    result = trial.last_result or {}
    progress = None
    if run is not None:  # the run's own history: whole, even when Tune restarted the trial after it finished
        epochs = run.epochs  # (it then only scored its test split)
    elif (progress := checkpointed_progress(trials_storage(base.storage, name), run_id(name, trial.trial_id))):
        epochs = progress.history  # Tune's results of a trial restored from a checkpoint start at the restore
    else:  # Tune's rows: the epochs it was told of, then the final report (which has no steps); a trial resumed
        # from an earlier checkpoint reports some epochs again, and the last report of an epoch stands
        told = {r["epoch"]: r for r in reports if r.get("steps") is not None and r["steps"] == r["steps"]}  # not NaN
        epochs = [told[epoch] for epoch in sorted(told)]
    monitored = [float(m[base.monitor_key]) for m in epochs]
    if tune_status == "ERROR":
        status, stop = "errored", error_text(trial)
    elif run is not None:
        status, stop = "finished", run.stop_reason
    elif tune_status == "TERMINATED":  # (before ASHALettingRunsEnd, ASHA could stop a run at its own last epoch)
        ended = progress.stop_reason if progress else epochs[-1].get("stop_reason") if epochs else None
        stop = stopped_by(result, sweep_settings)
        status, stop = "stopped", f"{stop}, at its run's last epoch ({ended})" if isinstance(ended, str) else stop
    else:
        status, stop = "unfinished", None
    timestamp = result.get("timestamp")
    return {
        "sweep_id": name, "trial_id": trial.trial_id, "model": base.model,
        "config": json.dumps(trial.config, sort_keys=True), "status": status, "stop_reason": stop,
        "epochs": len(monitored), "steps": int(epochs[-1]["total_steps"]) if epochs else 0,
        "best_value": float(max(monitored)) if monitored else None, "curve": monitored,
        "run_id": run_id(name, trial.trial_id),
        # Tune's clock restarts when it restores a trial; the epochs' own seconds span the restores
        "time_s": max(float(result.get("time_total_s") or 0.0), sum(float(m.get("epoch_s") or 0.0) for m in epochs)),
        "epoch_spans": [[m.get("epoch_started_at"), m.get("epoch_s")] for m in epochs],
        "settings": json.dumps(sweep_settings, sort_keys=True, default=str),
        "table_versions": json.dumps(versions), "recorded_at": now(), "params": trial.config,
        "reported_at": datetime.fromtimestamp(timestamp, timezone.utc) if timestamp else None,
    }


def checkpointed_progress(storage: str, name: str) -> Progress | None:
    """The progress (every epoch's metrics, the stop) in the latest checkpoint of run `name`, or None."""
    latest = RunDir(storage, name).latest_checkpoint()
    if latest is None:
        return None
    with latest.filesystem.open_input_stream(f"{latest.path}/{PROGRESS}") as stream:  # not the weights
        return Progress(**json.loads(stream.read()))


def stopped_by(result: dict, sweep_settings: dict) -> str:
    """What stopped a trial that Tune ended before its run did (its last result `result`): ASHA, whose stops
    are marked in the trial's last result (tuning.sweep.TrialEnds), or else the sweep's time budget. In a sweep
    with ASHA and no time budget that is ASHA even unmarked (trials from before the mark)."""
    sweep = sweep_settings.get("sweep") or {}
    if result.get(STOPPED_BY) == "ASHA" or (sweep.get("scheduler") == "asha" and not sweep.get("sweep_time_budget_s")):
        return "ASHA"
    return "sweep time budget"


def trial_reports(trial) -> list[dict]:
    """Tune's results of a live trial so far, from the result.json its JSON logger flushes after each."""
    path = Path(trial.local_path or "") / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def error_text(trial) -> str:
    """The last line of a trial's error (the model's or the settings' message), as Tune stored it."""
    error = trial.get_error()
    text = str(error) if error is not None else "error"
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:2000]


def write_sweep(db, name: str, records: list[dict]) -> None:
    """The sweep's rows as its trials stand: a trial Tune restarted from scratch (--retry-errored) has a new
    trial id, and the row of the attempt it replaced goes in the same commit."""
    store.add_missing_fields(db, SWEEPS, SWEEPS_SCHEMA)
    store.upsert(db, SWEEPS, sweep_rows(records), ["sweep_id", "trial_id"],
                 replaces=f"sweep_id = {store.sql_string(name)}")


def write_trial(db, record: dict) -> None:
    """One trial's row, as it ends (the sweep's others stay)."""
    store.add_missing_fields(db, SWEEPS, SWEEPS_SCHEMA)
    store.upsert(db, SWEEPS, sweep_rows([record]), ["sweep_id", "trial_id"])


def sweep_rows(records: list[dict]) -> pa.Table:
    rows = [{f.name: record.get(f.name) for f in SWEEPS_SCHEMA} | {k: json.dumps(record.get(k, [])) for k in LISTS}
            for record in records]
    return pa.Table.from_pylist(rows, schema=SWEEPS_SCHEMA)


def recorded_trials(db, name: str) -> list[dict]:
    """The sweep's rows in `sweeps` as records (params and curve decoded), in the order the trials reported."""
    table = store.open_table(db, SWEEPS, required=False)
    if table is None or "curve" not in table.schema.names:  # a table from before curves: nothing to continue
        return []
    rows = store.read_columns(db, SWEEPS, where=f"sweep_id = {store.sql_string(name)}").to_pylist()
    for row in rows:
        row |= {"params": json.loads(row["config"])} | {k: json.loads(row.get(k) or "[]") for k in LISTS}
    return sorted(rows, key=by_last_report)


def by_last_report(record: dict) -> tuple:
    """Sort key: trials in the order of their last reports, those without one last."""
    return record["reported_at"] is None, record["reported_at"] or now()


def leaderboard(records: list[dict], keys: list[str], monitor_key: str) -> str:
    """Markdown: the top trials by the monitored metric, with their searched values."""
    ranked = sorted((r for r in records if r["best_value"] is not None), key=lambda r: -r["best_value"])
    lines = [f"| rank | trial | {monitor_key} | status | stop | epochs | steps | " + " | ".join(keys) + " |",
             "|" + "---|" * (7 + len(keys))]
    for rank, r in enumerate(ranked[:LEADERBOARD_ROWS], 1):
        values = " | ".join(format_value(r["params"].get(k, r["params"].get(f"{k}__value"))) for k in keys)
        lines.append(f"| {rank} | {r['trial_id']} | {r['best_value']:.4f} | {r['status']} | {r['stop_reason']} | "
                     f"{r['epochs']} | {r['steps']} | {values} |")
    errored = [r for r in records if r["status"] == "errored"]
    lines += [f"\nerrored: trial {r['trial_id']}: {r['stop_reason']}" for r in errored]
    return "\n".join(lines)


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plots(records: list[dict], space: dict, monitor_key: str) -> dict[str, bytes]:
    """PNG bytes: best-so-far metric over sweep time, every trial's learning curve (stopped ones dashed and
    grey), and the metric against each searched hyper-parameter (log-uniform ones on a log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(figure) -> bytes:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        return buffer.getvalue()

    scored = [r for r in records if r["best_value"] is not None]
    figure, axis = plt.subplots(figsize=(6, 4))
    # by trial, not by wall time: a sweep continued on another day or machine has one axis still
    order = sorted(scored, key=by_last_report)
    axis.step(range(1, len(order) + 1), np.maximum.accumulate([r["best_value"] for r in order]), where="post",
              marker=".")
    axis.set(xlabel="trials, in the order they last reported", ylabel=f"best {monitor_key} so far")
    best_so_far = png(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    for r in records:
        stopped = r["status"] != "finished"
        axis.plot(range(1, len(r["curve"]) + 1), r["curve"], linestyle="--" if stopped else "-",
                  color="0.6" if stopped else None, linewidth=1)
    axis.set(xlabel="epoch", ylabel=monitor_key, title="finished (colour) and stopped (grey, dashed) trials")
    curves = png(figure)

    keys = searched_keys(space)
    figure, axes = plt.subplots(1, max(len(keys), 1), figsize=(3 * max(len(keys), 1), 3), squeeze=False)
    for axis, key in zip(axes[0], keys):
        values = [r["params"].get(key, r["params"].get(f"{key}__value")) for r in scored]
        axis.scatter([str(v) if isinstance(v, str) else v for v in values], [r["best_value"] for r in scored], s=12)
        axis.set(xlabel=key, ylabel=monitor_key)
        if "loguniform" in space[key] and space[key].get("zero"):  # its zeros on a linear stretch below the range
            axis.set_xscale("symlog", linthresh=float(space[key]["loguniform"][0]))
        elif "loguniform" in space[key]:
            axis.set_xscale("log")
    by_parameter = png(figure)
    return {TRIALS_PLOT: best_so_far, CURVES_PLOT: curves, PARAMS_PLOT: by_parameter}


def best_trial(records: list[dict]) -> dict | None:
    """The record with the best validation value (None if no trial got one)."""
    scored = [r for r in records if r["best_value"] is not None]
    return max(scored, key=lambda r: r["best_value"]) if scored else None


def final_seed_settings(best: dict, trial_base: dict, space: dict, seeds: int, name: str) -> dict[int, dict]:
    """Seed -> the run settings of that final seed of the best configuration."""
    return {seed: trial_settings(trial_base, best["params"], space) | {
        "seed": seed, "name": f"{name}-final-seed{seed}", "save_item_vectors": seed == 1, "save_plot": True}
        for seed in range(1, seeds + 1)}


def untrained_seeds(done: dict, planned: dict[int, dict], trial_base: dict) -> dict[int, dict]:
    """The `planned` final seeds without a finished run (`done`: finished_runs) of these settings."""
    def trained(settings: dict) -> bool:
        run = done.get(settings["name"])
        return run is not None and same_settings(run.config["settings"], settings, trial_base)

    return {seed: settings for seed, settings in planned.items() if not trained(settings)}


def final_seeds(db, best: dict, trial_base: dict, space: dict, seeds: int, name: str, splits: dict,
                concurrent: int, path: str) -> dict:
    """The best configuration trained again with seeds 1..N to early stopping (the same seeds for every model,
    so comparisons pair), on the sweep's splits, `concurrent` at once as the trials ran (a Tune experiment in
    `path`, the sweep's folder); the test metrics' mean and std, ranked and masked. Seed 1 writes the item
    vectors. A seed whose run finished already (in `runs`, with these settings) is not trained again."""
    planned = final_seed_settings(best, trial_base, space, seeds, name)
    done = finished_runs(db)
    todo = untrained_seeds(done, planned, trial_base)
    for seed, settings in planned.items():
        if seed not in todo:
            print(f"{settings['name']}: finished already, not trained again", flush=True)
        elif settings["name"] in done:  # a seed of an earlier best configuration: its run makes way
            print(f"{settings['name']}: trained again, with the best configuration's settings", flush=True)
            stale = RunDir(settings["storage"], settings["name"])
            stale.fs.delete_dir_contents(stale.path, missing_dir_ok=True)
    errors = train_seeds(todo, splits, concurrent, path) if todo else []
    done = finished_runs(db)
    missing = [settings["name"] for settings in untrained_seeds(done, planned, trial_base).values()]
    if missing or errors:
        raise RuntimeError(f"final seed run(s) {', '.join(missing)} did not finish: " + "; ".join(errors))
    tests = {settings["name"]: done[settings["name"]].test_metrics for settings in planned.values()}
    return {"seeds": list(planned), "runs": list(tests), **seed_summary(list(tests.values()))}


def seed_summary(tests: list[dict]) -> dict[str, float]:
    """Each test metric's mean over the seeds' runs and its sample standard deviation (0 for one seed)."""
    metrics = sorted(tests[0])
    return {**{f"{m}_mean": float(np.mean([t[m] for t in tests])) for m in metrics},
            **{f"{m}_std": float(np.std([t[m] for t in tests], ddof=1)) if len(tests) > 1 else 0.0
               for m in metrics}}


def same_settings(recorded: dict, settings: dict, trial_base: dict) -> bool:
    """Whether a run's recorded settings hold the values `settings` sets on top of the sweep's fixed ones (a
    final seed of an earlier best configuration does not)."""
    def plain(value):  # as the JSON record holds it
        return json.loads(json.dumps(value))

    return all(plain(recorded.get(key)) == plain(value) for key, value in settings.items()
               if key != "name" and trial_base.get(key) != value)


def table_versions(db) -> dict[str, int]:
    """The versions of the tables a sweep's trials read, kept in its rows."""
    return {table: int(store.open_table(db, table).version) for table in ("items", "interactions", "sequences")}


def finish_sweep(db, name: str, base: TrainConfig, trial_base: dict, space: dict, sweep, carried: list[dict],
                 versions: dict, wall_s: float, splits: dict, concurrent: int):
    """Records, leaderboard and plots from the finished sweep (the trials `carried` over from the rows of an
    earlier Tune experiment and those of this one, `versions` those of the tables they read), then the final seeds."""
    run_dir = RunDir(base.storage, name)
    records = carried + trial_records(db, run_dir.uri, name, base, sweep_record_settings(base, sweep, space), versions)
    write_sweep(db, name, records)
    keys = searched_keys(space)
    board = leaderboard(records, keys, base.monitor_key)
    files = [run_dir.write_bytes(LEADERBOARD_FILE, f"# Sweep {name}\n\n{board}\n".encode())]
    files += [run_dir.write_bytes(filename, data) for filename, data in plots(records, space, base.monitor_key).items()]
    best = best_trial(records)
    final = None
    unfinished = unfinished_trials(records)
    if unfinished:  # interrupted (Ctrl-C): the best so far is not the sweep's best, so no final seeds yet
        print(f"sweep {name} interrupted with {len(unfinished)} trial(s) unfinished; continue it with "
              f"--sweep-resume --sweep-name {name}", flush=True)
    elif best is not None and sweep.final_seeds:
        final = final_seeds(db, best, trial_base, space, sweep.final_seeds, name, splits, concurrent, run_dir.uri)
        files.append(run_dir.write_bytes("final_seeds.json", json.dumps(final, indent=1).encode()))
    return SweepResult(name=name, path=run_dir.uri, leaderboard=board, best=best, final=final, files=files,
                       wall_time_s=wall_s, unfinished=len(unfinished))


def sweep_record_settings(base: TrainConfig, sweep, space: dict) -> dict:
    """What a sweep's rows keep of its settings: the fixed training settings, the sweep's own and the space."""
    return {"training": base.to_dict(), "sweep": asdict(sweep), "space": dict(space)}


def unfinished_trials(records: list[dict]) -> list[str]:
    """The ids of trials Tune left running or pending: the sweep was interrupted, --sweep-resume runs them."""
    return [r["trial_id"] for r in records if r["status"] == "unfinished"]
