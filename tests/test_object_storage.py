"""Object storage: the AWS environment as LanceDB and pyarrow settings, against a real S3 server (SeaweedFS on
127.0.0.1, the `s3` fixture in conftest.py); a training run with its checkpoints, run record and store on S3."""
import os
import runpy

import pyarrow as pa
import pyarrow.fs
import pytest

from featurestore import objectstore, store
from training import records

from ml100k_store import build_ml100k_store  # tests/ helper
from tests.conftest import REPO


def test_the_aws_environment_becomes_storage_options_for_s3_uris_only(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    assert objectstore.storage_options("s3://bucket/store") == {
        "aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_endpoint": "http://127.0.0.1:9",
        "aws_region": "eu-west-1", "allow_http": "true"}
    assert objectstore.storage_options("/data/store") == {} == objectstore.storage_options("gs://bucket/store")
    fs, path = objectstore.filesystem("s3://bucket/runs/")
    assert isinstance(fs, pyarrow.fs.S3FileSystem) and path == "bucket/runs"
    travels = fs.__reduce__()[1][0]  # what a pickled copy (Ray Train's storage on a worker) is rebuilt from
    assert {k: travels[k] for k in ("access_key", "secret_key", "region", "endpoint_override", "scheme")} == {
        "access_key": "key", "secret_key": "secret", "region": "eu-west-1", "endpoint_override": "http://127.0.0.1:9",
        "scheme": "http"}
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "aws_endpoint" not in objectstore.storage_options("s3://bucket/store")
    assert objectstore.uri_of("s3://bucket/runs", "bucket/runs/a/checkpoint_1") == "s3://bucket/runs/a/checkpoint_1"
    assert objectstore.uri_of("/runs", "/runs/a/checkpoint_1") == "/runs/a/checkpoint_1"


def test_a_store_on_s3_takes_its_settings_from_the_environment(s3):
    uri = f"s3://{s3.bucket}/connect-test"
    db = store.connect(uri)
    rows = pa.table({"item_id": ["a", "b"], "n": [1, 2]})
    store.upsert(db, "t", rows, "item_id")
    store.upsert(db, "t", pa.table({"item_id": ["b", "c"], "n": [20, 3]}), "item_id")
    again = store.connect(uri)  # a new connection reads what the first one wrote
    assert sorted(again.open_table("t").to_arrow().to_pylist(), key=lambda r: r["item_id"]) == [
        {"item_id": "a", "n": 1}, {"item_id": "b", "n": 20}, {"item_id": "c", "n": 3}]
    # the objects are on the server, seen through a client the test builds itself
    listed = s3.filesystem().get_file_info(pyarrow.fs.FileSelector(f"{s3.bucket}/connect-test", recursive=True))
    assert any("/t.lance/data/" in info.path for info in listed)
    assert any("/t.lance/_versions/" in info.path for info in listed)


def test_wrong_credentials_are_a_store_error(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(store.StoreError, match=f"s3://{s3.bucket}/connect-test': the bucket '{s3.bucket}' cannot be"):
        store.connect(f"s3://{s3.bucket}/connect-test")


@pytest.mark.e2e
def test_a_training_run_on_s3_checkpoints_there_and_resumes_from_there(s3, ray_local, capsys):
    """flows/train.py with --db and --storage on S3: the store, the checkpoints, the settings, the plot and the
    run record are objects on the server; --resume continues the run from the checkpoint there. The workers
    were started without the AWS environment: Ray Train and Ray Data get the settings from the driver."""
    import ray

    assert ray.get(ray.remote(lambda: os.environ.get("AWS_ENDPOINT_URL")).remote()) is None
    db_uri, storage, name = f"s3://{s3.bucket}/store", f"s3://{s3.bucket}/runs", "sasrec-s3"
    build_ml100k_store(db_uri, 32)
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    small = ["--hidden-size", "16", "--n-layers", "1", "--n-heads", "1", "--batch-size", "256", "--max-len", "20",
             "--eval-batch-size", "512"]  # the fits are the cost here, not the epochs
    assert flow["main"](["--model", "sasrec", "--db", db_uri, "--storage", storage, "--name", name, "--epochs", "1",
                         *small]) == 0
    first = records.read_runs(store.connect(db_uri)).set_index("run_id").loc[name]
    assert (first.status, first.epochs_run) == ("finished", 1)

    assert flow["main"](["--resume", "--name", name, "--storage", storage, "--db", db_uri, "--epochs", "2"]) == 0
    assert f"checkpoint {storage}/{name}/checkpoint_" in capsys.readouterr().out
    run = records.read_runs(store.connect(db_uri)).set_index("run_id").loc[name]
    assert (run.status, run.epochs_run, [m["epoch"] for m in run.epochs]) == ("finished", 2, [1, 2])
    assert run.restored_at.tolist() == [1]  # epoch 2 trained on from epoch 1's checkpoint on S3
    assert run.run_dir == f"{storage}/{name}" and run.checkpoint.startswith(f"{storage}/{name}/checkpoint_")
    assert run["plot"] == f"{storage}/{name}/learning_curves.png"

    # what the server holds, seen through a client the test builds itself
    fs = s3.filesystem()
    objects = {info.path: info for info in fs.get_file_info(pyarrow.fs.FileSelector(s3.bucket, recursive=True))}
    run_prefix = f"{s3.bucket}/runs/{name}/"
    checkpoints = {path[len(run_prefix):].split("/")[0] for path in objects
                   if path.startswith(run_prefix + "checkpoint_")}
    assert 1 <= len(checkpoints) <= 2 and run.checkpoint.rsplit("/", 1)[1] in checkpoints  # the best and the latest
    assert {run_prefix + "train_config.json", run_prefix + "learning_curves.png"} <= set(objects)
    assert any(path.startswith(f"{s3.bucket}/store/runs.lance/data/") for path in objects)
    # no credentials in anything the run wrote
    files = [path for path, info in objects.items() if info.type == pyarrow.fs.FileType.File]
    for path in files:
        with fs.open_input_stream(path) as stream:
            content = stream.read()
        assert s3.secret_key.encode() not in content and s3.access_key.encode() not in content, path
