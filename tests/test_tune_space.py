"""tuning.space: default and file spaces, their checks, Tune's param_space and the trial settings it samples."""
import dataclasses
import json

import pytest
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Domain

from recmodels import MODELS
from recmodels.base import build_config
from training.config import TrainConfig
from tuning import SpaceError, check_space, default_space, load_space, param_space, searched_keys, trial_settings
from tuning.space import NOT_HYPERPARAMETERS


def base_for(model, **model_config):
    return {"model": model, "model_config": model_config}


def accepted(settings):
    """The settings as run_training would check them: TrainConfig and the model's config class."""
    config = TrainConfig.from_dict(settings)
    return config, build_config(MODELS[config.model].config_class, config.model_config)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_default_spaces_pass_their_checks_and_give_tune_samplers(model):
    space = default_space(model)
    check_space(space, model, "optuna", base_for(model))
    params = param_space(space)
    assert params and all(isinstance(domain, Domain) for domain in params.values())
    assert searched_keys(space) == list(space)
    json.dumps(space)  # a space is data: what a sweep records


def test_not_hyperparameters_are_train_config_fields():
    assert NOT_HYPERPARAMETERS <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_trial_settings_decode_zero_apply_also_and_place_model_keys():
    space = default_space("hm4sr")
    params = {"n_interactive_experts": 2, "n_temporal_experts": 8, "cp_weight__on": 0, "cp_weight__value": 0.5,
              "idcl_weight__on": 1, "idcl_weight__value": 0.3, "pcl_weight__on": 0, "pcl_weight__value": 0.2,
              "idcl_temperature": 0.2, "pcl_temperature": 1.0, "pcl_ratio": 0.3, "dropout": 0.25, "lr": 1e-3,
              "batch_size": 64, "train_mode": "last"}
    base = {"model": "hm4sr", "model_config": {"hidden_size": 32}, "epochs": 3}
    settings = trial_settings(base, params, space)
    assert base == {"model": "hm4sr", "model_config": {"hidden_size": 32}, "epochs": 3}  # not mutated
    assert settings["lr"] == 1e-3 and settings["batch_size"] == 64 and settings["train_mode"] == "last"
    assert settings["epochs"] == 3
    model_config = settings["model_config"]
    assert model_config["cp_weight"] == 0.0 and model_config["pcl_weight"] == 0.0
    assert model_config["idcl_weight"] == 0.3
    assert model_config["dropout"] == model_config["attn_dropout"] == 0.25
    assert model_config["hidden_size"] == 32 and model_config["n_temporal_experts"] == 8
    assert not {"lr", "batch_size", "train_mode"} & set(model_config)
    config, model = accepted(settings)
    assert config.batch_size == 64 and model.cp_weight == 0.0 and model.attn_dropout == 0.25


@pytest.mark.parametrize("model", sorted(MODELS))
def test_tune_and_optuna_samples_give_valid_settings(model):
    space = default_space(model)
    params = param_space(space)
    searcher = OptunaSearch(OptunaSearch.convert_search_space(params), metric="val_ndcg@20", mode="max", seed=0)
    samples = [{name: domain.sample() for name, domain in params.items()} for _ in range(20)]
    samples += [searcher.suggest(f"trial_{i}") for i in range(5)]
    for sampled in samples:
        json.dumps(sampled)
        accepted(trial_settings(base_for(model), sampled, space))


def test_grid_search_space():
    space = {"n_heads": {"grid": [1, 2]}, "lr": {"choice": [1e-3, 3e-3]}}
    check_space(space, "sasrec", "grid", base_for("sasrec"))
    assert param_space(space)["n_heads"] == {"grid_search": [1, 2]}


