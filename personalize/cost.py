"""Whole-pipeline cost of a Stable Diffusion backbone: parameters of the text encoder, U-Net, VAE
decoder and their sum (BK-SDM's "whole pipeline", `count_macs_params.py`: the decoder only, not
the encoder, which generation never runs), and MACs of one text encoding, one U-Net step and one
VAE decode at a given resolution.

Everything is *counted*, on the ``meta`` device (shapes only: no weights, no memory, a second or
two for an SD-size U-Net): parameters by building each module from its config, MACs by
`architectures.module_macs` (``torch.utils.flop_counter.FlopCounterMode`` over one forward pass,
MACs = FLOPs / 2, attention's Q K^T and A V included; the counter `distill prune --dry-run` uses).
That is the conv+linear count thop reports and the BK-SDM paper quotes, plus attention.

A pipeline directory is costed from its own ``*/config.json``; a registry backbone without local
weights from the real configs embedded here (SD-v1: CLIP ViT-L/14 text encoder; SD-v2: OpenCLIP
ViT-H/14; both with SD's VAE) and the U-Net configs of `architectures`, so `personalize backbones
--cost` needs no download.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .architectures import ARCHS, TEACHER_UNET_CONFIGS, module_macs, student_config
from .backbones import BACKBONES
from .errors import UserError, one_line

# `text_encoder/config.json` of CompVis/stable-diffusion-v1-4 (openai/clip-vit-large-patch14's text tower)
SD_V1_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "projection_dim": 768}
# `text_encoder/config.json` of stabilityai/stable-diffusion-2-1-base (OpenCLIP ViT-H/14, penultimate layer kept)
SD_V2_TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                     "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
                     "projection_dim": 512}
# `vae/config.json` shared by SD-v1.x / v2.x and every BK-SDM model
SD_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "act_fn": "silu",
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "sample_size": 512}
FAMILY_TEXT_CONFIGS = {"sd-v1": SD_V1_TEXT_CONFIG, "sd-v2": SD_V2_TEXT_CONFIG}

# registry name -> (teacher registry name, `architectures.ARCHS` student arch)
REGISTRY_ARCHS = {
    **{f"bk-sdm-{s}{x}": ("sd-v1.4", f"bk-{s}") for s in ("base", "small", "tiny") for x in ("", "-2m")},
    **{f"bk-sdm-v2-{s}": ("sd-v2.1-base", f"bk-{s}") for s in ("base", "small", "tiny")},
    # OFA-Sys/small-stable-diffusion-v0: its model card says it is SD-v1.4 with `layers_per_block=1`
    # (initialised from the first layer of each block), mid block kept; its published
    # unet/diffusion_pytorch_model.bin is 2.32 GB of fp32, ~0.58B parameters: BK-SDM-Base's U-Net shape
    "small-sd-v0": ("sd-v1.4", "bk-base"),
    "sd-v1.4": ("sd-v1.4", "full"),
    "sd-v2.1-base": ("sd-v2.1-base", "full"),
}


@dataclass(frozen=True)
class PipelineCost:
    resolution: int
    text_encoder_params: int
    unet_params: int
    vae_decoder_params: int
    text_encoder_macs: int  # one prompt (77 tokens)
    unet_macs: int  # one denoising step, one image (batch 1, no classifier-free guidance doubling)
    unet_attention_macs: int  # the part of unet_macs in attention matmuls (thop's count leaves it out)
    vae_decoder_macs: int  # one decode to `resolution` px

    @property
    def pipeline_params(self) -> int:
        return self.text_encoder_params + self.unet_params + self.vae_decoder_params

    def to_json(self) -> dict:
        return {**asdict(self), "pipeline_params": self.pipeline_params}


def _build(fn):
    import torch

    with torch.device("meta"):
        return fn()


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def cost_from_configs(unet_cfg: dict, text_cfg: dict, vae_cfg: dict, resolution: int = 512) -> PipelineCost:
    """Count parameters and MACs of the pipeline these three configs describe."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _build(lambda: UNet2DConditionModel.from_config({k: v for k, v in unet_cfg.items() if not k.startswith("_")}))
    te_cfg = CLIPTextConfig(**{k: v for k, v in text_cfg.items() if not k.startswith("_") and k != "architectures"})
    text = _build(lambda: CLIPTextModel(te_cfg)).eval()
    vae = _build(lambda: AutoencoderKL.from_config({k: v for k, v in vae_cfg.items() if not k.startswith("_")}))
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % scale:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {scale}")
    side = resolution // scale
    c = unet.config
    cross = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    seq = te_cfg.max_position_embeddings
    with torch.device("meta"):
        latent = torch.zeros(1, c.in_channels, side, side)
        ids = torch.zeros(1, seq, dtype=torch.long)
        ctx = torch.zeros(1, seq, cross)
        z = torch.zeros(1, vae.config.latent_channels, side, side)
        t = torch.zeros(1)
    unet_macs = module_macs(unet, latent, t, ctx)
    return PipelineCost(
        resolution=resolution,
        text_encoder_params=_count(text), unet_params=_count(unet), vae_decoder_params=_count(vae.decoder),
        text_encoder_macs=module_macs(text, ids).total, unet_macs=unet_macs.total,
        unet_attention_macs=unet_macs.attention, vae_decoder_macs=module_macs(vae.decoder, z).total,
    )


def _read(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: unreadable ({type(e).__name__}); not a complete pipeline directory") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a JSON {type(cfg).__name__}, not a config object; not a complete pipeline directory")
    return cfg


def pipeline_cost(pipeline_dir: Path, resolution: int = 512) -> PipelineCost:
    """Cost of a local diffusers pipeline directory, from its component configs; configs that do
    not build a countable SD pipeline are one UserError naming the directory."""
    d = Path(pipeline_dir)
    cfgs = [_read(d / part / "config.json") for part in ("unet", "text_encoder", "vae")]
    try:  # transformers' configs validate their fields with huggingface_hub's strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: field errors are TypeErrors
        StrictDataclassError = TypeError
    try:
        return cost_from_configs(*cfgs, resolution)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, StrictDataclassError) as e:
        raise UserError(f"{d}: its unet/text_encoder/vae configs do not build a countable Stable Diffusion "
                        f"pipeline ({one_line(e)})") from None


@functools.lru_cache(maxsize=None)  # -2m variants share their shapes; counting takes a second each
def registry_cost(name: str, resolution: int = 512) -> PipelineCost | None:
    """Cost of a registry backbone from the real configs (no download); None when its U-Net
    architecture is not one `architectures` can derive (`tiny` before it is built)."""
    if name not in REGISTRY_ARCHS:
        return None
    teacher, arch = REGISTRY_ARCHS[name]
    unet_cfg = student_config(TEACHER_UNET_CONFIGS[teacher], ARCHS[arch])
    return cost_from_configs(unet_cfg, FAMILY_TEXT_CONFIGS[BACKBONES[name].family], SD_VAE_CONFIG, resolution)


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def fmt_macs(n: int) -> str:
    return f"{n / 1e9:.1f}G" if n >= 1e8 else f"{n / 1e6:.1f}M"
