"""The shared diffusion step: min-SNR weights and offset noise checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from personalize.diffusion import diffusion_loss, min_snr_weights, noise_latents


def _scheduler(prediction="epsilon"):
    from diffusers import DDPMScheduler

    # Stable Diffusion's training schedule
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction)


def _alpha_bar_by_hand(t):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)[t]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_for_three_timesteps(prediction):
    t = np.array([10, 400, 999])
    ab = _alpha_bar_by_hand(t)
    snr = ab / (1 - ab)
    gamma = 5.0
    want = np.minimum(snr, gamma) / (snr if prediction == "epsilon" else snr + 1)
    got = min_snr_weights(_scheduler(prediction), torch.tensor(t), gamma).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    if prediction == "epsilon":
        assert got[2] == pytest.approx(1.0)  # low SNR (t = 999): below gamma, weight 1
        assert got[0] < 0.05  # high SNR (t = 10): clipped to gamma / SNR


def test_loss_without_gamma_is_plain_mse_and_with_gamma_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 400, 999])
    s = _scheduler()
    assert torch.equal(diffusion_loss(pred, target, t, s), F.mse_loss(pred, target))
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    ab = torch.tensor(_alpha_bar_by_hand(t.numpy()), dtype=torch.float32)
    snr = ab / (1 - ab)
    want = (per * torch.clamp(snr, max=5.0) / snr).mean()
    assert diffusion_loss(pred, target, t, s, snr_gamma=5.0).item() == pytest.approx(want.item(), rel=1e-4)


def test_noise_offset_adds_a_per_channel_constant_and_zero_changes_nothing():
    s = _scheduler()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = noise_latents(s, latents, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ref_noise = torch.randn(latents.shape, generator=g)
    assert torch.equal(plain.noise, ref_noise)  # offset 0: the draws of before, unchanged
    off = noise_latents(s, latents, torch.Generator().manual_seed(7), noise_offset=0.1)
    assert torch.equal(off.timesteps, plain.timesteps)
    diff = off.noise - plain.noise
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)  # constant over H, W
    assert diff.abs().max() > 0 and torch.equal(off.target, off.noise)  # epsilon target is the noise


def test_the_flags_train_and_are_recorded(photos, tmp_path, cli):
    import json

    from conftest import FAST

    out = tmp_path / "run"
    r = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--snr-gamma", "5", "--noise-offset", "0.1",
            "--output-dir", out, "--validation-images", "0")
    assert r.code == 0, r.err
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert (cfg["snr_gamma"], cfg["noise_offset"]) == (5.0, 0.1)
    bad = cli("lora", "--subject", photos, "--class-noun", "dog", *FAST, "--snr-gamma", "0",
              "--output-dir", tmp_path / "x")
    assert bad.code == 2 and "--snr-gamma must be positive" in bad.err


# ---------------------------------------------------------------------------- masked loss (kohya)
def test_masked_loss_by_hand():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, sched = torch.tensor([10, 500]), _scheduler()
    se = (pred - target) ** 2
    zero = torch.zeros(2, 1, 8, 8)
    assert diffusion_loss(pred, target, t, sched, mask=zero).item() == 0.0
    half = torch.zeros(2, 1, 8, 8)
    half[..., :4] = 1.0  # the left half of every latent
    # kohya's apply_masked_loss: error x mask, then the plain mean (no renormalisation by area)
    assert diffusion_loss(pred, target, t, sched, mask=half).item() == pytest.approx(se[..., :4].sum().item() / se.numel())
    grey = torch.full((2, 1, 8, 8), 0.5)  # a 127-grey mask: half weight everywhere
    assert diffusion_loss(pred, target, t, sched, mask=grey).item() == pytest.approx(0.5 * se.mean().item())
    ones = torch.ones(2, 1, 8, 8)
    assert diffusion_loss(pred, target, t, sched, mask=ones).item() == pytest.approx(F.mse_loss(pred, target).item())
    # with min-SNR: each sample's masked MSE, then its weight
    w = min_snr_weights(sched, t, 5.0)
    per = (se * half).mean(dim=(1, 2, 3))
    assert diffusion_loss(pred, target, t, sched, 5.0, mask=half).item() == pytest.approx((per * w).mean().item())
