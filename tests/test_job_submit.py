"""`ray job submit --working-dir .` of the encoding flow and of a sweep against a `ray start --head` cluster on
127.0.0.1, started as from a shell without the venv on its PATH, and submitted as the README says."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent  # the venv's bin: ray, python
# The documented way (README, "On a cluster"): the entrypoint is a shell command whose `python` is the first one on
# the PATH of the head node's `ray start`, so the job's runtime env puts the project's environment first there (Ray
# expands ${PATH} on the node). py_executable would not do: it picks the interpreter of the job's workers only.
PROJECT_ON_PATH = {"env_vars": {"PATH": f"{BIN}:${{PATH}}"}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(address: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # answering, if only to ask for the auth token
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {timeout_s}s")


@pytest.fixture(scope="module")
def head_node():
    """A head node of its own, in its own process group: stopping it touches no other Ray on the machine
    (`ray stop` would also kill the test session's Ray, and anybody else's). Started by the venv's `ray` from a
    PATH without the venv, as from a shell that never activated it: the raylet's PATH, which the job's
    entrypoint gets, then has no `python` with the project's dependencies. One for the module: each start and
    stop costs tens of seconds, and the jobs share nothing but the cluster."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p and Path(p).resolve() != BIN.resolve())
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # on SIGTERM `ray start` would first ask the GCS to drain the node, and the GCS has had the same
           # SIGTERM: the request times out after 30 s. This head has nothing to drain.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("VIRTUAL_ENV", None)
    gcs_port, dashboard_port = free_port(), free_port()
    # Every port of its own: the agents' defaults would collide with the test session's Ray (or any other),
    # and then the job agent never comes up.
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp_dir = Path("/tmp") / f"ray_job_test_{os.getpid()}"  # short: Ray's socket paths have a length limit
    start = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
             f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             "--object-store-memory=536870912", "--disable-usage-stats", f"--temp-dir={temp_dir}", *agent_ports]
    process = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_dashboard(address, process)
        yield env, address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", str(temp_dir)], check=False)  # stragglers of this cluster only


def run_job(address: str, env: dict, command: list[str], runtime_env: dict | None) -> tuple[int, str]:
    """`ray job submit --working-dir . [--runtime-env-json ...] -- python COMMAND`: its exit status and output."""
    args = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    if runtime_env is not None:
        args += ["--runtime-env-json", json.dumps(runtime_env)]
    args += ["--", "python", *command]
    for _ in range(30):  # the job agent comes up a little after the dashboard answers
        result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        if "No available agent" not in output:
            break
        time.sleep(2)
    return result.returncode, output


def submit(address: str, env: dict, *command: str) -> str:
    """A flow submitted the documented way; its output once it succeeded."""
    returncode, output = run_job(address, env, list(command), PROJECT_ON_PATH)
    assert returncode == 0, output[-3000:]
    assert "succeeded" in output
    return output


def test_without_the_runtime_env_the_job_finds_no_python_with_the_projects_dependencies(head_node):
    """What the runtime env is for: the head's PATH has no `python` that imports pyarrow (ModuleNotFoundError from
    another Python on the PATH, or no `python` at all)."""
    env, address = head_node
    returncode, output = run_job(address, env, ["-c", "import pyarrow"], runtime_env=None)
    assert returncode != 0 and "succeeded" not in output
    assert "No module named 'pyarrow'" in output or "python: not found" in output, output[-3000:]


@pytest.mark.slow
def test_ray_job_submit_encodes_into_the_store(head_node, sample_catalog, tmp_path):
    """The documented submission from a head without the venv on its PATH: the flow runs and fills the store.
    Slow: the sweep below is submitted the same way, and the encode flow runs end to end in test_encode_flow."""
    env, address = head_node
    db = tmp_path / "db"
    output = submit(address, env, "flows/encode_items.py", "--catalog", str(sample_catalog), "--db", str(db),
                    "--table", "photos", "--batch-size", "8")
    n = len(sample_catalog.read_text().splitlines())
    assert f"input {n} = encoded {n} + unchanged 0 + rejected whole 0" in output

    import lancedb

    table = lancedb.connect(str(db)).open_table("photos")
    assert table.count_rows() == n and table.count_rows("image_emb IS NULL") == 0


