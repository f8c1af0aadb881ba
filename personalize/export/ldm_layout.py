"""The original Stable Diffusion (CompVis `ldm`) names of a diffusers U-Net, VAE and CLIP text
encoder, computed from the model's actual structure rather than assumed.

The ldm `UNetModel` (Rombach et al. 2022, `ldm/modules/diffusionmodules/openaimodel.py`) numbers
its blocks in one flat sequence: `input_blocks.0` is the input conv; then per down stage one
`input_blocks.n` per residual block (`.0`, with its transformer as `.1` when the stage has
attention), then the downsampler as its own `input_blocks.n.0.op` (every stage but the last);
`middle_block.0/1/2` (resnet, transformer, resnet); per up stage one `output_blocks.m` per residual
block, the upsampler riding on the stage's last one (`.1.conv`, or `.2.conv` after a transformer).
SD-v1 has 2 residual blocks per down stage (12 input blocks), 3 per up stage and a mid block; the
BK-SDM students (Kim et al. 2023) have 1 and 2 (bk-base: 8 input blocks), no mid block (bk-small)
and one stage fewer (bk-tiny), so every index after the first stage moves. Here the sequence is
walked on the model itself, so any depth per stage, with or without a mid block, maps exactly.

The same names serve the single-file checkpoint (`model.diffusion_model.<ldm>.weight`, what
ComfyUI and AUTOMATIC1111 load) and kohya LoRA keys in ldm form (`lora_unet_<ldm with _>`, which
both clients match against the modules of the ldm model they build). No model weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD-v1: CLIP ViT-L/14 in transformers' own names
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD-v2: OpenCLIP ViT-H/14 in open_clip's names

# diffusers ResnetBlock2D -> ldm ResBlock (its Sequential in/emb/out layers)
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_BASIC = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class UNetLayout:
    """Where every diffusers U-Net module sits in the ldm `UNetModel`, and the shape facts an ldm
    config (A1111's yaml) needs."""

    modules: dict[str, str]  # diffusers module path -> ldm module path (longest prefix wins)
    down_res: tuple[int, ...]  # residual blocks per down stage
    up_res: tuple[int, ...]  # residual blocks per up stage (outermost last, as in diffusers)
    down_depth: tuple[int, ...]  # transformer blocks per down stage's attention (0: no attention)
    up_depth: tuple[int, ...]
    mid_depth: int | None  # transformer depth of the mid block; None: no mid block (bk-small/tiny)
    channels: tuple[int, ...]  # block_out_channels
    heads: tuple[int, ...]  # attention heads per down stage (0 where none)
    head_dims: tuple[int, ...]
    context_dim: int
    linear_proj: bool  # transformer proj_in/out are Linear (SD-v2) rather than 1x1 conv (SD-v1)
    norm_groups: int
    in_channels: int
    out_channels: int
    sample_size: int
    ldm_keys: dict[str, str] = field(default_factory=dict)  # every diffusers parameter -> ldm name

    @property
    def num_res_blocks(self) -> int | None:
        """ldm's one `num_res_blocks` (down count; up = down + 1) when every stage agrees, else None."""
        d = set(self.down_res)
        if len(d) == 1 and all(u == self.down_res[0] + 1 for u in self.up_res):
            return self.down_res[0]
        return None

    @property
    def is_sd_layout(self) -> bool:
        """The SD-v1/v2 block layout (2 down / 3 up blocks per stage, 4 stages, a mid block), the one
        every client builds without being told."""
        return (self.num_res_blocks == 2 and len(self.down_res) == 4 and self.mid_depth is not None
                and self.down_depth[:3] != (0, 0, 0) and self.down_depth[3] == 0)

    def ldm(self, name: str) -> str:
        """The ldm name of a diffusers module or parameter path (KeyError if it has none)."""
        return translate(self.modules, name)


def translate(modules: dict[str, str], name: str) -> str:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if head in modules:
            return ".".join([modules[head], *parts[k:]])
    raise KeyError(name)


def _resnet(modules: dict, diffusers: str, ldm: str) -> None:
    modules[diffusers] = ldm
    for d, l in UNET_RESNET.items():
        modules[f"{diffusers}.{d}"] = f"{ldm}.{l}"


def _depth(attn) -> int:
    return len(attn.transformer_blocks)


def _meta_unet(unet_or_config):
    if hasattr(unet_or_config, "down_blocks"):
        return unet_or_config
    import torch
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in dict(unet_or_config).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(cfg)


def unet_layout(unet_or_config) -> UNetLayout:
    """The ldm layout of a diffusers `UNet2DConditionModel` (a model, or its config: then built on
    the meta device). A U-Net with parts ldm has no place for is a UserError."""
    unet = _meta_unet(unet_or_config)
    m: dict[str, str] = dict(UNET_BASIC)
    n = 1
    down_res, down_depth, heads, head_dims = [], [], [], []
    for s, block in enumerate(unet.down_blocks):
        attns = list(getattr(block, "attentions", None) or [])
        down_res.append(len(block.resnets))
        down_depth.append(_depth(attns[0]) if attns else 0)
        a = attns[0].transformer_blocks[0].attn1 if attns else None
        heads.append(a.heads if a is not None else 0)
        head_dims.append(a.inner_dim // a.heads if a is not None else 0)
        for i in range(len(block.resnets)):
            _resnet(m, f"down_blocks.{s}.resnets.{i}", f"input_blocks.{n}.0")
            if attns:
                m[f"down_blocks.{s}.attentions.{i}"] = f"input_blocks.{n}.1"
            n += 1
        if getattr(block, "downsamplers", None):
            m[f"down_blocks.{s}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    mid = unet.mid_block
    mid_depth = None
    if mid is not None:
        if type(mid).__name__ != "UNetMidBlock2DCrossAttn" or len(mid.resnets) != 2 or len(mid.attentions) != 1:
            raise UserError(f"U-Net mid block {type(mid).__name__}: the ldm layout has no place for it")
        _resnet(m, "mid_block.resnets.0", "middle_block.0")
        m["mid_block.attentions.0"] = "middle_block.1"
        _resnet(m, "mid_block.resnets.1", "middle_block.2")
        mid_depth = _depth(mid.attentions[0])
    n = 0
    up_res, up_depth = [], []
    for u, block in enumerate(unet.up_blocks):
        attns = list(getattr(block, "attentions", None) or [])
        up_res.append(len(block.resnets))
        up_depth.append(_depth(attns[0]) if attns else 0)
        for i in range(len(block.resnets)):
            _resnet(m, f"up_blocks.{u}.resnets.{i}", f"output_blocks.{n}.0")
            if attns:
                m[f"up_blocks.{u}.attentions.{i}"] = f"output_blocks.{n}.1"
            if i == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
                m[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if attns else 1}.conv"
            n += 1
    keys = {}
    for name in unet.state_dict():
        try:
            keys[name] = translate(m, name)
        except KeyError:
            raise UserError(f"U-Net parameter {name}: the ldm layout has no place for it "
                            f"(class/addition embeddings are not Stable Diffusion v1/v2)") from None
    c = unet.config
    attn = next((b.attentions[0] for b in unet.down_blocks if getattr(b, "attentions", None)), None)
    cross = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    return UNetLayout(m, tuple(down_res), tuple(up_res), tuple(down_depth), tuple(up_depth), mid_depth,
                      tuple(c.block_out_channels), tuple(heads), tuple(head_dims), int(cross),
                      bool(attn is not None and type(attn.proj_in).__name__ == "Linear"),
                      int(c.norm_num_groups), int(c.in_channels), int(c.out_channels), int(c.sample_size), keys)


# --------------------------------------------------------------------------------------------
# VAE (ldm `AutoencoderKL`: encoder.down.i.block.j, mid.block_1/attn_1/block_2, decoder.up
# numbered from the innermost stage) and text encoders
# --------------------------------------------------------------------------------------------
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_modules(vae) -> dict[str, str]:
    """diffusers AutoencoderKL module path -> ldm name, walked on the model."""
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        m |= {f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
              f"{side}.conv_norm_out": f"{side}.norm_out"}
        part = getattr(vae, side)
        blocks = part.down_blocks if side == "encoder" else part.up_blocks
        for i, block in enumerate(blocks):
            dblock, ldm_i = ("down_blocks", i) if side == "encoder" else ("up_blocks", len(blocks) - 1 - i)
            ldm = f"{side}.{'down' if side == 'encoder' else 'up'}.{ldm_i}"
            for j in range(len(block.resnets)):
                m[f"{side}.{dblock}.{i}.resnets.{j}"] = f"{ldm}.block.{j}"
                m[f"{side}.{dblock}.{i}.resnets.{j}.conv_shortcut"] = f"{ldm}.block.{j}.nin_shortcut"
            for s in ("downsamplers", "upsamplers"):
                if getattr(block, s, None):
                    m[f"{side}.{dblock}.{i}.{s}.0.conv"] = f"{ldm}.{s[:-2]}.conv"
        mid = part.mid_block
        for j in range(len(mid.resnets)):
            m[f"{side}.mid_block.resnets.{j}"] = f"{side}.mid.block_{j + 1}"
            m[f"{side}.mid_block.resnets.{j}.conv_shortcut"] = f"{side}.mid.block_{j + 1}.nin_shortcut"
        for j, _ in enumerate(mid.attentions or []):
            for d, l in VAE_ATTN.items():
                m[f"{side}.mid_block.attentions.{j}.{d}"] = f"{side}.mid.attn_{j + 1}.{l}"
    return m


def vae_to_ldm(vae) -> dict:
    """The VAE's tensors under `first_stage_model.` ldm names; attention projections as the 1x1
    convs ldm's AttnBlock uses."""
    m = vae_modules(vae)
    out = {}
    for name, t in vae.state_dict().items():
        try:
            ldm = translate(m, name)
        except KeyError:
            raise UserError(f"VAE parameter {name}: the ldm layout has no place for it") from None
        if ".attn_" in ldm and ldm.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and t.ndim == 2:
            t = t[:, :, None, None]
        out[VAE_PREFIX + ldm] = t
    return out


def is_open_clip(text_encoder) -> bool:
    """SD-v2's text encoder is OpenCLIP ViT-H/14 (width 1024); SD-v1's CLIP ViT-L/14 (768)."""
    return int(text_encoder.config.hidden_size) == 1024


def clip_state_dict(text_encoder) -> dict:
    """The text encoder's tensors in transformers 4.x names (`text_model.` first), whatever
    transformers version holds it."""
    sd = text_encoder.state_dict()
    return {(k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def text_encoder_to_ldm(text_encoder) -> dict:
    """SD-v1: `cond_stage_model.transformer.text_model.*` (transformers names, what A1111's
    FrozenCLIPEmbedder and ComfyUI's SD1 CLIP load). SD-v2: open_clip's names under
    `cond_stage_model.model.` (q/k/v fused into `in_proj`), what FrozenOpenCLIPEmbedder loads."""
    import torch

    sd = clip_state_dict(text_encoder)
    if not is_open_clip(text_encoder):
        return {CLIP_PREFIX + k: v for k, v in sd.items()}
    sd = {k[len("text_model."):]: v for k, v in sd.items() if k.startswith("text_model.")}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    for i in range(int(text_encoder.config.num_hidden_layers)):
        p = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"])
            for d, l in OPENCLIP_LAYER.items():
                out[f"transformer.resblocks.{i}.{l}.{kind}"] = sd.pop(f"{p}{d}.{kind}")
    if sd:
        raise UserError(f"text encoder parameter {next(iter(sd))}: no place for it in open_clip's layout")
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def kohya_name(comp: str, module: str, unet_names=None) -> str:
    """kohya's sd-scripts name of an adapted module: `lora_unet_` + its (diffusers or, with
    `unet_names`, ldm) path, `lora_te_` + its CLIP path, dots as underscores."""
    if comp == "unet":
        return "lora_unet_" + (unet_names(module) if unet_names else module).replace(".", "_")
    # kohya names the text encoder by the original CLIP module path, which has text_model.
    if not module.startswith("text_model."):
        module = "text_model." + module
    return "lora_te_" + module.replace(".", "_")


def kohya_unet_namer(pipeline_dir):
    """module path -> ldm module path for the U-Net of a pipeline dir (its config only, built on
    the meta device): kohya keys in ldm form, `lora_unet_input_blocks_4_1_...`. A module without an
    ldm place is a UserError, never a key left out."""
    import json
    from pathlib import Path

    f = Path(pipeline_dir) / "unet" / "config.json"
    try:
        layout = unet_layout(json.loads(f.read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: cannot read the U-Net config ({type(e).__name__})") from None

    def name(module: str) -> str:
        try:
            return layout.ldm(module)
        except KeyError:
            raise UserError(f"U-Net module {module}: no place in the ldm layout of {pipeline_dir}") from None

    return name
