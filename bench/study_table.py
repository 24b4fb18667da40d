"""The study's table, rebuilt from the store: do FAME and HM4SR beat an equally tuned SASRec?

    python bench/study_table.py --db data/study/db --out bench/results/study.md --json bench/results/study.json

Reads the `runs` and `sweeps` tables (and each run's per-user test ranks beside its checkpoints): a row per
(model, data set, protocol) from the sweeps' final seeds (study-<data set>-<model>-final-seed<N>, the
"tuned" rows) and bench/study_runs.py's rows (study-<data set>-<row>-seed<N>); each tuned MoE model against
the tuned SASRec, paired by seed (t-test over the seeds) and by test user (bootstrap over the users of the
seeds' mean NDCG@10); each sweep's trials, compute time, leaderboard and plots (copied to --files), the
hyper-parameters that mattered, and the command lines that made the runs. A row with no finished run is
listed as missing, with the state of its sweep.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from featurestore import store  # noqa: E402
from study_pause import paused_in_epochs, read_pauses  # noqa: E402 - bench/
from study_runs import STUDY_ROWS, finished_runs, run_name, sweep_name  # noqa: E402 - bench/
from training.cli import argv_from  # noqa: E402
from training.records import RUNS, read_runs  # noqa: E402
from training.run import RunDir  # noqa: E402
from tuning.records import LEADERBOARD_FILE, PARAMS_PLOT, SWEEPS, TRIALS_PLOT, CURVES_PLOT  # noqa: E402
from tuning.sweep import SweepConfig  # noqa: E402

DATASETS = ("ml-100k", "ml-1m")
MODELS = ("sasrec", "fame", "hm4sr")
MAX_SEEDS = 5
K = 10
BOOTSTRAP_SEED = 0
ALPHA = 0.05
RECBOLE = "RecBole 1.2.1 SASRec on this ML-100k split (one seed): test NDCG@10 0.0640, HR@10 0.1357"
COLUMNS = ("model | dataset | protocol | config | seeds | NDCG@10 mean | NDCG@10 std | HR@10 mean | HR@10 std | "
           "MRR@10 mean | NDCG@10 masked mean | NDCG@10 masked std | epochs | s/epoch")


@dataclasses.dataclass
class Row:
    model: str
    dataset: str
    protocol: str
    config: str
    runs: list  # the finished runs' records (pandas rows), seed order
    missing: str = ""  # why there are no runs

    @property
    def seeds(self) -> list[int]:
        return [int(run.config["settings"]["seed"]) for run in self.runs]

    def metric(self, name: str) -> np.ndarray:
        return np.array([run.test_metrics[name] for run in self.runs])


def mean_std(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def chosen_values(trials, sweep: str) -> str:
    """The best trial's sampled values, as the config cell shows them."""
    best = trials[trials.sweep_id == sweep].sort_values("best_value", ascending=False).iloc[0]
    params = json.loads(best.config)
    shown = {}
    for key, value in params.items():
        if key.endswith("__on"):
            continue
        name = key.removesuffix("__value")
        if f"{name}__on" in params and not params[f"{name}__on"]:
            value = 0.0
        shown[name] = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{sweep} (trial {best.trial_id}): " + ", ".join(f"{k} {v}" for k, v in shown.items())


def sweep_state(trials, sweep: str) -> str:
    rows = trials[trials.sweep_id == sweep] if trials is not None else []
    if not len(rows):
        return f"sweep {sweep} not started"
    wanted = json.loads(rows.settings.iloc[0])["sweep"]["num_samples"]
    return f"sweep {sweep}: {len(rows)} of {wanted} trials recorded, final seeds not finished"


def build_rows(runs, trials) -> list[Row]:
    rows = []
    for dataset in DATASETS:
        for model in MODELS:
            sweep = sweep_name(dataset, model)
            found = finished_runs(runs, [f"{sweep}-final-seed{s}" for s in range(1, MAX_SEEDS + 1)])
            config = chosen_values(trials, sweep) if found else sweep
            rows.append(Row(model, dataset, "tuned, full ranking", config, found,
                            "" if found else sweep_state(trials, sweep)))
        for key, spec in STUDY_ROWS.items():
            if dataset not in spec.datasets or spec.kind != "study":
                continue
            found = finished_runs(runs, [run_name(dataset, key, s) for s in range(1, MAX_SEEDS + 1)])
            base = "the tuned configuration" if spec.base == "tuned" else "the flow's defaults"
            changes = json.dumps(spec.changes, sort_keys=True)
            rows.append(Row(spec.model, dataset, spec.protocol, f"{key}: {base} with {changes}", found,
                            "" if found else f"not run yet (bench/study_runs.py --rows {key})"))
    return rows


