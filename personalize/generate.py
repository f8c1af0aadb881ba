"""Text-to-image with personalized models: a LoRA run on its base (or any base its layers fit),
a full-finetune run's own pipeline, several LoRA adapters mixed with weights (diffusers
`set_adapters`), or a plain base.

Generation is planned before any weight is loaded: every image is a (prompt, seed) job whose
settings (prompt, negative prompt, seed, steps, scheduler, guidance, resolution, base, adapters and
their weights, the identity of each run) are known from the runs' `run.json` and the flags alone.
An image already on disk whose JSON sidecar holds the same settings is reused, so identical flags
give identical files and `personalize eval` never regenerates its protocol images; the model is
loaded only when something is missing. Image j of every prompt uses seed `seed + j`, so asking
for more images per prompt later keeps the first ones.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backbones import ResolvedBase, is_pipeline_dir, resolve_base
from .defaults import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS  # noqa: F401 - re-exported
from .errors import UserError
from .pipeline import DEFAULT_SCHEDULER, SCHEDULERS, build_pipeline, generate, load_components, save_png, write_json
from .runs import base_name, read_run, run_token
from .subjects import fill_prompt, load_prompts


MAX_PROMPTS_BYTES = 4 * 2**20  # ~40k prompts; a larger "prompts file" is a wrong path (a log, /dev/zero)
IMAGES_JSON = "images.json"  # index of one generate call's images, written last
GRID_PNG = "grid.png"


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
    LoRA adapters, or a full-finetune run's own pipeline directory."""

    pipeline_dir: Path
    base_name: str
    full_run: dict | None = None  # run.json of a full-finetune run (then pipeline_dir is that run)
    export: dict | None = None  # export.json of an ONNX/OpenVINO export (then pipeline_dir is that folder)
    adapters: list[AdapterRef] = field(default_factory=list)
    lora_scale: float = 1.0
    scheduler: str = DEFAULT_SCHEDULER
    inference_precision: str | None = None  # an OpenVINO export's compute precision (fp32/bf16)

    @property
    def subject_run(self) -> dict | None:
        """The run whose token and class fill `{token}` / `{class}`: the full run, else the first adapter."""
        return self.full_run or (self.export or {}).get("run") or (self.adapters[0].run if self.adapters else None)

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


def _run_base(run: dict) -> ResolvedBase:
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


def resolve_source(run_dir: Path | None = None, adapters: list[Path] | tuple = (), adapter_weights: list[float] | None = None,
                   base: str | None = None, lora_scale: float = 1.0, scheduler: str = DEFAULT_SCHEDULER,
                   inference_precision: str | None = None) -> Source:
    """RUN_DIR (a LoRA or full run) and/or `--adapter` LoRA runs and/or `--base` -> a Source.
    A LoRA RUN_DIR is the first adapter; a full RUN_DIR is the pipeline the adapters go on.
    `inference_precision` applies to OpenVINO exports only."""
    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{scheduler}'; choose from {', '.join(SCHEDULERS)}")
    if run_dir is not None:
        from .runtimes import export_source

        exported = export_source(Path(run_dir), list(adapters), base, scheduler, inference_precision)
        if exported is not None:
            return exported
    if inference_precision is not None:
        from .runtimes import check_inference_precision

        check_inference_precision(None, inference_precision, str(run_dir or base or "the source"))
    adapter_dirs = [Path(a) for a in adapters]
    full = None
    if run_dir is not None:
        run = read_run(run_dir, finished=True)
        if run.get("method") == "full":
            full = (Path(run_dir), run)
        else:
            adapter_dirs.insert(0, Path(run_dir))
    from .adapters import ADAPTER_METHODS
    from .peft_adapters import check_mix

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
        resolved = resolve_base(base) if base is not None else _run_base(refs[0].run)
        src = Source(resolved.path, resolved.name)
    src.adapters, src.lora_scale, src.scheduler = refs, float(lora_scale), scheduler
    return src


def pick_device(device: str | None) -> torch.device:
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"--device {device}: this machine has {have} CUDA device(s) visible to this torch build")
    if d.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: not supported here (cpu, cuda, cuda:N, mps)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available in this torch build")
    return d


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA (what SD inference runs in), fp32 on CPU; bf16 is an option on both."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise UserError(f"unknown --dtype '{dtype}' (auto, fp32, fp16 or bf16)")
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use bf16 or fp32 on CPU")
    return table[dtype]


def load_pipeline(src: Source, device: torch.device | None = None, dtype: torch.dtype | None = None,
                  allow_pickle: bool = False):
    """The diffusers pipeline of `src` with its adapters loaded and weighted, on `device`. Every
    adapter is checked against the base first: one that does not fit (trained on another
    architecture) is a one-line error naming both bases, not a shape traceback from peft."""
    from .adapters import method_of
    from .peft_adapters import activate, check_lora_file, load_peft_adapter

    if src.export is not None:
        from .runtimes import load_runtime_pipeline

        return load_runtime_pipeline(src.pipeline_dir, src.export["runtime"], src.scheduler, device, dtype,
                                     src.inference_precision or "fp32")
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
    pipe = build_pipeline(comps, src.scheduler)
    for a in diffusers_refs:
        pipe.load_lora_weights(str(a.run_dir), adapter_name=a.name)
    if diffusers_refs:
        pipe.set_adapters([a.name for a in diffusers_refs],
                          adapter_weights=[a.weight * src.lora_scale for a in diffusers_refs])
    return pipe.to(dtype=dtype).to(device)


