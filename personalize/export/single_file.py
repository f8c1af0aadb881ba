"""A model as one original-SD ("ldm", single-file) checkpoint: what ComfyUI's checkpoint loader and
AUTOMATIC1111 read, and diffusers' `from_single_file`.

Works on a full run, a LoRA run (fused into its base first, as `export --format merged`), a
`distill` output or any base. The U-Net's ldm names come from its real block layout
(`ldm_layout.unet_layout`), so BK-SDM students (fewer blocks, no mid block, one stage fewer) are
written as they are, not in SD-v1's numbering. Beside a non-SD-v1 layout that AUTOMATIC1111 can
build, the `.yaml` it needs (A1111 reads `<name>.yaml` next to a checkpoint); beside every file a
`<name>.README.md` saying which clients load it. All written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..backbones import is_pipeline_dir
from ..embeddings import a1111_embedding, of_source_runs
from ..errors import UserError
from ..fileio import atomic_file, write_text
from ..outputs import check_output, output_lock
from ..runs import RUN_JSON
from ..sources import Source, load_fused, resolve_base, resolve_source
from .ldm_layout import UNET_PREFIX, UNetLayout, is_open_clip, text_encoder_to_ldm, unet_layout, vae_to_ldm

# ldm builds every GroupNorm with 32 groups (ldm.modules.diffusionmodules.util.normalization and
# the VAE's Normalize), and so do ComfyUI and A1111, which reuse that code
LDM_GROUPS = 32


@dataclass(frozen=True)
class SingleFile:
    path: Path
    yaml: Path | None
    readme: Path
    clients: dict[str, str]  # client -> "yes ..." / "no: why"
    tensors: int


def _source(source, base: str | None, lora_scale: float, allow_pickle: bool):
    """(fp32 components with any adapter fused in, pipeline dir their configs come from, label,
    inputs to protect)."""
    p = Path(str(source)).expanduser()
    if (p / RUN_JSON).is_file():
        src = resolve_source(p, base=base, lora_scale=lora_scale)
        if src.full_run is not None:
            label, inputs = f"{src.full_run['subject']['name']} (full run)", [p]
        else:  # every adapter method fuses the same way
            run = src.adapters[0].run
            label, inputs = f"{run['subject']['name']} ({run['method']} fused into {src.base_name})", [p, src.pipeline_dir]
    elif p.exists() and not is_pipeline_dir(p):
        raise UserError(f"{source}: neither a run directory (run.json) nor a diffusers pipeline directory")
    else:
        b = resolve_base(str(source))
        src, label, inputs = Source(b.path, str(source)), str(source), [b.path]
    return load_fused(src, allow_pickle), src.pipeline_dir, label, inputs, src


def checkpoint_tensors(comps: dict, half: bool = False) -> tuple[dict, UNetLayout]:
    """The ldm state dict of a pipeline's U-Net, VAE and text encoder (fp16 with `half`)."""
    import torch

    layout = unet_layout(comps["unet"])
    sd = {UNET_PREFIX + layout.ldm_keys[k]: v for k, v in comps["unet"].state_dict().items()}
    sd |= vae_to_ldm(comps["vae"])
    sd |= text_encoder_to_ldm(comps["text_encoder"])
    dtype = torch.float16 if half else torch.float32
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, layout