def epoch_s(run, pauses: list[tuple[float, float]]) -> float:
    """A run's mean seconds an epoch, the study's pauses taken out (runs from before epochs were timed: as
    recorded)."""
    spans = [(m["epoch_started_at"], m["epoch_s"]) for m in run.epochs if m.get("epoch_started_at") is not None]
    if not spans or len(spans) < len(run.epochs):
        return run.mean_epoch_s
    return (sum(seconds for _, seconds in spans) - paused_in_epochs(spans, pauses)) / len(spans)


def row_line(row: Row, pauses: list[tuple[float, float]]) -> str:
    if not row.runs:
        return (f"| {row.model} | {row.dataset} | {row.protocol} | {row.config} | 0 | missing: {row.missing} |"
                + " |" * 9)
    cells = []
    for name in (f"test_ndcg@{K}", f"test_hr@{K}"):
        cells += [f"{v:.4f}" for v in mean_std(row.metric(name))]
    cells.append(f"{row.metric(f'test_mrr@{K}').mean():.4f}")
    cells += [f"{v:.4f}" for v in mean_std(row.metric(f"test_masked_ndcg@{K}"))]
    best = np.mean([run.best_epoch for run in row.runs])
    ran = np.mean([run.epochs_run for run in row.runs])
    per_epoch = np.mean([epoch_s(run, pauses) for run in row.runs])
    seeds = ",".join(map(str, row.seeds))
    return (f"| {row.model} | {row.dataset} | {row.protocol} | {row.config} | {seeds} | " + " | ".join(cells)
            + f" | {best:.1f} best / {ran:.1f} run | {per_epoch:.1f} |")


def at20_line(row: Row) -> str:
    values = [f"{row.metric(name).mean():.4f}" for name in
              ("test_ndcg@20", "test_hr@20", "test_mrr@20", "test_masked_hr@10", "test_masked_mrr@10",
               "test_masked_ndcg@20", "test_masked_hr@20")]
    return f"| {row.model} | {row.dataset} | {row.protocol} | " + " | ".join(values) + " |"


def user_ndcg(row: Row, seeds: list[int], masked: bool) -> tuple[np.ndarray, np.ndarray]:
    """(user keys, (seeds, users) NDCG@K of each user's test target) for the row's runs of `seeds`."""
    column = "rank_masked" if masked else "rank"
    keys, values = None, []
    for run in row.runs:
        if int(run.config["settings"]["seed"]) not in seeds:
            continue
        ranks = RunDir(run.run_dir.rsplit("/", 1)[0], run.name).read_test_ranks(int(run.num_workers))
        run_keys = ranks.column("user_key").to_numpy()
        if keys is not None and not np.array_equal(keys, run_keys):
            raise ValueError(f"{run.name}: its test users differ from the other runs' (another split?)")
        keys = run_keys
        rank = ranks.column(column).to_numpy().astype(np.float64)
        values.append((rank < K) / np.log2(rank + 2))
    return keys, np.stack(values)


def compare(model_row: Row, baseline: Row, resamples: int) -> dict:
    """Paired comparison of two rows on their common seeds: difference of mean NDCG@K, t-test over the seeds,
    bootstrap over the test users of the seeds' mean per-user NDCG@K; ranked and masked."""
    from scipy import stats

    seeds = sorted(set(model_row.seeds) & set(baseline.seeds))
    result = {"model": model_row.model, "baseline": baseline.model, "dataset": model_row.dataset, "seeds": seeds}
    if len(seeds) < 2:
        return result | {"verdict": f"not compared: {len(seeds)} common seed(s)"}
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    for masked in (False, True):
        label = "masked" if masked else "ranked"
        keys_a, a = user_ndcg(model_row, seeds, masked)
        keys_b, b = user_ndcg(baseline, seeds, masked)
        if not np.array_equal(keys_a, keys_b):
            raise ValueError(f"{model_row.model} and {baseline.model} were tested on different users")
        per_seed = a.mean(axis=1) - b.mean(axis=1)  # (seeds,)
        t = stats.ttest_rel(a.mean(axis=1), b.mean(axis=1))
        per_user = a.mean(axis=0) - b.mean(axis=0)  # (users,)
        draws = rng.integers(0, len(per_user), size=(resamples, len(per_user)))
        means = per_user[draws].mean(axis=1)
        low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
        p_boot = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
        difference = float(per_seed.mean())
        distinct = t.pvalue < ALPHA and (low > 0 or high < 0)
        verdict = ("better" if difference > 0 else "worse") if distinct else "not distinguishable"
        result[label] = {"difference": difference, "t_p": float(t.pvalue), "bootstrap_ci": [float(low), float(high)],
                         "bootstrap_p": float(p_boot), "users": int(len(per_user)), "verdict": verdict}
    return result


