"""Ray Tune sweeps over the training runs: search spaces (tuning.space)."""
from tuning.space import (PRIMITIVES, SpaceError, check_space, default_space, load_space, param_space,
                          searched_keys, trial_settings)

__all__ = ["PRIMITIVES", "SpaceError", "check_space", "default_space", "load_space", "param_space",
           "searched_keys", "trial_settings"]
