"""`distill eval`: BK-SDM's zero-shot MS-COCO benchmark for any backbone (Kim et al. 2023, Sec. 4):
generation (`coco.py`, resumable, sharded over `accelerate launch`), then scoring on the main
process: FID against real-image statistics, IS and CLIP score of the 256 px images
(`personalize.evaluation.fid`), and the whole-pipeline cost (`personalize.cost`).

Outputs in ``-o OUT``: ``images/im512``, ``images/im256``, ``generation.json`` (the protocol that
made them), ``gen_stats.npz`` (the generated set's FID statistics, pytorch-fid layout),
``scores.json`` and ``scores.md`` (one model-card-style table row).

Everything a run needs (prompts, real statistics or real images, the Inception file, the CLIP
model) is checked before the first image is drawn, so a 30K run never fails at the end for a
missing file.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from personalize.cost import fmt_macs, fmt_params, pipeline_cost
from personalize.errors import UserError
from personalize.fileio import write_json, write_text
from personalize.outputs import check_output, output_lock

from .benchmark_inputs import FID_NEEDS, REAL_STATS_NAME, inception_outputs, preflight
from .coco import COCO30K, COCO_ENV, IMAGES_DIR, GenerationConfig, Prompt, generate, image_paths, is_done, read_prompts

GENERATION_FILE = "generation.json"
SCORES_FILE = "scores.json"
SCORES_MD = "scores.md"
GEN_STATS = "gen_stats.npz"
# the CLIP of BK-SDM's eval_clip_score.py (open_clip ViT-g-14 laion2b_s34b_b88k), as transformers loads it
DEFAULT_BENCH_CLIP = "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"


@dataclass
class EvalConfig:
    """A `distill eval` run; each field is a flag (metadata as `distill train`'s config)."""

    base: str = field(metadata={"help": "registry name, hub id, pipeline dir, `distill train` output or full run"})
    output: str = field(metadata={"flag": ("-o", "--output"),
                                  "help": "folder: images/, generation.json, scores.json, scores.md"})
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # BK-SDM's benchmark: the 30K MS-COCO val2014 captions
    prompts: str = field(default=COCO30K, metadata={
        "help": f"coco30k (BK-SDM's metadata.csv, found via ${COCO_ENV}), a file_name,text CSV or a text file"})
    # 0: all 30K, as the paper; 5000 is the usual quick subset
    limit: int = field(default=0, metadata={"help": "only the first N prompts (0: all; same images as a full run)"})
    # pytorch-fid stats of val2014 at 256 px (BK-SDM's get_stat_mscoco_val2014.py)
    real_stats: str = field(default="", metadata={
        "help": f"pytorch-fid mu/sigma .npz of the real images (default: {REAL_STATS_NAME} beside the prompts)"})
    real_images: str = field(default="", metadata={
        "help": "folder of real images: their FID statistics are computed at --resize px and cached"})
    inception: str = field(default="", metadata={
        "help": "FID Inception TorchScript (default $PERSONALIZE_FID_INCEPTION, else the personalize cache)"})
    clip: str = field(default=DEFAULT_BENCH_CLIP, metadata={
        "help": "CLIP for the CLIP score: hub id or local dir (default %(default)s, BK-SDM's); `none` to skip"})
    # generate.py --batch_sz 1; the images do not depend on it, so bigger is only faster
    batch_size: int = field(default=4, metadata={"help": "prompts per generation batch (images do not depend on it)"})
    # one image at a time keeps 30K CLIP-g embeddings from needing GPU memory; Inception is small
    score_batch_size: int = field(default=32, metadata={"help": "images per Inception / CLIP batch"})
    # torch-fidelity's --isc default, which BK-SDM's eval_scores.sh uses
    is_splits: int = field(default=10, metadata={"help": "IS splits (default %(default)s, torch-fidelity)"})
    name: str = field(default="", metadata={"help": "label of this backbone in scores.md / `distill report`"})
    device: str = field(default="", metadata={"help": "cpu, cuda, cuda:N (default: this process's accelerate device)"})
    # scoring is a separate step: --no-generate rescores what is on disk, --no-score only draws
    generate: bool = field(default=True, metadata={"help": "generate missing images (--no-generate: score only)"})
    score: bool = field(default=True, metadata={"help": "score the images (--no-score: generate only)"})
    # project rule: safetensors weights only unless the user says so
    allow_pickle: bool = field(default=False, metadata={
        "help": "load .bin/.ckpt weights and an unknown Inception TorchScript (pickles: trusted sources only)"})

    def validate(self) -> None:
        g = self.generation
        for name in ("steps", "resolution", "resize", "batch_size", "score_batch_size", "is_splits"):
            v = getattr(g, name) if hasattr(g, name) else getattr(self, name)
            if v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.limit < 0:
            raise UserError("--limit must be >= 0")
        if g.resolution % 8:
            raise UserError(f"--resolution {g.resolution}: must be a multiple of 8 (the VAE's factor)")
        if not math.isfinite(g.guidance_scale) or g.guidance_scale < 0:
            raise UserError(f"--guidance-scale {g.guidance_scale}: must be finite and >= 0")
        if self.real_stats and self.real_images:
            raise UserError("--real-stats and --real-images: pass one")
        if not (self.generate or self.score):
            raise UserError("--no-generate and --no-score: nothing to do")


# ---------------------------------------------------------------------------- generation
def _check_generation_record(out: Path, gen: dict, base_dir: Path) -> None:
    f = out / GENERATION_FILE
    if not f.is_file():
        return
    try:
        before = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f}: unreadable; cannot tell which protocol made the images there") from None
    if not isinstance(before, dict) or not isinstance(before.get("generation"), dict):
        raise UserError(f"{f}: not a `distill eval` generation record (no 'generation' object); cannot tell which "
                        f"protocol made the images there")
    if before.get("generation") != gen:
        k = next(k for k in gen if (before.get("generation") or {}).get(k) != gen[k])
        raise UserError(f"-o {out}: its images were made with {k}={(before.get('generation') or {}).get(k)!r}, "
                        f"now {gen[k]!r}; use the same settings or another -o")
    if before.get("base_path") != str(base_dir):
        raise UserError(f"-o {out}: its images were made by {before.get('base_path')}, not {base_dir}; use another -o")


