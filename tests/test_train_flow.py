"""The training flow: resource plan, settings, and real Ray Train runs on MovieLens-100k in a real LanceDB.

The store holds the real ML-100k items and interactions; the text features are random 32-d vectors
(the encoders have their own tests, and a tiny model needs no real text to learn popularity).
The end-to-end runs: SASRec (quality, reload and record checks) and HM4SR (interrupted, refused on
changed features, resumed, a worker killed mid-epoch).
"""
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore import store
from featurestore.interactions import INTERACTIONS_SCHEMA
from featurestore.sequences import make_examples, read_sequences, split_counts
from recmodels import create_model
from training import TrainConfig, checkpoint, records, run_training
from training.checkpoint import Progress
from training.evaluate import numpy_batches, prefixed_means, protocol_sums, ranking_sums
from training.run import RunDir
from training.resources import DATA_CPU_RESERVE, ResourcePlanError, plan_workers
from training.steps import epoch_line, length_sorted_batches

from ml100k_store import build_ml100k_store, write_items  # tests/ helper

REPO = Path(__file__).resolve().parents[1]
TEXT_DIM = 32
TINY = {"hidden_size": 16, "n_layers": 1}
FAST = {"epochs": 2, "num_workers": 2, "batch_size": 128, "lr": 5e-3, "max_len": 50, "eval_batch_size": 512}


# ---------------------------------------------------------------- the CPU budget (no Ray needed)


def test_two_workers_with_a_cpu_each_on_two_cores_is_refused_not_left_to_hang():
    with pytest.raises(ResourcePlanError, match="leave 0 for Ray Data.*wait for its first batch forever"):
        plan_workers(cluster_cpus=2, cluster_gpus=0, largest_node_cpus=2, num_workers=2, cpus_per_worker=1.0)


def test_the_automatic_plan_shares_what_ray_data_does_not_need():
    plan = plan_workers(cluster_cpus=2, cluster_gpus=0, largest_node_cpus=2, num_workers=2)
    assert (plan.cpus_per_worker, plan.data_cpus, plan.threads_per_worker) == (0.75, DATA_CPU_RESERVE, 1)
    single = plan_workers(cluster_cpus=2, cluster_gpus=0, largest_node_cpus=2, num_workers=1)
    assert (single.cpus_per_worker, single.threads_per_worker) == (1.5, 2)
    assert single.scaling_config().resources_per_worker == {"CPU": 1.5}


@pytest.mark.parametrize("ask, message", [
    ({"num_workers": 2, "gpus_per_worker": 1}, "need 2 GPUs; the cluster has 0"),
    ({"num_workers": 1, "cpus_per_worker": 3}, "largest node has 2"),
    ({"num_workers": 0}, "num_workers must be >= 1"),
])
def test_plans_the_cluster_cannot_run_are_refused(ask, message):
    with pytest.raises(ResourcePlanError, match=message):
        plan_workers(cluster_cpus=2, cluster_gpus=0, largest_node_cpus=2, **ask)


# ---------------------------------------------------------------- settings, progress, output


