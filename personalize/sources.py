"""Every model source, resolved and loaded in one place.

A source is what draws, exports or teaches: a backbone (registry name, hub id, `tiny`), a local
diffusers pipeline directory (a `distill` output too), a LoRA/DoRA/LoHa/LoKr/OFT run on its base,
several adapter runs mixed with weights, a full-finetune run (its own pipeline), or an ONNX /
OpenVINO export folder. `resolve_base` / `resolve_source` read only small JSON files, so commands
can check everything before a weight is read; `load_components`, `load_pipeline` and `load_fused`
then load it: on torch in any dtype, with its adapters active or fused into the weights, or on the
export's own runtime.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import ADAPTER_DIR, ADAPTER_METHODS, LORA_WEIGHTS, has_adapter, method_of
from .backbones import (BACKBONES, HUB_PATTERNS, ResolvedBase, hub_offline, is_pipeline_dir, local_snapshot,
                        materialize_tiny, native_resolution)
from .defaults import DEFAULT_SCHEDULER, DEPLOY_FORMATS, RUNTIMES, SCHEDULERS
from .embeddings import load_run_embeddings
from .errors import UserError, one_line
from .peft_adapters import activate, check_lora_file, check_mix, load_peft_adapter, merge_and_unload
from .pipeline import build_pipeline, check_safetensors, load_cast, loading
from .precision import pick_device, pick_dtype
from .runs import RUN_JSON, TRAINING_DIRS, base_name, read_run, resolution_error, run_token
from .runtimes import COMPONENTS, EXPORT_JSON, check_inference_precision, read_export, runtime_components
from .subjects import fill_prompt

__all__ = ["AdapterRef", "Source", "check_safetensors", "export_source", "input_paths", "load_components",
           "load_fused", "load_pipeline", "load_unet", "pick_device", "pick_dtype", "resolve_base", "run_base",
           "resolve_source"]


# --------------------------------------------------------------------------------------------
# Resolving (no weights read)
# --------------------------------------------------------------------------------------------
def resolve_base(name_or_path: str, flag: str = "--base") -> ResolvedBase:
    """A registry name, hub id, `tiny[:seed]`, local pipeline directory or `distill train` output
    (its `student/`) -> a local diffusers pipeline directory, or a one-line UserError naming `flag`.
    The local HF cache is looked in first; the hub only when HF_HUB_OFFLINE is not set."""
    if name_or_path == "tiny" or name_or_path.startswith("tiny:"):
        seed = int(name_or_path.split(":", 1)[1]) if ":" in name_or_path else 0
        return ResolvedBase(name_or_path, materialize_tiny(seed), None, "built-in")
    p = Path(name_or_path).expanduser()
    # a hub id is owner/name; anything else with a slash, or a leading . / ~, is a path
    looks_like_path = (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1
                       or os.sep != "/" and os.sep in name_or_path)
    if looks_like_path and not p.exists():
        raise UserError(f"{flag} {name_or_path}: no such directory")
    if p.exists():
        if p.is_dir() and not is_pipeline_dir(p) and is_pipeline_dir(p / "student"):
            return ResolvedBase(name_or_path, (p / "student").resolve(), None, "local")  # a `distill train` output
        if not is_pipeline_dir(p):
            raise UserError(f"{flag} {name_or_path}: not a diffusers pipeline directory (no model_index.json + unet/)")
        return ResolvedBase(name_or_path, p.resolve(), None, "local")
    spec = BACKBONES.get(name_or_path)
    if spec is None and "/" not in name_or_path:
        raise UserError(f"unknown base '{name_or_path}'; known: {', '.join(BACKBONES)} "
                        f"(or a hub id / local pipeline dir)")
    hub_id = spec.hub_id if spec else name_or_path
    path, source = _snapshot(hub_id, name_or_path, flag)
    return ResolvedBase(name_or_path, path, hub_id, source)


def _snapshot(hub_id: str, display: str, flag: str) -> tuple[Path, str]:
    from huggingface_hub import constants, snapshot_download

    cached = local_snapshot(hub_id)
    if cached is not None:
        return cached, "registry-cache"
    hint = f"weights for '{display}' ({hub_id}) are not in the HF cache ({constants.HF_HUB_CACHE})"
    fix = f"download them with `hf download {hub_id}` where there is network, or pass {flag} /path/to/pipeline_dir"
    if hub_offline():
        raise UserError(f"{hint} and HF_HUB_OFFLINE is set; {fix}")
    try:
        p = Path(snapshot_download(hub_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: all end the same way for the user
        raise UserError(f"{hint} and the hub is unreachable ({type(e).__name__}); {fix}") from None
    if not is_pipeline_dir(p):
        raise UserError(f"{hub_id} downloaded but holds no diffusers pipeline (model_index.json + unet/)")
    return p, "hub-download"


@dataclass
class AdapterRef:
    run_dir: Path
    name: str  # peft adapter name inside the pipeline
    weight: float
    run: dict

    @property
    def method(self) -> str:
        return str(self.run.get("method", "lora"))

    def describe(self) -> dict:
        d = {"run": str(self.run_dir.resolve()), "subject": self.run["subject"]["name"], "weight": self.weight,
             "trained_on": base_name(self.run), "finished_at": self.run.get("finished_at")}
        # LoRA adapters keep the description they always had, so their cached images stay valid
        return d if self.method == "lora" else d | {"method": self.method}


@dataclass
class Source:
    """What draws the images, resolved without loading weights: a base pipeline directory plus
    adapters, a full-finetune run's own pipeline directory, or an ONNX/OpenVINO export."""

    pipeline_dir: Path
    base_name: str
    full_run: dict | None = None  # run.json of a full-finetune run (then pipeline_dir is that run)
    export: dict | None = None  # export.json of an ONNX/OpenVINO export (then pipeline_dir is that folder)
    adapters: list[AdapterRef] = field(default_factory=list)
    lora_scale: float = 1.0
    scheduler: str = DEFAULT_SCHEDULER
    inference_precision: str | None = None  # an OpenVINO export's compute precision (fp32/bf16)
    given: Path | None = None  # what the user named, when it was a run, export or pipeline folder

    @property
    def subject_run(self) -> dict | None:
        """The run whose token and class fill `{token}` / `{class}`: the full run, else the first adapter."""
        return self.full_run or (self.export or {}).get("run") or (self.adapters[0].run if self.adapters else None)

    @property
    def method(self) -> str:
        """full, export, the first adapter's method, or pipeline (a bare base)."""
        if self.full_run is not None:
            return "full"
        if self.export is not None:
            return "export"
        return self.adapters[0].method if self.adapters else "pipeline"

    def default_resolution(self) -> int:
        """The export's, else the run's training resolution, else the base's native one (checked)."""
        if self.export is not None or (self.subject_run or {}).get("resolution"):
            return int((self.export or self.subject_run)["resolution"])  # checked when read
        try:
            res = native_resolution(self.pipeline_dir)
            why = resolution_error(res)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            why = f"is unreadable ({one_line(e)})"
        if why:
            raise UserError(f"{self.pipeline_dir}: its native resolution (unet/config.json, vae/config.json) {why}")
        return res

    def describe(self) -> dict:
        d = {"base": self.base_name, "base_path": str(self.pipeline_dir), "scheduler": self.scheduler}
        if self.export is not None:
            d["export"] = {k: self.export.get(k) for k in ("format", "weight_format", "from", "method")}
            if self.inference_precision is not None:  # bf16 pixels differ from fp32 ones: never reuse across
                d["export"]["inference_precision"] = self.inference_precision
        if self.full_run is not None:
            d["full_run"] = {"run": str(self.pipeline_dir), "subject": self.full_run["subject"]["name"],
                             "trained_on": base_name(self.full_run), "finished_at": self.full_run.get("finished_at")}
        if self.adapters:
            d["adapters"] = [a.describe() for a in self.adapters]
            d["lora_scale"] = self.lora_scale
        return d

    def fill(self, template: str) -> str:
        run = self.subject_run
        if run is None:
            if "{token}" in template or "{class}" in template:
                raise UserError(f"prompt '{template}' has a {{token}}/{{class}} placeholder but no run to fill it "
                                f"from; pass a RUN_DIR or --adapter")
            return template
        return fill_prompt(template, run_token(run), run["subject"].get("class_noun") or "")


