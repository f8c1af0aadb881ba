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


def noise_latents(scheduler, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
    """One forward-process sample per latent. Every draw comes from `generator` (noise first, then
    timesteps), which `fit` seeds per step: that is what makes resume exact."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, t)
    return NoisedBatch(noisy, t, noise, diffusion_target(scheduler, latents, noise, t))
