"""`--prior base-prediction`: the prior loss without class images. The adapted model's prediction
for the class prompt on the step's own noisy latents is compared with the frozen base's prediction
for the same input (OneTrainer's "prior prediction", ai-toolkit's "differential output
preservation"). The frozen base is the same modules with their adapters switched off (peft's
tuner layers), or, for `full`, a frozen copy of the U-Net and text encoder taken before training
(asked for with --allow-frozen-copy: it costs their memory again)."""

from __future__ import annotations

import contextlib
import copy

import torch

from .config import TrainConfig
from .errors import UserError

FROZEN = ("unet", "text_encoder")


def parameter_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for m in models if m is not None for p in m.parameters())


@contextlib.contextmanager
def adapters_disabled(models: dict):
    """Every peft tuner layer of `models` off (its base layer's output only), back on after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models.values() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise RuntimeError("--prior base-prediction: the trained models hold no adapter to switch off")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield models
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def base_models(cfg: TrainConfig, comps: dict, autocast=contextlib.nullcontext):
    """None for --prior class-images; else `base(ms)`, a context manager that yields the models of
    the frozen base's prediction. Called before the adapter is attached (and before a resume loads a
    checkpoint): a full run's frozen copy is the base's own weights. `autocast`: the accelerator's
    (its prepared models run their forward under it; the copy, never prepared, runs under this)."""
    if cfg.prior != "base-prediction":
        return None
    if cfg.method != "full":
        return adapters_disabled
    models = {k: comps[k] for k in FROZEN if k in comps and (k == "unet" or cfg.train_text_encoder)}
    if not cfg.allow_frozen_copy:
        gib = parameter_bytes(*models.values()) / 2**30
        raise UserError(f"full --prior base-prediction keeps a frozen copy of the U-Net and text encoder "
                        f"({gib:.2f} GiB of parameters more); pass --allow-frozen-copy, or use --prior class-images")
    # its attentions run SDPA's own forward, as the trained models' do (attention_backward changes only
    # their backward), so the two predictions are equal at step 0
    frozen = {k: copy.deepcopy(m).requires_grad_(False).eval() for k, m in models.items()}

    @contextlib.contextmanager
    def base(ms: dict):
        with autocast():
            yield ms | frozen

    return base


def prior_prediction_loss(adapted: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(adapted.float(), base.float())