def comparison_lines(comparisons: list[dict]) -> list[str]:
    lines = [f"| model vs baseline | dataset | seeds | protocol | NDCG@{K} difference | t-test p (seeds) | "
             f"bootstrap 95% CI (users) | bootstrap p | verdict |", "|" + "---|" * 9]
    sentences = []
    for c in comparisons:
        if "ranked" not in c:
            sentences.append(f"- {c['model']} vs {c['baseline']} on {c['dataset']}: {c['verdict']}.")
            continue
        for label in ("ranked", "masked"):
            r = c[label]
            lines.append(f"| {c['model']} vs {c['baseline']} | {c['dataset']} | {len(c['seeds'])} | {label} | "
                         f"{r['difference']:+.4f} | {r['t_p']:.3g} | [{r['bootstrap_ci'][0]:+.4f}, "
                         f"{r['bootstrap_ci'][1]:+.4f}] | {r['bootstrap_p']:.3g} | {r['verdict']} |")
        sentences.append(f"- {c['model'].upper()} vs SASRec on {c['dataset']} ({len(c['seeds'])} seeds): "
                         f"{c['ranked']['verdict']} with history items ranked ({c['ranked']['difference']:+.4f} "
                         f"NDCG@{K}), {c['masked']['verdict']} with them masked ({c['masked']['difference']:+.4f}).")
    return lines + [""] + sentences


def what_mattered(trials, sweep: str) -> list[str]:
    """Per searched key: Spearman's rho with the best validation metric (numbers with > 3 values), or the mean
    metric per value."""
    from scipy import stats

    rows = trials[(trials.sweep_id == sweep) & trials.best_value.notna()]
    params = [json.loads(c) for c in rows.config]
    keys = sorted({k for p in params for k in p if not k.endswith("__on")})
    lines = []
    for key in keys:
        name = key.removesuffix("__value")
        values = [0.0 if f"{name}__on" in p and not p[f"{name}__on"] else p.get(key) for p in params]
        metric = rows.best_value.to_numpy()
        if all(isinstance(v, (int, float)) for v in values) and len(set(values)) > 3:
            rho = stats.spearmanr(values, metric).statistic
            lines.append(f"  - {name}: Spearman rho {rho:+.2f} with the best validation NDCG@10 ({len(values)} trials)")
        else:
            by_value = {v: metric[[x == v for x in values]] for v in sorted(set(values), key=str)}
            shown = ", ".join((f"{v:.4g}" if isinstance(v, float) else str(v)) + f": {m.mean():.4f} (n={len(m)})"
                              for v, m in by_value.items())
            lines.append(f"  - {name}: mean best validation NDCG@10 by value: {shown}")
    return lines


