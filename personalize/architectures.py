"""BK-SDM student architectures, derived from a teacher U-Net config by block removal, and what
they cost per denoising step.

Implements the architectural compression of BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight,
Fast, and Cheap Version of Stable Diffusion"), for any SD-v1/SD-v2-shaped teacher:

- ``bk-base``:  one residual+attention pair per down stage, two per up stage (teacher
  ``layers_per_block`` 2 -> 1; up stages always have one more pair than down stages), mid block kept.
- ``bk-small``: bk-base without the mid block.
- ``bk-tiny``:  bk-small without the innermost down stage and the innermost up stage.
- ``full``:     every teacher block (the identity); the reference point of the KD invariants.

A student config is plain data computed from the teacher's config dict, so no weights are needed
to reason about an architecture. Parameter counts build the U-Net on the ``meta`` device (no
memory, instant). MACs are *measured*, not derived analytically: one forward pass on the meta
device under ``torch.utils.flop_counter.FlopCounterMode``, MACs = FLOPs / 2 (it counts 2 FLOPs
per multiply-accumulate of every matmul and convolution), split into

- ``conv+linear``: every convolution and linear layer (output elements x input features x kernel
  area / groups). This is what ``thop.profile`` reports and what the BK-SDM paper quotes (339G
  for the SD-v1.4 U-Net at 512 px).
- ``attention``: the batched matmuls (bmm / scaled-dot-product kernels), which in these models are
  only attention's Q K^T and A V (each ``L_q x L_k x inner_dim``); thop does not see them.

Norms, activations and softmax are not counted (as in thop's convention for these layers).
`personalize.cost` counts whole pipelines (text encoder, VAE decoder) with the same counter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .errors import UserError

# Real U-Net configs of the teachers, embedded so that counts and `prune --dry-run` need no
# download. Values are the `unet/config.json` of the hub repos (diffusers defaults left out).
SD_V1_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD_V2_BASE_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

# Registry name (personalize.backbones.BACKBONES) -> embedded U-Net config.
TEACHER_UNET_CONFIGS: dict[str, dict] = {
    "sd-v1.4": SD_V1_UNET_CONFIG,
    "sd-v2.1-base": SD_V2_BASE_UNET_CONFIG,
}

# Config fields that hold one value per down stage (diffusers reverses them for the up path);
# dropping the innermost stage drops their last entry.
PER_STAGE_FIELDS = (
    "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
    "reverse_transformer_layers_per_block", "only_cross_attention", "cross_attention_dim", "layers_per_block",
)


@dataclass(frozen=True)
class StudentArch:
    """Which blocks of the teacher a BK-SDM student keeps."""

    name: str
    layers_per_block: int | None  # residual+attention pairs per down stage; None = the teacher's
    keep_mid_block: bool
    drop_innermost_stage: bool  # remove the deepest down stage and the deepest up stage
    description: str
    card_params_v1: str = ""  # U-Net size on the BK-SDM model card (SD-v1.4 teacher)


ARCHS: dict[str, StudentArch] = {
    a.name: a
    for a in [
        StudentArch("bk-base", 1, True, False, "fewer blocks in every stage (paper: ①)", "0.58B"),
        StudentArch("bk-small", 1, False, False, "bk-base without the mid block (①②)", "0.49B"),
        StudentArch("bk-tiny", 1, False, True, "bk-small without the innermost stage (①②③)", "0.33B"),
        StudentArch("full", None, True, False, "every teacher block (identity; for checks and ablations)"),
    ]
}


def get_arch(name: str) -> StudentArch:
    if name not in ARCHS:
        raise UserError(f"unknown arch '{name}'; known: {', '.join(ARCHS)}")
    return ARCHS[name]


def clean_config(cfg: dict) -> dict:
    """A U-Net config without diffusers' bookkeeping keys (``_class_name``, ``_use_default_values``...)."""
    return {k: copy.deepcopy(v) for k, v in dict(cfg).items() if not k.startswith("_")}


def full_config(cfg: dict) -> dict:
    """`cfg` with every diffusers default filled in, so that fields like ``mid_block_type`` are explicit."""
    import inspect

    from diffusers import UNet2DConditionModel

    sig = inspect.signature(UNet2DConditionModel.__init__)
    out = {k: p.default for k, p in sig.parameters.items() if k != "self" and p.default is not inspect.Parameter.empty}
    out.update(clean_config(cfg))
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


