"""CPU/GPU budget of a training run: Train workers never take the CPU Ray Data needs to feed them.

The rule is featurestore.raycluster's, shared with the encoding flow: 2 workers x 1 CPU on 2 cores leave Ray
Data nothing to schedule its read tasks on and the first batch never comes, so a plan keeps DATA_CPU_RESERVE
free (at least DATA_TASK_CPUS when the CPUs per worker are given) and any other plan is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# DATA_CPU_RESERVE and ResourcePlanError are re-exported: the training code names its budget through this module.
from featurestore.raycluster import DATA_CPU_RESERVE, DATA_TASK_CPUS, ResourcePlanError, cpus_beside_ray_data  # noqa: F401


# The training loop runs in a thread of the Ray Train worker, and glibc gives each thread its own malloc
# arena, whose heaps are capped at 64 MB: the activations a step frees go back to the kernel and return as
# fresh zeroed pages (a SASRec step on ML-1M: 14-35k page faults in a thread, ~0 in a main thread). One arena
# with fixed, high mmap and trim thresholds keeps freed memory for the next step; the worker's resident
# memory stays at its peak in exchange.
#
# OpenMP threads that spin between parallel regions (libgomp's default) make each region wait for a thread
# that lost its core. With one of 2 cores taken by another process, a SASRec epoch on ML-1M trained in
# 156-164 s with spinning and 41-45 s with passive waiting; on a quiet machine 23-25 s and 23-30 s. Ray Data
# tasks, Tune trials and other jobs share nodes, so the workers wait passively unless the driver's
# environment sets OMP_WAIT_POLICY (ACTIVE suits a machine given over to one worker).
WORKER_ENV_VARS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30),
                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


@dataclass(frozen=True)
class WorkerPlan:
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads_per_worker: int  # torch intra-op threads in each worker
    data_cpus: float  # cluster CPUs the workers leave to Ray Data

    def scaling_config(self, placement_strategy: str = "PACK"):
        """Ray Train's ScalingConfig; `placement_strategy` places the workers' bundles (PACK, SPREAD, ...)."""
        from ray.train import ScalingConfig

        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.gpus_per_worker > 0,
                             resources_per_worker=resources, placement_strategy=placement_strategy)

    def __str__(self) -> str:
        gpus = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (f"{self.num_workers} worker(s) x {self.cpus_per_worker:g} CPU{gpus} "
                f"({self.threads_per_worker} torch thread(s) each); {self.data_cpus:g} CPU left for Ray Data")


def plan_workers(cluster_cpus: float, cluster_gpus: float, largest_node_cpus: float, num_workers: int,
                 cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0,
                 threads_per_worker: int | None = None) -> WorkerPlan:
    """The per-worker resources, or a ResourcePlanError saying what to change.

    cpus_per_worker None: share what the cluster has, minus DATA_CPU_RESERVE, evenly (fractions allowed;
    one worker never asks for more than the largest node has). Given: it must leave DATA_TASK_CPUS free.
    """
    if num_workers < 1:
        raise ResourcePlanError(f"num_workers must be >= 1, got {num_workers}")
    if gpus_per_worker and num_workers * gpus_per_worker > cluster_gpus:
        raise ResourcePlanError(
            f"{num_workers} worker(s) x {gpus_per_worker:g} GPU need {num_workers * gpus_per_worker:g} GPUs; "
            f"the cluster has {cluster_gpus:g}. Use --gpus-per-worker 0 on a CPU machine")
    if cpus_per_worker is None:
        cpus_per_worker = round(min(cpus_beside_ray_data(cluster_cpus, num_workers, "training"), largest_node_cpus), 3)
    if cpus_per_worker > largest_node_cpus:
        raise ResourcePlanError(f"a worker asks for {cpus_per_worker:g} CPUs but the largest node has "
                                f"{largest_node_cpus:g}")
    data_cpus = round(cluster_cpus - num_workers * cpus_per_worker, 3)
    if data_cpus < DATA_TASK_CPUS:
        most = (cluster_cpus - DATA_TASK_CPUS) / num_workers
        raise ResourcePlanError(
            f"{num_workers} worker(s) x {cpus_per_worker:g} CPU take {num_workers * cpus_per_worker:g} of the "
            f"cluster's {cluster_cpus:g} CPUs and leave {max(data_cpus, 0):g} for Ray Data, which needs "
            f"{DATA_TASK_CPUS:g} to read the sequences: the run would wait for its first batch forever. "
            f"Use --cpus-per-worker <= {most:.3g}, fewer workers, or leave --cpus-per-worker unset")
    threads = threads_per_worker or max(1, round(cpus_per_worker))
    return WorkerPlan(num_workers, cpus_per_worker, gpus_per_worker, threads, data_cpus)


def plan_for_cluster(num_workers: int, cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0,
                     threads_per_worker: int | None = None) -> WorkerPlan:
    """plan_workers on the connected Ray cluster's totals."""
    import ray

    totals = ray.cluster_resources()
    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    return plan_workers(totals.get("CPU", 0.0), totals.get("GPU", 0.0), max(node_cpus, default=0.0),
                        num_workers, cpus_per_worker, gpus_per_worker, threads_per_worker)
