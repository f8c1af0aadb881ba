"""An adapter run (LoRA, DoRA, LoHa, LoKr, OFT) fused into its base and saved as a complete diffusers pipeline directory, which
`from_pretrained` loads without PEFT (the starting point of the deploy formats). Written atomically."""

from __future__ import annotations

from pathlib import Path

from ..fileio import atomic_dir, write_json, write_text
from ..outputs import check_output, output_lock
from .kohya import lora_run


def export_merged(run_dir: Path, out: Path, lora_scale: float = 1.0, base: str | None = None,
                  overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """RUN_DIR's adapter fused into its base (weights W + scale * alpha/r * B A), saved as a complete
    fp32 diffusers pipeline directory that `from_pretrained` loads without PEFT."""
    from ..generate import resolve_source

    run_dir, out = Path(run_dir), Path(out)
    run = lora_run(run_dir)
    check_output(out, kind="dir", inputs=[run_dir], overwrite=overwrite)
    src = resolve_source(run_dir, base=base, lora_scale=lora_scale)
    check_output(out, kind="dir", inputs=[run_dir, src.pipeline_dir], overwrite=overwrite)
    with output_lock(out):
        return _write_merged(run_dir, run, out, src, lora_scale, overwrite, allow_pickle)


def _write_merged(run_dir: Path, run: dict, out: Path, src, lora_scale: float, overwrite: bool,
                  allow_pickle: bool) -> Path:
    from ..pipeline import save_pipeline

    pipe = _fused(src, allow_pickle)
    method = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT"}.get(run.get("method"), "LoRA")
    with atomic_dir(out, replace=overwrite) as tmp:
        save_pipeline(tmp, src.pipeline_dir, pipe.components)
        write_json(tmp / "export.json", {"merged_from": str(run_dir.resolve()), "base": src.base_name,
                                         "base_path": str(src.pipeline_dir), "lora_scale": lora_scale,
                                         "method": run.get("method", "lora"),
                                         "subject": run["subject"], "instance_prompt": run.get("instance_prompt")})
        write_text(tmp / "README.md",
            f"# {run['subject']['name']} on {src.base_name} ({method} merged)\n\nThe {method} adapter of `{run_dir}` fused "
            f"into {src.base_name} at scale {lora_scale:g}; a plain diffusers pipeline:\n\n```python\n"
            f"from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained(\"{out}\")\n"
            f"pipe(\"{run.get('instance_prompt', '')} on the beach\").images[0]\n```\n")
    return out


def _fused(src, allow_pickle: bool):
    """The pipeline of `src` on the CPU in fp32 with its adapters fused in and PEFT removed."""
    import torch

    from ..generate import load_pipeline

    from ..adapters import has_adapter, method_of
    from ..peft_adapters import merge_and_unload

    pipe = load_pipeline(src, torch.device("cpu"), torch.float32, allow_pickle)
    if all(method_of(a.method).storage == "diffusers" for a in src.adapters):
        pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=[a.name for a in src.adapters])
        pipe.unload_lora_weights()
    else:  # LoHa / LoKr / OFT: peft's own merge of each layer (W + delta, or W R for OFT)
        for model in (pipe.unet, pipe.text_encoder):
            if has_adapter(model):
                merge_and_unload(model)
    return pipe


def fused_components(run_dir: Path, base: str | None = None, lora_scale: float = 1.0, allow_pickle: bool = False):
    """(components with the LoRA of RUN_DIR fused in, its resolved Source): what `merged` saves,
    for exports that write another format (single-file)."""
    from diffusers import DDPMScheduler

    from ..generate import resolve_source

    src = resolve_source(Path(run_dir), base=base, lora_scale=lora_scale)
    comps = dict(_fused(src, allow_pickle).components)
    comps["noise_scheduler"] = DDPMScheduler.from_pretrained(src.pipeline_dir, subfolder="scheduler")
    return comps, src