# --------------------------------------------------------------------------------------------
# Planning, reuse and writing
# --------------------------------------------------------------------------------------------
@dataclass
class ImageJob:
    path: Path
    prompt: str
    prompt_index: int
    seed: int
    settings: dict  # everything the pixels depend on; equal settings -> the file is reused

    def record(self) -> dict:
        return {"path": str(self.path), "prompt": self.prompt, "prompt_index": self.prompt_index, "seed": self.seed}


def plan(src: Source, prompts: list[str], out_dir: Path, *, images_per_prompt: int = 1, seed: int = DEFAULT_SEED,
         steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, negative_prompt: str | None = None,
         resolution: int | None = None) -> list[ImageJob]:
    if not prompts:
        raise UserError("no prompts to generate")
    for name, v in (("--steps", steps), ("-n/--images-per-prompt", images_per_prompt)):
        if v <= 0:
            raise UserError(f"{name} must be positive, got {v}")
    resolution = resolution or default_resolution(src)
    if resolution <= 0 or resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8, got {resolution}")
    common = {"negative_prompt": negative_prompt, "steps": steps, "guidance_scale": guidance_scale,
              "resolution": resolution, **src.describe()}
    jobs = []
    for i, template in enumerate(prompts):
        prompt = src.fill(template)
        for j in range(images_per_prompt):
            s = seed + j
            jobs.append(ImageJob(Path(out_dir) / f"p{i:02d}-s{s}.png", prompt, i, s,
                                 {"prompt": prompt, "seed": s, **common}))
    return jobs


def default_resolution(src: Source) -> int:
    from .backbones import native_resolution

    if src.export is not None:
        return int(src.export["resolution"])
    run = src.subject_run
    if run and run.get("resolution"):
        return int(run["resolution"])
    return native_resolution(src.pipeline_dir)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def is_up_to_date(job: ImageJob) -> bool:
    import json

    if not (job.path.is_file() and _sidecar(job.path).is_file()):
        return False
    try:
        return json.loads(_sidecar(job.path).read_text()).get("settings") == json.loads(json.dumps(job.settings))
    except (OSError, ValueError):
        return False


