"""Ray Tune sweeps over the training runs: search spaces (tuning.space), the sweep (tuning.sweep) and what it
leaves behind (tuning.records: the `sweeps` table, leaderboard, plots, final seeds)."""
import featurestore.raycluster  # noqa: F401 - before anything imports Ray: a local Ray then binds 127.0.0.1
from tuning.space import (PRIMITIVES, SpaceError, check_space, default_space, load_space, param_space,
                          searched_keys, trial_settings)
from tuning.sweep import SweepConfig, SweepResult, run_sweep

__all__ = ["PRIMITIVES", "SpaceError", "check_space", "default_space", "load_space", "param_space",
           "searched_keys", "trial_settings", "SweepConfig", "SweepResult", "run_sweep"]
