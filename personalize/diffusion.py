"""The diffusion training step shared by DreamBooth and knowledge distillation: draw noise and
timesteps, noise the latents (DDPM forward process, Ho et al. 2020) and name the regression
target for the base's parameterisation (epsilon, or v for v-prediction bases, Salimans & Ho
2022). The one place that knows about prediction types, so every trainer agrees on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class NoisedBatch:
    noisy: torch.Tensor  # x_t
    timesteps: torch.Tensor  # t, int64, one per sample
    noise: torch.Tensor  # eps
    target: torch.Tensor  # what the U-Net regresses onto


def check_prediction_type(scheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise UserError(f"the base's noise scheduler predicts {kind!r}; training supports "
                        f"{' and '.join(PREDICTION_TYPES)}")
    return kind


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """eps for epsilon-prediction, v = alpha_t * eps - sigma_t * x_0 for v-prediction."""
    kind = check_prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def noise_latents(scheduler, latents: torch.Tensor, generator: torch.Generator,
                  noise_offset: float = 0.0) -> NoisedBatch:
    """One forward-process sample per latent. Every draw comes from `generator` (noise first, then
    timesteps, then the offset when there is one), which `fit` seeds per step: that is what makes
    resume exact. `noise_offset` (Guttenberg 2023, "Diffusion with Offset Noise") adds a per-channel
    constant `offset * N(0, 1)` to the noise, so the model learns to shift an image's mean
    brightness; 0 leaves the draws exactly as without it."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device).long()
    if noise_offset:
        shift = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device,
                            dtype=latents.dtype)
        noise = noise + noise_offset * shift
    noisy = scheduler.add_noise(latents, noise, t)
    return NoisedBatch(noisy, t, noise, diffusion_target(scheduler, latents, noise, t))


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of the DDPM forward process at t."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy"): min(SNR, gamma) / SNR for epsilon-prediction, min(SNR, gamma) / (SNR + 1)
    for v-prediction (the same weighting expressed on the v target)."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if check_prediction_type(scheduler) == "v_prediction":
        return clipped / (s + 1)
    return clipped / s


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   snr_gamma: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between prediction and target; with `snr_gamma`, each sample's MSE is min-SNR weighted
    before the batch mean. Without either option, exactly `F.mse_loss` (bit for bit as before).

    `mask` (B, 1, h, w) in [0, 1] at the latent resolution weights each latent position's squared
    error before the mean, as kohya's masked loss (sd-scripts `apply_masked_loss`: white = learn,
    black = ignore, grey = partial weight; not renormalised by the mask's area, so a mask covering
    half the photo halves the loss of uniform errors)."""
    import torch.nn.functional as F

    if snr_gamma is None and mask is None:
        return F.mse_loss(pred.float(), target.float())
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        err = err * mask.to(err.dtype)
    per_sample = err.mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)
    return per_sample.mean()
