"""`ray job submit --working-dir .` of the encoding flow and of a sweep against a `ray start --head` cluster on 127.0.0.1."""
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

pytestmark = pytest.mark.slow


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


@pytest.fixture
def head_node():
    """A head node of its own, in its own process group: stopping it touches no other Ray on the machine
    (`ray stop` would also kill the test session's Ray, and anybody else's)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    # Every port of its own: the agents' defaults would collide with the test session's Ray (or any other),
    # and then the job agent never comes up.
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp_dir = Path("/tmp") / f"ray_job_test_{os.getpid()}"  # short: Ray's socket paths have a length limit
    start = [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
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


def submit(address: str, env: dict, *command: str) -> str:
    """`ray job submit --working-dir .` of a flow, as users run it; its output once it succeeded."""
    args = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
            "--", "python", *command]
    for _ in range(30):  # the job agent comes up a little after the dashboard answers
        result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        if "No available agent" not in output:
            break
        time.sleep(2)
    assert result.returncode == 0, output[-3000:]
    assert "succeeded" in output
    return output


def test_ray_job_submit_encodes_into_the_store(head_node, sample_catalog, tmp_path):
    env, address = head_node
    db = tmp_path / "db"
    output = submit(address, env, "flows/encode_items.py", "--catalog", str(sample_catalog), "--db", str(db),
                    "--table", "photos", "--batch-size", "8")
    n = len(sample_catalog.read_text().splitlines())
    assert f"input {n} = encoded {n} + unchanged 0 + rejected whole 0" in output

    import lancedb

    table = lancedb.connect(str(db)).open_table("photos")
    assert table.count_rows() == n and table.count_rows("image_emb IS NULL") == 0


def test_ray_job_submit_runs_a_sweep_on_the_cluster(head_node, tmp_path):
    """Two trials through `ray job submit`: the sweep's driver is the job, its trials the cluster's."""
    from featurestore import store
    from tuning.records import SWEEPS

    from ml100k_store import build_ml100k_store  # tests/ helper

    env, address = head_node
    db = build_ml100k_store(str(tmp_path / "db"), 16)
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.005, 0.008]}\n")
    output = submit(address, env, "flows/tune.py", "--model", "sasrec", "--db", db.uri, "--storage",
                    str(tmp_path / "runs"), "--space", str(space), "--search", "grid", "--num-samples", "1",
                    "--scheduler", "none", "--epochs", "1", "--max-len", "20", "--hidden-size", "16",
                    "--n-layers", "1", "--final-seeds", "0", "--sweep-name", "submitted")
    assert sum(line.startswith("trial ") for line in output.splitlines()) == 2
    trials = store.open_table(db, SWEEPS).to_pandas()
    assert len(trials) == 2 and (trials.status == "finished").all() and (trials.epochs == 1).all()
    assert (tmp_path / "runs" / "submitted" / "leaderboard.md").stat().st_size > 0
