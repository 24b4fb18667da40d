"""bench/study_table.py's paired comparisons and recorded commands, and bench/study_runs.py's rows: on runs
whose per-user test ranks are written the way the workers write them."""
import json
import runpy
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from training.run import RunDir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import study_runs  # noqa: E402 - bench/
import study_table  # noqa: E402 - bench/

USERS = 600


def fake_row(tmp_path, model: str, hit_rate: float, seeds=(1, 2, 3), draw_seed=0) -> study_table.Row:
    """A row of finished runs whose test targets rank first with probability hit_rate, else 100th."""
    rng = np.random.default_rng(draw_seed)
    keys = np.arange(USERS, dtype=np.int64) * 7919 - 10**6  # any int64 keys, the same users in every run
    runs = []
    for seed in seeds:
        name = f"{model}-seed{seed}"
        rank = np.where(rng.random(USERS) < hit_rate, 0, 99).astype(np.int32)
        masked = np.maximum(rank - 5, 0).astype(np.int32)
        # two workers' shares, as a two-worker run writes them
        for worker, share in enumerate(np.array_split(rng.permutation(USERS), 2)):
            RunDir(str(tmp_path), name).write_test_ranks(
                {"user_key": keys[share], "rank": rank[share], "rank_masked": masked[share]}, worker, 2)
        ndcg = float(np.mean((rank < 10) / np.log2(rank + 2)))
        runs.append(SimpleNamespace(name=name, run_dir=f"{tmp_path}/{name}", num_workers=2,
                                    config={"settings": {"seed": seed}}, test_metrics={"test_ndcg@10": ndcg}))
    return study_table.Row(model, "ml-100k", "tuned, full ranking", "", runs)


def test_a_clearly_better_model_is_better_by_both_tests_and_equal_ones_are_not_distinguishable(tmp_path):
    baseline = fake_row(tmp_path, "sasrec", 0.30)
    better = study_table.compare(fake_row(tmp_path, "fame", 0.45, draw_seed=1), baseline, resamples=2000)
    assert better["seeds"] == [1, 2, 3]
    for protocol in ("ranked", "masked"):
        result = better[protocol]
        assert result["verdict"] == "better" and result["users"] == USERS
        assert 0.1 < result["difference"] < 0.2 and result["t_p"] < 0.05
        assert 0 < result["bootstrap_ci"][0] < result["difference"] < result["bootstrap_ci"][1]
    alike = study_table.compare(fake_row(tmp_path, "hm4sr", 0.30, draw_seed=2), baseline, resamples=2000)
    assert alike["ranked"]["verdict"] == "not distinguishable"
    assert alike["ranked"]["bootstrap_ci"][0] < 0 < alike["ranked"]["bootstrap_ci"][1]
    lonely = study_table.compare(fake_row(tmp_path, "fame-one", 0.5, seeds=(4,)), baseline, resamples=10)
    assert lonely["verdict"] == "not compared: 0 common seed(s)"


def test_runs_tested_on_other_users_are_not_compared(tmp_path):
    baseline = fake_row(tmp_path, "sasrec", 0.3)
    other = fake_row(tmp_path, "fame", 0.3)
    RunDir(str(tmp_path), "fame-seed2").write_test_ranks(  # one worker's share of other users
        {"user_key": np.array([1, 2], dtype=np.int64), "rank": np.zeros(2, np.int32),
         "rank_masked": np.zeros(2, np.int32)}, 1, 2)
    with pytest.raises(ValueError, match="test users differ"):
        study_table.compare(other, baseline, resamples=10)


def test_a_recorded_sweep_becomes_the_tune_command_that_gives_its_settings_back():
    tune = runpy.run_path(str(REPO / "flows" / "tune.py"), run_name="flow")
    settings, space, sweep = tune["parse_args"](["--model", "fame", "--dataset", "ml-100k", "--epochs", "100",
                                                 "--monitor", "ndcg@10", "--num-samples", "32", "--grace-period", "5",
                                                 "--final-seeds", "5", "--sweep-name", "study-ml100k-fame"])
    from training.config import TrainConfig

    recorded = {"training": TrainConfig.from_dict(settings).to_dict(), "sweep": vars(sweep)}
    again = tune["parse_args"](study_table.sweep_argv(recorded))
    assert TrainConfig.from_dict(again[0]) == TrainConfig.from_dict(settings) and again[2] == sweep