def test_load_space_from_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text("n_heads: {choice: [1, 2]}\n"
                         "lr: {loguniform: [3.0e-4, 3.0e-3]}\n"
                         "dropout: {uniform: [0.1, 0.5], also: [attn_dropout]}\n")
    space = load_space(str(yaml_file))
    assert space == {"n_heads": {"choice": [1, 2]}, "lr": {"loguniform": [3e-4, 3e-3]},
                     "dropout": {"uniform": [0.1, 0.5], "also": ["attn_dropout"]}}
    json_file = tmp_path / "space.json"
    json_file.write_text(json.dumps(default_space("hm4sr")))
    assert load_space(str(json_file)) == default_space("hm4sr")
    check_space(space, "sasrec", "optuna", base_for("sasrec"))


@pytest.mark.parametrize("text, named", [
    ("- n_heads\n- lr\n", "a space is a mapping of keys to specs, got list"),
    ("n_heads: {choice: [1, 2]\n", "cannot read a space"),
    ("lr: {loguniform: [3e-4, 3e-3]}\n", "lr: loguniform takes .* write YAML floats as 3.0e-4"),  # YAML 1.1: text
])
def test_bad_space_files_name_the_file(tmp_path, text, named):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=f"space.yaml: {named}"):
        load_space(str(path))


def test_missing_space_file_is_named(tmp_path):
    with pytest.raises(SpaceError, match="missing.json: cannot read a space"):
        load_space(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("space, search, named", [
    ({"n_head": {"choice": [1, 2]}}, "optuna", r"'n_head' is not a hyper-parameter of sasrec; valid keys: .*n_heads"),
    ({"lr": {"normal": [0.0, 1.0]}}, "optuna", r"lr: a spec needs exactly one primitive.*'normal'"),
    ({"n_heads": {"choice": []}}, "optuna", r"n_heads: choice needs at least one value"),
    ({"n_heads": {"grid": [1, 2]}}, "optuna", r"n_heads: grid needs search 'grid' \(Optuna refuses"),
    ({"lr": {"uniform": [1e-3, 1e-2]}}, "grid", r"lr: search 'grid' takes grid and choice only"),
    ({"dropout": {"choice": [0.1, 0.2], "zero": True}}, "optuna", r"dropout: zero extends uniform or loguniform"),
    ({"lr": {"loguniform": [0.0, 1e-2]}}, "optuna", r"lr: loguniform needs 0 < low < high"),
    ({"n_layers": {"randint": [1.5, 3]}}, "optuna", r"n_layers: randint takes \[low, high\] as ints"),
    ({"max_seq_len": {"choice": [50]}}, "optuna", r"'max_seq_len' is set by the run and its data"),
    ({"seed": {"choice": [1, 2]}}, "optuna", r"'seed' is a run setting"),
    ({"dropout": {"uniform": [0.1, 0.5], "also": ["attn_dropot"]}}, "optuna", r"dropout: also 'attn_dropot'"),
    ({"dropout": {"uniform": [0.1, 0.5], "also": ["attn_dropout"]}, "attn_dropout": {"uniform": [0.1, 0.2]}},
     "optuna", r"dropout: also 'attn_dropout', which attn_dropout sets too"),
    ({"n_heads": {"choice": [2, 3]}}, "optuna",
     r"n_heads=3: not a valid sasrec run: hidden_size 64 is not divisible by n_heads 3"),
    ({"window_stride": {"randint": [1, 80]}}, "optuna", r"window_stride=79: .*window_stride must be in 1..max_len"),
])
def test_bad_spaces_name_the_key(space, search, named):
    with pytest.raises(SpaceError, match=named):
        check_space(space, "sasrec", search, {"model": "sasrec", "model_config": {"hidden_size": 64}})


def test_unknown_model():
    with pytest.raises(SpaceError, match=r"unknown model 'bert4rec'; valid models: \['fame', 'hm4sr', 'sasrec'\]"):
        default_space("bert4rec")
    with pytest.raises(SpaceError, match="unknown model 'bert4rec'"):
        check_space({"lr": {"choice": [1e-3]}}, "bert4rec", "optuna", {})