def test_settings_reject_unknown_keys_models_and_monitors():
    with pytest.raises(ValueError, match="unknown training setting.*'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="unknown model 'bert4rec'"):
        TrainConfig(model="bert4rec")
    with pytest.raises(ValueError, match="monitor 'ndcg@20' is not one of"):
        TrainConfig(ks=(5, 10))


def test_resume_keeps_the_experiment_and_lets_limits_change():
    saved = TrainConfig(model="hm4sr", name="run", lr=1e-3, epochs=10, model_config={"dropout": 0.2})
    resumed = saved.resumed_with({"name": "run", "resume": True, "epochs": 20, "num_workers": 2})
    assert (resumed.epochs, resumed.num_workers, resumed.model_config, resumed.lr) == (20, 2, {"dropout": 0.2}, 1e-3)
    with pytest.raises(ValueError, match=r"lr \(run: 0.001, given: 0.01\).*model_config"):
        saved.resumed_with({"lr": 1e-2, "model_config": {"dropout": 0.3}})


def test_progress_stops_on_patience_epochs_or_time_and_a_resume_can_give_more():
    progress = Progress()
    for value in (0.1, 0.3, 0.2, 0.3):
        progress.record({"epoch": progress.epoch + 1, "val_ndcg@20": value, "train_s": 10.0},
                        TrainConfig(epochs=10, patience=2))
    assert (progress.best_epoch, progress.finished, progress.stop_reason) == (2, True, "patience")
    progress.update_stop(TrainConfig(epochs=10, patience=5))  # a resumed run with more patience goes on
    assert not progress.finished
    progress.update_stop(TrainConfig(epochs=10, patience=5, time_budget_s=40))
    assert progress.stop_reason == "time budget"
    progress.update_stop(TrainConfig(epochs=4))
    assert progress.stop_reason == "epochs"
    progress.update_stop(TrainConfig(epochs=10, patience=5, stop_at=0.3))  # reached at epoch 2: its weights are best
    assert progress.stop_reason == "target" and progress.best_epoch == 2
    progress.update_stop(TrainConfig(epochs=10, patience=5, stop_at=0.31))
    assert not progress.finished


@pytest.mark.parametrize("shuffle", [False, True])
def test_length_sorted_batches_keep_every_row_once_and_cut_each_batch_to_its_longest_history(shuffle):
    examples = make_examples({"item_idx": [list(range(1, n + 1)) for n in range(4, 41)],
                              "timestamps": [list(range(n)) for n in range(4, 41)], "first_timestamp": [0] * 37},
                             "train", max_len=40, mode="all")  # L >= every history: one window a user
    windows = numpy_batches(examples, 16)  # 37 rows: windows of 16, 16 and 5
    batches = list(length_sorted_batches(windows, 5, shuffle=shuffle))
    assert sorted(len(b["target"]) for b in batches) == [2] + [5] * 7  # a window's odd rows wait for the next
    seen = torch.cat([b["target"] for b in batches])
    assert sorted(seen.tolist()) == sorted(examples["target"].tolist())
    for batch in batches:
        lengths = (batch["item_seq"] > 0).sum(dim=1)
        assert batch["item_seq"].shape[1] == batch["target_seq"].shape[1] == int(lengths.max())
        assert torch.equal(lengths, batch["seq_len"])  # rows are whole: the cut columns were padding
    if not shuffle:  # the first window's three whole batches rise in length
        assert all(batches[i]["seq_len"].max() <= batches[i + 1]["seq_len"].min() for i in range(2))


def test_the_count_of_batches_follows_from_the_rows_however_the_windows_are_cut():
    """DDP workers with equal shards must take equal steps: a worker whose iterator cuts its windows
    unevenly (as Ray Data's may) still gets ceil(rows / batch_size) batches."""
    examples = make_examples({"item_idx": [list(range(1, n + 1)) for n in range(4, 41)],
                              "timestamps": [list(range(n)) for n in range(4, 41)], "first_timestamp": [0] * 37},
                             "train", max_len=40, mode="all")
    even = numpy_batches(examples, 16)
    cuts = [0, 7, 23, 26, 37]  # the same 37 rows in windows of 7, 16, 3 and 11
    uneven = ({name: torch.as_tensor(value[start:end]) for name, value in examples.items()}
              for start, end in zip(cuts, cuts[1:]))
    for windows in (even, uneven):
        assert len(list(length_sorted_batches(windows, 5, shuffle=True))) == 8


def test_one_readable_line_per_epoch():
    metrics = {"epoch": 3, "loss": 9.5, "loss_ce": 7.25, "loss_cp": 0.5, "val_hr@10": 0.1, "val_ndcg@10": 0.05,
               "val_ndcg@20": 0.06, "epoch_s": 4.25, "train_s": 3.5, "eval_s": 0.75, "sequences_per_s": 1234.0,
               "sequences_per_s_per_worker": 617.0, "is_best": True}
    assert epoch_line(metrics, TrainConfig(epochs=10)) == (
        "epoch   3/10 | loss 9.5000 (ce 7.2500, cp 0.5000) | val hr@10 0.1000 ndcg@10 0.0500 ndcg@20 0.0600 *best* "
        "| 4.2 s (train 3.5, eval 0.8) | 1,234 seq/s, 617/worker")
    diverged = epoch_line(metrics | {"val_nonfinite_rows": 7}, TrainConfig(epochs=10))
    assert diverged.endswith("617/worker | 7 validation rows scored non-finite (counted as misses)")


@pytest.mark.parametrize("workers", [1, 2])
def test_one_worker_reads_its_splits_whole_without_split_coordinators_and_several_share_them(ray_local, workers):
    from ray.data.iterator import DataIterator

    from training.data import data_config

    rows = 10
    datasets = {split: ray_local.data.range(rows) for split in ("train", "valid", "test")}
    shards = data_config().configure(datasets, workers, None, None)
    assert len(shards) == workers
    for split in datasets:
        iterators = [shard[split] for shard in shards]
        kinds = {type(iterator).__name__ for iterator in iterators}
        # a streaming split's iterators share a SplitCoordinator actor; one worker needs none
        assert (kinds == {"StreamSplitDataIterator"}) == (workers > 1) and all(
            isinstance(iterator, DataIterator) for iterator in iterators)
        if workers == 1:
            assert sum(len(batch["id"]) for batch in iterators[0].iter_batches()) == rows


def test_flow_arguments_become_settings_and_a_model_config():
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    settings = flow["parse_args"](["--model", "hm4sr", "--epochs", "3", "--modalities", "id", "text",
                                   "--cp-weight", "0.5", "--num-workers", "2", "--train-mode", "last"])
    assert settings == {"model": "hm4sr", "epochs": 3, "num_workers": 2, "train_mode": "last",
                        "model_config": {"modalities": ["id", "text"], "cp_weight": 0.5}}
    assert flow["parse_args"]([]) == {}  # unset flags stay unset: defaults, or a resumed run's settings


# ---------------------------------------------------------------- item vectors (LanceDB, no Ray)


def test_item_vectors_replace_a_runs_rows_get_an_index_and_refuse_another_width(tmp_path, monkeypatch):
    db = store.connect(str(tmp_path / "db"))
    rng = np.random.default_rng(0)
    ids = [f"item{i}" for i in range(1000)]
    first, second = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 32))
    assert records.write_item_vectors(db, "item_vectors", "run-a", ids, first) is False  # small: exact search
    records.write_item_vectors(db, "item_vectors", "run-b", ids, first)
    monkeypatch.setattr(records, "INDEX_MIN_ROWS", 1500)
    assert records.write_item_vectors(db, "item_vectors", "run-a", ids, second) is True  # run-a replaced
    table = db.open_table("item_vectors")
    assert table.count_rows() == 2000 and table.count_rows("run_id = 'run-a'") == 1000
    assert {column for index in table.list_indices() for column in index.columns} == {"vector", "run_id"}
    hits = store.nearest(table.search(second[7].astype(np.float32)).where("run_id = 'run-a'", prefilter=True), 5).to_pandas()
    assert set(hits["run_id"]) == {"run-a"} and "item7" in set(hits["item_id"])
    assert records.vectors_table_for(db, 32) == "item_vectors" and records.vectors_table_for(db, 64) == "item_vectors_64"
    with pytest.raises(store.StoreError, match="holds 32-d vectors; this model's item representations are 64-d"):
        records.check_vectors_table(db, "item_vectors", 64)