def run_base(run: dict) -> ResolvedBase:
    """The base a run was trained on: where run.json says it was, else resolved again by name (a
    run moved to another machine finds the base in that machine's HF cache)."""
    base = run.get("base") or {}
    path = Path(base.get("path") or "/nonexistent")
    if is_pipeline_dir(path):
        return ResolvedBase(base.get("name", str(path)), path, base.get("hub_id"), base.get("source", "local"))
    return resolve_base(str(base.get("hub_id") or base.get("name") or "?"))


def _adapter_name(i: int, run: dict) -> str:
    # peft adapter names become attribute keys: letters, digits and underscores only
    return f"a{i}_" + re.sub(r"[^A-Za-z0-9_]", "_", run["subject"]["name"])


def export_source(path: Path, adapters: list | tuple = (), base: str | None = None, scheduler: str = DEFAULT_SCHEDULER,
                  inference_precision: str | None = None) -> Source | None:
    """The Source of an ONNX/OpenVINO export folder, or None when `path` is not an export."""
    rec = read_export(path)
    if rec is None or rec["format"] not in DEPLOY_FORMATS:  # a merged export is a plain pipeline dir
        return None
    if rec["format"] not in RUNTIMES:
        raise UserError(f"{path}: a {rec.get('format')} export; Core ML predicts on macOS only (load it in Apple's "
                        f"ml-stable-diffusion pipelines, see its README.md); generate runs onnx/openvino exports")
    check_export_record(Path(path) / EXPORT_JSON, rec)
    precision = check_inference_precision(rec["runtime"], inference_precision, str(path))
    if adapters or base is not None:
        raise UserError(f"{path}: an exported pipeline (adapters already fused); --adapter/--base do not apply")
    missing = [c for c in (*COMPONENTS, "tokenizer", "scheduler") if not (Path(path) / c).is_dir()]
    if missing:
        raise UserError(f"{path}: incomplete {rec['format']} export (no {missing[0]}/); export it again")
    return Source(Path(path).resolve(), str(rec.get("base", "?")), export=rec, scheduler=scheduler, given=Path(path),
                  inference_precision=precision or ("fp32" if rec["runtime"] == "openvino" else None))


