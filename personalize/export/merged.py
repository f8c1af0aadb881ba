"""An adapter run (LoRA, DoRA, LoHa, LoKr, OFT) fused into its base and saved as a complete diffusers
pipeline directory, which `from_pretrained` loads without PEFT (the starting point of the deploy
formats). Written atomically."""

from __future__ import annotations

from pathlib import Path

from ..defaults import METHOD_LABELS
from ..fileio import atomic_dir, write_json, write_text
from ..outputs import check_output, output_lock
from ..pipeline import save_pipeline
from ..runtimes import EXPORT_JSON
from ..sources import Source, load_fused, resolve_source
from .kohya import lora_run


def export_merged(run_dir: Path, out: Path, lora_scale: float = 1.0, base: str | None = None,
                  overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """RUN_DIR's adapter fused into its base (weights W + scale * alpha/r * B A), saved as a complete
    fp32 diffusers pipeline directory that `from_pretrained` loads without PEFT."""
    run_dir, out = Path(run_dir), Path(out)
    run = lora_run(run_dir)
    check_output(out, kind="dir", inputs=[run_dir], overwrite=overwrite)
    src = resolve_source(run_dir, base=base, lora_scale=lora_scale)
    check_output(out, kind="dir", inputs=[run_dir, src.pipeline_dir], overwrite=overwrite)
    with output_lock(out):
        return _write_merged(run_dir, run, out, src, lora_scale, overwrite, allow_pickle)


def _write_merged(run_dir: Path, run: dict, out: Path, src: Source, lora_scale: float, overwrite: bool,
                  allow_pickle: bool) -> Path:
    comps = load_fused(src, allow_pickle)
    method = METHOD_LABELS.get(run.get("method", "lora"), "LoRA")
    with atomic_dir(out, replace=overwrite) as tmp:
        save_pipeline(tmp, src.pipeline_dir, comps)
        # the export.json of every export: "format" first, then what it was made from
        write_json(tmp / EXPORT_JSON, {"format": "merged", "from": str(run_dir.resolve()),
                                       "method": run.get("method", "lora"), "base": src.base_name,
                                       "base_path": str(src.pipeline_dir), "lora_scale": lora_scale,
                                       "merged_from": str(run_dir.resolve()),  # the key earlier versions wrote
                                       "subject": run["subject"], "instance_prompt": run.get("instance_prompt")})
        write_text(tmp / "README.md",
            f"# {run['subject']['name']} on {src.base_name} ({method} merged)\n\nThe {method} adapter of `{run_dir}` fused "
            f"into {src.base_name} at scale {lora_scale:g}; a plain diffusers pipeline:\n\n```python\n"
            f"from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained(\"{out}\")\n"
            f"pipe(\"{run.get('instance_prompt', '')} on the beach\").images[0]\n```\n")
    return out