# A run of a sweep's trials: its process finds the runs table (or creates it), waits until every other has done
# so (a file each in a folder), then writes its row, at once with theirs.
WRITE_A_RUN_ROW_WITH_THE_OTHERS = """
import sys, time
from pathlib import Path
from featurestore import store
from training import records
uri, run_id, folder, writers = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
db = store.connect(uri)
records.ensure_runs_table(db)
(folder / run_id).touch()
while len(list(folder.iterdir())) < writers:
    time.sleep(0.01)
records.write_run(db, {"run_id": run_id, "status": "finished"})
"""


def test_runs_written_at_once_by_processes_that_created_their_table_at_once_are_all_kept(tmp_path):
    """Lance commits a table's creation as an overwrite: creations racing each other, or racing the first rows,
    used to lose runs (a sweep's two trials ending together kept one row). Each process creates the table where
    it is missing before any writes, and the losers of that race take the winner's table."""
    writers, uri, folder = 3, str(tmp_path / "db"), tmp_path / "created"
    folder.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", WRITE_A_RUN_ROW_WITH_THE_OTHERS, uri, f"run-{i}",
                                   str(folder), str(writers)], cwd=REPO, stderr=subprocess.PIPE, text=True)
                 for i in range(writers)]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    assert sorted(records.read_runs(store.connect(uri)).run_id) == [f"run-{i}" for i in range(writers)]


