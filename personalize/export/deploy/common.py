"""What every deploy export shares: the source (a LoRA run fused into its base, a full run's
pipeline, or a bare pipeline directory such as `distill prune/train` writes), the optional
dependency check, the output checks and lock, the atomic folder, and the export.json + README.md
written beside the models. Each format module only converts the three sub-models."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError

EXPORT_JSON = "export.json"
# format -> (extra, the modules it needs)
EXTRAS = {"onnx": ("onnx", ("onnx", "onnxruntime")), "openvino": ("openvino", ("openvino",)),
          "coreml": ("coreml", ("coremltools",))}


def require_extra(fmt: str, also: tuple[str, ...] = ()) -> None:
    """One line naming the extra to install when a runtime package is missing."""
    extra, modules = EXTRAS[fmt]
    for m in (*modules, *also):
        try:
            importlib.import_module(m)
        except ImportError:
            raise UserError(f"--format {fmt}: needs the {m} package; install it with "
                            f"pip install -c requirements/lock.txt 'personalize[{extra}]'") from None


@dataclass
class DeploySource:
    path: Path  # what was given: a run dir or a pipeline dir
    pipeline_dir: Path
    base_name: str
    method: str  # lora | full | pipeline
    run: dict | None = None
    adapters: list = field(default_factory=list)  # generate.AdapterRef of a LoRA run
    lora_scale: float = 1.0

    def describe(self) -> dict:
        d = {"from": str(self.path.resolve()), "method": self.method, "base": self.base_name,
             "base_path": str(self.pipeline_dir)}
        if self.adapters:
            d["fused"] = {"adapter": str(self.adapters[0].run_dir.resolve()), "lora_scale": self.lora_scale,
                          "components": ["unet", "text_encoder"]}
        return d


def resolve_deploy_source(path: Path, base: str | None = None, lora_scale: float = 1.0) -> DeploySource:
    from ...backbones import is_pipeline_dir
    from ...generate import resolve_source
    from ...runs import RUN_JSON

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not (path / RUN_JSON).is_file():
        if is_pipeline_dir(path):
            if base is not None:
                raise UserError(f"{path} is a complete pipeline; --base applies to LoRA runs")
            return DeploySource(path, path.resolve(), path.name, "pipeline")
        raise UserError(f"{path}: not a run (no {RUN_JSON}) nor a diffusers pipeline directory "
                        f"(model_index.json + unet/); pass a `personalize lora/full` or `distill` output")
    src = resolve_source(path, base=base, lora_scale=lora_scale)
    if src.full_run is not None:
        return DeploySource(path, src.pipeline_dir, src.base_name, "full", src.full_run)
    return DeploySource(path, src.pipeline_dir, src.base_name, "lora", src.adapters[0].run, src.adapters, lora_scale)


def load_fused(ds: DeploySource, allow_pickle: bool = False) -> dict:
    """fp32 CPU components with a LoRA run's adapter fused in (W + scale * alpha/r * B A), PEFT
    layers removed so the converters see plain Linear/Conv modules."""
    import torch

    from ...generate import Source, load_pipeline

    src = Source(ds.pipeline_dir, ds.base_name, adapters=ds.adapters, lora_scale=ds.lora_scale)
    pipe = load_pipeline(src, torch.device("cpu"), torch.float32, allow_pickle)
    if ds.adapters:
        pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=[a.name for a in ds.adapters],
                       lora_scale=1.0)  # the adapter weights already carry lora_scale (set_adapters)
        pipe.unload_lora_weights()
    comps = dict(pipe.components)
    comps["noise_scheduler_config"] = _train_scheduler_config(ds.pipeline_dir)
    for m in ("unet", "text_encoder", "vae"):
        comps[m].eval().requires_grad_(False)
    return comps


def _train_scheduler_config(pipeline_dir: Path) -> dict:
    """The base's scheduler config: generate builds its sampler from it (pipeline.build_pipeline)."""
    return json.loads((Path(pipeline_dir) / "scheduler" / "scheduler_config.json").read_text())


def write_common(tmp: Path, comps: dict, ds: DeploySource, fmt: str, settings: dict, resolution: int) -> None:
    """tokenizer/, scheduler/ and each model's config.json: what generate needs beside the models."""
    from ...fileio import write_json

    if fmt == "coreml":  # Apple's layout: vocab.json + merges.txt beside the packages (coreml.py)
        return
    comps["tokenizer"].save_pretrained(str(tmp / "tokenizer"))
    write_json(tmp / "scheduler" / "scheduler_config.json", comps["noise_scheduler_config"])
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


def write_record(tmp: Path, ds: DeploySource, fmt: str, settings: dict, resolution: int, readme: str) -> dict:
    from ...fileio import write_json, write_text

    record = {"format": fmt, **settings, "resolution": resolution, **ds.describe(), "run": ds.run,
              "sizes": sizes(tmp)}
    write_json(tmp / EXPORT_JSON, record)
    mb = "\n".join(f"| {k} | {v / 2**20:.1f} MiB |" for k, v in record["sizes"].items())
    what = (f"The LoRA adapter of `{ds.path}` fused into {ds.base_name} at scale {ds.lora_scale:g} "
            f"(U-Net and text encoder)." if ds.adapters else
            f"The full pipeline of `{ds.path}` ({ds.method}); nothing to fuse.")
    title = ds.run["subject"]["name"] if ds.run else ds.path.name
    write_text(tmp / "README.md", f"# {title} on {ds.base_name} ({fmt})\n\n{what}\n\n{readme}\n\n"
                                  f"## Sizes\n\n| part | size |\n|---|---|\n{mb}\n")
    return record


def read_export(path: Path) -> dict | None:
    """export.json of an export folder, or None when `path` is not one."""
    try:
        rec = json.loads((Path(path) / EXPORT_JSON).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and "format" in rec else None
