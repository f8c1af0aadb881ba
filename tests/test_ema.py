"""--ema: the average of exactly the trained weights (personalize.ema, a fit hook shared with
distill), held against an EMA computed by hand over the recorded trajectory; exact resume."""

from __future__ import annotations

import pytest
import torch

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
