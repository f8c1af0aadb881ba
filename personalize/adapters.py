"""LoRA adapters: attach (peft), and save/load in the diffusers format that plain
`pipe.load_lora_weights(run_dir)` reads, with each adapter's rank/alpha in the safetensors
metadata (so alpha != rank, as in the BK-SDM recipe's 16/27, round-trips)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers looks for by default


def lora_config(rank: int, alpha: float, targets: list[str]):
    from peft import LoraConfig

    # gaussian init of A (B = 0): the adapter starts as the identity, as in the diffusers scripts
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets),
                      lora_dropout=0.0)


def add_lora(unet, text_encoder, cfg) -> None:
    """Attach LoRA to the U-Net (and to the text encoder when it is trained); freeze everything else."""
    import torch

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    # peft draws A from the global RNG: seed it (in a fork, leaving the caller's RNG alone) so the
    # same --seed gives the same adapter init, which exact resume and reproducible runs rely on
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet.add_adapter(lora_config(cfg.rank, cfg.lora_alpha, cfg.lora_unet_targets))
        if cfg.train_text_encoder:
            text_encoder.add_adapter(lora_config(cfg.text_encoder_rank, cfg.text_encoder_alpha,
                                                 cfg.lora_text_encoder_targets))


def has_lora(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def lora_state_dicts(unet, text_encoder) -> tuple[dict, dict | None]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, save_embedding_layers=False))
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder, save_embedding_layers=False)) if has_lora(text_encoder) else None
    return unet_sd, te_sd


def save_lora(run_dir: Path, unet, text_encoder) -> Path:
    """Write run_dir/pytorch_lora_weights.safetensors atomically (temp dir, then rename)."""
    from diffusers import StableDiffusionPipeline

    run_dir = Path(run_dir)
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
    meta = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if te_sd is not None:
        meta["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=run_dir))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, safe_serialization=True, **meta
        )
        os.replace(tmp / LORA_WEIGHTS, run_dir / LORA_WEIGHTS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_dir / LORA_WEIGHTS
