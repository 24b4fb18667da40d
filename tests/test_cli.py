"""Flags generated from dataclass fields (training.cli): every TrainConfig setting and model hyper-parameter."""
import argparse
import dataclasses
import runpy
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recmodels import MODELS
from training import cli
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
NOT_FLAGS = {"model_config", "fail_at"}  # declared {"cli": False} in TrainConfig


def train_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser()
    return parser, cli.add_train_arguments(parser)


def test_every_train_setting_and_model_hyper_parameter_has_a_flag_with_help():
    parser, dests = train_parser()
    settings = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_FLAGS]
    model_fields = {f.name for model in MODELS.values() for f in dataclasses.fields(model.config_class)}
    assert [dest for dest in dests if not dest.startswith(cli.MODEL_DEST)] == settings
    assert {dest.removeprefix(cli.MODEL_DEST) for dest in dests if dest.startswith(cli.MODEL_DEST)} \
        == model_fields - {"max_seq_len", "n_intervals"}  # the data sets them (field metadata from_data)
    helps = {action.dest: action.help for action in parser._actions}
    for name in settings:
        assert TrainConfig.__dataclass_fields__[name].metadata["help"] in helps[name]
    assert all(helps[dest] for dest in dests)
    assert helps["lr"] == "Adam learning rate (default: 0.001)"
    assert helps["ks"] == "cut-offs of the HR/NDCG/MRR metrics (default: 5 10 20 50)"
    assert helps["model.n_heads"] == "default: sasrec 2, fame 4, hm4sr 2"  # the defaults differ per model
    assert helps["model.cp_weight"] == "hm4sr; default: 1.0"  # one model has it


def test_every_train_setting_round_trips_through_its_flag():
    defaults = TrainConfig()
    given = {"model": "hm4sr", "db": "/data/store", "dataset": "ml-1m", "storage": "s3://bucket/runs",
             "name": "run-a", "resume": True, "epochs": 3, "batch_size": 64, "sort_window": 1, "precision": "bf16",
             "eval_batch_size": 32, "lr": 0.01, "weight_decay": 1e-4, "max_len": 200, "seed": 7,
             "train_mode": "last", "window_stride": 5, "patience": 2, "time_budget_s": 90.5, "stop_at": 0.07,
             "monitor": "hr@5", "ks": (5, 10),
             "mask_history": True, "num_workers": 2, "cpus_per_worker": 1.5, "gpus_per_worker": 0.5,
             "threads_per_worker": 3, "placement_strategy": "SPREAD", "max_failures": 0, "vectors_table": "vectors", "save_item_vectors": False,
             "save_plot": False}
    assert set(given) == {f.name for f in dataclasses.fields(TrainConfig)} - NOT_FLAGS
    assert all(value != getattr(defaults, name) for name, value in given.items())  # each flag changes something
    parser, dests = train_parser()
    settings = cli.settings_from(parser.parse_args(cli.argv_from(given)), dests)  # the flags for records
    assert {name: type(value) for name, value in settings.items()} \
        == {name: list if name == "ks" else type(value) for name, value in given.items()}
    config = TrainConfig.from_dict(settings)
    assert {name: getattr(config, name) for name in given} == given


def test_a_runs_settings_become_the_flags_that_give_them_back():
    parser, dests = train_parser()
    settings = {"model": "hm4sr", "seed": 3, "ks": [5, 10, 20, 50], "save_item_vectors": False, "window_stride": None,
                "model_config": {"modalities": ["id", "text"], "n_temporal_experts": 0, "pcl_ratio": 0.25}}
    argv = cli.argv_from(settings)
    assert argv == ["--model", "hm4sr", "--seed", "3", "--no-save-item-vectors", "--modalities", "id", "text",
                    "--n-temporal-experts", "0", "--pcl-ratio", "0.25"]  # defaults (ks, stride) left out
    assert cli.settings_from(parser.parse_args(argv), dests) == {
        k: v for k, v in settings.items() if k not in ("ks", "window_stride")}
    with pytest.raises(ValueError, match="fail_at has no flag"):
        cli.argv_from({"fail_at": {"epoch": 1}})


