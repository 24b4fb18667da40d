"""A Ray Tune sweep over training.run_training: one trial = one training run, records and a leaderboard after.

    from tuning import SweepConfig, default_space, run_sweep
    result = run_sweep({"model": "sasrec", "dataset": "ml-100k", "epochs": 30}, default_space("sasrec"),
                       SweepConfig(num_samples=16))

The trainable is a driver function (the Train V2 pattern): each trial calls run_training with its sampled
settings and TuneReportCallback, which hands Tune every epoch's rank-0 metrics. Tune restores nothing itself
(it gets checkpoint paths only), so a trial's run is named after its trial id and a restarted trial resumes
that run. The sweep driver prepares the store once, before any trial, computes the example splits of every
layout the space lists once (training.data.shared_splits: Ray datasets the trials read, never copies in the
driver), and sizes the trials so that they never wait on each other's workers and always leave Ray Data
its CPUs. ASHA's clock is the epoch, a pass over the training rows in either training mode: trials are compared
after equal passes over the data, whatever their batch size (optimizer steps, the clock before, judged a
batch-16 trial after one epoch against batch-256 trials' sixteenth).

Every trial's row goes into `sweeps` as it ends, and those rows are enough to continue the sweep where its Tune
directory is gone (another machine or session, a lost disk): --sweep-resume then starts a new Tune experiment
that carries the ended trials over. Optuna is told their results, ASHA's rungs are rebuilt from their curves,
and only the trials still missing run; a trial the interruption caught is sampled anew (its checkpoints went with
the directory).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from featurestore import store
from featurestore.raycluster import DATA_CPU_RESERVE, ResourcePlanError, ensure_ray  # before Ray is imported
from featurestore.sequences import split_counts
import ray
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from training.config import TrainConfig
from training.data import ensure_dataset, shared_splits, snapshot_store
from training.records import ensure_runs_table
from tuning.space import LISTED, check_space, finite_combinations, param_space, parse_spec, trial_settings

SEARCHES = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "none")
TRIAL_DRIVER_CPUS = 0.25  # a trial's driver reads the store and waits on its Train workers
STEP_KEYS = ("batch_size", "max_len", "train_mode", "window_stride")  # the settings that decide steps per epoch
LAYOUT_KEYS = ("max_len", "train_mode", "window_stride")  # with num_workers (fixed for a sweep): a trial's splits
CARRIED_FILE = "carried_trials.json"  # in the sweep's folder: the ids of the trials its Tune experiment carried over


@dataclass
class SweepConfig:
    """A sweep's own settings; every training setting is fixed for all trials in the settings dict."""

    sweep_name: str | None = field(default=None, metadata={"help": "sweep name (its directory under --storage)",
                                                     "shown_default": "<model>-sweep-<date>-<time>"})
    num_samples: int = field(default=16, metadata={"help": "trials (with --search grid: runs of the whole grid)"})
    search: str = field(default="optuna", metadata={"help": "Optuna TPE, random sampling, or the space's grid",
                                                    "choices": SEARCHES})
    scheduler: str = field(default="asha", metadata={"help": "asha stops weak trials early; none runs all",
                                                     "choices": SCHEDULERS})
    grace_period: int = field(default=1, metadata={"help": "ASHA: epochs every trial runs before it can be stopped"})
    reduction_factor: int = field(default=2, metadata={"help": "ASHA: keep 1 of this many trials per rung"})
    max_concurrent: int | None = field(default=None, metadata={
        "help": "trials at once", "shown_default": "as many as the cluster's CPUs fit"})
    sweep_seed: int = field(default=0, metadata={"help": "the searcher's seed: the same seed samples the same trials"})
    sweep_time_budget_s: float | None = field(default=None, metadata={
        "help": "end the sweep after this long: running trials stop where they are (their rows say 'sweep time "
                "budget', and --sweep-resume does not run them again), no more start; the final seeds follow"})
    sweep_resume: bool = field(default=False, metadata={"help": "continue the interrupted sweep --sweep-name"})
    retry_errored: bool = field(default=False, metadata={"help": "with --sweep-resume: run errored trials again"})
    final_seeds: int = field(default=3, metadata={
        "help": "train the best configuration again with seeds 1..N to early stopping (0: skip)"})

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in
                    ("num_samples", "grace_period", "reduction_factor") if getattr(self, name) < 1]
        if self.search not in SEARCHES or self.scheduler not in SCHEDULERS:
            problems.append(f"search must be one of {SEARCHES} and scheduler one of {SCHEDULERS}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            problems.append(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.final_seeds < 0:
            problems.append(f"final_seeds must be >= 0, got {self.final_seeds}")
        if self.sweep_resume and not self.sweep_name:
            problems.append("resume needs the name of the sweep to continue (--sweep-name)")
        if self.retry_errored and not self.sweep_resume:
            problems.append("retry_errored applies to a resumed sweep (--sweep-resume)")
        if problems:
            raise ValueError("invalid sweep settings: " + "; ".join(problems))


@dataclass
class TrialPlan:
    """How many trials run at once and what each one's workers ask for."""

    max_concurrent: int
    cpus_per_worker: float

    def __str__(self) -> str:
        return (f"{self.max_concurrent} trial(s) at once, each a driver ({TRIAL_DRIVER_CPUS:g} CPU) and workers "
                f"of {self.cpus_per_worker:g} CPU")


def plan_trials(cluster_cpus: float, settings: TrainConfig, max_concurrent: int | None) -> TrialPlan:
    """Trials never wait on each other's workers, and Ray Data keeps DATA_CPU_RESERVE: explicit per-trial CPUs.

    cpus_per_worker given: as many trials as fit (or max_concurrent, if they fit); unset: the CPUs the cluster
    has beside Ray Data and the trial drivers, shared by max_concurrent (default 1) trials' workers.
    """
    usable = cluster_cpus - DATA_CPU_RESERVE
    per_trial_workers = settings.num_workers
    if settings.cpus_per_worker is None:
        concurrent = max_concurrent or 1
        cpus = round((usable - concurrent * TRIAL_DRIVER_CPUS) / (concurrent * per_trial_workers), 3)
    else:
        cpus = settings.cpus_per_worker
        fits = math.floor(usable / (TRIAL_DRIVER_CPUS + per_trial_workers * cpus) + 1e-9)
        concurrent = min(max_concurrent or fits, fits)
    if cpus <= 0 or concurrent < 1 or concurrent * (TRIAL_DRIVER_CPUS + per_trial_workers * cpus) > usable + 1e-9:
        raise ResourcePlanError(
            f"{max_concurrent or 1} trial(s) of {per_trial_workers} worker(s) do not fit the cluster's "
            f"{cluster_cpus:g} CPUs beside Ray Data's {DATA_CPU_RESERVE:g} and {TRIAL_DRIVER_CPUS:g} per trial "
            f"driver: use fewer --max-concurrent or --num-workers, or a smaller --cpus-per-worker")
    return TrialPlan(concurrent, cpus)


def trial_variants(settings: TrainConfig, space: Mapping[str, Any], keys: tuple[str, ...]) -> list[TrainConfig]:
    """The trial settings of every combination of the space's finite values of `keys`, the rest as `settings`
    (one, `settings` itself, when none of them is searched)."""
    subspace = {key: space[key] for key in keys if key in space}
    return [TrainConfig.from_dict(trial_settings(settings.to_dict(), params, subspace))
            for params in finite_combinations(subspace)]


def steps_per_epoch_range(rows, settings: TrainConfig, space: Mapping[str, Any]) -> tuple[int, int]:
    """(fewest, most) optimizer steps in an epoch over the space's finite values of batch size, L, mode and stride."""
    steps = []
    for trial in trial_variants(settings, space, STEP_KEYS):
        counts = split_counts(rows, trial.max_len, trial.window_stride)
        steps.append(math.ceil(counts[f"train_examples_{trial.train_mode}"] / trial.batch_size))
    return min(steps), max(steps)


def sweep_splits(db, settings: TrainConfig, space: Mapping[str, Any]) -> dict[tuple, Any]:
    """The example splits of every layout (L, mode, stride) the space lists, computed once for all trials.

    A trial whose split keys are here starts without computing any. A space that samples L or the stride
    (randint) leaves each trial to compute its own, as a run outside a sweep does. A layout the store cannot
    train is refused here, before any trial.
    """
    if any(parse_spec(key, space[key])[0] not in LISTED for key in LAYOUT_KEYS if key in space):
        return {}
    layouts = {(t.max_len, t.train_mode, t.stride) for t in trial_variants(settings, space, LAYOUT_KEYS)}
    return shared_splits([(snapshot_store(db, max_len, mode, settings.num_workers, stride)[0], max_len, mode,
                           settings.num_workers, stride) for max_len, mode, stride in sorted(layouts)])


def sweep_name(settings: TrainConfig, sweep: SweepConfig) -> str:
    return sweep.sweep_name or f"{settings.model}-sweep-{datetime.now():%Y%m%d-%H%M%S}"


def run_sweep(settings: Mapping[str, Any], space: Mapping[str, Any], sweep: SweepConfig) -> "SweepResult":
    """Check everything, prepare the store once, run (or resume) the Tune sweep, record it, train the best
    configuration with the final seeds. Bad settings or a bad space raise before any trial starts."""
    from tuning.records import finish_sweep, sweep_record_settings, table_versions

    base = TrainConfig.from_dict(settings)
    check_space(dict(space), base.model, sweep.search, base.to_dict())
    name = sweep_name(base, sweep)
    started = time.perf_counter()
    db = store.connect(base.db)
    carried = carried_trials(db, name, base, sweep, space)  # nothing to resume is said before Ray starts
    if settled(db, name, base, sweep, dict(space), carried):  # Ray would have nothing to do
        return finish_sweep(db, name, base, trial_base_settings(base, name, base.cpus_per_worker), dict(space),
                            sweep, carried, table_versions(db), time.perf_counter() - started, {}, 1)
    ensure_ray()

    if base.dataset:
        ensure_dataset(db, base.dataset)  # here, once: the trials then only read the store
    ensure_runs_table(db)  # before trials that end at once write their rows into it
    rows = store.read_columns(db, "sequences", ["item_idx"])
    fewest, most = steps_per_epoch_range(rows, base, space)
    plan = plan_trials(ray.cluster_resources().get("CPU", 0.0), base, sweep.max_concurrent)
    splits = sweep_splits(db, base, space)
    trial_base = trial_base_settings(base, name, plan.cpus_per_worker)
    print(f"sweep {name}: {base.model}, {sweep.num_samples} trial(s) by {sweep.search}, scheduler "
          f"{sweep.scheduler}; {plan}; {fewest}-{most} optimizer steps per epoch; {len(splits)} example "
          f"split(s) computed for the trials", flush=True)
    # Tune reserves the resources of up to 200 pending random/grid trials ahead: on a small cluster those
    # reservations take the CPUs the running trial's Train workers need, and they never start
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(plan.max_concurrent)
    versions = table_versions(db)  # what every trial reads (the trials and final seeds write none of them)
    TrialEnds.context = SweepContext(base.db, name, base, sweep_record_settings(base, sweep, space), versions)
    tuner = build_tuner(name, base, trial_base, dict(space), sweep, plan, splits, carried)
    if tuner is not None:
        tuner.fit()
    return finish_sweep(db, name, base, trial_base, dict(space), sweep, carried, versions,
                        time.perf_counter() - started, splits, plan.max_concurrent)


def trial_base_settings(base: TrainConfig, name: str, cpus_per_worker: float) -> dict:
    """The settings every trial and final seed starts from (the store prepared, the runs in the sweep's folder)."""
    return {**base.to_dict(), "cpus_per_worker": cpus_per_worker, "dataset": None,
            "storage": trials_storage(base.storage, name), "save_item_vectors": False, "save_plot": False}


def settled(db, name: str, base: TrainConfig, sweep: SweepConfig, space: dict, carried: list[dict]) -> bool:
    """Whether a sweep continued from the store has nothing left to train: every trial ended and every final
    seed of the best finished with its settings (then it only writes its records again, without Ray)."""
    from training.run import RunDir
    from tuning.records import best_trial, final_seed_settings, finished_runs, untrained_seeds

    if not carried or len(carried) < sweep.num_samples or tune.Tuner.can_restore(RunDir(base.storage, name).uri):
        return False
    best = best_trial(carried)
    if best is None or not sweep.final_seeds:
        return True
    trial_base = trial_base_settings(base, name, base.cpus_per_worker)  # the seeds' settings set over it count
    planned = final_seed_settings(best, trial_base, space, sweep.final_seeds, name)
    return not untrained_seeds(finished_runs(db), planned, trial_base)


def carried_trials(db, name: str, base: TrainConfig, sweep: SweepConfig, space: Mapping[str, Any]) -> list[dict]:
    """The trials of an earlier Tune experiment of the sweep that this one carries over (their rows in `sweeps`).

    A fresh sweep carries none; a sweep Tune restores carries what its experiment carried when it began; a
    resumed sweep without a Tune directory carries every trial that ended, errored ones only without
    --retry-errored (with it they are sampled anew), and records their ids for later restores. Trials of
    another search space are refused: the searcher could not be told of them.
    """
    from training.run import RunDir
    from tuning.records import DONE, recorded_trials

    run_dir = RunDir(base.storage, name)
    if not sweep.sweep_resume:
        return []
    recorded = recorded_trials(db, name)
    if tune.Tuner.can_restore(run_dir.uri):
        ids = set(json.loads(run_dir.read_text(CARRIED_FILE))) if run_dir.exists(CARRIED_FILE) else set()
        # Tune's restore would record its own trials over the sweep's rows: the rows of trials it does not know
        # (the sweep went on from the store elsewhere) would be lost
        known = ids | {trial.trial_id for trial in tune.ExperimentAnalysis(run_dir.uri).trials}
        unknown = [r["trial_id"] for r in recorded if r["status"] in DONE and r["trial_id"] not in known]
        if unknown:
            raise ValueError(f"sweep {name!r}: the store holds {len(unknown)} ended trial(s) that its Tune "
                             f"directory {run_dir.uri} does not know ({', '.join(unknown[:3])}"
                             f"{', ...' if len(unknown) > 3 else ''}): the directory is older than the sweep's "
                             f"rows; move it aside and resume again to continue from the store")
        return [r for r in recorded if r["trial_id"] in ids]
    ended = [r for r in recorded
             if r["status"] in DONE and not (sweep.retry_errored and r["status"] == "errored")]
    if not ended:
        raise ValueError(f"nothing to resume: no sweep {name!r} in {base.storage} and no ended trials of it in "
                         f"the store's sweeps table")
    if sweep.search == "grid":
        raise ValueError(f"sweep {name!r} has no Tune directory in {base.storage}: a grid sweep continues only "
                         f"from it (its trials are the grid's points in order)")
    spaces = {json.dumps(json.loads(r["settings"] or "{}").get("space"), sort_keys=True) for r in ended}
    if spaces - {json.dumps(None), json.dumps(dict(space), sort_keys=True)}:  # (rows from before spaces were kept)
        raise ValueError(f"sweep {name!r} ran over another search space than this one: continue it with that "
                         f"space (--space), or start a sweep of another name")
    run_dir.write_bytes(CARRIED_FILE, json.dumps([r["trial_id"] for r in ended]).encode())
    print(f"sweep {name}: no Tune directory; continuing from the store with {len(ended)} ended trial(s) carried "
          f"over", flush=True)
    return ended


def build_tuner(name: str, base: TrainConfig, trial_base: dict, space: dict, sweep: SweepConfig, plan: TrialPlan,
                splits: dict[tuple, Any], carried: list[dict]):
    """Tune's restore of the sweep's experiment, or a new experiment for the trials not yet run (None: none
    left), its searcher told of the carried trials and ASHA's rungs rebuilt from their curves."""
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    # the splits travel through the object store once (Tune's with_parameters), not with every trial
    trainable = tune.with_resources(tune.with_parameters(TrialRunner(name, trial_base, space), splits=splits),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    from training.run import RunDir

    path = RunDir(base.storage, name).uri
    if sweep.sweep_resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=sweep.retry_errored, param_space=param_space(space))
    remaining = sweep.num_samples - len(carried)
    if remaining < 1:
        return None
    # ASHA's max_t is just past --epochs, so that the trials' own epoch limit ends them, never ASHA's
    # (metric and mode go to the scheduler and searcher themselves: the carried trials are replayed before Tune
    # would set them)
    metric = base.monitor_key
    scheduler = (ASHALettingRunsEnd(time_attr="epoch", metric=metric, mode="max", max_t=base.epochs + 1,
                                    grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    if sweep.scheduler == "asha":
        replay(scheduler, carried, metric)
    # live, Tune tells the searcher an errored trial failed and TPE leaves it out: so here
    told = [r for r in carried if r["curve"] and r["status"] != "errored"]
    # a trial's driver needs little, so Tune would start every trial at once: the limit must hold, or their
    # Train workers wait on each other (Tune applies max_concurrent_trials to a Searcher, not to a generator)
    # a continued sweep's searcher takes another seed: TPE's first samples are random, and the same seed would
    # draw the carried trials' configurations again
    seed = sweep.sweep_seed + 1_000_003 * len(carried)
    search = (OptunaSearch(metric=metric, mode="max", seed=seed,
                           points_to_evaluate=[r["params"] for r in told] or None,
                           evaluated_rewards=[searcher_reward(r) for r in told] or None)
              if sweep.search == "optuna" else
              BasicVariantGenerator(random_state=seed, max_concurrent=plan.max_concurrent))
    return tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(num_samples=remaining, scheduler=scheduler, search_alg=search,
                                    max_concurrent_trials=plan.max_concurrent, time_budget_s=sweep.sweep_time_budget_s),
        run_config=tune.RunConfig(name=name, storage_path=base.storage, callbacks=[TrialEnds()], verbose=0))


class ASHALettingRunsEnd(AsyncHyperBandScheduler):
    """ASHA that never stops a trial at the report where its run ended by itself (patience, its epochs, a time
    budget: the report's stop_reason): Tune would kill the trial's driver while it scores the test split and
    writes the run's record. The report still counts in ASHA's rung."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if result.get("stop_reason"):
            return TrialScheduler.CONTINUE
        if decision == TrialScheduler.STOP and TrialEnds.context is not None:
            TrialEnds.context.stopped_by_asha.add(trial.trial_id)  # TrialEnds marks the trial's result
        return decision


def replay(scheduler, carried: list[dict], metric: str) -> None:
    """ASHA's rungs as the carried trials left them: each trial's epochs reported again, in the order the
    trials reported (a trial is only a trial id to ASHA)."""
    for record in carried:
        trial = SimpleNamespace(trial_id=record["trial_id"])
        scheduler.on_trial_add(None, trial)
        for epoch, value in enumerate(record["curve"], 1):
            scheduler.on_trial_result(None, trial, {"epoch": epoch, metric: value})
        scheduler.on_trial_remove(None, trial)


def searcher_reward(record: dict) -> float:
    """What Tune told the searcher of a trial that ended without error: its last result's metric, which is the
    best epoch's for a run that finished (its final report) and the last epoch's for one ASHA stopped."""
    return record["best_value"] if record["status"] == "finished" else record["curve"][-1]


class TrialRunner:
    """The trainable: one training run with the trial's settings, named after the trial, resumed if restarted."""

    def __init__(self, sweep_name: str, trial_base: dict, space: dict):
        self.sweep_name, self.trial_base, self.space = sweep_name, trial_base, space

    def __call__(self, params: dict, splits: dict[tuple, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from training import run_training

        settings = trial_settings(self.trial_base, params, self.space)
        settings["name"] = run_id(self.sweep_name, tune.get_context().get_trial_id())
        run_training(continuing(settings), callbacks=[TuneReportCallback()], shared_splits=splits)


class SeedRunner:
    """The trainable of a sweep's final seeds: the run of the seed's settings, resumed if it exists."""

    def __init__(self, settings_by_seed: dict[int, dict]):
        self.settings_by_seed = settings_by_seed

    def __call__(self, params: dict, splits: dict[tuple, Any]) -> None:
        from training import run_training

        result = run_training(continuing(self.settings_by_seed[params["seed"]]), shared_splits=splits)
        print("\n".join(result.lines()), flush=True)


def train_seeds(settings_by_seed: dict[int, dict], splits: dict[tuple, Any], concurrent: int, path: str) -> list[str]:
    """The runs of `settings_by_seed`, `concurrent` at once, as a Tune experiment of their own under `path`
    (Tune places their driver functions as it placed the trials); the last line of each one's error."""
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(SeedRunner(settings_by_seed), splits=splits),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    grid = tune.Tuner(trainable, param_space={"seed": tune.grid_search(sorted(settings_by_seed))},
                      tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrent)),
                      run_config=tune.RunConfig(name="final-seeds", storage_path=path, verbose=0)).fit()
    return [(str(result.error).strip().splitlines() or ["an error"])[-1] for result in grid if result.error]


def continuing(settings: dict) -> dict:
    """The settings with resume set when their run already exists (a restarted trial, a resumed sweep)."""
    from training.run import SETTINGS_FILE, RunDir

    return settings | {"resume": RunDir(settings["storage"], settings["name"]).exists(SETTINGS_FILE)}


def trials_storage(storage: str, sweep_name: str) -> str:
    """Where the sweep's trials keep their runs: under the sweep's directory."""
    return f"{storage.rstrip('/')}/{sweep_name}/runs"


def run_id(sweep_name: str, trial_id: str) -> str:
    """A trial's run id in `runs`, which every sweep and run of the store shares."""
    return f"{sweep_name}-{trial_id}"


def trial_line(trial, monitor_key: str, sweep_settings: dict, errored: bool) -> str:
    """One line per finished trial: its configuration, epochs, stop reason, metric and seconds."""
    from tuning.records import stopped_by

    result = trial.last_result or {}
    # a run's last epoch names its own stop
    stop = "an error" if errored else result.get("stop_reason") or stopped_by(result, sweep_settings)
    metric = result.get(monitor_key)
    shown = "-" if metric is None else f"{metric:.4f}"
    return (f"trial {trial.trial_id}: {json.dumps(trial.config, sort_keys=True)} | {result.get('epoch', 0)} "
            f"epochs, stopped by {stop} | {monitor_key} {shown} | {result.get('time_total_s', 0):.0f} s")


@dataclass
class SweepContext:
    """What TrialEnds records a trial's row with: the store and settings of the sweep this process runs."""

    db_uri: str
    name: str
    base: TrainConfig
    sweep_settings: dict
    versions: dict
    released: set = field(default_factory=set)  # the placement groups TrialEnds removed
    stopped_by_asha: set = field(default_factory=set)  # the trials ASHA stopped: their last results get the mark


class TrialEnds(tune.Callback):
    """As each trial ends: its line, and its row in `sweeps` (the sweep's state that outlives Tune's directory).

    Tune pickles its callbacks with the experiment and a restored sweep gets those back, so the store and settings
    are not the callback's own: run_sweep sets `context` for the sweep it runs (a sweep resumed with another
    --db records into that one)."""

    context: SweepContext | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from tuning.records import STOPPED_BY

        # Tune calls this after its scheduler's decision and keeps what it adds in the trial's last result: the
        # mark that tells an ASHA stop from the sweep's time budget in the records, after a restore too
        if trial.trial_id in TrialEnds.context.stopped_by_asha:
            result[STOPPED_BY] = "ASHA"

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended(trial, "ERROR")

    def on_trial_start(self, iteration, trials, trial, **info):
        # again before each start: a stopped trial's controller may have started another worker group meanwhile
        for ended in trials:
            if ended.status in ("TERMINATED", "ERROR"):
                release_workers(TrialEnds.context, ended.trial_id)

    def on_experiment_end(self, trials, **info):
        # the sweep's time budget stops trials without on_trial_complete: their workers go before the final seeds'
        for trial in trials:
            release_workers(TrialEnds.context, trial.trial_id)

    def ended(self, trial, tune_status: str) -> None:
        from tuning.records import finished_runs, trial_record, trial_reports, write_trial

        context = TrialEnds.context
        print(trial_line(trial, context.base.monitor_key, context.sweep_settings, errored=tune_status == "ERROR"),
              flush=True)
        try:  # the sweep goes on without it: its end writes every row again
            db = store.connect(context.db_uri)
            run = finished_runs(db).get(run_id(context.name, trial.trial_id))
            write_trial(db, trial_record(trial, tune_status, trial_reports(trial), run, context.name, context.base,
                                         context.sweep_settings, context.versions))
        except Exception as error:  # noqa: BLE001 - Tune would end the whole sweep on a callback's exception
            print(f"trial {trial.trial_id}: its row in sweeps was not written now ({error!r}); the sweep's end "
                  f"writes it", flush=True)
        release_workers(context, trial.trial_id)


def release_workers(context: SweepContext, trial_id: str) -> None:
    """Removes the placement group of an ended trial's Ray Train workers if it is still there. Tune kills a trial
    that ASHA stops; Train V2 then leaves the group to its PlacementGroupCleaner, which asks the State API whether
    the controller died and gives up for good on a machine with two Ray instances ("Found multiple active Ray
    instances"): the group keeps its CPUs and the next trial's workers never start."""
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    from training.run import PLACEMENT_GROUP_FILE, RunDir

    try:
        run_dir = RunDir(trials_storage(context.base.storage, context.name), run_id(context.name, trial_id))
        if not run_dir.exists(PLACEMENT_GROUP_FILE):
            return  # its workers never started
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(run_dir.read_text(PLACEMENT_GROUP_FILE))))
        if group.id.hex() not in context.released:
            if placement_group_table(group).get("state") not in (None, "REMOVED"):
                remove_placement_group(group)
            context.released.add(group.id.hex())
    except Exception as error:  # noqa: BLE001 - Tune would end the whole sweep on a callback's exception
        print(f"trial {trial_id}: its workers' placement group was not removed ({error!r})", flush=True)


@dataclass
class SweepResult:
    name: str
    path: str  # the sweep's directory: Tune's results, the runs, the leaderboard and plots
    leaderboard: str  # markdown
    best: dict | None  # the best trial's record
    final: dict | None  # the final seeds' mean and std test metrics
    files: list[str]
    wall_time_s: float
    unfinished: int = 0  # trials an interruption left running or pending (then there are no final seeds yet)

    @property
    def exit_status(self) -> int:
        """130 (interrupted) while trials are unfinished: a script that runs sweeps one after another stops."""
        return 130 if self.unfinished else 0

    def lines(self) -> list[str]:
        state = f", interrupted with {self.unfinished} trial(s) unfinished" if self.unfinished else ""
        return [self.leaderboard, *(f"wrote {path}" for path in self.files),
                f"sweep {self.name}: {self.wall_time_s:.0f} s{state}"]

