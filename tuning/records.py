"""What a sweep leaves behind: a row per trial in `sweeps`, a leaderboard, plots, and the final seeds' runs.

sweeps  one row per (sweep id, trial id): model, config JSON (the sampled values), status (finished: the run
        ended by its epochs, patience or time budget; stopped: ASHA stopped it; errored), stop reason, epochs,
        optimizer steps, best validation metric, seconds, the `runs` id of the trial, the sweep's settings JSON and the
        versions of the tables the sweep read. A trial that ASHA stops never reaches the end of run_training,
        so the sweep driver writes every row, from Tune's own results (which stay readable with
        tune.ExperimentAnalysis / ResultGrid).
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from featurestore import store
from ray import tune
from training import run_training
from training.config import TrainConfig
from training.records import RUNS, now, read_runs
from training.run import RunDir
from tuning.space import searched_keys, trial_settings
from tuning.sweep import SweepResult, continuing, run_id

SWEEPS = "sweeps"
LEADERBOARD_FILE, TRIALS_PLOT, CURVES_PLOT, PARAMS_PLOT = ("leaderboard.md", "best_so_far.png", "learning_curves.png",
                                                          "metric_by_parameter.png")
LEADERBOARD_ROWS = 10
SWEEPS_SCHEMA = pa.schema([
    pa.field("sweep_id", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("model", pa.string()),
    pa.field("config", pa.string()),  # JSON: the trial's sampled values
    pa.field("status", pa.string()),  # finished | stopped | errored
    pa.field("stop_reason", pa.string()),  # epochs | patience | time budget | ASHA | the error
    pa.field("epochs", pa.int32()),
    pa.field("steps", pa.int64()),
    pa.field("best_value", pa.float64()),  # the monitored validation metric, best epoch
    pa.field("time_s", pa.float64()),  # the trial's seconds as Tune counted them (a resumed trial's in total)
    pa.field("run_id", pa.string()),  # the trial's row in `runs` (runs live under the sweep's folder)
    pa.field("settings", pa.string()),  # JSON: the sweep's fixed training settings and its own settings
    pa.field("table_versions", pa.string()),  # JSON: the versions of items, interactions, sequences read
    pa.field("recorded_at", pa.timestamp("us", tz="UTC")),
])


def trial_records(db, path: str, name: str, base: TrainConfig, sweep_settings: dict, versions: dict) -> list[dict]:
    """One record per trial from Tune's results in `path`; a trial finished when its run wrote its record
    (one that ASHA stopped never gets that far)."""
    analysis = tune.ExperimentAnalysis(path)
    finished = read_runs(db).set_index("run_id") if RUNS in store.table_names(db) else None
    records = []
    for trial in analysis.trials:
        run = run_id(name, trial.trial_id)
        record = None if finished is None or run not in finished.index else finished.loc[run]
        result = trial.last_result or {}
        if record is not None and record.status == "finished":  # the run's own history: whole, even when Tune
            epochs = record.epochs  # restarted the trial after it finished (it then only scored its test split)
        else:  # Tune's rows: the epochs it was told of, then the final report (which has no steps)
            history = analysis.trial_dataframes.get(trial.trial_id)
            epochs = ([] if history is None or "steps" not in history
                      else history[history["steps"].notna()].to_dict("records"))
        monitored = [float(m[base.monitor_key]) for m in epochs]
        if trial.status == "ERROR":
            status, stop = "errored", error_text(trial)
        elif record is not None and record.status == "finished":
            status, stop = "finished", record.stop_reason
        else:
            status, stop = "stopped", "ASHA"
        records.append({
            "sweep_id": name, "trial_id": trial.trial_id, "model": base.model,
            "config": json.dumps(trial.config, sort_keys=True), "status": status, "stop_reason": stop,
            "epochs": len(monitored), "steps": int(epochs[-1]["total_steps"]) if epochs else 0,
            "best_value": float(max(monitored)) if len(monitored) else None, "run_id": run,
            "time_s": float(result.get("time_total_s") or 0.0),
            "settings": json.dumps(sweep_settings, sort_keys=True, default=str),
            "table_versions": json.dumps(versions), "recorded_at": now(), "curve": monitored,
            "reported_at": float(result.get("timestamp") or 0.0), "params": trial.config,
            "started_at": float(result.get("timestamp") or 0.0) - float(result.get("time_total_s") or 0.0),
            "tune_status": trial.status,
        })
    return records


def error_text(trial) -> str:
    """The last line of a trial's error (the model's or the settings' message), as Tune stored it."""
    error = trial.get_error()
    text = str(error) if error is not None else "error"
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:2000]


