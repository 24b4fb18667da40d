"""Ray Tune sweeps (flows/tune.py, tuning.sweep, tuning.records): trial sizing, argument checks before Ray
starts, the splits a sweep computes once and its runs take, and real sweeps on MovieLens-100k in their own Ray
instances: one that is killed, resumed and retried (shared by the resume and errored-trial tests: a sweep's
start-up is what they cost), and one that continues from its rows in the store once its Tune directory is gone
(with ASHA's replay of the carried trials checked against a live ASHA). The sweep where ASHA stops a hopeless
trial and the trials after it still start, with its records, leaderboard, plots and final seeds, is submitted
to a `ray start` cluster (tests/test_job_submit.py)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pytest

from featurestore import store
from featurestore.raycluster import ResourcePlanError
from training import TrainConfig
from training.records import read_runs
from tuning.records import SWEEPS, SWEEPS_SCHEMA
from tuning.records import plots as records_plots
from tuning.sweep import TRIAL_DRIVER_CPUS, SweepConfig, plan_trials, steps_per_epoch_range

from ml100k_store import build_ml100k_store, write_items  # tests/ helper

REPO = Path(__file__).resolve().parents[1]
TUNE = str(REPO / "flows" / "tune.py")


def tune_command(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray instance
    return subprocess.run([sys.executable, TUNE, *args], capture_output=True, text=True, env=env, timeout=1500)


def test_trials_are_sized_so_they_never_wait_on_each_other_and_leave_ray_data_its_cpus():
    shared = plan_trials(2.0, TrainConfig(), max_concurrent=None)  # one trial gets what Ray Data leaves
    assert (shared.max_concurrent, shared.cpus_per_worker) == (1, 2.0 - 0.5 - TRIAL_DRIVER_CPUS)
    fitted = plan_trials(16.0, TrainConfig(num_workers=2, cpus_per_worker=1.0), max_concurrent=None)
    assert fitted.max_concurrent == 6  # (16 - 0.5) // (0.25 + 2 x 1)
    assert plan_trials(16.0, TrainConfig(num_workers=2, cpus_per_worker=1.0), max_concurrent=2).max_concurrent == 2
    with pytest.raises(ResourcePlanError, match="do not fit"):
        plan_trials(2.0, TrainConfig(cpus_per_worker=2.0), max_concurrent=None)


def test_the_sweeps_first_line_spans_the_steps_per_epoch_of_every_batch_size_and_mode_the_space_can_pick():
    rows = {"item_idx": [list(range(1, 30))] * 10}  # 10 users, 26 training targets each
    space = {"batch_size": {"choice": [4, 10]}, "train_mode": {"choice": ["all", "last"]}}
    # at L 20 and stride 10: 2 windows a user (20 in all) or 260 prefixes
    assert steps_per_epoch_range(rows, TrainConfig(max_len=20), space) == (2, 65)
    assert steps_per_epoch_range(rows, TrainConfig(max_len=20, batch_size=8), {}) == (3, 3)


def test_sweep_settings_are_checked():
    with pytest.raises(ValueError, match="resume needs the name"):
        SweepConfig(sweep_resume=True)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        SweepConfig(num_samples=0)


def test_a_bad_argument_fails_the_command_with_one_message_before_ray_starts(tmp_path):
    done = tune_command("--model", "nope", "--storage", str(tmp_path / "runs"), "--db", str(tmp_path / "db"))
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr
    assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr + done.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "db").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "sasrec", "--space", "SPACE"], "'n_experts'"),
    (["--model", "sasrec", "--name", "x"], "--sweep-name"),
    (["--model", "sasrec", "--search", "optuna", "--space", "GRID"], "grid"),
])
def test_bad_spaces_and_arguments_exit_2_with_one_message_from_the_argument_check(tmp_path, capsys, args, message):
    """The flow's parse_args, which its main runs before anything starts Ray (the command itself: above)."""
    import runpy

    (tmp_path / "bad.yaml").write_text("n_experts: {choice: [1, 2]}\n")  # a FAME key, not SASRec's
    (tmp_path / "grid.yaml").write_text("lr: {grid: [0.001, 0.002]}\n")
    args = [{"SPACE": str(tmp_path / "bad.yaml"), "GRID": str(tmp_path / "grid.yaml")}.get(a, a) for a in args]
    parse_args = runpy.run_path(TUNE, run_name="flow")["parse_args"]
    with pytest.raises(SystemExit) as exited:
        parse_args(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_sweeps_rows_are_replaced_as_a_whole_and_other_sweeps_are_kept(tmp_path):
    from tuning.records import write_sweep

    db = store.connect(str(tmp_path / "db"))
    older = pa.schema([f for f in SWEEPS_SCHEMA if f.name != "time_s"])  # a table from before the field
    db.create_table(SWEEPS, data=pa.Table.from_pylist([{"sweep_id": "b", "trial_id": "0", "status": "finished"}],
                                                      schema=older))
    write_sweep(db, "a", [{"sweep_id": "a", "trial_id": "1", "status": "errored"},
                          {"sweep_id": "a", "trial_id": "2", "status": "finished"}])
    write_sweep(db, "b", [{"sweep_id": "b", "trial_id": "1", "status": "finished"}])
    write_sweep(db, "a", [{"sweep_id": "a", "trial_id": "3", "status": "finished"},  # trial 1 retried as 3
                          {"sweep_id": "a", "trial_id": "2", "status": "finished"}])
    rows = store.open_table(db, SWEEPS).to_pandas()
    assert sorted(zip(rows.sweep_id, rows.trial_id, rows.status)) == [
        ("a", "2", "finished"), ("a", "3", "finished"), ("b", "1", "finished")]  # b's rows replaced as a whole
    assert "time_s" in rows.columns


def test_an_interrupted_sweep_is_told_apart_from_a_finished_one_by_the_trials_tune_left_running():
    from tuning.records import unfinished_trials

    ended = [{"trial_id": "a", "status": "finished"}, {"trial_id": "b", "status": "errored"},
             {"trial_id": "c", "status": "stopped"}]
    assert unfinished_trials(ended) == []
    assert unfinished_trials(ended + [{"trial_id": "d", "status": "unfinished"}]) == ["d"]


def test_an_interrupted_sweep_exits_130_so_a_script_running_sweeps_in_turn_stops(capsys):
    from featurestore.jobs import run_job
    from tuning.sweep import SweepResult

    def result(unfinished: int) -> SweepResult:
        return SweepResult(name="s", path="p", leaderboard="", best=None, final=None, files=[], wall_time_s=1.0,
                           unfinished=unfinished)

    assert run_job(lambda: result(2)) == 130 and "interrupted with 2 trial(s) unfinished" in capsys.readouterr().out
    assert run_job(lambda: result(0)) == 0


def test_final_seeds_are_summarised_by_each_metrics_mean_and_sample_std():
    from tuning.records import seed_summary

    two = seed_summary([{"test_ndcg@10": 0.10, "test_masked_ndcg@10": 0.20},
                        {"test_ndcg@10": 0.14, "test_masked_ndcg@10": 0.20}])
    assert two == pytest.approx({"test_ndcg@10_mean": 0.12, "test_masked_ndcg@10_mean": 0.20,
                                 "test_ndcg@10_std": 0.04 / 2**0.5, "test_masked_ndcg@10_std": 0.0})
    assert seed_summary([{"test_ndcg@10": 0.1}]) == {"test_ndcg@10_mean": 0.1, "test_ndcg@10_std": 0.0}


def test_plots_draw_every_trial_with_log_axes_for_log_uniform_values_and_zeros_kept(monkeypatch):
    import matplotlib.pyplot as plt

    space = {"lr": {"loguniform": [3e-4, 3e-3]}, "cp_weight": {"loguniform": [0.01, 1.0], "zero": True},
             "n_heads": {"choice": [1, 2]}}
    params = [{"lr": 1e-3, "cp_weight__on": False, "cp_weight__value": 0.0, "n_heads": 1},
              {"lr": 2e-3, "cp_weight__on": True, "cp_weight__value": 0.5, "n_heads": 2}]
    records = [{"best_value": value, "curve": [0.01, value], "status": status, "params": p,
                "reported_at": pd.Timestamp(100.0 * i, unit="s", tz="UTC")} for i, (p, status, value) in
               enumerate(zip(params, ["finished", "stopped"], [0.06, 0.05]))]
    drawn, savefig = [], plt.Figure.savefig  # the figures themselves, as they are saved
    monkeypatch.setattr(plt.Figure, "savefig", lambda figure, *a, **k: (drawn.append(figure), savefig(figure, *a, **k)))
    images = records_plots(records, space, "val_ndcg@10")
    assert all(png.startswith(b"\x89PNG") for png in images.values()) and len(images) == 3
    best_so_far, curves, by_parameter = drawn
    (steps,) = best_so_far.axes[0].get_lines()  # by trial, in the order they last reported
    assert list(steps.get_xdata()) == [1, 2] and list(steps.get_ydata()) == pytest.approx([0.06, 0.06])
    assert len(curves.axes[0].get_lines()) == 2
    assert [axis.get_xscale() for axis in by_parameter.axes] == ["log", "symlog", "linear"]


def test_a_sweeps_runs_take_the_splits_it_computed_once_and_modes_share_their_evaluation_splits(ray_local, tmp_path):
    """shared_splits computes each split key once (validation and test do not depend on the training mode);
    a run whose keys it holds takes those datasets themselves, and a run on another version of the sequences
    computes its own."""
    import dataclasses

    import pyarrow as pa

    from featurestore.sequences import SEQUENCES, SEQUENCES_SCHEMA, split_counts
    from training.data import StoreSnapshot, example_datasets, shared_splits, split_keys

    def sequences(users: int) -> pa.Table:
        return pa.table({"user_id": [f"u{u}" for u in range(users)], "item_idx": [list(range(1, 12))] * users,
                         "timestamps": [list(range(11))] * users, "first_timestamp": [0] * users},
                        schema=SEQUENCES_SCHEMA)

    table = store.connect(str(tmp_path / "db")).create_table(SEQUENCES, data=sequences(6))
    rows = table.to_arrow()
    snapshot = StoreSnapshot(db_uri=str(tmp_path / "db"), versions={SEQUENCES: table.version},
                             sequences_uri=table.to_lance().uri, users=6, n_items=11,
                             counts=split_counts(rows, 4, 2), max_gap_s=None)
    shared = shared_splits([(snapshot, 4, "all", 1, 2), (snapshot, 4, "last", 1, 2)])
    assert len(shared) == 4  # a training split per mode; validation and test once
    counts = snapshot.counts
    for mode in ("all", "last"):
        keys = split_keys(snapshot, 4, mode, 1, 2)
        assert shared[keys["train"]].count() == counts[f"train_examples_{mode}"]
        datasets = example_datasets(snapshot, 4, mode, 1, 2, shared)
        assert all(datasets[split] is shared[key] for split, key in keys.items())

    table.add(sequences(2))  # a new version of the sequences: a run pinned to it reads its own splits
    later = dataclasses.replace(snapshot, versions={SEQUENCES: table.version}, users=8,
                                counts=split_counts(table.to_arrow(), 4, 2))
    datasets = example_datasets(later, 4, "last", 1, 2, shared)
    assert not set(map(id, datasets.values())) & set(map(id, shared.values()))
    assert datasets["train"].count() == later.counts["train_examples_last"] > counts["train_examples_last"]


def test_a_sweep_continued_from_the_store_over_another_space_is_refused_before_ray_starts(tmp_path):
    from tuning.records import write_sweep

    db = store.connect(str(tmp_path / "db"))
    ran_over = {"lr": {"loguniform": [1e-3, 1e-2]}}
    write_sweep(db, "s", [{"sweep_id": "s", "trial_id": "t1", "status": "finished", "curve": [0.05],
                           "config": "{}", "best_value": 0.05, "settings": json.dumps({"space": ran_over})}])
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    done = tune_command("--model", "sasrec", "--db", str(tmp_path / "db"), "--storage", str(tmp_path / "runs"),
                        "--space", str(space), "--sweep-name", "s", "--sweep-resume")
    assert done.returncode == 2 and "sweep 's' ran over another search space" in done.stderr
    assert "Ray" not in done.stdout + done.stderr


def test_asha_replayed_from_the_carried_trials_curves_stops_what_it_would_have_stopped_live():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from tuning.sweep import replay

    def asha():
        return ASHAScheduler(time_attr="epoch", metric="val", mode="max", max_t=9, grace_period=1, reduction_factor=2)

    curves = {"a": [0.10, 0.20, 0.30, 0.35], "b": [0.05, 0.08], "c": [0.12, 0.22, 0.31, 0.34]}
    live = asha()
    for trial_id, curve in curves.items():
        trial = SimpleNamespace(trial_id=trial_id)
        live.on_trial_add(None, trial)
        for epoch, value in enumerate(curve, 1):
            live.on_trial_result(None, trial, {"epoch": epoch, "val": value})
        live.on_trial_complete(None, trial, {"epoch": len(curve), "val": curve[-1]})
    replayed = asha()
    replay(replayed, [{"trial_id": t, "curve": c} for t, c in curves.items()], "val")

    def decisions(scheduler, curve):
        trial = SimpleNamespace(trial_id=f"new-{len(scheduler._trial_info)}-{curve[0]}")  # a new trial each call
        scheduler.on_trial_add(None, trial)
        actions = []
        for epoch, value in enumerate(curve, 1):  # until the first stop
            actions.append(scheduler.on_trial_result(None, trial, {"epoch": epoch, "val": value}))
            if actions[-1] == TrialScheduler.STOP:
                return actions
        return actions

    weak, strong = [0.11, 0.15, 0.2, 0.25], [0.2, 0.3, 0.4, 0.5]
    # stopped at epoch 2, below the median of the carried trials' epoch-2 rung (0.20)
    assert decisions(live, weak) == decisions(replayed, weak) == [TrialScheduler.CONTINUE, TrialScheduler.STOP]
    assert decisions(replayed, strong) == [TrialScheduler.CONTINUE] * 4


def test_asha_lets_a_weak_trial_end_at_the_report_where_its_run_stopped_by_itself():
    """Stopped there, the trial's driver would be killed before it writes its run's record (seen in the study:
    a trial whose patience ran out at a rung). The report still counts in the rung."""
    from ray.tune.schedulers import TrialScheduler

    from tuning.sweep import ASHALettingRunsEnd

    asha = ASHALettingRunsEnd(time_attr="epoch", metric="val", mode="max", max_t=9, grace_period=1, reduction_factor=2)
    trials = {name: SimpleNamespace(trial_id=name) for name in ("strong", "weak", "ending")}
    for trial in trials.values():
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, trials["strong"], {"epoch": 1, "val": 0.3}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, trials["weak"], {"epoch": 1, "val": 0.1, "stop_reason": None}) \
        == TrialScheduler.STOP
    assert asha.on_trial_result(None, trials["ending"], {"epoch": 1, "val": 0.1, "stop_reason": "patience"}) \
        == TrialScheduler.CONTINUE
    rung_1 = dict(asha._trial_info["ending"]._rungs)[1]  # ASHA's bracket of the trial: milestone -> results
    assert rung_1 == {"strong": 0.3, "weak": 0.1, "ending": 0.1}


