"""What every job here needs from Ray: one way to start or join it, and the CPUs its Ray Data tasks must keep free.

`ensure_ray()` joins the cluster RAY_ADDRESS names (`ray job submit` sets it) or starts a local instance whose
services all listen on 127.0.0.1 only, with token authentication unless RAY_AUTH_MODE says otherwise.

The CPU rule guards against a silent hang, not an error: actors or Train workers that hold every CPU
starve the Ray Data tasks feeding them (2 encoder actors, or 2 Train workers, at 1 CPU each on 2 cores), and
the first batch never comes. So every task of ours asks for DATA_TASK_CPUS, every plan keeps DATA_CPU_RESERVE
free, and a plan that cannot is refused with a ResourcePlanError.
"""
from __future__ import annotations

import ipaddress
import os
import sys

# On Linux a local Ray instance takes the machine's external address as its node address, and its GCS, raylet,
# workers and agents then listen on every interface (`_node_ip_address="127.0.0.1"` is mapped back to that
# address). With this variable at 0 the node address is 127.0.0.1 and every service binds there; a driver that
# joins a cluster on loopback needs it too, or it waits forever for a node at its external address. Ray reads it
# once, when it is first imported, so it is set when this module is imported, before Ray is.
LOOPBACK_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _cluster_is_remote() -> bool:
    """Whether RAY_ADDRESS names a cluster off this machine's loopback (or "auto": whatever `ray start` made)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not address:
        return False
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        return host != "localhost" and not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "auto"
        return True


if "ray" not in sys.modules and not _cluster_is_remote():
    os.environ.setdefault(LOOPBACK_NODE_ENV, "0")
# The first ray.init writes ~/.ray/auth_token; from then on drivers and `ray job submit` need token mode. Ray
# reads the mode when it is imported too (a driver that imports ray.tune before ensure_ray), so it is set here.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def ensure_ray() -> None:
    """Connect this process to Ray once: the cluster RAY_ADDRESS names, or else a new local instance on 127.0.0.1
    (never a cluster somebody else started on this machine)."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    if ray_constants.ENABLE_RAY_CLUSTER and not _cluster_is_remote():
        raise RuntimeError(
            f"Ray was imported before featurestore.raycluster (or with {LOOPBACK_NODE_ENV}=1), so a local Ray would "
            f"listen on every interface: import featurestore.raycluster first, or set RAY_ADDRESS to join a cluster")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    # Ray's own helpers inside the job (Train's placement-group cleaner asks the dashboard whether a stopped
    # Tune trial's controller is gone) find "the" cluster by scanning this machine, and give up when another
    # Ray instance runs here too: the trial's placement group then stays and the next trial cannot start. So
    # the job's workers are told this instance's dashboard address.
    dashboard_port = free_port()
    ray.init(address="local", dashboard_port=dashboard_port,
             runtime_env={"env_vars": {"RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}})


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


DATA_TASK_CPUS = 0.25  # every Ray Data read/transform task asks for this much
DATA_CPU_RESERVE = 2 * DATA_TASK_CPUS  # what a plan leaves free: a read and a transform at once
# Ray Data's hash shuffle (joins, groupby) maps each block in a task that asks for one whole CPU
# (HashShuffleOperator._DEFAULT_SHUFFLE_BLOCK_NUM_CPUS in Ray 2.60, not configurable): actors running beside a
# join must leave that much free, or the join never starts (2 encoder actors at 0.75 CPU on 2 cores hung).
# A join's reduce tasks take their CPUs from `aggregator_ray_remote_args` (the encode plan gives them DATA_TASK_CPUS).
SHUFFLE_CPU_RESERVE = 1.0


class ResourcePlanError(ValueError):
    """The requested actors or workers cannot run on this cluster (or would starve the data pipeline)."""


def cpus_beside_ray_data(cluster_cpus: float, holders: int, job: str, reserve: float = DATA_CPU_RESERVE) -> float:
    """The CPUs each of `holders` long-lived actors or workers may ask for so that `reserve` stays free for Ray
    Data (DATA_CPU_RESERVE, or SHUFFLE_CPU_RESERVE beside a join)."""
    spare = cluster_cpus - reserve
    if spare <= 0:
        raise ResourcePlanError(f"the cluster has {cluster_cpus:g} CPUs; {job} needs more than the "
                                f"{reserve:g} it keeps for Ray Data")
    return spare / holders