def write_sweep(db, name: str, records: list[dict]) -> None:
    """The sweep's rows as its trials stand: a trial Tune restarted from scratch (--retry-errored) has a new
    trial id, and the row of the attempt it replaced goes in the same commit."""
    rows = [{f.name: record.get(f.name) for f in SWEEPS_SCHEMA} for record in records]
    store.add_missing_fields(db, SWEEPS, SWEEPS_SCHEMA)
    store.upsert(db, SWEEPS, pa.Table.from_pylist(rows, schema=SWEEPS_SCHEMA), ["sweep_id", "trial_id"],
                 replaces=f"sweep_id = {store.sql_string(name)}")


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
    order = sorted(scored, key=lambda r: r["reported_at"])
    sweep_start = min((r["started_at"] for r in records), default=0.0)
    axis.step([(r["reported_at"] - sweep_start) / 60 for r in order],
              np.maximum.accumulate([r["best_value"] for r in order]), where="post", marker=".")
    axis.set(xlabel="sweep time (minutes, at each trial's last report)", ylabel=f"best {monitor_key} so far")
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


def final_seeds(best: dict, trial_base: dict, space: dict, seeds: int, name: str, splits: dict) -> dict:
    """The best configuration trained again with seeds 1..N to early stopping (the same seeds for every model,
    so comparisons pair), on the sweep's splits; the test metrics' mean and std, ranked and masked. Seed 1
    writes the item vectors."""
    runs = []
    for seed in range(1, seeds + 1):
        settings = trial_settings(trial_base, best["params"], space) | {
            "seed": seed, "name": f"{name}-final-seed{seed}", "save_item_vectors": seed == 1, "save_plot": True}
        result = run_training(continuing(settings), shared_splits=splits)
        print("\n".join(result.lines()), flush=True)
        runs.append(result)
    metrics = sorted(runs[0].test)
    return {"seeds": list(range(1, seeds + 1)), "runs": [r.run_id for r in runs],
            **{f"{m}_mean": float(np.mean([r.test[m] for r in runs])) for m in metrics},
            **{f"{m}_std": float(np.std([r.test[m] for r in runs], ddof=1)) if seeds > 1 else 0.0 for m in metrics}}


def finish_sweep(db, name: str, base: TrainConfig, trial_base: dict, space: dict, sweep, grid, wall_s: float,
                 splits: dict):
    """Records, leaderboard and plots from the finished sweep, then the final seeds."""
    run_dir = RunDir(base.storage, name)
    versions = {table: int(store.open_table(db, table).version) for table in ("items", "interactions", "sequences")}
    sweep_settings = {"training": base.to_dict(), "sweep": asdict(sweep)}
    records = trial_records(db, run_dir.uri, name, base, sweep_settings, versions)
    write_sweep(db, name, records)
    keys = searched_keys(space)
    board = leaderboard(records, keys, base.monitor_key)
    files = [run_dir.write_bytes(LEADERBOARD_FILE, f"# Sweep {name}\n\n{board}\n".encode())]
    files += [run_dir.write_bytes(filename, data) for filename, data in plots(records, space, base.monitor_key).items()]
    scored = [r for r in records if r["best_value"] is not None]
    best = max(scored, key=lambda r: r["best_value"]) if scored else None
    final = None
    unfinished = unfinished_trials(records)
    if unfinished:  # interrupted (Ctrl-C): the best so far is not the sweep's best, so no final seeds yet
        print(f"sweep {name} interrupted with {len(unfinished)} trial(s) unfinished; continue it with "
              f"--sweep-resume --sweep-name {name}", flush=True)
    elif best is not None and sweep.final_seeds:
        final = final_seeds(best, trial_base, space, sweep.final_seeds, name, splits)
        files.append(run_dir.write_bytes("final_seeds.json", json.dumps(final, indent=1).encode()))
    return SweepResult(name=name, path=run_dir.uri, leaderboard=board, best=best, final=final, files=files,
                       wall_time_s=wall_s, unfinished=len(unfinished))


def unfinished_trials(records: list[dict]) -> list[str]:
    """The ids of trials Tune left running or pending: the sweep was interrupted, --sweep-resume runs them."""
    return [r["trial_id"] for r in records if r["tune_status"] not in ("TERMINATED", "ERROR")]
