"""`ray job submit --working-dir .` of the encoding flow against a `ray start --head` cluster on 127.0.0.1."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"ray_job_test_{os.getpid()}"  # short: Ray's socket paths have a length limit
    start = [str(bin_dir / "ray"), "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1",
             f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             "--object-store-memory=536870912", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield env, f"http://127.0.0.1:{dashboard_port}"
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_encodes_into_the_store(head_node, sample_catalog, tmp_path):
    env, address = head_node
    db = tmp_path / "db"
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
              "--", "python", "flows/encode_items.py", "--catalog", str(sample_catalog), "--db", str(db),
              "--table", "photos", "--batch-size", "8"]
    result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "succeeded" in output
    n = len(sample_catalog.read_text().splitlines())
    assert f"input {n} = encoded {n} + unchanged 0 + rejected whole 0" in output

    import lancedb

    table = lancedb.connect(str(db)).open_table("photos")
    assert table.count_rows() == n and table.count_rows("image_emb IS NULL") == 0
