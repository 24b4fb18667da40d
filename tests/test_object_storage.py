"""Object storage: the AWS environment as LanceDB and pyarrow settings, against a real S3 server (SeaweedFS on
127.0.0.1, the `s3` fixture in conftest.py); a training run with its checkpoints, run record and store on S3."""
import pyarrow as pa
import pyarrow.fs
import pytest

from featurestore import objectstore, store


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
    with pytest.raises(store.StoreError, match="cannot open LanceDB database 's3://"):
        store.connect(f"s3://{s3.bucket}/connect-test")
