"""Adapters where people use them: a LoRA run exported as a kohya-format file (AUTOMATIC1111,
ComfyUI, kohya's sd-scripts, and diffusers' own loader read it), or fused into a complete
diffusers pipeline directory for deployment without PEFT.

Both write to a temporary name next to the destination and rename it into place, and refuse an
existing destination unless told to overwrite it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .fileio import atomic_dir, atomic_file, write_json, write_text
from .runs import base_name, read_run

FORMATS = ("kohya", "merged")


def _check_dest(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        out.parent.mkdir(parents=True)


def _lora_run(run_dir: Path) -> dict:
    run = read_run(run_dir, finished=True)
    if run.get("method") != "lora":
        raise UserError(f"{run_dir} is a {run.get('method')} run: it already is a complete pipeline directory "
                        f"(load it with from_pretrained); export works on LoRA runs")
    return run


def _family(layers) -> str:
    """sd-v2 when any layer sees a 1024-wide input (OpenCLIP ViT-H text features), else sd-v1
    (CLIP ViT-L/14, 768): the one difference between the families an adapter's shapes show."""
    widths = {int(x.down.shape[1]) for (c, m), x in layers.items() if c == "text_encoder" or "attn2.to_k" in m
              or "attn2.to_v" in m}
    return "sd-v2" if 1024 in widths else "sd-v1"


def export_kohya(run_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """RUN_DIR's adapter as one kohya-format safetensors file (`lora_unet_*`, `lora_te_*`, alphas)."""
    from safetensors.torch import save_file

    from .adapters import LORA_WEIGHTS, kohya_metadata, read_lora, to_kohya

    run_dir, out = Path(run_dir), Path(out)
    run = _lora_run(run_dir)
    _check_dest(out, overwrite)
    layers = read_lora(run_dir / LORA_WEIGHTS)
    meta = kohya_metadata(layers, _family(layers))
    meta |= {"ss_output_name": out.stem, "personalize_subject": run["subject"]["name"],
             "personalize_base": base_name(run),
             "personalize_instance_prompt": str(run.get("instance_prompt", ""))}
    with atomic_file(out) as tmp:
        save_file(to_kohya(layers), str(tmp), metadata=meta)
    return out


def export_merged(run_dir: Path, out: Path, lora_scale: float = 1.0, base: str | None = None,
                  overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """RUN_DIR's adapter fused into its base (weights W + scale * alpha/r * B A), saved as a complete
    fp32 diffusers pipeline directory that `from_pretrained` loads without PEFT."""
    import torch

    from .generate import load_pipeline, resolve_source
    from .pipeline import save_pipeline

    run_dir, out = Path(run_dir), Path(out)
    run = _lora_run(run_dir)
    _check_dest(out, overwrite)
    src = resolve_source(run_dir, base=base, lora_scale=lora_scale)
    pipe = load_pipeline(src, torch.device("cpu"), torch.float32, allow_pickle)
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=[a.name for a in src.adapters])
    pipe.unload_lora_weights()
    with atomic_dir(out, replace=overwrite) as tmp:
        save_pipeline(tmp, src.pipeline_dir, pipe.components)
        write_json(tmp / "export.json", {"merged_from": str(run_dir.resolve()), "base": src.base_name,
                                         "base_path": str(src.pipeline_dir), "lora_scale": lora_scale,
                                         "subject": run["subject"], "instance_prompt": run.get("instance_prompt")})
        write_text(tmp / "README.md",
            f"# {run['subject']['name']} on {src.base_name} (LoRA merged)\n\nThe LoRA adapter of `{run_dir}` fused "
            f"into {src.base_name} at scale {lora_scale:g}; a plain diffusers pipeline:\n\n```python\n"
            f"from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained(\"{out}\")\n"
            f"pipe(\"{run.get('instance_prompt', '')} on the beach\").images[0]\n```\n")
    return out
