"""What every deploy export writes beside its models: tokenizer/, scheduler/ and each model's
config.json (what generate needs), export.json (format, settings, the source and what was fused)
and a README.md. The source is resolved and fused by sources.py, the output checked and locked by
outputs.py; each format module only converts the three sub-models."""

from __future__ import annotations

import json
from pathlib import Path

from ...defaults import METHOD_LABELS
from ...fileio import write_json, write_text
from ...runtimes import EXPORT_JSON
from ...sources import Source


def describe(src: Source) -> dict:
    """What export.json records of the source: where it came from and what was fused."""
    d = {"from": str(src.given.resolve()), "method": src.method, "base": src.base_name,
         "base_path": str(src.pipeline_dir)}
    if src.adapters:
        d["fused"] = {"adapter": str(src.adapters[0].run_dir.resolve()), "lora_scale": src.lora_scale,
                      "components": ["unet", "text_encoder"]}
    return d


def _train_scheduler_config(pipeline_dir: Path) -> dict:
    """The base's own scheduler config, as stored: generate builds its sampler from it
    (pipeline.build_pipeline)."""
    return json.loads((Path(pipeline_dir) / "scheduler" / "scheduler_config.json").read_text())


def write_common(tmp: Path, comps: dict, fmt: str, src: Source) -> None:
    """tokenizer/, scheduler/ and each model's config.json: what generate needs beside the models."""
    if fmt == "coreml":  # Apple's layout: vocab.json + merges.txt beside the packages (coreml.py)
        return
    comps["tokenizer"].save_pretrained(str(tmp / "tokenizer"))
    write_json(tmp / "scheduler" / "scheduler_config.json", _train_scheduler_config(src.pipeline_dir))
    for folder, module in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae")):
        if (tmp / folder).is_dir():
            cfg = comps[module].config
            write_json(tmp / folder / "config.json", cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))


def sizes(root: Path) -> dict[str, int]:
    """Bytes per top-level entry (a model folder or package), and the total."""
    out = {}
    for p in sorted(Path(root).iterdir()):
        if p.name in (EXPORT_JSON, "README.md"):
            continue
        out[p.name] = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    out["total"] = sum(out.values())
    return out


def write_record(tmp: Path, src: Source, fmt: str, settings: dict, resolution: int, readme: str) -> dict:
    run = src.subject_run
    record = {"format": fmt, **settings, "resolution": resolution, **describe(src), "run": run,
              "sizes": sizes(tmp)}
    write_json(tmp / EXPORT_JSON, record)
    mb = "\n".join(f"| {k} | {v / 2**20:.1f} MiB |" for k, v in record["sizes"].items())
    what = (f"The {METHOD_LABELS.get(src.method, src.method)} adapter of `{src.given}` fused into {src.base_name} at scale {src.lora_scale:g} "
            f"(U-Net and text encoder)." if src.adapters else
            f"The full pipeline of `{src.given}` ({src.method}); nothing to fuse.")
    title = run["subject"]["name"] if run else src.given.name
    write_text(tmp / "README.md", f"# {title} on {src.base_name} ({fmt})\n\n{what}\n\n{readme}\n\n"
                                  f"## Sizes\n\n| part | size |\n|---|---|\n{mb}\n")
    return record