def sweep_argv(settings: dict) -> list[str]:
    """flows/tune.py flags of a sweep's recorded settings: its training settings and its own."""
    own = [f for f in dataclasses.fields(SweepConfig)
           if settings["sweep"].get(f.name, f.default) != f.default and f.name != "sweep_resume"]
    flags = []
    for f in own:
        value = settings["sweep"][f.name]
        flags += [f"--{f.name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv_from({k: v for k, v in settings["training"].items() if k != "resume"}) + flags


def trial_s(trial, pauses: list[tuple[float, float]]) -> tuple[float, bool]:
    """(a trial's seconds, whether the study's pauses could be taken out): its row's seconds, less the pauses
    within its epochs where the row has their spans (rows from before them: as recorded, pauses included)."""
    spans = json.loads(getattr(trial, "epoch_spans", None) or "[]")
    if spans and all(start is not None for start, _ in spans):
        return float(trial.time_s or 0.0) - paused_in_epochs(spans, pauses), True
    return float(trial.time_s or 0.0), False


def sweep_section(trials, sweep: str, files_dir: Path, out_dir: Path, pauses: list[tuple[float, float]]) -> list[str]:
    rows = trials[trials.sweep_id == sweep]
    settings = json.loads(rows.settings.iloc[0])
    counts = rows.status.value_counts().to_dict()
    seconds = [trial_s(trial, pauses) for trial in rows.itertuples()] if "time_s" in rows else []
    hours = sum(s for s, _ in seconds) / 3600 if seconds else float("nan")
    paused = sum(1 for _, known in seconds if not known)
    lines = [f"### {sweep}", "",
             f"{len(rows)} of {settings['sweep']['num_samples']} trials recorded ({counts}); trial time "
             f"{hours:.2f} h (sum of the trials' seconds, the study's logged pauses taken out"
             + (f"; {paused} trial(s) recorded before epoch spans keep theirs" if paused else "")
             + f"; {settings['sweep'].get('max_concurrent') or 'as many as fitted'} at once), "
             f"{hours * 60 / max(len(rows), 1):.1f} min per trial.", "",
             f"`python flows/tune.py {' '.join(sweep_argv(settings))}`", ""]
    source = Path(settings["training"]["storage"]) / sweep
    if source.exists():
        target = files_dir / sweep
        target.mkdir(parents=True, exist_ok=True)
        copied = [name for name in (LEADERBOARD_FILE, TRIALS_PLOT, CURVES_PLOT, PARAMS_PLOT)
                  if (source / name).exists() and shutil.copy(source / name, target / name)]
        lines.append("Files: " + ", ".join(f"[{name}]({os.path.relpath(target / name, out_dir)})" for name in copied))
        lines.append("")
    lines += ["Hyper-parameters:", *what_mattered(trials, sweep), ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "study.md"))
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "study.json"))
    parser.add_argument("--files", default=str(REPO / "bench" / "results" / "study"),
                        help="where the sweeps' leaderboards and plots are copied")
    parser.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--storage", help="the study's storage folder: its pauses (bench/study_pause.py) are "
                                          "taken out of the seconds")
    args = parser.parse_args(argv)
    pauses = read_pauses(args.storage) if args.storage else []
    db = store.connect(args.db)
    if RUNS not in store.table_names(db):
        parser.exit(2, f"error: {args.db} holds no runs\n")
    runs = read_runs(db).set_index("run_id")
    trials = store.open_table(db, SWEEPS).to_pandas() if SWEEPS in store.table_names(db) else None
    rows = build_rows(runs, trials)
    tuned = {(r.dataset, r.model): r for r in rows if r.protocol.startswith("tuned") and r.runs}
    comparisons = [compare(tuned[(d, m)], tuned[(d, "sasrec")], args.bootstrap)
                   for d in DATASETS for m in ("fame", "hm4sr") if (d, m) in tuned and (d, "sasrec") in tuned]

    lines = ["# The study: FAME and HM4SR against an equally tuned SASRec", "",
             "Generated by `python bench/study_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
             + "` from the store's `runs` and `sweeps`. Protocol: leave-one-out, full ranking over all items, L 50, "
             "d 64, selection on validation NDCG@10; test metrics of the best validation epoch's weights, history "
             "items ranked (RecBole's convention) and masked; seeds paired across models.", "",
             f"Calibration: {RECBOLE}.", "", "| " + COLUMNS + " |", "|" + "---|" * 14]
    lines += [row_line(r, pauses) for r in rows]
    lines += ["", "@20 and masked HR/MRR (means over the same seeds):", "",
              "| model | dataset | protocol | NDCG@20 | HR@20 | MRR@20 | HR@10 masked | MRR@10 masked | "
              "NDCG@20 masked | HR@20 masked |", "|" + "---|" * 10]
    lines += [at20_line(r) for r in rows if r.runs]
    lines += ["", "## Paired comparisons", ""] + (comparison_lines(comparisons) if comparisons else
                                                   ["None yet: a tuned row of both models is needed."])
    lines += ["", "## Sweeps", ""]
    for sweep in ([] if trials is None else sorted(trials.sweep_id.unique())):
        lines += sweep_section(trials, sweep, Path(args.files), Path(args.out).resolve().parent, pauses)
    lines += ["## Commands of the study runs (seed 1 of each row; the other seeds differ by --seed and --name)", ""]
    for row in rows:
        if row.runs and not row.protocol.startswith("tuned"):
            lines.append(f"- {row.protocol}: `python flows/train.py {' '.join(argv_from(row.runs[0].config['settings']))}`")
    Path(args.out).write_text("\n".join(lines) + "\n")
    summary = [{"model": r.model, "dataset": r.dataset, "protocol": r.protocol, "config": r.config, "seeds": r.seeds,
                "runs": [run.name for run in r.runs], "missing": r.missing,
                "test": {name: r.metric(name).tolist() for name in r.runs[0].test_metrics} if r.runs else {}}
               for r in rows]
    Path(args.json).write_text(json.dumps({"rows": summary, "comparisons": comparisons}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
