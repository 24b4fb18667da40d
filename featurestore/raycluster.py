"""What every job here needs from Ray: the CPUs its Ray Data tasks must keep free.

The failure this guards against is a silent hang, not an error: actors or Train workers that hold every CPU
starve the Ray Data tasks feeding them (2 encoder actors, or 2 Train workers, at 1 CPU each on 2 cores), and
the first batch never comes. So every task of ours asks for DATA_TASK_CPUS, every plan keeps DATA_CPU_RESERVE
free, and a plan that cannot is refused with a ResourcePlanError.
"""
from __future__ import annotations

DATA_TASK_CPUS = 0.25  # every Ray Data read/transform task asks for this much
DATA_CPU_RESERVE = 2 * DATA_TASK_CPUS  # what a plan leaves free: a read and a transform at once


class ResourcePlanError(ValueError):
    """The requested actors or workers cannot run on this cluster (or would starve the data pipeline)."""


def cpus_beside_ray_data(cluster_cpus: float, holders: int, job: str) -> float:
    """The CPUs each of `holders` long-lived actors or workers may ask for so that DATA_CPU_RESERVE stays free."""
    spare = cluster_cpus - DATA_CPU_RESERVE
    if spare <= 0:
        raise ResourcePlanError(f"the cluster has {cluster_cpus:g} CPUs; {job} needs more than the "
                                f"{DATA_CPU_RESERVE:g} it keeps for Ray Data")
    return spare / holders