@pytest.mark.e2e
@pytest.mark.slow
def test_a_sweeps_time_budget_stops_its_trial_and_its_row_says_so_not_asha(tmp_path):
    """Tune's budget clock starts once the first trial is created, and no trial trains 50 epochs in a second;
    ASHA never stops a sweep's only trial (it is its rungs' median). Slow: a sweep of its own (53 s), and the
    Tune tests in `make test` stay within issue 11's 5 minutes with the job-submit sweep alone."""
    db = build_ml100k_store(str(tmp_path / "db"), 16)
    done = tune_command("--model", "sasrec", "--db", db.uri, "--storage", str(tmp_path / "runs"), "--num-samples",
                        "1", "--epochs", "50", "--sweep-time-budget-s", "1", "--max-len", "20", "--hidden-size", "16",
                        "--n-layers", "1", "--batch-size", "256", "--final-seeds", "0", "--sweep-name", "budget")
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = store.open_table(db, SWEEPS).to_pandas().itertuples()
    assert (trial.status, trial.stop_reason) == ("stopped", "sweep time budget") and trial.epochs < 50


@pytest.mark.e2e
@pytest.mark.slow
def test_a_sweep_whose_tune_directory_is_gone_continues_from_its_rows_in_the_store(tmp_path):
    """Another machine or session: the store is all that is left of the sweep. Continued with --sweep-resume, it
    carries the ended trials over (rows unchanged), runs only the trials missing, and trains a final seed again
    only if the best configuration changed. The Tune directory found again later is refused as older than the
    rows."""
    db = build_ml100k_store(str(tmp_path / "db"), 16)
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    runs = tmp_path / "runs"

    def sweep(samples: int, *more: str) -> subprocess.CompletedProcess:
        done = tune_command("--model", "sasrec", "--db", db.uri, "--storage", str(runs), "--space", str(space),
                            "--num-samples", str(samples), "--epochs", "2", "--grace-period", "1", "--monitor",
                            "ndcg@10", "--max-len", "20", "--hidden-size", "16", "--n-layers", "1", "--batch-size",
                            "256", "--final-seeds", "1", "--sweep-name", "lost", *more)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def rows():
        return store.open_table(db, SWEEPS).to_pandas().set_index("trial_id").sort_index()

    nothing = tune_command("--model", "sasrec", "--db", db.uri, "--storage", str(runs), "--sweep-name", "lost",
                           "--sweep-resume")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: nothing to resume: no sweep 'lost'")
    assert "Started a local Ray instance" not in nothing.stderr + nothing.stdout  # said before Ray starts
    sweep(1)  # one trial is enough to carry over, and each costs a trial's start-up
    first, seed_run = rows(), read_runs(db).set_index("run_id").loc["lost-final-seed1"]
    assert len(first) == 1 and (first.curve.map(json.loads).map(len) >= 1).all()
    shutil.move(runs / "lost", tmp_path / "lost-tune-dir")

    same = sweep(1, "--sweep-resume")  # every trial ended: nothing trains, not even the final seed
    assert "continuing from the store with 1 ended trial(s)" in same.stdout
    assert "Started a local Ray instance" not in same.stderr + same.stdout  # nothing for Ray to do
    assert not [line for line in same.stdout.splitlines() if line.startswith("trial ")]
    assert "lost-final-seed1: finished already" in same.stdout
    assert read_runs(db).set_index("run_id").loc["lost-final-seed1"].finished_at == seed_run.finished_at
    pd.testing.assert_frame_equal(rows()[["config", "best_value", "curve"]], first[["config", "best_value", "curve"]])

    more = sweep(2, "--sweep-resume")  # one trial more
    assert sum(line.startswith("trial ") for line in more.stdout.splitlines()) == 1
    after = rows()
    assert len(after) == 2 and set(first.index) < set(after.index)
    (new,) = set(after.index) - set(first.index)
    assert after.loc[new].config not in set(first.config)  # the searcher did not draw a carried trial again
    pd.testing.assert_frame_equal(after.loc[first.index, ["config", "best_value"]], first[["config", "best_value"]])
    final = json.loads((runs / "lost" / "final_seeds.json").read_text())
    best = json.loads(after.loc[after.best_value.idxmax()].config)
    assert final["runs"] == ["lost-final-seed1"]
    assert read_runs(db).set_index("run_id").loc["lost-final-seed1"].config["settings"]["lr"] == best["lr"]

    # the first Tune directory comes back (a disk that was not lost after all): it does not know the second
    # trial, and restoring it would record its trial over the sweep's rows
    shutil.rmtree(runs / "lost")
    shutil.move(tmp_path / "lost-tune-dir", runs / "lost")
    stale = tune_command("--model", "sasrec", "--db", db.uri, "--storage", str(runs), "--space", str(space),
                         "--sweep-name", "lost", "--sweep-resume")
    assert stale.returncode == 2 and "ended trial(s) that its Tune directory" in stale.stderr
    assert new in stale.stderr and "Started a local Ray instance" not in stale.stderr + stale.stdout
    assert len(rows()) == 2