def run_generation(cfg: EvalConfig, prompts: list[Prompt], base_dir: Path, out: Path, log=print) -> int:
    """This process's share of the images (accelerate's process index / count)."""
    import torch

    from personalize.fit import process_state
    from personalize.sources import Source, load_pipeline, pick_device, pick_dtype

    state = process_state()
    rank, world = state.process_index, state.num_processes
    device = pick_device(cfg.device) if cfg.device else state.device
    dtype = pick_dtype(cfg.generation.dtype, device)
    with output_lock(out / f"shard-{rank}-of-{world}"):
        todo = [p for p in prompts[rank::world] if not is_done(out, p, cfg.generation)]
        if not todo:
            log(f"[{rank}/{world}] all {len(prompts[rank::world])} images already there")
            _record_shard(out, rank, world, [])
            return 0
        pipe = load_pipeline(Source(base_dir, str(base_dir), scheduler=cfg.generation.scheduler), device=device,
                             dtype=dtype, allow_pickle=cfg.allow_pickle)
        if cfg.generation.scheduler == "pndm":
            from diffusers import PNDMScheduler

            # SD-v1's and BK-SDM's scheduler_config.json: PLMS only (skip_prk_steps), as generate.py ran
            pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
        with torch.inference_mode():
            made = generate(pipe, prompts, out, cfg.generation, batch_size=cfg.batch_size, rank=rank, world=world,
                            log=log)
        _record_shard(out, rank, world, made)
        return len(made)


def _record_shard(out: Path, rank: int, world: int, made: list[str]) -> None:
    """shards/R-of-W.json: which images this process drew in its last run (who made what)."""
    write_json(out / "shards" / f"{rank}-of-{world}.json", {"rank": rank, "world": world, "generated": made})


# ---------------------------------------------------------------------------- scoring
def score(cfg: EvalConfig, prompts: list[Prompt], base_dir: Path, label: str, out: Path, found: dict,
          log=print) -> dict:
    """scores.json + scores.md of the images on disk (all of the prompts' must be there)."""
    from personalize.evaluation import fid as F

    g = cfg.generation
    paths = [image_paths(out, p, g)[1] for p in prompts]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(paths)} images missing in {missing[0].parent} (first: {missing[0].name}); "
                        f"run `distill eval` without --no-generate to make them")
    device, net = found["device"], found["inception"]
    log(f"scoring {len(paths)} images: Inception ({net.name})")
    pool, logits = inception_outputs(net, paths, cfg.score_batch_size)
    mu, sigma = F.feature_stats(pool)
    F.save_stats(out / GEN_STATS, mu, sigma)
    rmu, rsigma, real_src = found["real"]
    fid = F.frechet_distance(mu, sigma, rmu, rsigma)
    is_mean = is_std = None
    is_note = None
    if logits is None:
        is_note = "the Inception has no class logits (pool features only): IS needs one that returns them"
    else:
        is_mean, is_std = F.inception_score(logits, splits=min(cfg.is_splits, len(paths)))
    clip = None
    if cfg.clip.lower() != "none":
        from personalize.evaluation.evaluators import ClipEmbedder

        emb = ClipEmbedder.from_name_or_path(cfg.clip, device=device, batch_size=cfg.score_batch_size)
        log(f"CLIP score ({cfg.clip})")
        clip = F.clip_score(emb.embed_images(paths), emb.embed_texts([p.text for p in prompts]))
    cost = pipeline_cost(base_dir, g.resolution)
    doc = {
        "benchmark": "BK-SDM zero-shot MS-COCO (Kim et al. 2023): FID / IS / CLIP score at "
                     f"{g.resize} px of {g.resolution} px images",
        "name": cfg.name or label, "base": label, "base_path": str(base_dir), "n_images": len(paths),
        "prompts": cfg.prompts, "limit": cfg.limit or None,
        "fid": fid, "is": is_mean, "is_std": is_std, "is_note": is_note, "clip_score": clip,
        "inception": net.name, "real_stats": real_src, "clip_model": None if cfg.clip.lower() == "none" else cfg.clip,
        "is_splits": min(cfg.is_splits, len(paths)), "generation": g.to_json(), "cost": cost.to_json(),
    }
    write_json(out / SCORES_FILE, doc)
    write_text(out / SCORES_MD, markdown_table([doc]))
    log(markdown_table([doc]))
    return doc


