"""Two Ray nodes on one machine (the `two_nodes` fixture in conftest.py): where the training flow's DDP
workers run, asserted from the workers' own node ids, and the run record naming those nodes."""
import os
import runpy
import subprocess
import sys

import pyarrow as pa
import pytest

from featurestore import store
from featurestore.sequences import read_sequences, split_counts
from training import TrainConfig, records
from training.resources import plan_workers

from ml100k_store import build_ml100k_store  # tests/ helper
from tests.conftest import REPO


def test_the_placement_strategy_reaches_ray_trains_scaling_config():
    plan = plan_workers(cluster_cpus=4, cluster_gpus=0, largest_node_cpus=2, num_workers=2, cpus_per_worker=0.5)
    assert plan.scaling_config("SPREAD").placement_strategy == "SPREAD"
    assert plan.scaling_config().placement_strategy == TrainConfig().placement_strategy == "PACK"
    with pytest.raises(ValueError, match="placement_strategy must be one of"):
        TrainConfig(placement_strategy="DIAGONAL")
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    assert flow["parse_args"](["--placement-strategy", "STRICT_SPREAD"]) == {"placement_strategy": "STRICT_SPREAD"}


def test_a_runs_table_from_before_worker_nodes_gets_the_column(tmp_path):
    db = store.connect(str(tmp_path / "db"))
    older = pa.schema([field for field in records.RUNS_SCHEMA if field.name != "worker_nodes"])
    db.create_table(records.RUNS, data=pa.Table.from_pylist([{"run_id": "old", "status": "finished"}], schema=older))
    records.write_run(db, {"run_id": "new", "status": "finished", "worker_nodes": ["a", "b"]})
    runs = records.read_runs(db).set_index("run_id")
    assert runs.loc["new"].worker_nodes.tolist() == ["a", "b"] and runs.loc["old"].worker_nodes is None


@pytest.mark.slow
def test_spread_puts_one_ddp_worker_on_each_node_and_the_record_names_them(two_nodes, tmp_path):
    """flows/train.py joins the two-node cluster as a job would (RAY_ADDRESS). At half a CPU each, both workers fit
    on one node, which is where PACK (the default) puts them; SPREAD puts one on each."""
    db = build_ml100k_store(str(tmp_path / "db"), 32)
    command = [sys.executable, "flows/train.py", "--db", db.uri, "--storage", str(tmp_path / "runs"), "--name", "spread",
               "--epochs", "1", "--num-workers", "2", "--cpus-per-worker", "0.5", "--placement-strategy", "SPREAD",
               "--hidden-size", "16", "--n-layers", "1", "--n-heads", "1", "--batch-size", "256", "--max-len", "20",
               "--eval-batch-size", "512"]
    env = {**os.environ, "RAY_ADDRESS": two_nodes.address}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nodes = {node.node_id for node in two_nodes.list_all_nodes()}
    run = records.read_runs(db).set_index("run_id").loc["spread"]
    assert len(run.worker_nodes) == 2 and set(run.worker_nodes) == nodes  # one worker on each node
    assert "workers ran on 2 node(s)" in done.stdout
    # every training window once in the epoch (Ray's even split for DDP drops up to num_workers - 1)
    windows = split_counts(read_sequences(db), 20)["train_examples_all"]
    assert windows - 1 <= run.epochs[0]["sequences"] <= windows
