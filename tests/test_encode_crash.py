"""The encode flow's driver killed at each of its commit points: the table stays readable at its previous
version, and the re-run completes with every item exactly once, re-using what the killed run staged."""
import os
import subprocess
import sys

import pytest

from featurestore import store
from featurestore.encode import CRASH_ENV
from flow_runs import REPO  # tests/ helper

pytestmark = pytest.mark.e2e

ITEMS = 120
FLOW = [sys.executable, "flows/encode_items.py", "--catalog", "ml-100k", "--limit", str(ITEMS), "--batch-size", "16",
        "--commit-rows", "32"]


def encode(ray, db_uri: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    """The flow's command line in a new driver process that joins the session's Ray (as `ray job submit` would)."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run([*FLOW, "--db", db_uri], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def items(db_uri: str) -> dict:
    table = store.read_columns(store.connect(db_uri), "items", ["item_id", "encoded_at"])
    ids = table.column("item_id").to_pylist()
    assert len(ids) == len(set(ids)), "an item stored twice"
    return dict(zip(ids, table.column("encoded_at").to_pylist()))


@pytest.mark.parametrize("crash_at", [pytest.param("staged", marks=pytest.mark.slow), "mid-merge",
                                      pytest.param("before-index", marks=pytest.mark.slow)])
def test_a_killed_run_is_completed_by_the_next_without_encoding_twice(ray_local, tmp_path, crash_at):
    db_uri = str(tmp_path / "db")
    killed = encode(ray_local, db_uri, crash_at)
    assert killed.returncode == 17, killed.stderr[-3000:]
    db = store.connect(db_uri)
    staged = store.open_table(db, "items_staged", required=False)
    staged_rows = staged.count_rows() if staged is not None else 0
    before = items(db_uri) if store.open_table(db, "items", required=False) is not None else {}
    if crash_at == "staged":  # killed after its first bounded commit: some rows staged, the table not yet made
        assert 0 < staged_rows < ITEMS and before == {}
    else:  # the items merged, the staging not yet dropped
        assert len(before) == ITEMS

    rerun = encode(ray_local, db_uri)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = items(db_uri)
    assert sorted(after, key=int) == [str(i) for i in range(1, ITEMS + 1)]
    summary = rerun.stdout
    staged_or_merged = max(staged_rows, len(before))
    assert f"encoded {ITEMS - staged_or_merged} + unchanged {staged_or_merged} + rejected whole 0" in summary
    if crash_at == "staged":
        killed_run_stamp = min(after.values())
        assert sum(stamp == killed_run_stamp for stamp in after.values()) == staged_rows  # kept, not re-encoded
    assert sorted(store.table_names(store.connect(db_uri))) == ["items"]  # the staging tables are gone