def test_study_rows_are_the_tuned_configuration_with_their_changes():
    import pandas as pd

    tuned = {"model": "fame", "lr": 0.002, "batch_size": 32, "name": "x", "seed": 1, "cpus_per_worker": 1.25,
             "model_config": {"n_heads": 4, "n_experts": 2, "dropout": 0.3}}
    runs = pd.DataFrame({"status": ["finished"], "config": [{"settings": tuned}]},
                        index=["study-ml100k-fame-final-seed1"])
    row = study_runs.row_settings(study_runs.STUDY_ROWS["fame-H1"], runs, "ml-100k")
    assert row == {"model": "fame", "lr": 0.002, "batch_size": 32,
                   "model_config": {"n_heads": 1, "n_experts": 2, "dropout": 0.3}}  # name, seed, CPUs: the run's own
    authors = study_runs.row_settings(study_runs.STUDY_ROWS["hm4sr-authors"], runs, "ml-100k")
    assert authors["batch_size"] == 1024 and authors["max_len"] == 50 and authors["monitor"] == "ndcg@10"
    with pytest.raises(SystemExit, match="run the sweep study-ml100k-hm4sr first"):
        study_runs.row_settings(study_runs.STUDY_ROWS["hm4sr-no-temporal"], runs, "ml-100k")


def test_time_to_quality_is_counted_from_the_first_step_and_from_launch_to_the_end_of_the_reaching_epoch():
    import pandas as pd
    import time_to_quality  # noqa: E402 - bench/

    epochs = [{"epoch": e, "epoch_started_at": 1000.0 + 10 * (e - 1), "epoch_s": 9.0, "val_ndcg@10": v}
              for e, v in [(1, 0.05), (2, 0.071), (3, 0.08)]]
    run = SimpleNamespace(epochs=epochs, started_at=pd.Timestamp(970.0, unit="s", tz="UTC"), restored_at=[])
    assert time_to_quality.reach(run) == {"epoch": 2, "from_first_step_s": 19.0, "from_launch_s": 49.0,
                                          "resumed": False}
    slow = SimpleNamespace(epochs=epochs[:1], started_at=run.started_at, restored_at=[])
    assert time_to_quality.reach(slow) == {"epoch": None, "best": 0.05}
    paused = time_to_quality.reach(run, [(1003.0, 1007.0), (1030.0, 1040.0)])  # 4 s in epoch 1, one after
    assert (paused["from_first_step_s"], paused["from_launch_s"]) == (15.0, 45.0)