def num_stages(cfg: dict) -> int:
    return len(cfg["down_block_types"])


def teacher_layers_per_block(cfg: dict) -> int:
    lpb = cfg.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        # BK-SDM's pair selection assumes the same depth in every stage (true for SD-v1/v2)
        raise ValueError(f"teacher layers_per_block must be one int, got {lpb}")
    return lpb


def student_config(teacher_cfg: dict, arch: StudentArch) -> dict:
    """The student U-Net config for `arch`: the teacher's config with blocks removed.

    Everything not touched by block removal (channels, heads, cross-attention width, projection
    type, sample size...) is inherited, which is what makes the recipe teacher-agnostic.
    """
    t = full_config(teacher_cfg)
    s = copy.deepcopy(t)
    L = teacher_layers_per_block(t)
    if arch.layers_per_block is not None:
        if not 1 <= arch.layers_per_block <= L:
            raise ValueError(f"{arch.name}: layers_per_block {arch.layers_per_block} not in 1..{L} (teacher has {L})")
        s["layers_per_block"] = arch.layers_per_block
    if not arch.keep_mid_block:
        s["mid_block_type"] = None
    if arch.drop_innermost_stage:
        n = num_stages(t)
        if n < 2:
            raise ValueError(f"{arch.name}: teacher has {n} stage(s); cannot drop the innermost one")
        s["down_block_types"] = t["down_block_types"][:-1]
        s["up_block_types"] = t["up_block_types"][1:]
        s["block_out_channels"] = t["block_out_channels"][:-1]
        for k in PER_STAGE_FIELDS:
            if isinstance(s.get(k), list) and len(s[k]) == n:
                s[k] = s[k][:-1]
    return s


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------
def build_unet(cfg: dict, device: str = "meta"):
    """Instantiate a U-Net from a config dict; on ``meta`` this takes no memory and no time."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(clean_config(cfg))


def count_params(cfg: dict) -> int:
    return sum(p.numel() for p in build_unet(cfg).parameters())


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward pass (of a U-Net: one denoising step, batch 1)."""

    conv_linear: int  # convolutions + linear layers: the thop / paper convention
    attention: int  # Q K^T and A V matmuls of every attention layer

    @property
    def total(self) -> int:
        return self.conv_linear + self.attention


def module_macs(module, *inputs, **kwargs) -> MacCount:
    """MACs of one forward of `module` (built on meta) on meta `inputs`, by FlopCounterMode.
    Attention = the batched matmuls (bmm / scaled-dot-product kernels): in these models only
    attention's Q K^T and A V are batched; linear layers are mm/addmm."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*inputs, **kwargs)
    by_op = fc.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in by_op.items() if "bmm" in str(k) or "scaled_dot_product" in str(k)) // 2
    return MacCount(conv_linear=fc.get_total_flops() // 2 - attention, attention=attention)


def count_macs(cfg: dict, resolution: int = 512, text_len: int = 77, vae_scale: int = 8) -> MacCount:
    """U-Net MACs per denoising step for one `resolution`² image (batch 1, no classifier-free
    guidance doubling), measured on the meta device (shapes only; see the module docstring)."""
    import torch

    unet = build_unet(cfg)
    c = unet.config
    side = resolution // vae_scale
    cross = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    with torch.device("meta"):
        latent, t, ctx = torch.zeros(1, c.in_channels, side, side), torch.zeros(1), torch.zeros(1, text_len, cross)
    return module_macs(unet, latent, t, ctx)


@dataclass(frozen=True)
class ArchReport:
    name: str
    params: int
    macs: MacCount

    def line(self, teacher: "ArchReport | None" = None) -> str:
        rel = ""
        if teacher is not None:
            rel = f"  ({self.params / teacher.params:5.1%} params, {self.macs.total / teacher.macs.total:5.1%} MACs)"
        return (f"{self.name:<10} U-Net {self.params / 1e6:8.1f}M params | MACs/step: "
                f"{self.macs.conv_linear / 1e9:6.1f}G conv+linear + {self.macs.attention / 1e9:5.1f}G attention "
                f"= {self.macs.total / 1e9:6.1f}G{rel}")


def report(cfg: dict, name: str, resolution: int = 512) -> ArchReport:
    return ArchReport(name, count_params(cfg), count_macs(cfg, resolution))