# ---------------------------------------------------------------------------- the table row
COLUMNS = ("model", "FID↓", "IS↑", "CLIP score↑", "U-Net params", "whole params", "MACs/U-Net step", "images")


def _f(v, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_row(doc: dict) -> str:
    c = doc.get("cost") or {}
    cells = [doc.get("name") or doc.get("base", "?"), _f(doc.get("fid"), 2), _f(doc.get("is"), 2),
             _f(doc.get("clip_score"), 4),
             fmt_params(c["unet_params"]) if c.get("unet_params") else "-",
             fmt_params(c["pipeline_params"]) if c.get("pipeline_params") else "-",
             fmt_macs(c["unet_macs"]) if c.get("unet_macs") else "-", str(doc.get("n_images", "-"))]
    return "| " + " | ".join(cells) + " |"


def markdown_table(docs: list[dict]) -> str:
    """The model cards' table (FID, IS, CLIP score, sizes, MACs per U-Net step at the generation
    resolution, attention included)."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join(markdown_row(d) for d in docs) + "\n"


# ---------------------------------------------------------------------------- the run
def evaluate(cfg: EvalConfig, log=print) -> dict | None:
    """Generate (this process's share) and score (main process). Returns scores on the main process."""
    from personalize.fit import process_state
    from personalize.sources import resolve_base

    cfg.validate()
    prompts = read_prompts(cfg.prompts, cfg.limit or None)
    if cfg.score and len(prompts) < 2:  # the covariance of one sample: fail now, not after generating
        culprit = f"--limit {cfg.limit}" if cfg.limit else f"--prompts {cfg.prompts}"
        raise UserError(f"{culprit}: {len(prompts)} prompt, so 1 generated image; {FID_NEEDS} (or pass --no-score "
                        f"to only generate)")
    resolved = resolve_base(cfg.base)
    base_dir, label = resolved.path, resolved.name
    out = check_output(Path(cfg.output), kind="dir", inputs=[base_dir], allow_existing_dir=True)
    state = process_state()
    # the main process holds -o's writer lock throughout (a second `distill eval -o OUT` is refused
    # before it records anything); every process also locks its own shard of the images
    fresh = not out.exists()
    with output_lock(out) if state.is_main_process else contextlib.nullcontext():
        try:
            found = preflight(cfg, state.is_main_process, log)
            return _run(cfg, prompts, base_dir, label, out, found, state, log)
        except BaseException:
            if fresh and state.num_processes == 1:
                _remove_if_imageless(out)
            raise


def _remove_if_imageless(out: Path) -> None:
    """A run that created -o and failed before drawing any image (a base that does not load,
    --no-generate on nothing) leaves no folder behind, only its one-line error. A folder holding
    images is kept: a rerun resumes from them."""
    if out.is_dir() and not any(p.is_file() for p in (out / IMAGES_DIR).rglob("*")):
        shutil.rmtree(out, ignore_errors=True)


def _run(cfg: EvalConfig, prompts: list[Prompt], base_dir: Path, label: str, out: Path, found: dict, state,
         log) -> dict | None:
    log = log if state.is_main_process else (lambda *a, **k: None)
    gen = cfg.generation.to_json()
    _check_generation_record(out, gen, base_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / GENERATION_FILE, {"generation": gen, "base": label, "base_path": str(base_dir),
                                           "prompts": cfg.prompts, "config": _config_json(cfg)})
    state.wait_for_everyone()
    if cfg.generate:
        made = run_generation(cfg, prompts, base_dir, out, log=log)
        log(f"generated {made} image(s) in {out / 'images'}")
    state.wait_for_everyone()
    if not (cfg.score and state.is_main_process):
        return None
    return score(cfg, prompts, base_dir, label, out, found, log=log)


def _config_json(cfg: EvalConfig) -> dict:
    d = asdict(cfg)
    d.pop("generation")
    return d