def test_the_studys_pauses_are_read_from_their_log_and_taken_out_of_the_epochs_and_trials_they_overlap(tmp_path):
    """A stop and the cont after it are a pause; a stop the session ended on paused no recorded epoch."""
    import pandas as pd
    from datetime import datetime, timezone

    import study_pause  # bench/

    def stamp(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")

    (tmp_path / study_pause.PAUSES_FILE).write_text(
        f"{stamp(1000)} stop\n{stamp(1030)} cont\n{stamp(5000)} stop\n{stamp(9000)} stop\n{stamp(9010)} cont\n")
    pauses = study_pause.read_pauses(tmp_path)
    assert pauses == [(1000.0, 1030.0), (9000.0, 9010.0)]
    assert study_pause.read_pauses(tmp_path / "elsewhere") == []
    spans = [(990.0, 20.0), (1010.0, 40.0), (8000.0, 100.0)]  # 10 s and 20 s of them paused
    assert study_pause.paused_in_epochs(spans, pauses) == 30.0

    epochs = [{"epoch_started_at": start, "epoch_s": seconds} for start, seconds in spans]
    run = SimpleNamespace(epochs=epochs, mean_epoch_s=160 / 3)
    assert study_table.epoch_s(run, pauses) == pytest.approx(130 / 3)
    untimed = SimpleNamespace(epochs=[{"epoch_s": 20.0}], mean_epoch_s=20.0)  # a run from before the stamps
    assert study_table.epoch_s(untimed, pauses) == 20.0
    trial = pd.Series({"time_s": 170.0, "epoch_spans": json.dumps(spans)})  # Tune's seconds: 10 more than epochs'
    assert study_table.trial_s(SimpleNamespace(**trial), pauses) == (140.0, True)
    assert study_table.trial_s(SimpleNamespace(time_s=170.0, epoch_spans=None), pauses) == (170.0, False)


def test_the_ledger_carries_the_studys_store_to_another_machine_and_keeps_what_that_store_holds(tmp_path):
    """export writes runs, sweeps and the paired runs' test ranks as text with the paths made portable; load
    into a store elsewhere gives the same rows there, the ranks as the workers wrote them, and keeps the rows
    that store holds in a later version."""
    from datetime import datetime, timedelta, timezone

    import study_ledger  # bench/

    from featurestore import store
    from training.records import read_runs, write_run
    from tuning.records import SWEEPS, write_sweep

    here, there = tmp_path / "here", tmp_path / "there"
    db_uri, storage = str(here / "db"), str(here / "runs")
    db = store.connect(db_uri)
    started = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    for run_id in ("seed-run", "sweep-trial"):
        write_run(db, {"run_id": run_id, "status": "finished", "started_at": started, "num_workers": 2,
                       "run_dir": f"{storage}/{run_id}", "test_metrics": json.dumps({"test_ndcg@10": 0.05}),
                       "config": json.dumps({"settings": {"db": db_uri, "storage": storage, "seed": 1}})})
    write_sweep(db, "s", [{"sweep_id": "s", "trial_id": "t1", "status": "stopped", "run_id": "sweep-trial",
                           "curve": [0.01, 0.02], "best_value": 0.02, "reported_at": started}])
    keys = np.arange(10, dtype=np.int64) - 5
    for worker, share in enumerate(np.array_split(np.arange(10), 2)):
        RunDir(storage, "seed-run").write_test_ranks(
            {"user_key": keys[share], "rank": share.astype(np.int32), "rank_masked": share.astype(np.int32)}, worker, 2)
    ledger = tmp_path / "ledger"
    # not the trial's ranks, and no storage beside them: no run folder, no Tune state
    assert study_ledger.export(db_uri, storage, ledger) == {"runs": 2, "sweeps": 1, "test_ranks": 1, "storage": 0}
    assert str(here) not in "".join(path.read_text() for path in ledger.rglob("*") if path.is_file())

    there_db, there_storage = str(there / "db"), str(there / "runs")
    other = store.connect(there_db)
    hour = timedelta(hours=1)
    write_run(other, {"run_id": "sweep-trial", "status": "failed", "started_at": started + hour})  # newer: stays
    write_run(other, {"run_id": "seed-run", "status": "failed", "started_at": started - hour})  # older: replaced
    assert study_ledger.load(there_db, there_storage, ledger) == {"runs": 1, "sweeps": 1, "storage": 0, "test_ranks": 1}
    runs = read_runs(other).set_index("run_id")
    loaded = runs.loc["seed-run"]
    assert loaded.status == "finished" and loaded.run_dir == f"{there_storage}/seed-run" and loaded.started_at == started
    assert loaded.config["settings"] == {"db": str(Path(there_db).resolve()), "storage": there_storage, "seed": 1}
    assert runs.loc["sweep-trial"].status == "failed"
    ranks = RunDir(there_storage, "seed-run").read_test_ranks(2)
    assert ranks["user_key"].to_pylist() == sorted(keys.tolist()) and ranks["rank"].to_pylist() == list(range(10))
    trial = store.open_table(other, SWEEPS).to_pandas().iloc[0]
    assert json.loads(trial.curve) == [0.01, 0.02] and trial.reported_at == started
    assert study_ledger.load(there_db, there_storage, ledger) == {"runs": 0, "sweeps": 0, "storage": 0, "test_ranks": 0}


def test_study_runs_run_side_by_side_each_with_its_log_and_the_failures_are_named(tmp_path):
    """Each run waits for the other to have started (run one at a time, the first would give up waiting)."""
    script = ("import pathlib, sys, time; here, other, code = sys.argv[1:]; pathlib.Path(here).touch()\n"
              "for _ in range(600):\n"
              "    if pathlib.Path(other).exists(): print('met', other); sys.exit(int(code))\n"
              "    time.sleep(0.1)\n"
              "sys.exit(9)")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pending = [("run-a", [sys.executable, "-c", script, a, b, "0"]),
               ("run-b", [sys.executable, "-c", script, b, a, "3"])]
    assert study_runs.run_all(pending, 2, tmp_path / "logs") == [("run-b", 3)]
    assert (tmp_path / "logs" / "run-a.log").read_text() == f"met {b}\n"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_sweep_the_ledger_carries_to_another_machine_resumes_its_trial_in_flight_from_its_checkpoint(tmp_path):
    """The study's case: a session ends with a trial half trained and the next starts on a new machine. The ledger
    exported after the sweep's driver died carries its Tune directory and the trial's latest checkpoint; loaded
    into another store and storage folder (the first ones gone), the sweep resumes there and the trial goes on
    from its checkpoint's epoch, not from scratch. Exported again once it finished, the run keeps no weights."""
    import os
    import shutil
    import subprocess

    import study_ledger  # bench/

    from ml100k_store import build_ml100k_store  # tests/ helper
    from training.records import read_runs
    from tuning.records import SWEEPS
    from featurestore import store

    here, there, ledger = tmp_path / "here", tmp_path / "there", tmp_path / "ledger"
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.005]}\n")

    def sweep(side: Path) -> list[str]:
        return [sys.executable, str(REPO / "flows" / "tune.py"), "--model", "sasrec", "--db", str(side / "db"),
                "--storage", str(side / "runs"), "--space", str(space), "--search", "grid", "--num-samples", "1",
                "--scheduler", "none", "--epochs", "6", "--max-len", "20", "--hidden-size", "16", "--n-layers", "1",
                "--batch-size", "256", "--final-seeds", "0", "--sweep-name", "carried"]

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray instance
    build_ml100k_store(str(here / "db"), 16)
    driver = subprocess.Popen(sweep(here), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while not list((here / "runs" / "carried" / "runs").glob("*/checkpoint_manager_snapshot.json")):
            assert driver.poll() is None, "the sweep ended before its trial's first checkpoint"
            time.sleep(0.1)
    finally:  # the machine goes: its Ray dies with the driver
        driver.kill()
        driver.wait(timeout=60)
    counts = study_ledger.export(str(here / "db"), str(here / "runs"), ledger)
    assert counts["runs"] == counts["sweeps"] == 0 and counts["storage"] > 0  # nothing ended: only the copy holds it
    (run_copy,) = (ledger / "storage" / "carried" / "runs").iterdir()
    assert list(run_copy.glob("checkpoint_*/model.pt")) and list(run_copy.glob("checkpoint_*/optimizer.pt"))
    shutil.rmtree(here)

    build_ml100k_store(str(there / "db"), 16)
    assert study_ledger.load(str(there / "db"), str(there / "runs"), ledger)["storage"] == 1  # the sweep's folder
    resumed = subprocess.run([*sweep(there), "--sweep-resume"], capture_output=True, text=True, env=env,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    db = store.connect(str(there / "db"))
    (trial,) = store.open_table(db, SWEEPS).to_pandas().itertuples()
    assert (trial.status, trial.stop_reason, trial.epochs) == ("finished", "epochs", 6)
    assert f"carried-{trial.trial_id}" == run_copy.name  # the same trial, restored by Tune
    starts = [start for start, _ in json.loads(trial.epoch_spans)]  # when each epoch ran, across the machines
    assert len(starts) == 6 and starts == sorted(starts)
    run = read_runs(db).set_index("run_id").loc[run_copy.name]
    restored = list(run.restored_at)
    assert len(restored) == 1 and restored[0] >= 1 and run.epochs_run == 6  # on from its checkpoint

    study_ledger.export(str(there / "db"), str(there / "runs"), ledger)
    (run_copy,) = (ledger / "storage" / "carried" / "runs").iterdir()
    assert list(run_copy.glob("checkpoint_*/progress.json")) and not list(run_copy.rglob("*.pt"))
