"""Loading Stable Diffusion components from a resolved base, and generating images with metadata.

Weights load from safetensors only; a base that ships only pickles (.bin/.ckpt) is refused unless
the user passes --allow-pickle. Images are written with their generation settings in the PNG text
chunks, to a temp file first and then renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import UserError

WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
# DPM-Solver++ with 25 steps, as the BK-SDM generation scripts
DEFAULT_SCHEDULER = "dpm++"
SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def check_safetensors(base_path: Path, allow_pickle: bool) -> None:
    for sub in WEIGHT_FOLDERS:
        d = Path(base_path) / sub
        if not d.is_dir():
            raise UserError(f"{base_path}: missing {sub}/; not a complete Stable Diffusion pipeline directory")
        if any(d.glob("*.safetensors")):
            continue
        pickles = [p.name for p in d.iterdir() if p.suffix in {".bin", ".ckpt", ".pt", ".pth"}]
        if pickles and not allow_pickle:
            raise UserError(f"{d}: only pickle weights ({pickles[0]}); convert them to safetensors or pass "
                            f"--allow-pickle if you trust the source")
        if not pickles:
            raise UserError(f"{d}: no weights found")


def load_components(base_path: Path, allow_pickle: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """tokenizer, text_encoder, vae, unet and the training noise scheduler (DDPM). The U-Net and
    text encoder load straight into `dtype` (frozen LoRA bases: no fp32 copy ever in memory);
    the VAE stays fp32 (it only encodes the photos once)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base_path = Path(base_path)
    check_safetensors(base_path, allow_pickle)
    st = not allow_pickle
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(base_path, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(base_path, subfolder="text_encoder", use_safetensors=st,
                                                      torch_dtype=dtype),
        "vae": AutoencoderKL.from_pretrained(base_path, subfolder="vae", use_safetensors=st),
        "unet": UNet2DConditionModel.from_pretrained(base_path, subfolder="unet", use_safetensors=st,
                                                     torch_dtype=dtype),
        "noise_scheduler": DDPMScheduler.from_pretrained(base_path, subfolder="scheduler"),
    }


def make_scheduler(name: str, config):
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; choose from {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **extra)


def build_pipeline(components: dict, scheduler: str = DEFAULT_SCHEDULER):
    """A StableDiffusionPipeline sharing the given modules (no copy, no reload)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=make_scheduler(scheduler, components["noise_scheduler"].config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def generate(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float, resolution: int,
             negative_prompt: str | None = None, cross_attention_kwargs: dict | None = None):
    """One image per (prompt, seed); each image has its own CPU generator, so an image depends only
    on its prompt and seed, not on the batch it was generated in."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(prompts, generator=gens, num_inference_steps=steps, guidance_scale=guidance_scale,
               height=resolution, width=resolution,
               negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
               cross_attention_kwargs=cross_attention_kwargs)
    return out.images


def save_png(img, path: Path, metadata: dict) -> Path:
    """PNG with each metadata entry as a text chunk (plus all of it as JSON under 'personalize'),
    written to a temp name and renamed."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    info.add_text("personalize", json.dumps(metadata))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