def run_jobs(src: Source, jobs: list[ImageJob], *, batch_size: int | None = None, device: str | None = None,
             dtype: str | None = None, allow_pickle: bool = False, progress: bool = True, pipe=None) -> int:
    """Generate every job whose image is missing or stale; returns how many were generated. The
    pipeline is loaded only if there is something to generate (or taken from `pipe`)."""
    todo = [j for j in jobs if not is_up_to_date(j)]
    if not todo:
        return 0
    dev = pick_device(device or ("cpu" if src.export is not None else None))  # exports run on the CPU
    if pipe is None:
        pipe = load_pipeline(src, dev, pick_dtype(dtype, dev), allow_pickle)
    batch_size = batch_size or (8 if dev.type == "cuda" else 2)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    todo[0].path.parent.mkdir(parents=True, exist_ok=True)
    # batches hold jobs of the same settings but prompt/seed (the pipeline takes one negative
    # prompt, size and step count per call); planned jobs already share them
    with Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        task = bar.add_task("gen", total=len(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            st = chunk[0].settings
            images = generate(pipe, [j.prompt for j in chunk], [j.seed for j in chunk], steps=st["steps"],
                              guidance_scale=st["guidance_scale"], resolution=st["resolution"],
                              negative_prompt=st["negative_prompt"])
            for job, img in zip(chunk, images):
                save_png(img, job.path, job.settings)
                write_json(_sidecar(job.path), {"image": job.path.name, "prompt_index": job.prompt_index,
                                                "settings": job.settings})
            bar.update(task, advance=len(chunk))
    return len(todo)


def write_index(out_dir: Path, jobs: list[ImageJob], grid: bool = True) -> dict[str, Path]:
    """images.json (every image of this call and its settings) and, with `grid`, grid.png."""
    from PIL import Image

    from .data import make_grid

    out_dir = Path(out_dir)
    written = {}
    if grid:
        images = [Image.open(j.path).convert("RGB") for j in jobs]
        per_prompt = len(jobs) // len({j.prompt_index for j in jobs})
        # one row per prompt when there are several images of each, else rows of four
        cols = per_prompt if per_prompt > 1 else min(len(images), 4)
        written["grid"] = save_png(make_grid(images, cols=cols), out_dir / GRID_PNG, {
            "prompts": list(dict.fromkeys(j.prompt for j in jobs)), "seeds": sorted({j.seed for j in jobs}),
            **{k: v for k, v in jobs[0].settings.items() if k not in ("prompt", "seed")}})
    written["index"] = write_json(out_dir / IMAGES_JSON, {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "images": [{**j.record(), "path": j.path.name} for j in jobs],
        "settings": {k: v for k, v in jobs[0].settings.items() if k not in ("prompt", "seed")},
    })
    return written


def generate_protocol_images(run_dir: Path, out_dir: Path, *, images_per_prompt: int = 4, seed: int = DEFAULT_SEED,
                             steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                             scheduler: str = DEFAULT_SCHEDULER, batch_size: int | None = None,
                             device: str | None = None, progress: bool = True) -> list[dict]:
    """The DreamBooth §4.1 protocol images of a run: its subject's 25 prompts (object or live set) x
    `images_per_prompt`, reusing every image already generated with the same settings. Returns one
    record per image: path, prompt (with the identifier), prompt_index, seed."""
    src = resolve_source(Path(run_dir), scheduler=scheduler)
    kind = src.subject_run["subject"].get("kind")
    if kind not in ("live", "object"):
        raise UserError(f"{run_dir}: subject kind '{kind}' has no DreamBooth prompt set (live or object)")
    jobs = plan(src, load_prompts(kind), Path(out_dir), images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                guidance_scale=guidance_scale)
    run_jobs(src, jobs, batch_size=batch_size, device=device, progress=progress)
    write_index(out_dir, jobs, grid=False)
    return [j.record() for j in jobs]


def collect_prompts(src: Source, prompts: list[str] | None = None, prompts_file: Path | None = None,
                    protocol: bool = False) -> list[str]:
    """Prompt templates from `--prompt`s, a `--prompts` file (one per line, # comments) and/or
    `--protocol` (the subject's 25 DreamBooth prompts); none given: the run's instance prompt."""
    out = list(prompts or [])
    if prompts_file is not None:
        pf = Path(prompts_file)
        if pf.exists() and not pf.is_file():
            raise UserError(f"--prompts {prompts_file}: not a regular file")
        if pf.is_file() and pf.stat().st_size > MAX_PROMPTS_BYTES:
            raise UserError(f"--prompts {prompts_file}: {pf.stat().st_size} bytes; a prompts file is at most "
                            f"{MAX_PROMPTS_BYTES // 2**20} MiB (one prompt per line)")
        try:
            lines = pf.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts {prompts_file}: unreadable ({type(e).__name__})") from None
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not out:
            raise UserError(f"--prompts {prompts_file}: no prompts in it")
    if protocol:
        run = src.subject_run
        if run is None:
            raise UserError("--protocol needs a run (its subject decides the prompt set)")
        out += load_prompts(run["subject"].get("kind", "object"))
    if not out:
        run = src.subject_run
        if run is None:
            raise UserError("no prompt: pass --prompt, --prompts FILE or --protocol")
        out = [run.get("instance_prompt") or "a {token} {class}"]
    return out


def default_out_dir(src: Source) -> Path:
    """<first run>/samples/<time>, or ./samples/<time> for a plain base: a new folder per call."""
    run_dirs = ([src.pipeline_dir] if src.full_run is not None or src.export is not None else []) + [a.run_dir for a in src.adapters]
    root = Path(run_dirs[0]) / "samples" if run_dirs else Path("samples")
    return root / time.strftime("%Y%m%d-%H%M%S")


def generate_to_dir(src: Source, templates: list[str], out_dir: Path | None = None, *, images_per_prompt: int = 1,
                    seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                    negative_prompt: str | None = None, resolution: int | None = None, batch_size: int | None = None,
                    device: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
                    progress: bool = True) -> tuple[Path, list[ImageJob], int]:
    """`personalize generate`: images (PNG with metadata + JSON sidecar each), grid.png and
    images.json in `out_dir`. Returns (out_dir, the jobs, how many images were generated now)."""
    from .outputs import check_output, output_lock

    out_dir = Path(out_dir) if out_dir else default_out_dir(src)
    check_output(out_dir, kind="dir", inputs=input_paths(src), allow_existing_dir=True)
    pick_dtype(dtype, pick_device(device))  # a bad device or dtype fails before anything is drawn
    jobs = plan(src, templates, out_dir, images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                guidance_scale=guidance_scale, negative_prompt=negative_prompt, resolution=resolution)
    with output_lock(out_dir):
        made = run_jobs(src, jobs, batch_size=batch_size, device=device, dtype=dtype, allow_pickle=allow_pickle,
                        progress=progress)
        write_index(out_dir, jobs)
    return out_dir, jobs, made


def input_paths(src: Source) -> list[Path]:
    """What a generation reads: the adapters' files and the pipeline's own entries (an output
    folder beside them, like the default RUN_DIR/samples/, is fine; one over them is not)."""
    from .adapters import ADAPTER_DIR, LORA_WEIGHTS
    from .runs import RUN_JSON

    if src.export is not None:
        from .runtimes import COMPONENTS

        return [src.pipeline_dir / n for n in (*COMPONENTS, "tokenizer", "scheduler", "export.json")]
    paths = [src.pipeline_dir / n for n in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                            "scheduler", RUN_JSON)]
    for a in src.adapters:
        paths += [a.run_dir / LORA_WEIGHTS, a.run_dir / ADAPTER_DIR, a.run_dir / RUN_JSON]
    return paths