# ---------------------------------------------------------------- a MovieLens-100k store


@pytest.fixture(scope="module")
def ml100k(ray_local, tmp_path_factory):
    return build_ml100k_store(str(tmp_path_factory.mktemp("ml100k") / "db"), TEXT_DIM)


@pytest.fixture
def no_workers(monkeypatch):
    """Fail the test if a run gets as far as building its TorchTrainer."""
    def refuse(*args, **kwargs):
        raise AssertionError("the bad input was not caught before the workers start")

    monkeypatch.setattr("training.run.build_trainer", refuse)


def single_process_test_metrics(model, db, max_len: int, ks) -> dict[str, float]:
    """Every test user scored in this process, in order, with history items ranked ("test_") and masked
    ("test_masked_"): what the workers' all-reduced sums must equal."""
    examples = make_examples(read_sequences(db), "test", max_len)
    return {**prefixed_means(ranking_sums(model, numpy_batches(examples, 256), ks), "test"),
            **prefixed_means(ranking_sums(model, numpy_batches(examples, 256), ks, mask_history=True), "test_masked")}


# ---------------------------------------------------------------- bad input: clear errors, no workers


@pytest.mark.e2e
def test_unknown_model_fails_before_anything_starts(ml100k, tmp_path, no_workers):
    with pytest.raises(ValueError, match="unknown model 'gru4rec'"):
        run_training({"model": "gru4rec", "db": ml100k.uri, "storage": str(tmp_path)})
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    with pytest.raises(SystemExit):  # argparse names the valid choices
        flow["parse_args"](["--model", "gru4rec"])


