"""Search spaces of a Ray Tune sweep: plain data, checked before any trial starts.

A space is a dict key -> spec. A key is a TrainConfig hyper-parameter (lr, batch_size, train_mode, ...) or a field
of the model's config class (n_heads, dropout, cp_weight, ...). A spec is one primitive and its arguments:

    {"choice": [v1, v2, ...]}   {"grid": [v1, ...]}   (grid: search "grid" only; Optuna refuses grid parameters)
    {"uniform": [low, high]}    {"loguniform": [low, high]} (0 < low)   {"randint": [low, high]} (high exclusive)

with two optional keys: "zero": true (uniform/loguniform: the value is 0 half of the time, so a zero auxiliary
loss weight is reachable) and "also": [keys] (the sampled value sets these keys too: dropout also attn_dropout).

    default_space(model) / load_space(path)      a space from the defaults below or a YAML/JSON file
    check_space(space, model, search, base)      SpaceError unless every trial of the space is a valid run
    param_space(space)                           Tune's param_space
    trial_settings(base, params, space)          a trial's run_training settings from Tune's sampled params
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from recmodels import MODELS
from recmodels.base import build_config
from training.config import TrainConfig


class SpaceError(ValueError):
    """A problem with a search space; the message names the key (and the file it came from)."""


PRIMITIVES = ("choice", "uniform", "loguniform", "randint", "grid")
LISTED = ("choice", "grid")  # the argument is the list of values
CONTINUOUS = ("uniform", "loguniform")  # the primitives "zero" may extend
SPEC_OPTIONS = ("zero", "also")  # the spec keys besides its primitive
SAMPLERS = {"choice": tune.choice, "grid": tune.grid_search, "uniform": tune.uniform, "loguniform": tune.loguniform,
            "randint": tune.randint}
# Optuna has no "zero or continuous" primitive: a zero spec is two Tune parameters, a coin and the value.
ON, VALUE = "__on", "__value"
# TrainConfig fields that say where, how long or on what a run goes, not how the model learns
NOT_HYPERPARAMETERS = frozenset({
    "model", "db", "dataset", "storage", "name", "resume", "fail_at", "model_config", "num_workers",
    "cpus_per_worker", "gpus_per_worker", "threads_per_worker", "placement_strategy", "max_failures", "vectors_table",
    "save_item_vectors", "save_plot", "epochs", "patience", "time_budget_s", "stop_at", "monitor", "ks", "mask_history", "seed"})
TRAIN_KEYS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
COMBINATION_CAP = 4096  # check_space tries at most this many combinations of the spaces' finite values

POWERS_OF_TWO = {"choice": [1, 2, 4, 8]}
AUXILIARY_WEIGHT = {"loguniform": [0.01, 1.0], "zero": True}
SHARED_DEFAULTS = {  # every model's, after its own keys
    "dropout": {"uniform": [0.1, 0.5], "also": ["attn_dropout"]},
    "lr": {"loguniform": [3e-4, 3e-3]},
    # train_mode all needs small batches to step as often as last does: on ML-100k all at batch 10 reached
    # last's validation range, at batch 256 it stayed below (bench/results/train_mode_ml100k.md)
    "batch_size": {"choice": [8, 16, 32, 64, 128, 256]},
    "train_mode": {"choice": ["all", "last"]},
}
DEFAULT_SPACES = {
    "fame": {"n_heads": POWERS_OF_TWO, "n_experts": POWERS_OF_TWO, "mixture": {"choice": ["logits", "softmax"]},
             "sub_embeddings": {"choice": ["project", "slice"]}, **SHARED_DEFAULTS},
    "hm4sr": {"n_interactive_experts": POWERS_OF_TWO, "n_temporal_experts": POWERS_OF_TWO,
              "cp_weight": AUXILIARY_WEIGHT, "idcl_weight": AUXILIARY_WEIGHT, "pcl_weight": AUXILIARY_WEIGHT,
              "idcl_temperature": {"loguniform": [0.05, 1.0]}, "pcl_temperature": {"loguniform": [0.1, 2.0]},
              "pcl_ratio": {"uniform": [0.1, 0.5]}, **SHARED_DEFAULTS},
    "sasrec": {"n_heads": {"choice": [1, 2, 4]}, "n_layers": {"choice": [1, 2, 3]}, **SHARED_DEFAULTS},
}


def default_space(model: str) -> dict[str, dict]:
    """The issue's space for `model` (a copy: the caller may edit it)."""
    model_config_class(model)
    return copy.deepcopy(DEFAULT_SPACES[model])


