"""--prior base-prediction: the prior loss against the frozen base's own prediction, no class images."""

from __future__ import annotations

import csv
import json

import torch
from safetensors.torch import load_file

from conftest import FAST, kill_after_checkpoint

PRIOR = ["--prior", "base-prediction"]


def _losses(run) -> list[dict]:
    with open(run / "logs" / "loss.csv") as f:
        return list(csv.DictReader(f))


def test_prior_is_zero_at_step_0_grows_as_the_adapter_moves_and_draws_no_class_images(photos, tmp_path, cli):
    out = tmp_path / "r"
    r = cli("lora", "--subject", photos, "--class-noun", "dog", "--output-dir", out, *FAST, *PRIOR,
            "--lr", "1e-2", "--log-every", "1", "--validation-images", "0")
    assert r.code == 0, r.err
    rows = _losses(out)
    prior = [float(row["loss_prior"]) for row in rows]
    assert prior[0] == 0.0  # a zero-initialized LoRA predicts exactly what the base does
    assert all(p > 0 for p in prior[1:]) and prior[-1] > prior[1]
    meta = json.loads((out / "run.json").read_text())
    assert meta["config"]["prior"] == "base-prediction"
    assert meta["class_images"] == {"enabled": False, "prior": "base-prediction"}  # none drawn, none read


def test_resume_is_exact(photos, tmp_path, cli, monkeypatch):

    args = ["lora", "--subject", photos, "--class-noun", "dog", "--lr", "1e-2", *FAST, *PRIOR,
            "--steps", "4", "--checkpoint-every", "2", "--validation-images", "0"]
    assert cli(*args, "--output-dir", tmp_path / "a").code == 0
    whole_again = kill_after_checkpoint(monkeypatch, 2)
    assert cli(*args, "--output-dir", tmp_path / "b").code == 130
    whole_again()
    assert cli(*args, "--output-dir", tmp_path / "b", "--resume").code == 0
    a = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_refuses_without_allow_frozen_copy_naming_the_memory(photos, tmp_path, cli):
    r = cli("full", "--subject", photos, "--class-noun", "dog", "--output-dir", tmp_path / "f", *FAST, *PRIOR)
    assert r.code == 2
    line = r.err.strip().splitlines()[-1]
    assert "--allow-frozen-copy" in line and "GiB" in line


def test_batch_takes_prior():
    from personalize.cli import build_parser
    from personalize.commands.dreambooth import config_from_args

    args = build_parser().parse_args(["batch", "--prior", "base-prediction"])
    assert config_from_args(args, "lora", subject="batch").prior == "base-prediction"


def test_full_with_a_frozen_copy_starts_at_zero(photos, tmp_path, cli):
    out = tmp_path / "f"
    r = cli("full", "--subject", photos, "--class-noun", "dog", "--output-dir", out, *FAST, *PRIOR,
            "--allow-frozen-copy", "--steps", "2", "--log-every", "1", "--lr", "1e-3", "--validation-images", "0")
    assert r.code == 0, r.err
    prior = [float(row["loss_prior"]) for row in _losses(out)]
    assert prior[0] == 0.0 and prior[1] > 0  # the copy is the base's weights, not the trained ones
