"""personalize.flags: the one flag generator of both CLIs. Every config field is a flag whose help
comes from the field's metadata, and every choice list is the library's own constant."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from personalize import defaults
from personalize.config import TrainConfig
from personalize.flags import add_flags, config_fields, flag_names, from_args


def _commands(build_parser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def _personalize() -> dict[str, argparse.ArgumentParser]:
    from personalize.cli import build_parser

    return _commands(build_parser)


def _actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions}


def _by_flag(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def _help_of(f: dataclasses.Field) -> str:
    return f.metadata["help"]


def test_every_train_config_field_has_a_flag_with_the_help_of_its_metadata():
    commands = _personalize()
    # the method-only flags are on their method's command; every other flag is on all of them
    shown = {k: v for m in defaults.ADAPTER_METHOD_NAMES for k, v in _actions(commands[m]).items()}
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help in its metadata"
        if f.name == "method":  # the command itself: personalize lora, ..., personalize full
            assert flag_names(f) == () and set(defaults.METHODS) <= set(commands)
            continue
        action = shown[f.name]
        assert action.option_strings[0] == flag_names(f)[0]
        assert action.help.replace("%%", "%").startswith(_help_of(f)), f.name
    # batch: the same flags, minus the ones a batch sets per job
    batch = _actions(commands["batch"])
    skipped = {"method", "subject", "base", "class_noun", "output_dir", "resume", "overwrite"}
    assert {f.name for f in dataclasses.fields(TrainConfig)} - skipped <= set(batch)


def test_every_flag_with_a_default_names_it():
    for name in ("lora", "full", "batch"):
        for a in _personalize()[name]._actions:
            if a.option_strings and a.default not in (None, "", argparse.SUPPRESS) and a.nargs != 0:
                assert "default" in a.help, (name, a.option_strings)


def test_choices_are_the_library_constants():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, constant in (("method", defaults.METHODS), ("lr_scheduler", defaults.LR_SCHEDULERS),
                           ("optimizer", defaults.OPTIMIZERS),
                           ("class_images_runtime", defaults.CLASS_IMAGE_RUNTIMES)):
        assert fields[name].metadata["choices"] is constant, name

    commands = _personalize()
    lora = _by_flag(commands["lora"])
    # TrainConfig.validate() refuses other values (one line for the CLI, batch and the app): shown, not checked
    assert lora["--lr-scheduler"].metavar == "{" + ",".join(defaults.LR_SCHEDULERS) + "}"
    assert lora["--optimizer"].metavar == "{" + ",".join(defaults.OPTIMIZERS) + "}"
    assert lora["--class-images-runtime"].metavar == "{" + ",".join(defaults.CLASS_IMAGE_RUNTIMES) + "}"

    generate, export = _by_flag(commands["generate"]), _by_flag(commands["export"])
    assert list(generate["--scheduler"].choices) == list(defaults.SCHEDULERS)
    assert list(generate["--inference-precision"].choices) == list(defaults.INFERENCE_PRECISIONS)
    assert list(export["--format"].choices) == list(defaults.EXPORT_FORMATS)
    assert ", ".join(defaults.METHODS) in _by_flag(commands["batch"])["--methods"].help
    assert set(defaults.METHODS) <= set(commands)


def test_export_choices_that_live_in_heavy_modules_equal_them():
    """These constants sit in modules that import torch (not importable while --help is built),
    so export spells them out; this holds the two together."""
    from personalize.defaults import COREML_ATTENTION as ATTENTION, COREML_NBITS as NBITS
    from personalize.defaults import OPENVINO_WEIGHT_FORMATS as WEIGHT_FORMATS

    export = _by_flag(_personalize()["export"])
    assert list(export["--weight-format"].choices) == list(WEIGHT_FORMATS)
    assert list(export["--attention"].choices) == list(ATTENTION)
    assert export["--quantize-nbits"].metavar == "{" + ",".join(map(str, NBITS)) + ",none}"


def test_distill_flags_come_from_the_same_generator():
    import distill.cli
    from personalize.architectures import ARCHS
    from distill.benchmark import EvalConfig
    from distill.config import DistillConfig
    from personalize.defaults import MIXED_PRECISIONS as MIXED_PRECISION

    assert not hasattr(distill.cli, "_scalar_type")  # one generator: personalize.flags
    commands = _commands(distill.cli.build_parser)
    for name, cls in (("train", DistillConfig), ("eval", EvalConfig)):
        actions = _actions(commands[name])
        for owner, f, _ in config_fields(cls):
            assert f.metadata.get("help"), f"{owner.__name__}.{f.name} has no help in its metadata"
            if flag_names(f):
                assert actions[f.name].help.replace("%%", "%").startswith(f.metadata["help"].split("%(")[0])
    assert list(_by_flag(commands["train"])["--mixed-precision"].choices) == list(MIXED_PRECISION)
    assert list(_by_flag(commands["eval"])["--scheduler"].choices) == list(defaults.SCHEDULERS)
    assert _by_flag(commands["prune"])["--arch"].metavar == "{" + ",".join(ARCHS) + "}"


def test_a_bad_choice_is_refused_by_the_config_with_its_one_line():
    from personalize.commands.dreambooth import config_from_args
    from personalize.errors import UserError

    args = _personalize()["lora"].parse_args(["--subject", "dog", "--optimizer", "sgd"])
    with pytest.raises(UserError, match="--optimizer must be one of adamw, adamw8bit, prodigy"):
        config_from_args(args, "lora").validate()


# -------------------------------------------------------------------------------- the generator itself
COLOURS = ("red", "green")


@dataclass
class Inner:
    depth: int = field(default=3, metadata={"help": "how deep"})


@dataclass
class Example:
    name: str = field(metadata={"help": "the name"})
    output: str = field(metadata={"flag": ("-o", "--output"), "help": "where"})
    count: int = field(default=2, metadata={"help": "how many"})
    ratio: float | None = field(default=None, metadata={"help": "a ratio (default: none)"})
    colour: str = field(default="red", metadata={"choices": COLOURS, "help": "a colour"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "a mode"})
    tags: list[str] = field(default_factory=lambda: ["x", "y"], metadata={"help": "tags"})
    fast: bool = field(default=False, metadata={"help": "go fast"})
    crop: bool = field(default=True, metadata={"flag": "--no-crop", "invert": True, "help": "do not crop"})
    inner: Inner = field(default_factory=Inner)
    fixed: float = field(default=1.0, metadata={"flag": None, "help": "not a flag"})


def _example_parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, Example, **kw)
    return p


def test_the_generator_maps_each_type_to_its_flag():
    p = _example_parser(groups={"Example": "main", "Inner": "inner"})
    a = from_args(Example, p.parse_args(["--name", "n", "-o", "o"]))
    assert a == Example("n", "o")
    a.tags.append("z")  # a config never shares the parser's default list
    assert from_args(Example, p.parse_args(["--name", "n", "-o", "o"])).tags == ["x", "y"]
    b = from_args(Example, p.parse_args(["--name", "n", "--output", "o", "--count", "5", "--ratio", "0.5",
                                         "--colour", "green", "--mode", "b", "--tags", "p, q,", "--fast",
                                         "--no-crop", "--depth", "7"]))
    assert b == Example("n", "o", count=5, ratio=0.5, colour="green", mode="b", tags=["p", "q"], fast=True,
                        crop=False, inner=Inner(7))
    assert from_args(Example, p.parse_args(["--name", "n", "-o", "o", "--no-fast"]), count=9).count == 9
    flags = _by_flag(p)
    assert "--fixed" not in flags and flags["--no-fast"] is flags["--fast"]
    assert flags["--count"].help == "how many (default: 2)" and flags["--ratio"].help == "a ratio (default: none)"
    assert flags["--tags"].help == "tags (default: x,y)" and flags["--fast"].help == "go fast (default: off)"
    assert flags["--colour"].choices == list(COLOURS) and flags["--mode"].choices == ["a", "b"]
    assert flags["--name"].required and flags["--output"].metavar == "OUTPUT"
    assert {g.title for g in p._action_groups} >= {"main", "inner"}
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "n", "-o", "o", "--colour", "blue"])
    # choices left to the dataclass's own validate(): shown, not checked
    unchecked = _by_flag(_example_parser(check_choices=False))
    assert unchecked["--colour"].choices is None and unchecked["--colour"].metavar == "{red,green}"


def test_a_field_without_help_or_with_an_unknown_key_is_refused():
    bare = dataclasses.make_dataclass("Bare", [("steps", int, field(default=1))])
    with pytest.raises(TypeError, match="Bare.steps has no help"):
        add_flags(argparse.ArgumentParser(), bare)
    typo = dataclasses.make_dataclass("Typo", [("steps", int, field(default=1, metadata={"hlep": "x", "help": "y"}))])
    with pytest.raises(TypeError, match="unknown flag metadata"):
        add_flags(argparse.ArgumentParser(), typo)
    # a TrainConfig field added without help breaks every training command's parser
    extended = dataclasses.make_dataclass("Extended", [("new_knob", int, field(default=0))], bases=(TrainConfig,))
    with pytest.raises(TypeError, match="Extended.new_knob has no help"):
        add_flags(argparse.ArgumentParser(), extended)
