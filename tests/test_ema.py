"""--ema: the average of exactly the trained weights (personalize.ema, a fit hook shared with
distill), held against an EMA computed by hand over the recorded trajectory; exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST
from personalize.ema import WeightsEMA
from personalize.fit import FitConfig, Hook, StopRun, fit, make_accelerator


def _toy():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    m[0].bias.requires_grad_(False)  # a frozen parameter: not averaged
    return m


def _loss(ms, step, micro, g):
    x = torch.randn(8, 4, generator=g)
    return {"loss": ((ms["m"](x) - x.sum(1, keepdim=True)) ** 2).mean()}


def _trained(ms):
    return [p for p in ms["m"].parameters() if p.requires_grad]


def _run(d, steps, decay, resume=False, every=0, record=None, stop_at=None):
    ema = WeightsEMA(d, d / "checkpoints" / "ema", decay, _trained)
    hooks = [Hook("ema", 1, ema, on_checkpoint=ema.save)]
    if record is not None:
        hooks.append(Hook("record", 1, lambda s, ms: record.append([p.detach().clone() for p in _trained(ms)])))
    if stop_at is not None:
        def stop(step, ms):
            if step == stop_at:
                raise StopRun()
        hooks.append(Hook("stop", 1, stop))
    cfg = FitConfig(steps=steps, lr=5e-2, checkpoint_every=every, log_every=1)
    r = fit(make_accelerator("no", 1, None), {"m": _toy()}, _loss, cfg, d, resume=resume, log=lambda s: None,
            hooks=hooks)
    ema.copy_to(r.models, r.step)
    return [p.detach().clone() for p in _trained(r.models)], r


def _by_hand(trajectory, decay):
    """EMAModel's rule: update t (from 1) has decay min(decay, t / (9 + t)) (0 at the first: a copy)."""
    avg = [p.clone() for p in trajectory[0]]
    for t, params in enumerate(trajectory[1:], start=2):
        d = min(decay, t / (9 + t))
        avg = [a * d + (1 - d) * p for a, p in zip(avg, params)]
    return avg


@pytest.mark.parametrize("decay", [0.999, 0.2])
def test_the_average_is_the_one_computed_by_hand(tmp_path, decay):
    trajectory = []
    averaged, r = _run(tmp_path, 6, decay, record=trajectory)
    assert len(trajectory) == 6 and len(averaged) == 3  # the frozen bias is not averaged
    for a, h, last in zip(averaged, _by_hand(trajectory, decay), trajectory[-1]):
        torch.testing.assert_close(a, h, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, last)  # an average, not the last weights
    assert torch.equal(r.models["m"][0].bias, _toy()[0].bias)


def test_resume_continues_the_same_average(tmp_path):
    a, _ = _run(tmp_path / "a", 7, 0.5)
    _run(tmp_path / "b", 3, 0.5, every=3)
    assert (tmp_path / "b" / "checkpoints" / "ema" / "step-000003.safetensors").is_file()
    b, _ = _run(tmp_path / "b", 7, 0.5, resume=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_stop_between_checkpoints_still_writes_the_average_of_its_step(tmp_path):
    """The app's Cancel (StopRun) checkpoints a step that is no multiple of --checkpoint-every:
    the EMA's state is written with it (Hook.on_checkpoint), so the run resumes exactly."""
    a, _ = _run(tmp_path / "a", 6, 0.5)
    with pytest.raises(StopRun):
        _run(tmp_path / "b", 6, 0.5, every=4, stop_at=2)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "ema").iterdir()) == ["step-000002.safetensors"]
    b, _ = _run(tmp_path / "b", 6, 0.5, resume=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_applied_swaps_the_average_in_and_the_trained_weights_back_exactly(tmp_path):
    ema = WeightsEMA(tmp_path, tmp_path / "ema", 0.5, _trained)
    m = {"m": _toy()}
    ema(1, m)
    before = [p.detach().clone() for p in _trained(m)]
    with torch.no_grad():
        for p in _trained(m):
            p.add_(1.0)
    moved = [p.detach().clone() for p in _trained(m)]
    with ema.applied(m):
        assert all(torch.equal(p, b) for p, b in zip(_trained(m), before))
    assert all(torch.equal(p, b) for p, b in zip(_trained(m), moved))


@pytest.mark.slow
def test_a_lora_run_saves_the_average_and_its_raw_weights(photos, tmp_path, cli):
    """The run's output and each step save are the EMA of the raw adapter weights the run records
    (steps/step-N/raw/ and raw/), computed by hand; raw/ is a loadable run of its own."""
    run = tmp_path / "r"
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--steps", "3", "--lr", "1e-2",
            "--class-images", "0", "--validation-images", "0", "--ema", "--ema-decay", "0.5", "--save-raw-weights",
            "--save-every", "1", "--output-dir", run)
    assert r.code == 0, r.err
    name = "pytorch_lora_weights.safetensors"
    raws = [load_file(run / "steps" / f"step-00000{s}" / "raw" / name) for s in (1, 2)] + [load_file(run / "raw" / name)]
    for step, path in ((2, run / "steps" / "step-000002" / name), (3, run / name)):
        saved = load_file(path)
        assert saved.keys() == raws[0].keys()
        hand = dict(zip(saved, _by_hand([[t[k] for k in saved] for t in raws[:step]], 0.5)))
        for k in saved:
            torch.testing.assert_close(saved[k], hand[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(load_file(run / name)[k], raws[-1][k]) for k in raws[-1])
    meta, raw_meta = (json.loads((d / "run.json").read_text()) for d in (run, run / "raw"))
    assert meta["weights"] == "ema (decay 0.5)" and "raw" in meta["outputs"]
    assert raw_meta["weights"] == "raw" and raw_meta["status"] == "finished"
    assert not (run / "checkpoints").exists()


def test_flag_checks_are_one_line(photos, tmp_path, cli):
    base = ["lora", "--subject", photos, "--class-noun", "dog", *FAST, "--output-dir", tmp_path / "r"]
    for extra, msg in ((["--save-raw-weights"], "--save-raw-weights needs --ema"),
                       (["--ema", "--ema-decay", "1.5"], "--ema-decay must be in [0, 1]"),
                       (["--caption-dropout", "1"], "--caption-dropout must be in [0, 1)"),
                       (["--keep-tokens", "2"], "goes with --shuffle-caption")):
        r = cli(*base, *extra)
        assert r.code == 2 and msg in r.err, (extra, r.err)
    assert not (tmp_path / "r").exists()
