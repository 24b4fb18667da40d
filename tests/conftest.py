import os
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