def load_space(path: str) -> dict[str, dict]:
    """A space from a .yaml/.yml or .json file whose top level is the space; its specs' form is checked here,
    the keys against a model in check_space."""
    file = Path(path)
    parse = {".yaml": yaml.safe_load, ".yml": yaml.safe_load, ".json": json.loads}.get(file.suffix.lower())
    if parse is None:
        raise SpaceError(f"{path}: a space file is .yaml, .yml or .json")
    try:
        space = parse(file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError is a ValueError
        raise SpaceError(f"{path}: cannot read a space: {error}") from None
    if not isinstance(space, Mapping):
        raise SpaceError(f"{path}: a space is a mapping of keys to specs, got {type(space).__name__}")
    try:
        for key, spec in space.items():
            parse_spec(key, spec)
    except SpaceError as error:
        raise SpaceError(f"{path}: {error}") from None
    return dict(space)


def check_space(space: Mapping[str, Any], model: str, search: str, base: Mapping[str, Any]) -> None:
    """Raise SpaceError for a space `search` cannot sample or whose trials would not be valid runs of `model`
    on the settings `base` (as far as the run's data does not decide it)."""
    config_class = model_config_class(model)
    if not isinstance(space, Mapping) or not space:
        raise SpaceError(f"a space is a non-empty mapping of keys to specs, got {space!r}")
    if base.get("model", model) != model:
        raise SpaceError(f"model: the space is checked for {model!r} but the base settings train {base['model']!r}")
    also_set_by: dict[str, str] = {}  # an "also" key -> the space key whose value sets it
    for key, spec in space.items():
        check_key(key, model, key)
        primitive, _ = parse_spec(key, spec)
        if primitive == "grid" and search != "grid":
            raise SpaceError(f"{key}: grid needs search 'grid' (Optuna refuses grid parameters), not {search!r}; "
                             f"use choice")
        if search == "grid" and primitive not in LISTED:
            raise SpaceError(f"{key}: search 'grid' takes grid and choice only, not {primitive}")
        for target in spec.get("also", ()):
            check_key(target, model, key)
            setter = target if target in space else also_set_by.get(target)
            if setter:
                raise SpaceError(f"{key}: also {target!r}, which {setter} sets too")
            also_set_by[target] = key
    for params in finite_combinations(space):
        settings = trial_settings({**base, "model": model}, params, space)
        try:
            build_config(config_class, TrainConfig.from_dict(settings).model_config)
        except (ValueError, TypeError) as error:
            shown = ", ".join(f"{key}={sampled_value(params, key, spec)!r}" for key, spec in space.items())
            raise SpaceError(f"{shown}: not a valid {model} run: {error}") from None


def param_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's param_space of `space`: a zero spec as `<key>__on` (0 or 1) and `<key>__value`."""
    params = {}
    for key, spec in space.items():
        primitive, args = parse_spec(key, spec)
        domain = SAMPLERS[primitive](list(args)) if primitive in LISTED else SAMPLERS[primitive](*args)
        if spec.get("zero"):
            params[key + ON] = tune.choice([0, 1])
            params[key + VALUE] = domain
        else:
            params[key] = domain
    return params


def trial_settings(base: Mapping[str, Any], params: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    """run_training settings: `base` updated by a trial's sampled `params` (the keys of param_space(space)),
    TrainConfig keys at the top level, model hyper-parameters merged into its model_config."""
    settings = copy.deepcopy(dict(base))
    settings["model_config"] = dict(settings.get("model_config") or {})
    for key, spec in space.items():
        value = sampled_value(params, key, spec)
        for target in (key, *spec.get("also", ())):
            (settings if target in TRAIN_KEYS else settings["model_config"])[target] = value
    return settings


def searched_keys(space: Mapping[str, Any]) -> list[str]:
    """The space's keys in order, as a leaderboard shows them."""
    return list(space)


def model_config_class(model: str) -> type:
    if model not in MODELS:
        raise SpaceError(f"model: unknown model {model!r}; valid models: {sorted(MODELS)}")
    return MODELS[model].config_class


def searchable_keys(model: str) -> list[str]:
    """The keys a space for `model` may hold."""
    config_class = model_config_class(model)
    model_keys = {f.name for f in dataclasses.fields(config_class)} - config_class.data_keys(("always",))
    return sorted(TRAIN_KEYS - NOT_HYPERPARAMETERS | model_keys)


def check_key(target: Any, model: str, key: Any) -> None:
    """SpaceError unless `target` (set by the space's `key`) is a hyper-parameter of `model`."""
    if target in searchable_keys(model):
        return
    if target in NOT_HYPERPARAMETERS:
        why = "a run setting, not a hyper-parameter"
    elif target in model_config_class(model).data_keys(("always",)):
        why = "set by the run and its data"
    else:
        why = f"not a hyper-parameter of {model}"
    named = repr(target) if target == key else f"{key}: also {target!r}"
    raise SpaceError(f"{named} is {why}; valid keys: {searchable_keys(model)}")


def parse_spec(key: Any, spec: Any) -> tuple[str, list]:
    """The spec's primitive and arguments, its form checked (not against a model)."""
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{key}: a spec is a mapping such as {{'choice': [...]}}, got {spec!r}")
    named = [name for name in spec if name not in SPEC_OPTIONS]
    unknown = [name for name in named if name not in PRIMITIVES]
    if unknown or len(named) != 1:
        raise SpaceError(f"{key}: a spec needs exactly one primitive of {PRIMITIVES} (and optionally {SPEC_OPTIONS}), "
                         f"got {sorted(map(str, spec))}")
    primitive, args = named[0], spec[named[0]]
    if not isinstance(args, (list, tuple)):
        raise SpaceError(f"{key}: {primitive} takes a list, got {args!r}")
    if primitive in LISTED and not args:
        raise SpaceError(f"{key}: {primitive} needs at least one value")
    if primitive not in LISTED:
        check_bounds(key, primitive, args)
    if not isinstance(spec.get("zero", False), bool):
        raise SpaceError(f"{key}: zero is true or false, got {spec['zero']!r}")
    if spec.get("zero") and primitive not in CONTINUOUS:
        raise SpaceError(f"{key}: zero extends {' or '.join(CONTINUOUS)} only, not {primitive}")
    also = spec.get("also", [])
    if not isinstance(also, (list, tuple)) or not all(isinstance(target, str) for target in also):
        raise SpaceError(f"{key}: also is a list of keys, got {also!r}")
    return primitive, list(args)


def check_bounds(key: Any, primitive: str, bounds: list | tuple) -> None:
    number = int if primitive == "randint" else (int, float)
    if len(bounds) != 2 or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds):
        # YAML 1.1 reads 3e-4 as text: its floats need a dot and a signed exponent
        hint = "; write YAML floats as 3.0e-4" if any(isinstance(b, str) for b in bounds) else ""
        raise SpaceError(f"{key}: {primitive} takes [low, high] as {'ints' if number is int else 'numbers'}, "
                         f"got {list(bounds)!r}{hint}")
    low, high = bounds
    if not low < high or (primitive == "loguniform" and low <= 0):
        needs = "0 < low < high" if primitive == "loguniform" else "low < high"
        raise SpaceError(f"{key}: {primitive} needs {needs}, got [{low}, {high}]")


def sampled_value(params: Mapping[str, Any], key: str, spec: Mapping[str, Any]) -> Any:
    """The value the trial's `params` give `key`: a zero spec's value or 0.0 by its coin."""
    if spec.get("zero"):
        return params[key + VALUE] if params[key + ON] else 0.0
    return params[key]


def finite_combinations(space: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Param dicts of every combination of each key's finite values (a continuous key's bounds, and 0 where zero
    is on; randint's lowest and highest value), or COMBINATION_CAP of them drawn with a fixed seed."""
    per_key = [finite_params(key, spec) for key, spec in space.items()]
    total = 1
    for options in per_key:
        total *= len(options)
    if total <= COMBINATION_CAP:
        combinations = itertools.product(*per_key)
    else:
        draw = random.Random(0)
        combinations = ([draw.choice(options) for options in per_key] for _ in range(COMBINATION_CAP))
    for combination in combinations:
        yield {name: value for params in combination for name, value in params.items()}


def finite_params(key: str, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One key's finite values, each as the params param_space's sampler would give."""
    primitive, args = parse_spec(key, spec)
    values = [args[0], args[1] - 1] if primitive == "randint" else args
    if spec.get("zero"):
        return [{key + ON: 0, key + VALUE: values[0]}] + [{key + ON: 1, key + VALUE: value} for value in values]
    return [{key: value} for value in values]
