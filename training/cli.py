"""Command-line flags generated from dataclass fields: the TrainConfig settings and the models' hyper-parameters.

    add_train_arguments(parser) -> dests        every TrainConfig setting and model hyper-parameter as a flag
    settings_from(args, dests) -> dict          the settings those flags set, the model's under "model_config"
    argv_from(settings) -> list[str]            the flags that set `settings` (its inverse: commands for records)
    add_dataclass_arguments(group, classes)     the generator both groups of flags come from

A field `some_name` becomes `--some-name`, parsed by its annotation: int, float, str; bool: a switch; X | None
as X; tuple[X, ...]: one or more X. Its metadata gives the rest: "help", "choices", "shown_default" (the text
for a default derived at run time); {"cli": False} keeps a field off the command line. No flag has an argparse
default, so an unset flag is absent from the settings and the dataclass default, or a resumed run's saved
setting, applies; the help shows the dataclass default.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from recmodels import MODELS
from training.config import TrainConfig

MODEL_DEST = "model."  # dest prefix of the model flags: their values go to settings["model_config"]


def add_train_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """A flag per TrainConfig setting and, in their own group, per model hyper-parameter -> their dests."""
    models = parser.add_argument_group("model hyper-parameters (unset: the model's default)")
    return (add_dataclass_arguments(parser, {"train": TrainConfig})
            + add_dataclass_arguments(models, {name: model.config_class for name, model in MODELS.items()},
                                      dest_prefix=MODEL_DEST))


def settings_from(args: argparse.Namespace, dests: Iterable[str]) -> dict[str, Any]:
    """The settings the flags `dests` set, unset ones absent; model hyper-parameters under "model_config"."""
    given = {dest: getattr(args, dest) for dest in dests if getattr(args, dest) is not None}
    settings = {dest: value for dest, value in given.items() if not dest.startswith(MODEL_DEST)}
    model_config = {dest.removeprefix(MODEL_DEST): value for dest, value in given.items()
                    if dest.startswith(MODEL_DEST)}
    if model_config:
        settings["model_config"] = model_config
    return settings


def argv_from(settings: Mapping[str, Any]) -> list[str]:
    """flows/train.py flags that give `settings` (a TrainConfig dict): the model, every setting that differs from its
    default, then every model hyper-parameter in settings["model_config"]; settings_from(parse(argv_from(s))) gives s back
    up to the defaults. Fields kept off the command line ({"cli": False}) must be unset."""
    argv = []
    for f in dataclasses.fields(TrainConfig):
        value = settings.get(f.name, default_of(f))
        if not f.metadata.get("cli", True):
            if f.name != "model_config" and value != default_of(f):
                raise ValueError(f"{f.name} has no flag, so a command line cannot set it to {value!r}")
            continue
        if f.name == "model" or (value != default_of(f) and not (isinstance(value, (list, tuple))
                                                                 and tuple(value) == default_of(f))):
            argv += flag(f.name, value, default_of(f) is True)
    switched_on = {f.name for model in MODELS.values() for f in dataclasses.fields(model.config_class)
                   if default_of(f) is True}  # as add_dataclass_arguments decides which switches get --no-
    for name, value in (settings.get("model_config") or {}).items():
        argv += flag(name, value, name in switched_on)
    return argv


def flag(name: str, value: Any, default_on: bool) -> list[str]:
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [option] if value else ["--no-" + option[2:]] if default_on else []
    if isinstance(value, (list, tuple)):
        return [option, *map(str, value)]
    return [option, str(value)]


def add_dataclass_arguments(group: argparse._ActionsContainer, classes: Mapping[str, type], *,
                            dest_prefix: str = "") -> list[str]:
    """A flag per field of the dataclasses `classes` (label -> class) into dest `dest_prefix + field name`.

    A field several classes have is one flag; its help gives each class's default where they differ and names
    the classes that have it where not all do. -> the dests, in order.
    """
    by_name: dict[str, dict[str, dataclasses.Field]] = {}  # field name -> label -> field
    declared: dict[str, tuple[Any, dict]] = {}  # field name -> (annotation, metadata) of the first class with it
    for label, cls in classes.items():
        hints = typing.get_type_hints(cls)  # the annotations `from __future__ import annotations` keeps as text
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                by_name.setdefault(f.name, {})[label] = f
                declared.setdefault(f.name, (hints[f.name], f.metadata))
    dests = []
    for name, fields in by_name.items():
        annotation, meta = declared[name]
        defaults = {label: default_of(f) for label, f in fields.items()}
        kwargs = parse_keywords(name, annotation, any(value is True for value in defaults.values()))
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        elif "action" not in kwargs:  # argparse lists the choices where there is no metavar
            kwargs["metavar"] = name.upper()
        named = "/".join(fields) if len(fields) < len(classes) else ""
        group.add_argument("--" + name.replace("_", "-"), dest=dest_prefix + name, default=None,
                           help=help_text(meta.get("help", ""), named, meta.get("shown_default"), defaults),
                           **kwargs)
        dests.append(dest_prefix + name)
    return dests


def default_of(f: dataclasses.Field) -> Any:
    """The field's default; None for a field without one."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def parse_keywords(name: str, annotation: Any, default_on: bool) -> dict[str, Any]:
    """argparse keywords that parse a value of `annotation`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        annotation = next(a for a in args if a is not type(None))  # X | None: unset is None
        args = typing.get_args(annotation)
    if annotation is bool:  # a switch; one that is on by default also gets --no-<name>
        return {"action": argparse.BooleanOptionalAction if default_on else "store_true"}
    if typing.get_origin(annotation) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": args[0], "nargs": "+"}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"field {name!r}: no flag parses {annotation!r}; declare it with metadata {{'cli': False}} "
                    f"or an int, float, str, bool or tuple[X, ...] annotation")


def help_text(described: str, named: str, shown_default: str | None, defaults: Mapping[str, Any]) -> str:
    """'<classes>; <help> (default: <default>)', each part where there is one."""
    if shown_default is None:
        shown = {label: value_text(value) for label, value in defaults.items()}
        distinct = set(shown.values())
        shown_default = distinct.pop() if len(distinct) == 1 else ", ".join(f"{k} {v}" for k, v in shown.items())
    if shown_default and described:
        described = f"{described} (default: {shown_default})"
    elif shown_default:
        described = f"default: {shown_default}"
    text = "; ".join(part for part in (named, described) if part)
    return text.replace("%", "%%")  # argparse formats help with %


def value_text(value: Any) -> str:
    """A default as it is typed on the command line; '' for none (None, or a switch that is off)."""
    if value is None or value is False:
        return ""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
