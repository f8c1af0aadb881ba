"""Watching a DreamBooth run while it trains, so a person can pick the step before it overfits:
sample grids (`samples/step-N.png` + `samples/index.html`), loadable step saves (`steps/step-N/`,
each a finished run dir that `generate`, `export`, `eval` and diffusers load like the final one)
and scores by step (`scores_by_step.csv` + `.png`: DINO, CLIP-I, CLIP-T as in DreamBooth section
4.1, with eval's evaluators loaded once).

Each is a `fit.Hook`: it runs between steps with the global RNG forked away and draws its images
from fixed-seed CPU generators of its own, so turning it on changes neither the trained weights nor
an exact `--resume`. Rerunning a step (after a resume) rewrites the same files with the same
content.
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Callable

from .errors import UserError
from .fileio import atomic_dir, scratch_dir, write_atomic, write_text
from .subjects import fill_prompt, list_images, load_prompts
from .subjects import read_prompts_file as read_prompt_lines

SAMPLES_DIR = "samples"
STEPS_DIR = "steps"
SCORES_CSV = "scores_by_step.csv"
SCORES_PNG = "scores_by_step.png"
INDEX_HTML = "index.html"
SAMPLE_SEED = 0  # as validation.png: image i of a grid uses seed i, so every step's grid is comparable
SCORE_SEED = 1000  # scored images: seeds 1000, 1001, ... per prompt, apart from the sample grid's
MAX_PROMPTS_BYTES = 1 << 20
SCORE_COLUMNS = ["step", "dino", "clip_i", "clip_t", "n_images"]
OUTPUT_NAMES = {SAMPLES_DIR, STEPS_DIR, SCORES_CSV, SCORES_PNG}  # what a run dir may hold besides its outputs

ComponentsFn = Callable[[dict], dict]  # fit's trained modules -> the full component dict of a pipeline


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# ------------------------------------------------------------------------------------ prompts
def default_sample_prompts(instance_prompt: str, protocol: list[str]) -> list[str]:
    """The instance prompt, one recontextualisation (the protocol's first prompt) and one property
    change (both DreamBooth prompt lists end with five: red, purple, shiny, wet, cube shaped)."""
    picks = [instance_prompt] + ([protocol[0], protocol[-5]] if len(protocol) >= 5 else protocol[:2])
    return list(dict.fromkeys(picks))


def read_prompts_file(path: str | Path, token: str, class_noun: str, flag: str = "--sample-prompts") -> list[str]:
    """`subjects.read_prompts_file` (at most 1 MiB, `#` comments) with `{token}`/`{class}` filled;
    a file with no prompt is refused."""
    prompts = [fill_prompt(p, token, class_noun) for p in read_prompt_lines(path, flag, MAX_PROMPTS_BYTES)]
    if not prompts:
        raise UserError(f"{flag} {path}: no prompts in it")
    return prompts


# ------------------------------------------------------------------------------------ samples
class Sampler:
    """`--sample-every`: one grid per step, a column per prompt, image i at seed SAMPLE_SEED + i;
    prompts, seeds and sampler settings in the PNG's text chunks; index.html rebuilt each time."""

    def __init__(self, run_dir: Path, components: ComponentsFn, prompts: list[str], *, steps: int,
                 guidance_scale: float, resolution: int, meta: dict):
        self.dir = Path(run_dir) / SAMPLES_DIR
        self.components, self.prompts = components, prompts
        self.seeds = [SAMPLE_SEED + i for i in range(len(prompts))]
        self.settings = dict(steps=steps, guidance_scale=guidance_scale, resolution=resolution)
        self.meta = meta

    def __call__(self, step: int, models: dict) -> Path:
        from .data import make_grid
        from .pipeline import build_pipeline, generate, save_png

        images = generate(build_pipeline(self.components(models)), self.prompts, self.seeds, **self.settings)
        path = save_png(make_grid(images, cols=len(images)), self.dir / f"{step_name(step)}.png",
                        {"step": step, "prompts": self.prompts, "seeds": self.seeds, "scheduler": "dpm++",
                         **self.settings, **self.meta})
        write_index(self.dir, self.prompts)
        return path


def write_index(samples_dir: Path, prompts: list[str]) -> Path:
    """samples/index.html: every step's grid, newest last, prompts as column headings."""
    grids = sorted(p for p in Path(samples_dir).glob("step-*.png"))
    head = "".join(f"<th>{html.escape(p)}</th>" for p in prompts)
    rows = "\n".join(f'<tr><td class="s">{int(g.stem[5:])}</td><td colspan="{len(prompts)}">'
                     f'<img src="{html.escape(g.name)}" loading="lazy"></td></tr>' for g in grids)
    doc = ("<!doctype html><meta charset=\"utf-8\"><title>samples by step</title>\n"
           "<style>body{font-family:sans-serif}img{width:100%}td.s{font-weight:bold;vertical-align:top}"
           "th{font-weight:normal;font-size:90%}</style>\n"
           f"<table><tr><th>step</th>{head}</tr>\n{rows}\n</table>\n")
    return write_text(Path(samples_dir) / INDEX_HTML, doc)


# ------------------------------------------------------------------------------------ step saves
class StepSaver:
    """`--save-every`: `steps/step-N/` written by `save(dest, models, step)` into a temp folder
    and renamed into place (a run killed mid-save leaves no half folder)."""

    def __init__(self, run_dir: Path, save: Callable[[Path, dict, int], None]):
        self.dir = Path(run_dir) / STEPS_DIR
        self.save = save

    def __call__(self, step: int, models: dict) -> Path:
        dest = self.dir / step_name(step)
        with atomic_dir(dest, replace=True) as tmp:
            self.save(tmp, models, step)
        return dest


def saved_steps(run_dir: Path) -> list[int]:
    d = Path(run_dir) / STEPS_DIR
    return sorted(int(p.name[5:]) for p in d.glob("step-*") if p.is_dir() and p.name[5:].isdigit()) \
        if d.is_dir() else []


# ------------------------------------------------------------------------------------ scores
class Scorer:
    """`--score-every`: `score_prompts` x `score_images` fixed-seed images scored against the real
    photos with eval's `score_subject` (DINO, CLIP-I mean cosines to the photos; CLIP-T to the
    prompt without its identifier), one row per step in scores_by_step.csv, plot rebuilt each time."""

    def __init__(self, run_dir: Path, components: ComponentsFn, prompts: list[str], images_per_prompt: int, *,
                 real_images: list[Path], token: str, subject: str, dino, clip, steps: int,
                 guidance_scale: float, resolution: int):
        self.run_dir = Path(run_dir)
        self.components, self.prompts, self.n = components, prompts, images_per_prompt
        self.real, self.token, self.subject = real_images, token, subject
        self.dino, self.clip = dino, clip
        self.settings = dict(steps=steps, guidance_scale=guidance_scale, resolution=resolution)
        self.rows = {r["step"]: r for r in read_scores(self.run_dir / SCORES_CSV)}

    def __call__(self, step: int, models: dict) -> dict:
        from .evaluation.protocol import GeneratedImage, score_subject
        from .pipeline import build_pipeline, generate

        prompts = [p for p in self.prompts for _ in range(self.n)]
        seeds = [SCORE_SEED + k for _ in self.prompts for k in range(self.n)]
        images = generate(build_pipeline(self.components(models)), prompts, seeds, **self.settings)
        with scratch_dir(self.run_dir / ".scoring") as tmp:
            gen = []
            for i, (img, prompt, seed) in enumerate(zip(images, prompts, seeds)):
                img.save(tmp / f"{i:04d}.png")
                gen.append(GeneratedImage(tmp / f"{i:04d}.png", prompt, i // self.n, self.subject, seed))
            scores = score_subject(self.real, gen, dino=self.dino, clip=self.clip, token=self.token)
        row = {"step": step, **{m: scores.summary[m] for m in ("dino", "clip_i", "clip_t")},
               "n_images": scores.summary["n_images"]}
        self.rows[step] = row
        rows = [self.rows[s] for s in sorted(self.rows)]
        write_text(self.run_dir / SCORES_CSV, scores_csv(rows))
        write_atomic(self.run_dir / SCORES_PNG, scores_png(rows))
        return row


def scores_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SCORE_COLUMNS)
    for r in rows:
        w.writerow([r["step"], *(f"{r[m]:.6f}" for m in ("dino", "clip_i", "clip_t")), r["n_images"]])
    return buf.getvalue()


def read_scores(path: Path) -> list[dict]:
    """Rows of a scores_by_step.csv (empty when there is none, e.g. a fresh run)."""
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="") as f:
        return [{"step": int(r["step"]), "dino": float(r["dino"]), "clip_i": float(r["clip_i"]),
                 "clip_t": float(r["clip_t"]), "n_images": int(r["n_images"])} for r in csv.DictReader(f)]


def best_step(rows: list[dict], min_clip_t: float) -> dict | None:
    """The step with the highest DINO (subject fidelity) among those whose CLIP-T (prompt
    fidelity) is at least `min_clip_t`; the earlier step on a tie; None when no step qualifies."""
    ok = [r for r in rows if math.isfinite(r["dino"]) and r["clip_t"] >= min_clip_t]
    return max(sorted(ok, key=lambda r: r["step"]), key=lambda r: r["dino"], default=None)


def scores_png(rows: list[dict]) -> bytes:
    """A line plot (PIL, as the report's: matplotlib is not a dependency) of DINO, CLIP-I and CLIP-T
    against the step, on one shared axis."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    w, h, left, top, right, bottom = 640, 360, 56, 30, 110, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [r[m] for r in rows for m in ("dino", "clip_i", "clip_t") if math.isfinite(r[m])]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo, hi)
    steps = [r["step"] for r in rows]
    s0, s1 = (min(steps), max(steps)) if steps else (0, 1)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(step, v):
        return (left + (step - s0) / (s1 - s0) * (w - left - right),
                top + (hi - v) / (hi - lo) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for frac in (0, 0.5, 1):
        v = lo + frac * (hi - lo)
        _, y = xy(s0, v)
        d.text((4, y - 7), f"{v:.3f}", fill="black", font=font)
    for s in sorted(set(steps)):
        x, _ = xy(s, lo)
        d.text((x - 12, h - bottom + 6), str(s), fill="black", font=font)
    for i, (m, label, color) in enumerate((("dino", "DINO", (31, 119, 180)), ("clip_i", "CLIP-I", (255, 127, 14)),
                                           ("clip_t", "CLIP-T", (44, 160, 44)))):
        pts = [xy(r["step"], r[m]) for r in rows if math.isfinite(r[m])]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.line([w - right + 10, top + 10 + 18 * i, w - right + 30, top + 10 + 18 * i], fill=color, width=3)
        d.text((w - right + 36, top + 3 + 18 * i), label, fill="black", font=font)
    d.text((left, 8), "scores by step", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def summary(run_dir: Path, min_clip_t: float, final_step: int) -> dict:
    """What run.json records about the monitoring: saved steps, sample grids, the best step."""
    run_dir = Path(run_dir)
    out: dict = {}
    steps = saved_steps(run_dir)
    if steps:
        out["saved_steps"] = steps
    grids = sorted((run_dir / SAMPLES_DIR).glob("step-*.png")) if (run_dir / SAMPLES_DIR).is_dir() else []
    if grids:
        out["sample_steps"] = [int(g.stem[5:]) for g in grids]
    rows = read_scores(run_dir / SCORES_CSV)
    if rows:
        best = best_step(rows, min_clip_t)
        if best is not None:
            best = {**best, "min_clip_t": min_clip_t, "dir": "." if best["step"] == final_step else
                    f"{STEPS_DIR}/{step_name(best['step'])}" if best["step"] in steps else None}
        out["best_step"] = best
    return out


def describe_best(info: dict, min_clip_t: float) -> str | None:
    if "best_step" not in info:
        return None
    b = info["best_step"]
    if b is None:
        return f"no scored step reached CLIP-T >= {min_clip_t:g}; lower --min-clip-t (see {SCORES_CSV})"
    where = {".": "the final weights", None: "not saved: give --save-every the --score-every value"}.get(
        b["dir"], b["dir"])
    return (f"best step {b['step']} ({where}): DINO {b['dino']:.3f}, CLIP-I {b['clip_i']:.3f}, "
            f"CLIP-T {b['clip_t']:.3f} (CLIP-T >= {min_clip_t:g})")


# ------------------------------------------------------------------------------------ wiring
def sample_prompts(p) -> list[str]:
    """--sample-prompts FILE, else the defaults of `default_sample_prompts` for the subject."""

    cfg, subject = p.cfg, p.subject
    if cfg.sample_prompts:
        return read_prompts_file(cfg.sample_prompts, cfg.prompt_token(), subject.class_noun)
    protocol = [fill_prompt(t, cfg.prompt_token(), subject.class_noun) for t in load_prompts(subject.kind)]
    return default_sample_prompts(p.instance_prompt, protocol)


def check_evaluators(cfg) -> None:
    """--score-every's evaluators found locally (or fetchable), checked before anything is loaded
    or written: a missing one is eval's one line, naming --dino/--clip."""
    if cfg.score_every:
        from .evaluation.evaluators import resolve_model

        resolve_model(cfg.dino, what="DINO", flag="--dino")
        resolve_model(cfg.clip, what="CLIP", flag="--clip")


def load_evaluators(cfg, device):
    """eval's DINO and CLIP embedders, loaded once for the whole run (None without --score-every)."""
    if not cfg.score_every:
        return None
    from .evaluation.evaluators import ClipEmbedder, DinoEmbedder

    return DinoEmbedder.from_name_or_path(cfg.dino, device=device), ClipEmbedder.from_name_or_path(cfg.clip, device=device)


def make_hooks(p, components: ComponentsFn, save_step: Callable[[Path, dict, int], None], evaluators) -> list:
    """The fit.Hooks a run's flags ask for (`p`: dreambooth.Prepared). Order within a step: save,
    then samples, then scores (a saved step is on disk before anything slower can fail)."""
    from .fit import Hook

    cfg = p.cfg
    gen = dict(steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale, resolution=p.resolution)
    hooks = []
    if cfg.save_every:
        hooks.append(Hook("save", cfg.save_every, StepSaver(p.run_dir, save_step), skip_last=True))
    if cfg.sample_every:
        meta = {"base": p.base.name, "method": cfg.method}
        hooks.append(Hook("samples", cfg.sample_every, Sampler(p.run_dir, components, sample_prompts(p), meta=meta,
                                                               **gen), at_end=True))
    if cfg.score_every:
        from .evaluation.protocol import protocol_prompts

        dino, clip = evaluators or (None, None)  # None on the processes that never run hooks
        prompts = protocol_prompts(p.subject.kind, cfg.prompt_token(), p.subject.class_noun)
        # spread over the list: recontextualisations first, property changes last in both sets
        picked = [prompts[round(i * (len(prompts) - 1) / max(cfg.score_prompts - 1, 1))]
                  for i in range(min(cfg.score_prompts, len(prompts)))]
        hooks.append(Hook("scores", cfg.score_every, Scorer(
            p.run_dir, components, list(dict.fromkeys(picked)), cfg.score_images,
            real_images=list_images(p.subject.image_dir), token=cfg.prompt_token(), subject=p.subject.name,
            dino=dino, clip=clip, **gen), at_end=True))
    return hooks