def clients(layout: UNetLayout, vae_groups: int = LDM_GROUPS, v2: bool = False) -> dict[str, str]:
    """Which client loads the file, and why not where one does not (from the clients' loaders:
    ComfyUI detects SD1.x/2.x by model_channels 320 and the context width; A1111 builds ldm's
    UNetModel, which has one num_res_blocks and always a middle block)."""
    groups = {layout.norm_groups, int(vae_groups)}
    out = {"diffusers": "yes: StableDiffusionPipeline.from_single_file(FILE, config=<a pipeline dir of this architecture>)"}
    ldm_ok = None if groups == {LDM_GROUPS} else f"no: GroupNorm with {min(groups)} groups (ldm clients build 32)"
    family = (layout.context_dim, layout.linear_proj) in ((768, False), (1024, True))
    if ldm_ok:
        out["ComfyUI"] = ldm_ok
    elif layout.channels[0] != 320 or not family:
        out["ComfyUI"] = (f"no: not detected as SD1.x/SD2.x (model_channels {layout.channels[0]}, "
                          f"context {layout.context_dim}; ComfyUI knows 320 with 768 or 1024)")
    else:
        out["ComfyUI"] = f"yes: Load Checkpoint (detected as {'SD2.x' if v2 else 'SD1.x'} from the keys)"
    if ldm_ok:
        out["AUTOMATIC1111"] = ldm_ok
    elif layout.mid_depth is None:
        out["AUTOMATIC1111"] = "no: its ldm UNetModel cannot be built without a mid block (BK-SDM small/tiny)"
    elif layout.num_res_blocks is None or any(c % layout.channels[0] for c in layout.channels):
        out["AUTOMATIC1111"] = "no: blocks per stage differ between stages (ldm has one num_res_blocks)"
    elif layout.is_sd_layout and not v2:
        out["AUTOMATIC1111"] = "yes: put it in models/Stable-diffusion/"
    else:
        out["AUTOMATIC1111"] = "yes: put it in models/Stable-diffusion/ together with the .yaml beside it"
    return out


def a1111_yaml(layout: UNetLayout, comps: dict) -> str:
    """The ldm `LatentDiffusion` config (v1-inference.yaml / v2-inference.yaml shape) that builds
    this U-Net, VAE and text encoder: what A1111 reads from `<checkpoint>.yaml`."""
    vae, sched = comps["vae"].config, comps["noise_scheduler"].config
    v2 = is_open_clip(comps["text_encoder"])
    c0 = layout.channels[0]
    attn_res = [2 ** s for s, d in enumerate(layout.down_depth) if d]
    depths = {d for d in layout.down_depth if d} | ({layout.mid_depth} if layout.mid_depth else set())
    heads = {h for h in layout.heads if h}
    # one head count everywhere (SD-v1: 8) or one head width (SD-v2: 64), as ldm's two options;
    # num_heads must then be absent, not -1 (diffusers' yaml reader takes any num_heads given)
    head_spec = (f"num_heads: {heads.pop()}" if len(heads) == 1
                 else f"num_head_channels: {max(layout.head_dims)}")
    cond = ("ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n      params:\n        freeze: True\n"
            "        layer: \"penultimate\"" if v2 else "ldm.modules.encoders.modules.FrozenCLIPEmbedder")
    param = "    parameterization: \"v\"\n" if sched.get("prediction_type") == "v_prediction" else ""
    return f"""# AUTOMATIC1111 / ldm config for this checkpoint's layout (written by personalize export)
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
{param}    linear_start: {sched.get('beta_start', 0.00085)}
    linear_end: {sched.get('beta_end', 0.012)}
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: {sched.get('num_train_timesteps', 1000)}
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {layout.sample_size}
    channels: {layout.in_channels}
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {vae.get('scaling_factor', 0.18215)}
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: {layout.in_channels}
        out_channels: {layout.out_channels}
        model_channels: {c0}
        attention_resolutions: {json.dumps(attn_res[::-1])}
        num_res_blocks: {layout.num_res_blocks}
        channel_mult: {json.dumps([c // c0 for c in layout.channels])}
        {head_spec}
        use_spatial_transformer: True
        transformer_depth: {max(depths) if depths else 1}
        context_dim: {layout.context_dim}
        use_linear_in_transformer: {layout.linear_proj}
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {vae.latent_channels}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {vae.latent_channels}
          resolution: 256
          in_channels: {vae.in_channels}
          out_ch: {vae.out_channels}
          ch: {vae.block_out_channels[0]}
          ch_mult: {json.dumps([c // vae.block_out_channels[0] for c in vae.block_out_channels])}
          num_res_blocks: {vae.layers_per_block}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: {cond}
"""