def test_ray_job_submit_runs_a_sweep_on_the_cluster_and_a_trial_after_one_asha_stopped_starts(head_node, tmp_path):
    """Three trials, one at a time, through `ray job submit`: the sweep's driver is the job, its trials the
    cluster's. ASHA stops the second (lr 1e-6 learns nothing in an epoch) and the third must still get its
    workers: Tune kills a stopped trial, and Ray Train's own clean-up of its placement group fails wherever a second
    Ray instance runs on the machine (as the test session's does), so the sweep removes it (tuning.sweep). Then
    the sweep's records, leaderboard, plots and two final seeds of the best configuration."""
    from featurestore import store
    from training.records import read_runs
    from tuning.records import SWEEPS

    from ml100k_store import build_ml100k_store  # tests/ helper

    env, address = head_node
    db = build_ml100k_store(str(tmp_path / "db"), 16)
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.005, 0.000001, 0.006]}\n")
    runs = tmp_path / "runs"
    output = submit(address, env, "flows/tune.py", "--model", "sasrec", "--db", db.uri, "--storage",
                    str(runs), "--space", str(space), "--search", "grid", "--num-samples", "1",
                    "--grace-period", "1", "--epochs", "3", "--monitor", "ndcg@10", "--max-len", "20",
                    "--hidden-size", "16", "--n-layers", "1", "--batch-size", "256", "--final-seeds", "2",
                    "--sweep-time-budget-s", "36000", "--sweep-name", "submitted")  # a budget: ASHA's stop is marked
    assert "3 example split(s) computed for the trials" in output  # one layout: the trials share it
    assert sum(line.startswith("trial ") for line in output.splitlines()) == 3  # a line per trial
    trials = store.open_table(db, SWEEPS).to_pandas().set_index("config")
    assert len(trials) == 3 and set(trials.sweep_id) == {"submitted"}
    hopeless = trials.loc[json.dumps({"lr": 1e-06})]
    assert (hopeless.status, hopeless.stop_reason) == ("stopped", "ASHA") and hopeless.epochs < 3
    assert f"trial {hopeless.trial_id}: " in output and "stopped by ASHA" in output
    after = trials.loc[json.dumps({"lr": 0.006})]
    assert after.status in ("finished", "stopped") and after.epochs >= 1, output[-3000:]  # its workers started
    assert set(trials.status) <= {"finished", "stopped"}  # ASHA or the epoch limit ended every trial
    finished = trials[trials.status == "finished"]
    assert len(finished) >= 1 and (finished.stop_reason == "epochs").all() and (finished.epochs == 3).all()
    assert (trials.steps == trials.epochs * 36).all()  # ceil(9,189 windows at L 20 / 256) per epoch
    recorded = read_runs(db).set_index("run_id")
    assert set(finished.run_id) <= set(recorded.index)

    for name in ("leaderboard.md", "best_so_far.png", "learning_curves.png", "metric_by_parameter.png"):
        assert (runs / "submitted" / name).stat().st_size > 0
    best = trials.best_value.idxmax()
    assert f"| 1 | {trials.loc[best].trial_id} |" in (runs / "submitted" / "leaderboard.md").read_text()
    final = json.loads((runs / "submitted" / "final_seeds.json").read_text())
    assert final["seeds"] == [1, 2] and set(final["runs"]) <= set(recorded.index)
    assert {"test_ndcg@10_mean", "test_ndcg@10_std", "test_masked_ndcg@10_mean"} <= set(final)
    assert recorded.loc[final["runs"][0]].config["settings"]["lr"] == json.loads(best)["lr"]