@pytest.mark.e2e
def test_a_store_without_items_is_refused(ml100k, tmp_path, no_workers, capsys):
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    assert flow["main"](["--db", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs")]) == 2
    error = capsys.readouterr().err
    assert "table 'items' does not exist" in error and "run flows/encode_items.py first" in error


@pytest.mark.e2e
def test_an_empty_interactions_table_is_refused(ml100k, tmp_path, no_workers):
    db = store.connect(str(tmp_path / "db"))
    write_items(db, TEXT_DIM)
    db.create_table(store.INTERACTIONS, schema=INTERACTIONS_SCHEMA)
    with pytest.raises(store.StoreError, match="table 'interactions' .* is empty: run flows/import_interactions.py"):
        run_training({"db": db.uri, "storage": str(tmp_path / "runs")})


@pytest.mark.e2e
def test_a_store_of_another_data_set_is_refused(ml100k, tmp_path, no_workers):
    with pytest.raises(store.StoreError, match=r"--dataset 'ml-1m': the store .* holds \['ml-100k'\]"):
        run_training({"dataset": "ml-1m", "db": ml100k.uri, "storage": str(tmp_path)})


@pytest.mark.e2e
def test_workers_that_would_starve_ray_data_are_refused(ml100k, tmp_path, no_workers):
    with pytest.raises(ResourcePlanError, match="leave 0 for Ray Data"):
        run_training({"db": ml100k.uri, "storage": str(tmp_path), "num_workers": 2, "cpus_per_worker": 1.0})


@pytest.mark.e2e
def test_a_bad_model_hyper_parameter_is_refused(ml100k, tmp_path, no_workers):
    with pytest.raises(ValueError, match="unknown SASRecConfig key.*'n_experts'"):
        run_training({"db": ml100k.uri, "storage": str(tmp_path), "model_config": {"n_experts": 4}})


# ---------------------------------------------------------------- a short real run


@pytest.fixture(scope="module")
def sasrec_run(ml100k, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    result = run_training({"model": "sasrec", "db": ml100k.uri, "storage": str(storage), "name": "sasrec-short",
                           "model_config": {**TINY, "n_heads": 1}, **FAST})
    return result


@pytest.mark.e2e
def test_a_stopped_trials_row_takes_every_epoch_from_its_runs_checkpoint(sasrec_run, tmp_path):
    """Tune's results of a trial restored from a checkpoint hold only the epochs after the restore (seen in the
    study: 2 of a trial's 10 epochs); a trial that ASHA stopped has no run record, so its row (curve, epochs,
    steps, best value: what the leaderboard and ASHA's replay read) comes from its run's latest checkpoint."""
    from types import SimpleNamespace

    from tuning.records import trial_record
    from tuning.sweep import run_id, trials_storage

    shutil.copytree(sasrec_run.run_dir, Path(trials_storage(str(tmp_path), "s")) / run_id("s", "t1"))
    base = TrainConfig(model="sasrec", storage=str(tmp_path))
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.005}, last_result=sasrec_run.history[-1])
    told = sasrec_run.history[-1:]  # restored after epoch 1: Tune was told of epoch 2 only
    record = trial_record(trial, "TERMINATED", told, None, "s", base, {"sweep": {"scheduler": "asha"}}, {})
    history = [m[base.monitor_key] for m in sasrec_run.history]
    assert record["curve"] == history and record["best_value"] == max(history) and record["epochs"] == 2
    assert record["steps"] == sasrec_run.history[-1]["total_steps"]
    # Tune's clock (time_total_s) restarts at a restore: the epochs' seconds count the epochs before it too
    trial.last_result = {**trial.last_result, "time_total_s": sasrec_run.history[-1]["epoch_s"]}
    record = trial_record(trial, "TERMINATED", told, None, "s", base, {"sweep": {"scheduler": "asha"}}, {})
    assert record["time_s"] == pytest.approx(sum(m["epoch_s"] for m in sasrec_run.history))
    # its run had ended by its epoch limit at that report: so the row says
    assert (record["status"], record["stop_reason"]) == ("stopped", "ASHA, at its run's last epoch (epochs)")


@pytest.mark.e2e
def test_short_run_metrics_are_finite_and_beat_an_untrained_model(sasrec_run, ml100k):
    result = sasrec_run
    assert [m["epoch"] for m in result.history] == [1, 2]
    for metrics in result.history:
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
        # one window per 25 targets (L 50, stride 25); Ray's even split for DDP drops up to num_workers - 1 rows
        windows = split_counts(read_sequences(ml100k), 50)["train_examples_all"]
        assert windows - 1 <= metrics["sequences"] <= windows and metrics["sequences_per_s_per_worker"] > 0
    meta = checkpoint.read_meta(result.checkpoint)
    torch.manual_seed(0)
    untrained = create_model("sasrec", meta["model_config"], meta["n_items"]).eval()
    before = single_process_test_metrics(untrained, ml100k, 50, TrainConfig().ks)
    assert result.test["test_ndcg@10"] > 2 * before["test_ndcg@10"]
    assert result.test["test_hr@20"] > 2 * before["test_hr@20"]
    assert all(math.isfinite(v) for v in result.test.values())


@pytest.mark.e2e
def test_checkpoint_reloads_to_the_scores_the_workers_reported(sasrec_run, ml100k):
    result = sasrec_run
    model = checkpoint.load_model(result.checkpoint, None)
    # the distributed evaluation (2 workers, all-reduced sums) equals one process scoring every user
    alone = single_process_test_metrics(model, ml100k, 50, TrainConfig().ks)
    assert alone == pytest.approx(result.test, rel=1e-9, abs=1e-12)
    vectors = ml100k.open_table(result.vectors_table).to_pandas()
    assert len(vectors) == 1682 and set(vectors["run_id"]) == {"sasrec-short"}
    stored = np.stack(vectors.sort_values("item_id")["vector"].to_numpy())
    expected = model.item_representations().detach().numpy()[1:]  # the index order is sorted ids
    np.testing.assert_array_equal(stored, expected)


@pytest.mark.e2e
def test_each_test_user_has_a_rank_per_protocol_that_the_reported_metrics_follow_from(sasrec_run, ml100k):
    result = sasrec_run
    ranks = RunDir(str(Path(result.run_dir).parent), result.run_id).read_test_ranks(2).to_pydict()
    examples = make_examples(read_sequences(ml100k), "test", 50)
    assert sorted(ranks["user_key"]) == sorted(examples["user_key"]) and len(set(ranks["user_key"])) == 943
    for column, prefix in (("rank", "test"), ("rank_masked", "test_masked")):
        rank = np.asarray(ranks[column], dtype=np.float64)
        assert np.mean((rank < 10) / np.log2(rank + 2)) == pytest.approx(result.test[f"{prefix}_ndcg@10"], rel=1e-9)
        assert np.mean(rank < 20) == pytest.approx(result.test[f"{prefix}_hr@20"], rel=1e-9)
    # the same users' ranks as one process scoring them with the checkpoint's best weights
    model = checkpoint.load_model(result.checkpoint, None)
    _, alone = protocol_sums(model, numpy_batches(examples, 256), (10,), (False, True), keep_ranks=True)
    by_user = dict(zip(ranks["user_key"], zip(ranks["rank"], ranks["rank_masked"])))
    assert [by_user[key] for key in alone["user_key"].tolist()] == list(zip(alone["rank_0"].tolist(),
                                                                            alone["rank_1"].tolist()))


@pytest.mark.e2e
def test_the_run_is_recorded_with_versions_timing_and_a_plot(sasrec_run, ml100k):
    run = records.read_runs(ml100k).set_index("run_id").loc["sasrec-short"]
    assert (run.status, run.model, run.epochs_run, run.num_workers, run.n_items) == ("finished", "sasrec", 2, 2, 1682)
    for name in ("items", "interactions", "sequences"):
        assert run[f"{name}_version"] == ml100k.open_table(name).version
    assert run.config["settings"]["lr"] == 5e-3 and run.config["model"]["model_config"]["hidden_size"] == 16
    assert [m["epoch"] for m in run.epochs] == [1, 2] and run.test_metrics == sasrec_run.test
    assert run.wall_time_s > run.train_time_s > 0 and run.sequences_per_s > 0
    assert Path(sasrec_run.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(sasrec_run.plot).parent == Path(sasrec_run.checkpoint).parent
    kept = [p for p in Path(sasrec_run.run_dir).iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert 1 <= len(kept) <= 2  # the best and the latest


# ---------------------------------------------------------------- interruption, resume, worker failure


@pytest.mark.e2e
def test_an_interrupted_run_resumes_and_survives_a_killed_worker(ml100k, tmp_path, monkeypatch):
    """One HM4SR run, three invocations (fits are the expensive part of these tests)."""
    from ray.train import TrainingFailedError

    runs = str(tmp_path / "runs")
    # 1. rank 1 dies in the middle of epoch 2 and no restart is allowed: the run is interrupted
    with pytest.raises(TrainingFailedError):
        run_training({"model": "hm4sr", "db": ml100k.uri, "storage": runs, "name": "hm4sr-cut",
                      "model_config": TINY, **FAST, "epochs": 3, "max_failures": 0,
                      "max_len": 20, "batch_size": 256,  # 4 steps per worker and epoch: fits are the cost here
                      "fail_at": {"epoch": 2, "step": 1, "rank": 1, "marker": str(tmp_path / "crashed")}})
    assert records.read_runs(ml100k).set_index("run_id").loc["hm4sr-cut"].status == "failed"

    # 2. the items were re-encoded with another text encoder: the checkpoint no longer fits the store
    changed = store.connect(str(tmp_path / "changed"))
    shutil.copytree(ml100k.uri, changed.uri, dirs_exist_ok=True)
    write_items(store.connect(changed.uri), 16)
    with monkeypatch.context() as patch:
        patch.setattr("training.run.build_trainer", lambda *a, **k: pytest.fail("workers started"))
        with pytest.raises(ValueError, match="'text' is 16-d in the items table, but checkpoint .* 32-d"):
            run_training({"name": "hm4sr-cut", "storage": runs, "resume": True, "db": changed.uri})

    # 3. --resume continues from the epoch-1 checkpoint; in epoch 3 rank 1 is killed mid-epoch, and Ray
    #    Train restarts the workers from the epoch-2 checkpoint
    killed = tmp_path / "killed"
    result = run_training({"name": "hm4sr-cut", "storage": runs, "resume": True, "max_failures": 1,
                           "fail_at": {"epoch": 3, "step": 1, "rank": 1, "marker": str(killed)}})
    assert killed.exists()
    assert [m["epoch"] for m in result.history] == [1, 2, 3]  # the epochs of an uninterrupted run
    assert checkpoint.read_progress(result.checkpoint).restored_at == [1, 2]
    assert set(result.history[0]) >= {"loss_ce", "loss_cp", "loss_idcl", "loss_pcl"}
    assert all(math.isfinite(v) for v in result.test.values())
    run = records.read_runs(ml100k).set_index("run_id").loc["hm4sr-cut"]
    assert run.status == "finished" and run.restored_at.tolist() == [1, 2] and run.epochs_run == 3
    assert run.config["model"]["model_config"]["modalities"] == ["id", "text"]  # the items have no images
    assert ml100k.open_table(run.vectors_table).schema.field("vector").type.list_size == 32  # id + text, d 16


@pytest.mark.e2e
def test_a_finished_run_name_is_not_reused_by_accident(sasrec_run, ml100k, no_workers):
    storage = str(Path(sasrec_run.run_dir).parent)
    with pytest.raises(ValueError, match="already exists.*--resume"):
        run_training({"db": ml100k.uri, "storage": storage, "name": "sasrec-short"})


def test_checkpoints_from_before_layer_norm_eps_keep_the_eps_they_were_trained_with(tmp_path):
    (tmp_path / checkpoint.META).write_text(json.dumps({"model": "sasrec", "n_items": 5, "model_config": {"hidden_size": 8}}))
    assert checkpoint.read_meta(tmp_path)["model_config"] == {"hidden_size": 8, "layer_norm_eps": 1e-5}
    (tmp_path / checkpoint.META).write_text(json.dumps({"model": "sasrec", "n_items": 5,
                                                        "model_config": {"hidden_size": 8, "layer_norm_eps": 1e-12}}))
    assert checkpoint.read_meta(tmp_path)["model_config"]["layer_norm_eps"] == 1e-12


def test_a_resumed_run_keeps_its_checkpoints_model_config_and_refuses_a_changed_store(tmp_path, monkeypatch):
    import ray.train

    from training import run as run_module

    saved_config = {"hidden_size": 8, "max_seq_len": 20}  # written before layer_norm_eps existed
    (tmp_path / checkpoint.META).write_text(json.dumps(
        {"model": "sasrec", "n_items": 5, "model_config": saved_config, "feature_dims": {}}))
    monkeypatch.setattr(run_module.RunDir, "latest_checkpoint",
                        lambda self: ray.train.Checkpoint.from_directory(str(tmp_path)))
    run_dir = run_module.RunDir(str(tmp_path), "old-run")
    now = {"model": "sasrec", "n_items": 5, "feature_dims": {},
           "model_config": {"hidden_size": 8, "max_seq_len": 20, "layer_norm_eps": 1e-12}}
    resumed = run_module.resumed_meta(run_dir, now, None, 5)
    assert resumed["model_config"] == {**saved_config, "layer_norm_eps": 1e-5}  # the eps it was trained with
    with pytest.raises(ValueError, match=r"max_seq_len \(checkpoint: 20, store now: 50\)"):
        run_module.resumed_meta(run_dir, {**now, "model_config": {**now["model_config"], "max_seq_len": 50}}, None, 5)


BUFFERS_IN_A_THREAD = """
import ctypes, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE, faults = 48 * 2**20, []  # a training step's activations: large buffers, freed at the step's end

def steps():  # the way Ray Train runs the loop: not in the main thread
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        buffer = libc.malloc(SIZE)
        ctypes.memset(buffer, 1, SIZE)  # touch every page, as a step writes its activations
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(sum(faults[1:]), SIZE // resource.getpagesize() * len(faults[1:]))
"""


def test_worker_malloc_settings_keep_a_training_threads_freed_memory_for_the_next_step():
    """With WORKER_ENV_VARS the pages a thread's step frees stay mapped, so the next step faults on none of them.

    Only our settings are asserted: how many faults glibc's defaults cause depends on the machine and its load
    (the speed effect is in bench/results/ml1m_sasrec_converged.md).
    """
    import subprocess
    import sys

    from training.resources import WORKER_ENV_VARS

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    output = subprocess.run([sys.executable, "-c", BUFFERS_IN_A_THREAD], env={**clean, **WORKER_ENV_VARS},
                            check=True, capture_output=True, text=True).stdout
    faults, pages_touched = map(int, output.split())
    assert faults < pages_touched / 100  # without the settings every step maps its buffer anew: a fault a page


# ---------------------------------------------------------------- the one-process runner (bench/ml1m_one_process.py)

WITHOUT_RAY = """
import importlib.abc, runpy, sys
class NotInstalled(importlib.abc.MetaPathFinder):  # the GPU machines have torch but not Ray or LanceDB
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"ray", "lancedb", "lance", "lance_ray"}:
            raise ImportError(f"no module named {name!r} on this machine")
sys.meta_path.insert(0, NotInstalled())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.e2e
def test_the_one_process_runner_trains_the_flows_models_where_ray_is_not_installed(ml100k, tmp_path):
    import subprocess
    import sys

    script = str(Path(__file__).resolve().parents[1] / "bench" / "ml1m_one_process.py")
    data, out = tmp_path / "ml100k.npz", tmp_path / "results.json"
    # OpenMP threads that spin while Ray's processes hold a core made these epochs 14x slower on 2 cores
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([sys.executable, script, "export", "--dataset", "ml-100k", "--db", ml100k.uri, "--out", str(data),
                    "--max-len", "50", "--hidden-size", "16", "--lr", "5e-3", "--models", "sasrec", "hm4sr"],
                   check=True, env=env, timeout=300)
    refused = subprocess.run([sys.executable, script, "train", "--data", str(data), "--out", str(out), "--settings",
                              '{"seed": 2, "nope": 1}'], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--settings: unknown training setting(s) ['nope']" in refused.stderr
    subprocess.run([sys.executable, "-c", WITHOUT_RAY, script, "train", "--data", str(data), "--out", str(out),
                    "--epochs", "3", "--device", "cpu", "--settings", '{"eval_batch_size": 128}'], check=True,
                   env=env, timeout=600)
    results = json.loads(out.read_text())["models"]
    assert list(results) == ["sasrec", "hm4sr"]
    assert all(result["settings"]["eval_batch_size"] == 128 for result in results.values())  # --settings applied
    assert results["hm4sr"]["meta"]["model_config"]["modalities"] == ["id", "text"]  # as the flow resolves it
    assert results["hm4sr"]["history"][-1]["loss_idcl"] > 0  # the auxiliary losses ran and were reported
    meta = results["sasrec"]["meta"]
    torch.manual_seed(0)
    untrained = create_model("sasrec", meta["model_config"], meta["n_items"]).eval()
    before = single_process_test_metrics(untrained, ml100k, 50, TrainConfig().ks)
    assert results["sasrec"]["test_ndcg@10"] > 2 * before["test_ndcg@10"]
    for result in results.values():
        assert [m["epoch"] for m in result["history"]] == [1, 2, 3] and result["stop_reason"] == "epochs"
        windows = split_counts(read_sequences(ml100k), 50)["train_examples_all"]
        assert all(m["sequences"] == windows for m in result["history"])  # every training row, every epoch
        losses = [m["loss"] for m in result["history"]]
        assert losses[2] < losses[1] < losses[0]
        assert result["test_masked_hr@10"] >= result["test_hr@10"]  # masking seen items can only help here
        assert len(result["test_ranks"]["user_key"]) == len(set(result["test_ranks"]["user_key"])) == 943