@pytest.fixture(scope="module")
def cut_sweep(tmp_path_factory):
    """One HM4SR sweep shared by the resume and the errored-trial tests (a sweep's start-up is their cost): on
    items without categories its cp_weight 0.5 trials cannot run. Grid order, one trial at a time: 0.5 (errors),
    0 (finishes), then the driver is killed; --sweep-resume runs the rest: 0.5 (errors) and 0 (finishes).
    What the tests assert of the state after the resume is read here, before the retry test changes the store."""
    tmp_path = tmp_path_factory.mktemp("cut_sweep")
    db = build_ml100k_store(str(tmp_path / "db"), 16, categories=False)
    space = tmp_path / "space.yaml"
    space.write_text("cp_weight: {grid: [0.5, 0.0]}\nlr: {grid: [0.005, 0.008]}\n")
    args = ["--model", "hm4sr", "--db", db.uri, "--storage", str(tmp_path / "runs"), "--space", str(space),
            "--search", "grid", "--num-samples", "1", "--scheduler", "none", "--epochs", "2", "--max-len", "20",
            "--hidden-size", "16", "--n-layers", "1", "--batch-size", "256", "--idcl-weight", "0",
            "--pcl-weight", "0", "--final-seeds", "0", "--sweep-name", "cut"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, TUNE, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env=env)
    errored_before = []  # the ids of the trials that errored before the kill
    for line in driver.stdout:  # the first trial that trains is done: kill the sweep's driver (and its Ray) at once
        if line.startswith("trial ") and "stopped by an error" in line:
            errored_before.append(line.split(":")[0].removeprefix("trial "))
        elif line.startswith("trial "):
            driver.kill()
            break
    driver.wait(timeout=60)
    first = read_runs(db).set_index("run_id")
    resumed = tune_command(*args, "--sweep-resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return SimpleNamespace(db=db, args=args, first=first, errored_before=errored_before, trials=store.open_table(db, SWEEPS).to_pandas(),
                           runs=read_runs(db).set_index("run_id"),
                           leaderboard=(tmp_path / "runs" / "cut" / "leaderboard.md").read_text())