def check_export_record(path: Path, rec: dict) -> None:
    """The fields of an ONNX/OpenVINO export.json that generate uses (one line naming file and field)."""
    run, shown = rec.get("run"), {k: json.dumps(rec[k])[:40] if k in rec else "missing" for k in ("runtime", "base")}
    subject = run.get("subject") if isinstance(run, dict) else None
    why = {"runtime": rec.get("runtime") != rec["format"] and f"is {shown['runtime']}, not {rec['format']}",
           "resolution": "is missing" if "resolution" not in rec else resolution_error(rec["resolution"]),
           "base": not isinstance(rec.get("base"), str) and f"is {shown['base']}, not the name of a base",
           "run": run is not None and not (isinstance(subject, dict) and isinstance(subject.get("name"), str))
           and "is not the run.json of a run (no subject.name)"}
    for name, what in why.items():
        if what:
            raise UserError(f"{path}: field {name} {what}; export it again")


def resolve_source(run_dir: Path | None = None, adapters: list[Path] | tuple = (), adapter_weights: list[float] | None = None,
                   base: str | None = None, lora_scale: float = 1.0, scheduler: str = DEFAULT_SCHEDULER,
                   inference_precision: str | None = None) -> Source:
    """RUN_DIR (a LoRA or full run, an export, or a base: the same as `--base` then) and/or
    `--adapter` runs and/or `--base` -> a Source. A LoRA RUN_DIR is the first adapter; a full
    RUN_DIR is the pipeline the adapters go on. `inference_precision`: OpenVINO exports only."""
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{scheduler}'; choose from {', '.join(SCHEDULERS)}")
    if run_dir is not None:
        exported = export_source(Path(run_dir), list(adapters), base, scheduler, inference_precision)
        if exported is not None:
            return exported
    if inference_precision is not None:
        check_inference_precision(None, inference_precision, str(run_dir or base or "the source"))
    given = Path(run_dir) if run_dir is not None else None
    if given is not None and not (given / RUN_JSON).is_file():
        if _is_base(str(run_dir)):  # before/after: a bare base as RUN_DIR is `--base`
            if base is not None:
                raise UserError(f"{run_dir} is a base; --base {base} names another: pass one of them")
            base, run_dir = str(run_dir), None
        elif not any((given / d).exists() for d in TRAINING_DIRS):  # an unfinished run: read_run says why
            raise UserError(f"{run_dir}: not a run (no {RUN_JSON}) nor a base (a diffusers pipeline directory, "
                            f"a `distill` output, tiny, a registry name or a hub id in the HF cache)")
    adapter_dirs = [Path(a) for a in adapters]
    full = None
    if run_dir is not None:
        run = read_run(run_dir, finished=True)
        if run.get("method") == "full":
            full = (Path(run_dir), run)
        else:
            adapter_dirs.insert(0, Path(run_dir))
    refs = []
    for i, d in enumerate(adapter_dirs):
        run = read_run(d, finished=True)
        if run.get("method", "lora") not in ADAPTER_METHODS:
            raise UserError(f"--adapter {d}: a {run.get('method')} run is a whole pipeline, not an adapter; "
                            f"pass it as RUN_DIR")
        refs.append(AdapterRef(d, _adapter_name(i, run), 1.0, run))
    if adapter_weights is not None:
        if len(adapter_weights) != len(refs):
            raise UserError(f"--adapter-weights has {len(adapter_weights)} values for {len(refs)} adapter(s)")
        for r, w in zip(refs, adapter_weights):
            r.weight = float(w)
    check_mix([r.method for r in refs], [r.weight for r in refs], float(lora_scale))
    if full is not None:
        if base is not None:
            raise UserError(f"{full[0]} is a full finetune and is its own pipeline; --base applies to LoRA runs")
        src = Source(full[0].resolve(), base_name(full[1]), full_run=full[1])
    else:
        if base is None and not refs:
            raise UserError("nothing to generate with: pass a RUN_DIR, --adapter RUN_DIR or --base")
        resolved = resolve_base(base) if base is not None else run_base(refs[0].run)
        src = Source(resolved.path, resolved.name)
    src.adapters, src.lora_scale, src.scheduler = refs, float(lora_scale), scheduler
    src.given = None if given is None else given if given.exists() else src.pipeline_dir
    return src