def test_unset_flags_are_absent_and_model_flags_go_to_model_config():
    parser, dests = train_parser()
    assert cli.settings_from(parser.parse_args([]), dests) == {}
    args = parser.parse_args(["--seed", "1", "--mixture", "softmax", "--modalities", "id", "image",
                              "--inner-size", "96", "--pcl-ratio", "0.2"])
    assert cli.settings_from(args, dests) == {
        "seed": 1, "model_config": {"mixture": "softmax", "modalities": ["id", "image"], "inner_size": 96,
                                    "pcl_ratio": 0.2}}


def test_help_runs_and_names_every_flag(capsys):
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    with pytest.raises(SystemExit) as exit_:
        flow["parse_args"](["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    _, dests = train_parser()
    for dest in dests:
        assert "--" + dest.removeprefix(cli.MODEL_DEST).replace("_", "-") + " " in shown
    assert "--fail-at" not in shown and "--model-config" not in shown and "--max-seq-len" not in shown
    assert "Adam learning rate (default: 0.001)" in shown


@dataclass
class Sweep:  # the kinds of field the generator knows, as a later TrainConfig field would declare them
    warmup: int = field(default=0, metadata={"help": "epochs of linear warm-up"})
    scale: float = field(default=1.0, metadata={"help": "loss scale"})
    schedule: str = field(default="cosine", metadata={"help": "lr schedule", "choices": ["cosine", "step"]})
    clip: float | None = field(default=None, metadata={"help": "gradient norm clip", "shown_default": "no clip"})
    layers: tuple[int, ...] = field(default=(64, 32), metadata={"help": "widths"})
    verbose: bool = field(default=False, metadata={"help": "log every step"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the rows"})
    hook: dict | None = field(default=None, metadata={"cli": False})


@dataclass
class OtherSweep:
    warmup: int = 5
    decay: float = field(default=0.5, metadata={"help": "lr decay"})


def test_a_new_field_with_metadata_becomes_a_flag_of_its_type():
    parser = argparse.ArgumentParser()
    dests = cli.add_dataclass_arguments(parser, {"sweep": Sweep})
    assert dests == ["warmup", "scale", "schedule", "clip", "layers", "verbose", "shuffle"]
    args = parser.parse_args(["--warmup", "3", "--scale", "0.5", "--schedule", "step", "--clip", "1",
                              "--layers", "8", "4", "2", "--verbose", "--no-shuffle"])
    assert cli.settings_from(args, dests) == {"warmup": 3, "scale": 0.5, "schedule": "step", "clip": 1.0,
                                              "layers": [8, 4, 2], "verbose": True, "shuffle": False}
    assert cli.settings_from(parser.parse_args([]), dests) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule", "linear"])
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["warmup"] == "epochs of linear warm-up (default: 0)"
    assert helps["clip"] == "gradient norm clip (default: no clip)"
    assert helps["layers"] == "widths (default: 64 32)"
    assert helps["verbose"] == "log every step" and helps["shuffle"] == "shuffle the rows (default: True)"


def test_a_field_added_to_train_config_is_a_flag_of_the_flow(monkeypatch):
    @dataclass
    class Extended(TrainConfig):
        warmup_epochs: int = field(default=0, metadata={"help": "epochs of linear warm-up"})

    monkeypatch.setattr(cli, "TrainConfig", Extended)
    flow = runpy.run_path(str(REPO / "flows" / "train.py"), run_name="flow")
    assert flow["parse_args"](["--warmup-epochs", "3", "--epochs", "9"]) == {"warmup_epochs": 3, "epochs": 9}


def test_fields_several_classes_share_are_one_flag_naming_the_classes_where_not_all_have_it():
    parser = argparse.ArgumentParser()
    dests = cli.add_dataclass_arguments(parser, {"sweep": Sweep, "other": OtherSweep}, dest_prefix="x.")
    assert dests == ["x.warmup", "x.scale", "x.schedule", "x.clip", "x.layers", "x.verbose", "x.shuffle", "x.decay"]
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["x.warmup"] == "epochs of linear warm-up (default: sweep 0, other 5)"
    assert helps["x.scale"] == "sweep; loss scale (default: 1.0)"
    assert helps["x.decay"] == "other; lr decay (default: 0.5)"
    assert parser.parse_args(["--decay", "0.1"]).__dict__["x.decay"] == 0.1


def test_a_field_no_flag_can_parse_must_be_declared_off_the_command_line():
    @dataclass
    class Unparsable:
        hooks: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match=r"field 'hooks': no flag parses .*\{'cli': False\}"):
        cli.add_dataclass_arguments(argparse.ArgumentParser(), {"unparsable": Unparsable})
