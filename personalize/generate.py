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

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .class_images_openvino import openvino_source, run_export_dir
from .data import make_grid
from .defaults import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_SEED, DEFAULT_STEPS, EVAL_RUNTIMES
from .errors import UserError
from .fileio import write_json
from .outputs import check_output, output_lock
from .pipeline import generate, save_png
from .runs import resolution_error
from .sources import Source, input_paths, load_pipeline, pick_device, pick_dtype, resolve_source
from .subjects import load_prompts, read_prompts_file


MAX_PROMPTS_BYTES = 4 * 2**20  # ~40k prompts; a larger "prompts file" is a wrong path (a log, /dev/zero)
IMAGES_JSON = "images.json"  # index of one generate call's images, written last
GRID_PNG = "grid.png"


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


def dtype_setting(src: Source, device: str | None, dtype: str | None) -> dict:
    """The torch dtype as an image setting (bf16 pixels are not fp32's), there only where it is not
    the device's default, so that images drawn before it was recorded stay valid; an export computes
    in its own precision (Source.describe). A bad device or dtype is one line here, before any drawing."""
    dev = pick_device(device)
    if src.export is not None or pick_dtype(dtype, dev) == pick_dtype(None, dev):
        return {}
    return {"dtype": dtype}  # named (not auto) and not the default


def plan(src: Source, prompts: list[str], out_dir: Path, *, images_per_prompt: int = 1, seed: int = DEFAULT_SEED,
         steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE, negative_prompt: str | None = None,
         resolution: int | None = None, extra: dict | None = None) -> list[ImageJob]:
    if not prompts:
        raise UserError("no prompts to generate")
    for name, v in (("--steps", steps), ("-n/--images-per-prompt", images_per_prompt)):
        if v <= 0:
            raise UserError(f"{name} must be positive, got {v}")
    if resolution is not None and (why := resolution_error(resolution)):
        raise UserError(f"--resolution {why}")
    resolution = resolution or src.default_resolution()
    common = {"negative_prompt": negative_prompt, "steps": steps, "guidance_scale": guidance_scale,
              "resolution": resolution, **src.describe(), **(extra or {})}
    jobs = []
    for i, template in enumerate(prompts):
        prompt = src.fill(template)
        for j in range(images_per_prompt):
            s = seed + j
            jobs.append(ImageJob(Path(out_dir) / f"p{i:02d}-s{s}.png", prompt, i, s,
                                 {"prompt": prompt, "seed": s, **common}))
    return jobs


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def is_up_to_date(job: ImageJob) -> bool:
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
                             device: str | None = None, progress: bool = True, runtime: str = "torch",
                             dtype: str | None = None) -> list[dict]:
    """The DreamBooth §4.1 protocol images of a run: its subject's 25 prompts (object or live set) x
    `images_per_prompt`, reusing every image already generated with the same settings. Returns one
    record per image: path, prompt (with the identifier), prompt_index, seed. `runtime` openvino:
    drawn on CPU through an OpenVINO export of the run kept in the personalize cache (made once per
    run and again when it changes; bf16 where the CPU has it natively, and those images are kept
    apart from torch's)."""
    if runtime not in EVAL_RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(EVAL_RUNTIMES)}, got '{runtime}'")
    src = resolve_source(Path(run_dir), scheduler=scheduler)
    if src.subject_run is None:
        raise UserError(f"{run_dir}: not a run; the protocol prompts are those of a run's subject")
    if runtime == "openvino":
        res = src.default_resolution()
        src = openvino_source(Path(run_dir), run_export_dir(Path(run_dir), res), res, "eval --runtime openvino",
                              run=src.subject_run, scheduler=scheduler)
    kind = src.subject_run["subject"].get("kind")
    if kind not in ("live", "object"):
        raise UserError(f"{run_dir}: subject kind '{kind}' has no DreamBooth prompt set (live or object)")
    jobs = plan(src, load_prompts(kind), Path(out_dir), images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                guidance_scale=guidance_scale, extra=dtype_setting(src, device, dtype))
    run_jobs(src, jobs, batch_size=batch_size, device=device, dtype=dtype, progress=progress)
    write_index(out_dir, jobs, grid=False)
    return [j.record() for j in jobs]


def collect_prompts(src: Source, prompts: list[str] | None = None, prompts_file: Path | None = None,
                    protocol: bool = False) -> list[str]:
    """Prompt templates from `--prompt`s, a `--prompts` file (one per line, # comments) and/or
    `--protocol` (the subject's 25 DreamBooth prompts); none given: the run's instance prompt."""
    out = list(prompts or [])
    if prompts_file is not None:
        out += read_prompts_file(prompts_file, "--prompts", MAX_PROMPTS_BYTES)
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
    out_dir = Path(out_dir) if out_dir else default_out_dir(src)
    check_output(out_dir, kind="dir", inputs=input_paths(src), allow_existing_dir=True)
    jobs = plan(src, templates, out_dir, images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                guidance_scale=guidance_scale, negative_prompt=negative_prompt, resolution=resolution,
                extra=dtype_setting(src, device, dtype))
    with output_lock(out_dir):
        made = run_jobs(src, jobs, batch_size=batch_size, device=device, dtype=dtype, allow_pickle=allow_pickle,
                        progress=progress)
        write_index(out_dir, jobs)
    return out_dir, jobs, made