def _is_base(name: str) -> bool:
    """RUN_DIR is a pipeline dir, `distill` output, tiny, registry name or cached hub id (never downloaded)."""
    p = Path(name).expanduser()
    if p.exists():
        return p.is_dir() and (is_pipeline_dir(p) or is_pipeline_dir(p / "student"))
    return (name == "tiny" or name.startswith("tiny:") or name in BACKBONES
            or name.count("/") == 1 and not name.startswith((".", "~")) and local_snapshot(name) is not None)


def input_paths(src: Source) -> list[Path]:
    """What loading `src` reads: the adapters' files and the pipeline's own entries (an output
    folder beside them, like the default RUN_DIR/samples/, is fine; one over them is not)."""
    if src.export is not None:
        return [src.pipeline_dir / n for n in (*COMPONENTS, "tokenizer", "scheduler", EXPORT_JSON)]
    paths = [src.pipeline_dir / n for n in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                            "scheduler", RUN_JSON)]
    for a in src.adapters:
        paths += [a.run_dir / LORA_WEIGHTS, a.run_dir / ADAPTER_DIR, a.run_dir / RUN_JSON]
    return paths


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_components(base_path: Path, allow_pickle: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """tokenizer, text_encoder, vae, unet and the training noise scheduler (DDPM). The U-Net and
    text encoder load straight into `dtype` (frozen LoRA bases: no fp32 copy ever in memory);
    the VAE stays fp32 (it only encodes the photos once)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base_path = Path(base_path)
    check_safetensors(base_path, allow_pickle)
    st = _use_safetensors(allow_pickle)
    out = {}
    with loading(base_path / "tokenizer"):
        out["tokenizer"] = CLIPTokenizer.from_pretrained(base_path, subfolder="tokenizer")
    with loading(base_path / "text_encoder"):
        out["text_encoder"] = load_cast(CLIPTextModel, base_path / "text_encoder", dtype, use_safetensors=st)
    out["vae"] = load_vae(base_path, allow_pickle)
    with loading(base_path / "unet"):
        out["unet"] = load_cast(UNet2DConditionModel, base_path / "unet", dtype, use_safetensors=st)
    with loading(base_path / "scheduler"):
        out["noise_scheduler"] = DDPMScheduler.from_pretrained(base_path, subfolder="scheduler")
    return out


def load_vae(base_path: Path, allow_pickle: bool = False):
    """The base's VAE in fp32 (it only encodes the photos once and decodes a few samples)."""
    from diffusers import AutoencoderKL

    with loading(Path(base_path) / "vae"):
        return AutoencoderKL.from_pretrained(Path(base_path), subfolder="vae",
                                             use_safetensors=None if allow_pickle else True)


def _load_export(src: Source, device: torch.device | None, dtype: torch.dtype | None):
    runtime = src.export["runtime"]
    if device is not None and device.type != "cpu":
        raise UserError(f"--device {device}: an exported {runtime} folder runs on the CPU here")
    if dtype not in (None, torch.float32):
        raise UserError(f"--dtype: an exported {runtime} folder computes in fp32 (its weight format was set at export)")
    return build_pipeline(runtime_components(src.pipeline_dir, runtime, src.inference_precision or "fp32"),
                          src.scheduler)


def load_pipeline(src: Source, device: torch.device | None = None, dtype: torch.dtype | None = None,
                  allow_pickle: bool = False):
    """The diffusers pipeline of `src` with its adapters loaded and weighted, on `device` (an
    export: its models on their runtime, CPU). Every adapter is checked against the base first:
    one that does not fit (trained on another architecture) is a one-line error naming both
    bases, not a shape traceback from peft."""
    if src.export is not None:
        return _load_export(src, device, dtype)
    device = device or pick_device(None)
    dtype = dtype or pick_dtype(None, device)
    comps = load_components(src.pipeline_dir, allow_pickle, dtype=dtype)
    comps["vae"].to(dtype=dtype)
    diffusers_refs = [a for a in src.adapters if method_of(a.method).storage == "diffusers"]
    for a in diffusers_refs:
        check_lora_file(a.run_dir, a.method, comps, base_name(a.run), src.base_name)
    for a in src.adapters:
        if a not in diffusers_refs:
            load_peft_adapter(comps, a.run_dir, a.method, a.name, base_name(a.run), src.base_name)
    if len(diffusers_refs) < len(src.adapters):
        activate(comps, {a.name: a.weight * src.lora_scale for a in src.adapters})
    load_run_embeddings(comps, [(a.run_dir, a.run) for a in src.adapters])  # --pivotal runs' new tokens
    pipe = build_pipeline(comps, src.scheduler)
    for a in diffusers_refs:
        pipe.load_lora_weights(str(a.run_dir), adapter_name=a.name)
    if diffusers_refs:
        pipe.set_adapters([a.name for a in diffusers_refs],
                          adapter_weights=[a.weight * src.lora_scale for a in diffusers_refs])
    return pipe.to(dtype=dtype).to(device)


def load_fused(src: Source, allow_pickle: bool = False) -> dict:
    """fp32 CPU components of `src` (tokenizer, text_encoder, vae, unet, noise_scheduler) with its
    adapters fused into the weights (LoRA/DoRA: W + scale * alpha/r * B A through diffusers; LoHa,
    LoKr, OFT: peft's merge of each layer) and the PEFT layers removed, so exporters see plain
    Linear/Conv modules."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(src, torch.device("cpu"), torch.float32, allow_pickle)
    if src.adapters and all(method_of(a.method).storage == "diffusers" for a in src.adapters):
        # the adapter weights already carry lora_scale (set_adapters)
        pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=[a.name for a in src.adapters])
        pipe.unload_lora_weights()
    else:
        for model in (pipe.unet, pipe.text_encoder):
            if has_adapter(model):
                merge_and_unload(model)
    comps = {k: pipe.components[k] for k in ("tokenizer", "text_encoder", "vae", "unet")}
    comps["noise_scheduler"] = DDPMScheduler.from_pretrained(src.pipeline_dir, subfolder="scheduler")
    for m in ("unet", "text_encoder", "vae"):
        comps[m].eval().requires_grad_(False)
    return comps


def _use_safetensors(allow_pickle: bool) -> bool | None:
    # None, not False: False means pickles *only* (a pipeline mixing both formats would fail)
    return None if allow_pickle else True


def load_diffusers_pipeline(path: Path, allow_pickle: bool = False, **components):
    """The diffusers pipeline stored at `path`, as stored (any pipeline class, fp32), with
    `components` replacing its own (a student U-Net); safetensors only unless `allow_pickle`."""
    from diffusers import DiffusionPipeline

    check_safetensors(path, allow_pickle)
    with loading(Path(path)):
        return DiffusionPipeline.from_pretrained(str(path), use_safetensors=_use_safetensors(allow_pickle),
                                                 **components)


def load_unet(pipeline_dir: Path, allow_pickle: bool = False, dtype: torch.dtype | None = None):
    """The U-Net of a pipeline dir, safetensors only unless `allow_pickle`, streamed straight into
    `dtype` (no fp32 copy of a half-precision teacher)."""
    from diffusers import UNet2DConditionModel

    check_safetensors(pipeline_dir, allow_pickle)
    with loading(Path(pipeline_dir) / "unet"):
        return load_cast(UNet2DConditionModel, Path(pipeline_dir) / "unet", dtype or torch.float32,
                         use_safetensors=_use_safetensors(allow_pickle))