def _layout_line(layout: UNetLayout) -> str:
    mid = f"mid block depth {layout.mid_depth}" if layout.mid_depth is not None else "no mid block"
    return (f"{len(layout.down_res)} stages, residual blocks per stage down {list(layout.down_res)} / up "
            f"{list(layout.up_res)}, attention depth per stage {list(layout.down_depth)}, {mid}")


def export_single_file(source, out: Path, half: bool = False, base: str | None = None, lora_scale: float = 1.0,
                       overwrite: bool = False, allow_pickle: bool = False) -> SingleFile:
    """SOURCE (full or LoRA run, distill output, base) as one ldm-layout safetensors checkpoint."""
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise UserError(f"-o {out}: name a .safetensors file (clients pick checkpoints by that suffix)")
    yaml_path, readme = out.with_suffix(".yaml"), out.with_name(out.stem + ".README.md")
    src_path = Path(str(source)).expanduser()
    for p in (out, yaml_path, readme):
        check_output(p, kind="file", inputs=[src_path] if src_path.exists() else [], overwrite=overwrite)
    comps, pipeline_dir, label, inputs, src = _source(source, base, lora_scale, allow_pickle)
    # --pivotal: the checkpoint keeps the base's table (what A1111's and ComfyUI's own tokenizers index;
    # a longer one fails to load there), the embedding goes beside it as their embeddings file
    pivotal = of_source_runs([(a.run_dir, a.run) for a in src.adapters])
    emb = out.parent / f"{out.stem}-embeddings" / f"{pivotal[0]}.safetensors" if pivotal else None
    for p in (out, yaml_path, readme, *([emb] if emb else [])):
        check_output(p, kind="file", inputs=inputs, overwrite=overwrite)
    tensors, layout = checkpoint_tensors(comps, half)
    if pivotal:
        key = next(k for k in tensors if k.endswith("token_embedding.weight"))
        tensors[key] = tensors[key][: -len(pivotal[1])].contiguous()
    who = clients(layout, comps["vae"].config.norm_num_groups, is_open_clip(comps["text_encoder"]))
    needs_yaml = who["AUTOMATIC1111"].startswith("yes") and "yaml" in who["AUTOMATIC1111"]
    meta = {"format": "pt", "personalize_source": label, "personalize_layout": _layout_line(layout),
            "personalize_config_dir": str(pipeline_dir), "personalize_clients": json.dumps(who)}
    with output_lock(out), atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        if needs_yaml:
            write_text(yaml_path, a1111_yaml(layout, comps))
        elif yaml_path.exists():  # --overwrite of an earlier export with another layout
            yaml_path.unlink()
        if pivotal:
            a1111_embedding(emb, pivotal[1])
        write_text(readme, _readme(out, label, layout, who, pipeline_dir, half)
                   + (f"\nPivotal tuning's embedding: `{emb.parent.name}/{emb.name}`; copy it into A1111's "
                      f"`embeddings/` (ComfyUI: `models/embeddings/`) and write `{pivotal[0]}` in a prompt "
                      f"(ComfyUI: `embedding:{pivotal[0]}`).\n" if pivotal else ""))
    return SingleFile(out, yaml_path if needs_yaml else None, readme, who, len(tensors))


def _readme(out: Path, label: str, layout: UNetLayout, who: dict, pipeline_dir: Path, half: bool) -> str:
    rows = "\n".join(f"| {c} | {v} |" for c, v in who.items())
    return (f"# {out.name}\n\n{label}, as one original-Stable-Diffusion (ldm layout) checkpoint"
            f"{' in fp16' if half else ''}.\nU-Net layout: {_layout_line(layout)}.\n\n| client | loads it |\n"
            f"|---|---|\n{rows}\n\n```python\nfrom diffusers import StableDiffusionPipeline\n"
            f"pipe = StableDiffusionPipeline.from_single_file(\"{out.name}\", config=\"{pipeline_dir}\")\n```\n")