@pytest.mark.e2e
@pytest.mark.slow
def test_a_killed_sweep_resumes_without_running_a_trial_twice_from_scratch(cut_sweep):
    first = cut_sweep.first
    assert len(first) == 1 and first.status.iloc[0] == "finished"
    trials, runs = cut_sweep.trials, cut_sweep.runs
    trained = trials[trials.config.str.contains('"cp_weight": 0.0')]
    assert len(trials) == 4 and len(trained) == 2 and (trained.status == "finished").all()
    assert (trained.epochs == 2).all()
    assert set(trained.run_id) == set(runs.index) and (runs.epochs_run == 2).all()
    # the trial that had finished was not trained again: if Tune restarts it, its run continues from its last
    # checkpoint (epoch 2) straight to the test split, and that checkpoint stays the latest
    assert runs.loc[first.index[0]].checkpoint == first.checkpoint.iloc[0]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_trial_the_store_cannot_serve_errors_with_the_models_message_the_others_finish_and_a_retry_runs_it(
        cut_sweep):
    """check_space cannot know the store: HM4SR's category loss on items without categories fails in its trial.
    The resumed sweep kept the trial that errored before the kill errored; with --retry-errored, once the store
    has categories, the errored trials run."""
    trials = cut_sweep.trials.set_index("config")
    errored = trials[trials.index.str.contains('"cp_weight": 0.5')]
    assert len(errored) == 2 and (errored.status == "errored").all()
    assert errored.stop_reason.str.contains("the items have no categories").all()
    assert "errored: trial" in cut_sweep.leaderboard
    assert len(cut_sweep.errored_before) == 1 and set(cut_sweep.errored_before) <= set(errored.trial_id)
    assert not set(errored.run_id) & set(cut_sweep.runs.index)  # the resume did not run the one that had errored

    write_items(cut_sweep.db, 16, categories=True)
    retried = tune_command(*cut_sweep.args, "--sweep-resume", "--retry-errored")
    assert retried.returncode == 0, retried.stderr[-3000:]
    trials = store.open_table(cut_sweep.db, SWEEPS).to_pandas().set_index("config")
    # Tune restarts an errored trial as a new trial (a new id): its row replaces the errored attempt's
    assert (trials.status == "finished").all() and len(trials) == 4
    assert not set(trials.trial_id) & set(errored.trial_id)
    runs = read_runs(cut_sweep.db).set_index("run_id")
    retried_runs = runs.loc[trials[trials.index.str.contains('"cp_weight": 0.5')].run_id]
    assert (retried_runs.epochs_run == 2).all()
    # the trials that had finished were not trained again
    assert (runs.loc[cut_sweep.runs.index].checkpoint == cut_sweep.runs.checkpoint).all()
