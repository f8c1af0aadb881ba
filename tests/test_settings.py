"""personalize.settings: --config FILE.toml and --preset NAME on every command that has flags; each
run's resolved settings in config.toml, which repeats the run."""

from __future__ import annotations

import tomllib

import pytest
from safetensors.torch import load_file

from personalize.cli import build_parser, main
from personalize.commands.dreambooth import config_from_args
from personalize.config import TrainConfig, other_methods_fields
from personalize.flags import config_fields, flag_names
from personalize.settings import preset_names, read_preset, settings_of, to_toml

TRAINING = ("lora", "full", "batch")


def _parse(argv):
    return build_parser().parse_args(argv)


def _toml(tmp_path, text: str):
    f = tmp_path / "s.toml"
    f.write_text(text)
    return str(f)


def test_a_file_sets_flags_in_either_spelling_and_the_command_line_overrides_it(tmp_path):
    f = _toml(tmp_path, 'subject = "dog"\nlora-alpha = 8\nlora_targets = ["to_k", "to_v"]\n'
                        'steps = 5\ntrain-text-encoder = false\nema = true\n')
    cfg = config_from_args(_parse(["lora", "--config", f, "--steps", "7"]), "lora")
    assert (cfg.subject, cfg.lora_alpha, cfg.steps) == ("dog", 8, 7)
    assert cfg.lora_unet_targets == ["to_k", "to_v"] and cfg.train_text_encoder is False and cfg.ema is True
    assert config_from_args(_parse(["lora", f"--config={f}", "--no-ema"]), "lora").ema is False


@pytest.mark.parametrize("text,words", [
    ("bogus = 1", ["unknown key 'bogus'"]),
    ('lora-alpha = "x"', ["lora-alpha", "float"]),
    ("buckets = 3", ["buckets", "true or false"]),
    ("steps = 1.5", ["steps"]),
    ("[table]\nsteps = 1", ["table"]),
    ("steps = ", ["not valid TOML"]),
])
def test_a_bad_key_or_value_is_one_line_naming_the_key_and_the_file(tmp_path, capsys, text, words):
    f = _toml(tmp_path, text + "\n")
    assert main(["lora", "--subject", "dog", "--config", f]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f in err and all(w in err for w in words), err


def test_a_missing_file_or_preset_is_one_line(tmp_path, capsys):
    assert main(["lora", "--subject", "dog", "--config", str(tmp_path / "nope.toml")]) == 2
    assert main(["lora", "--subject", "dog", "--preset", "nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "nope.toml" in lines[0] and "cpu-preview" in lines[1]


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_made_of_training_flags_and_parses(name):
    about, values = read_preset(name)
    assert about, f"preset {name} says what it is for (its `about`)"
    flags = {n.lstrip("-") for _, f, _ in config_fields(TrainConfig) for n in flag_names(f)}
    assert set(values) <= flags, set(values) - flags
    for command in TRAINING:
        argv = [command, "--preset", name] + (["--subject", "dog"] if command != "batch" else [])
        args = _parse(argv)
        if command != "batch":
            cfg = config_from_args(args, command)
            cfg.validate()
            for key, value in values.items():
                assert settings_of(cfg)[key] == value


def test_presets_default_and_order(tmp_path):
    assert set(preset_names()) >= {"bk-sdm", "cpu-preview", "phone-photos"}
    assert config_from_args(_parse(["lora", "--subject", "d"]), "lora") == TrainConfig(method="lora", subject="d")
    phone = config_from_args(_parse(["lora", "--subject", "d", "--preset", "phone-photos"]), "lora")
    assert phone.buckets and phone.caption_dropout == 0.05 and phone.shuffle_caption
    # preset < --config < command line
    f = _toml(tmp_path, "steps = 9\nresolution = 128\n")
    cfg = config_from_args(_parse(["lora", "--subject", "d", "--preset", "cpu-preview", "--config", f,
                                   "--resolution", "64"]), "lora")
    assert (cfg.steps, cfg.resolution, cfg.class_images) == (9, 64, read_preset("cpu-preview")[1]["class-images"])


def test_presets_command_lists_them(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert name in out and read_preset(name)[0] in out
    assert "buckets = true" in out


def test_generate_export_and_batch_take_a_file(tmp_path):
    f = _toml(tmp_path, 'format = "kohya"\nout = "x.safetensors"\nnames = "ldm"\n')
    args = _parse(["export", "runs/a", "--config", f])
    assert (args.format, str(args.out), args.names) == ("kohya", "x.safetensors", "ldm")
    g = _toml(tmp_path, 'prompt = ["a {token} {class}", "b"]\nsteps = 3\nprotocol = true\n')
    args = _parse(["generate", "runs/a", "--config", g])
    assert args.prompt == ["a {token} {class}", "b"] and args.steps == 3 and args.protocol
    b = _toml(tmp_path, 'methods = "lora,full"\nsteps = 3\n')
    args = _parse(["batch", "--config", b])
    assert args.methods == "lora,full" and args.steps == 3


def test_settings_written_read_back_give_the_same_config(tmp_path):
    cfg = config_from_args(_parse(["lora", "--subject", "d", "--preset", "phone-photos", "--lr", "3e-5",
                                   "--no-train-text-encoder", "--lora-targets", "to_k,to_out.0"]), "lora")
    f = tmp_path / "config.toml"
    f.write_text(to_toml(settings_of(cfg, skip=other_methods_fields("lora"))))
    assert tomllib.loads(f.read_text())  # valid TOML
    assert config_from_args(_parse(["lora", "--config", str(f)]), "lora") == cfg


def test_config_toml_of_a_run_repeats_it_exactly(lora_run, tmp_path):
    written = lora_run / "config.toml"
    values = tomllib.loads(written.read_text())
    assert values["steps"] == 4 and values["lr"] == 1e-2 and "resume" not in values and "overwrite" not in values
    again = tmp_path / "again"
    assert main(["lora", "--config", str(written), "--output-dir", str(again)]) == 0
    a = load_file(lora_run / "pytorch_lora_weights.safetensors")
    b = load_file(again / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert tomllib.loads((again / "config.toml").read_text()) == {**values, "output-dir": str(again)}
