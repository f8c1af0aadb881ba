"""The DreamBooth evaluation protocol (Ruiz et al. 2023, §4.1), as the BK-SDM paper's DreamBooth
table uses it: per subject, its 25 prompts (object or live set) x 4 images = 100 generated images
(30 subjects -> 3,000 images), scored with

- DINO: mean cosine between the DINO ViT-S/16 CLS embeddings of each generated image and every
  real photo of the subject, averaged over all (generated, real) pairs;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine between each generated image's CLIP image embedding and the CLIP text
  embedding of its prompt, with the identifier token removed (`metrics.strip_identifier`);
- a "real images" reference: DINO / CLIP-I of each real photo against the subject's *other*
  photos (the paper's upper bound).

`score_subject` computes per-image, per-prompt and per-subject scores; `write_scores` writes them
(`scores_images.csv`, `scores_prompts.csv`, `scores.md`, then `scores.json` last, so a
`scores.json` on disk always means a complete evaluation); `evaluate_run` glues generation,
scoring and writing for one training run. `report.py` gathers many evaluated runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from ..fileio import write_atomic
from .metrics import clip_t, mean_cosine_to_set, nanmean, real_vs_real, strip_identifier
from ..runs import base_name, find_run_dirs, read_run, run_token
from ..subjects import fill_prompt, find_subject, list_images, load_prompts, load_subjects

PROTOCOL = "DreamBooth §4.1 (Ruiz et al. 2023): 25 prompts x N images per subject; DINO, CLIP-I, CLIP-T"
SCORES_JSON = "scores.json"
SCORES_IMAGES_CSV = "scores_images.csv"
SCORES_PROMPTS_CSV = "scores_prompts.csv"
SCORES_MD = "scores.md"
EVAL_DIR = "eval"  # inside a run dir: protocol images and scores
METRICS = ("dino", "clip_i", "clip_t")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
SCORES_VERSION = 1


@dataclass(frozen=True)
class GeneratedImage:
    """One protocol image: where it is and the prompt (with the identifier) it was generated from."""

    path: Path
    prompt: str
    prompt_index: int
    subject: str
    seed: int | None = None

    @classmethod
    def from_record(cls, record: dict, subject: str) -> "GeneratedImage":
        try:
            return cls(Path(record["path"]), str(record["prompt"]), int(record["prompt_index"]),
                       str(record.get("subject", subject)), record.get("seed"))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"generated image record {record!r} lacks path/prompt/prompt_index ({e})") from None


@dataclass
class SubjectScores:
    subject: str
    token: str
    images: list[dict]  # one row per generated image
    prompts: list[dict]  # one row per prompt (means over its images)
    real_images: list[dict]  # one row per real photo: mean similarity to the other photos
    summary: dict  # per-subject means: dino, clip_i, clip_t, n_images, n_prompts
    real_reference: dict  # dino, clip_i over real-vs-real pairs, n_real
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Scoring one subject
# --------------------------------------------------------------------------------------------
def score_subject(real_images: Sequence[Path], generated: Sequence[GeneratedImage], *, dino, clip,
                  token: str) -> SubjectScores:
    """Score one subject's generated images against its real photos (DreamBooth §4.1).

    `dino` / `clip` are `evaluators.DinoEmbedder` / `ClipEmbedder` (or anything with the same
    `embed_images` / `embed_texts`). Per-image DINO and CLIP-I are means over all real photos, so
    the subject mean over images equals the mean over all (generated, real) pairs."""
    if not real_images:
        raise UserError("no real images to score against")
    if not generated:
        raise UserError("no generated images to score")
    subjects = {g.subject for g in generated}
    if len(subjects) > 1:
        raise UserError(f"generated images of several subjects in one scoring call: {sorted(subjects)}")
    subject = subjects.pop()
    missing = [str(g.path) for g in generated if not Path(g.path).is_file()]
    if missing:
        raise UserError(f"{len(missing)} generated image(s) missing, e.g. {missing[0]}")

    real_paths = [Path(p) for p in real_images]
    gen_paths = [Path(g.path) for g in generated]
    real_dino, gen_dino = dino.embed_images(real_paths), dino.embed_images(gen_paths)
    real_clip, gen_clip = clip.embed_images(real_paths), clip.embed_images(gen_paths)

    # one text embedding per distinct prompt: 25 forward passes, not 100
    clip_prompts = [strip_identifier(g.prompt, token) for g in generated]
    distinct = sorted(set(clip_prompts))
    text_emb = clip.embed_texts(distinct)
    row_of = {p: i for i, p in enumerate(distinct)}
    per_image_text = text_emb[[row_of[p] for p in clip_prompts]]

    dino_scores = mean_cosine_to_set(gen_dino, real_dino).tolist()
    clip_i_scores = mean_cosine_to_set(gen_clip, real_clip).tolist()
    clip_t_scores = clip_t(gen_clip, per_image_text).tolist()

    images = [
        {"subject": subject, "prompt_index": g.prompt_index, "prompt": g.prompt, "clip_prompt": cp,
         "path": str(g.path), "seed": g.seed, "dino": d, "clip_i": ci, "clip_t": ct}
        for g, cp, d, ci, ct in zip(generated, clip_prompts, dino_scores, clip_i_scores, clip_t_scores)
    ]
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for row in images:
        by_prompt[row["prompt_index"]].append(row)
    prompts = [
        {"subject": subject, "prompt_index": i, "prompt": rows[0]["prompt"], "clip_prompt": rows[0]["clip_prompt"],
         "n_images": len(rows), **{m: nanmean([r[m] for r in rows]) for m in METRICS}}
        for i, rows in sorted(by_prompt.items())
    ]
    summary = {"n_images": len(images), "n_prompts": len(prompts),
               **{m: nanmean([r[m] for r in images]) for m in METRICS}}

    rr_dino, rr_clip = real_vs_real(real_dino).tolist(), real_vs_real(real_clip).tolist()
    real_rows = [{"subject": subject, "path": str(p), "dino": d, "clip_i": c}
                 for p, d, c in zip(real_paths, rr_dino, rr_clip)]
    real_reference = {"n_real": len(real_paths), "dino": nanmean(rr_dino), "clip_i": nanmean(rr_clip)}
    return SubjectScores(subject, token, images, prompts, real_rows, summary, real_reference)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6f}"
    return "" if v is None else str(v)


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    # NaN is not JSON; an undefined score (1-photo reference) is null
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def md_num(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _relative(rows: list[dict], root: Path) -> list[dict]:
    """Paths relative to the scores directory where possible, so a moved run dir stays readable."""
    out = []
    for r in rows:
        p = Path(r["path"])
        try:
            rel = str(p.resolve().relative_to(root.resolve()))
        except ValueError:
            rel = str(p)
        out.append({**r, "path": rel})
    return out


IMAGE_COLUMNS = ["subject", "prompt_index", "prompt", "clip_prompt", "path", "seed", "dino", "clip_i", "clip_t"]
PROMPT_COLUMNS = ["subject", "prompt_index", "prompt", "clip_prompt", "n_images", "dino", "clip_i", "clip_t"]


def write_scores(out_dir: Path, scores: SubjectScores, *, settings: dict, evaluators: dict,
                 run: dict | None = None) -> dict[str, Path]:
    """Write scores_images.csv, scores_prompts.csv, scores.md and, last, scores.json into
    `out_dir`, each atomically. Returns {file kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, real = _relative(scores.images, out_dir), _relative(scores.real_images, out_dir)
    run_info = run_summary(run) if run else {}
    doc = {
        "version": SCORES_VERSION,
        "protocol": PROTOCOL,
        "subject": run_info.get("subject") or {"name": scores.subject},
        "run": {k: run_info[k] for k in ("method", "base") if k in run_info},
        "scores": scores.summary,
        "real_reference": scores.real_reference,
        "settings": {**settings, "token": scores.token,
                     "clip_t_prompt": "prompt with the identifier token removed (metrics.strip_identifier)"},
        "evaluators": evaluators,
        "prompts": scores.prompts,
        "images": images,
        "real_images": real,
    }
    paths = {
        "images_csv": write_atomic(out_dir / SCORES_IMAGES_CSV, csv_text(images, IMAGE_COLUMNS)),
        "prompts_csv": write_atomic(out_dir / SCORES_PROMPTS_CSV, csv_text(scores.prompts, PROMPT_COLUMNS)),
        "markdown": write_atomic(out_dir / SCORES_MD, _scores_markdown(doc)),
    }
    paths["json"] = write_atomic(out_dir / SCORES_JSON, json.dumps(_json_safe(doc), indent=2) + "\n")
    return paths


def _scores_markdown(doc: dict) -> str:
    subj, run, s, rr = doc["subject"], doc["run"], doc["scores"], doc["real_reference"]
    ev, st = doc["evaluators"], doc["settings"]
    title = subj.get("name", "?")
    if subj.get("class_noun"):
        title += f" ({subj['class_noun']}, {subj.get('kind', '?')})"
    if run:
        title += f" — {run.get('base', '?')} / {run.get('method', '?')}"
    lines = [
        f"# Subject fidelity: {title}", "",
        f"{PROTOCOL}.", "",
        f"{s['n_prompts']} prompts, {s['n_images']} generated images, {rr['n_real']} real images. "
        f"Evaluators: DINO `{ev.get('dino', {}).get('name', '?')}`, CLIP `{ev.get('clip', {}).get('name', '?')}`. "
        f"CLIP-T uses each prompt with the identifier `{st.get('token')}` removed.", "",
        "| | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|",
        f"| generated | {md_num(s['dino'])} | {md_num(s['clip_i'])} | {md_num(s['clip_t'])} |",
        f"| real images (reference, self pairs excluded) | {md_num(rr['dino'])} | {md_num(rr['clip_i'])} | – |",
        "", "## Per prompt", "",
        "| # | prompt (as scored by CLIP-T) | images | DINO | CLIP-I | CLIP-T |", "|---:|---|---:|---:|---:|---:|",
    ]
    for p in doc["prompts"]:
        lines.append(f"| {p['prompt_index']} | {p['clip_prompt']} | {p['n_images']} | {md_num(p['dino'])} | "
                     f"{md_num(p['clip_i'])} | {md_num(p['clip_t'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# One run: generate (or reuse) the protocol images, score, write
# --------------------------------------------------------------------------------------------
def real_images_for_run(run: dict, data_dir: str | None = None) -> list[Path]:
    """The subject's real photos. Dataset subjects: `--data-dir`, else $PERSONALIZE_DATA, else the
    folder the run was trained on (run.json `subject.image_dir`), else ./data/dreambooth/dataset
    (the lookup of `personalize.subjects`). A folder of the user's own photos: `--data-dir`/<name>
    when that exists, else the folder the run was trained on."""

    subj = run["subject"]
    name = subj["name"]
    trained_on = Path(subj["image_dir"]).expanduser() if subj.get("image_dir") else None
    usable = trained_on if trained_on and trained_on.is_dir() and list_images(trained_on) else None
    if name not in load_subjects():
        own = Path(data_dir).expanduser() / name if data_dir else None
        if own and own.is_dir() and list_images(own):
            return list_images(own)
        if usable:
            return list_images(usable)
        raise UserError(f"subject '{name}': the photos the run was trained on ({trained_on}) are gone; "
                        f"pass their parent folder with --data-dir")
    if usable and not (data_dir or os.environ.get("PERSONALIZE_DATA")):
        return list_images(usable)
    return list_images(find_subject(name, data_dir, class_noun=subj.get("class_noun")).image_dir)


def protocol_prompts(kind: str, token: str, class_noun: str) -> list[str]:
    """The 25 DreamBooth evaluation prompts of a subject (object or live set), filled in."""

    if kind not in ("live", "object"):
        raise UserError(f"unknown subject kind '{kind}' (live or object)")
    return [fill_prompt(t, token, class_noun) for t in load_prompts(kind)]


GenerateFn = Callable[..., list[dict]]


def _default_generator() -> GenerateFn:
    from ..generate import generate_protocol_images

    return generate_protocol_images


def evaluate_run(run_dir: Path, *, dino, clip, data_dir: str | None = None, images_per_prompt: int = 4,
                 seed: int | None = None, generation: dict | None = None, out_dir: Path | None = None,
                 generate: GenerateFn | None = None) -> dict[str, Path]:
    """Evaluate one training run by the DreamBooth §4.1 protocol: generate (or reuse) its protocol
    images with `generate(run_dir, images_dir, images_per_prompt=..., [seed=...], **generation)`
    (default: `personalize.generate.generate_protocol_images`), score them against the subject's
    real photos, write the score files into `out_dir` (default RUN_DIR/eval)."""
    if images_per_prompt <= 0:
        raise UserError(f"--images-per-prompt must be positive, got {images_per_prompt}")
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / EVAL_DIR
    real = real_images_for_run(run, data_dir)  # before generating: a missing photo folder fails fast
    generate = generate or _default_generator()
    kwargs = {"images_per_prompt": images_per_prompt, **({"seed": seed} if seed is not None else {}),
              **{k: v for k, v in (generation or {}).items() if v is not None}}
    images_dir = out_dir / "images"
    records = generate(run_dir, images_dir, **kwargs)
    subject = run["subject"]["name"]
    generated = []
    for r in records:
        g = GeneratedImage.from_record(r, subject)
        if not g.path.is_absolute() and not g.path.exists():  # a path relative to the images dir
            g = GeneratedImage(images_dir / g.path, g.prompt, g.prompt_index, g.subject, g.seed)
        generated.append(g)
    token = run_token(run)
    scores = score_subject(real, generated, dino=dino, clip=clip, token=token)
    settings = {"images_per_prompt": images_per_prompt, "seed": seed, **(generation or {}),
                "n_real": len(real), "real_dir": str(real[0].parent)}
    evaluators = {"dino": {"name": dino.name, "source": getattr(dino, "source", None)},
                  "clip": {"name": clip.name, "source": getattr(clip, "source", None)}}
    return write_scores(out_dir, scores, settings=settings, evaluators=evaluators, run=run)


def evaluate_paths(paths: Sequence[Path], *, dino_name: str, clip_name: str, batch_size: int = 32,
                   device: str | None = None, data_dir: str | None = None, images_per_prompt: int = 4,
                   seed: int | None = None, generation: dict | None = None,
                   echo: Callable[[str], None] = print) -> list[dict[str, Path]]:
    """`personalize eval`: every run dir given (or found below a given dir) is evaluated, with the
    evaluator models loaded once for all of them. Runs are found, and evaluators loaded, before
    any image is generated, so a typo or a missing model fails in seconds, not after generation."""
    from .evaluators import ClipEmbedder, DinoEmbedder

    run_dirs = [r for p in paths for r in find_run_dirs(Path(p))]
    for r in run_dirs:
        read_run(r)
    from ..sources import pick_device

    device = str(pick_device(device))  # a device this torch does not have: one line, before any load
    dino = DinoEmbedder.from_name_or_path(dino_name, device=device, batch_size=batch_size)
    clip = ClipEmbedder.from_name_or_path(clip_name, device=device, batch_size=batch_size)
    results = []
    for r in run_dirs:
        written = evaluate_run(r, dino=dino, clip=clip, data_dir=data_dir, images_per_prompt=images_per_prompt,
                               seed=seed, generation=generation)
        doc = json.loads(written["json"].read_text())
        s, rr = doc["scores"], doc["real_reference"]
        echo(f"{r}: DINO {md_num(s['dino'])}  CLIP-I {md_num(s['clip_i'])}  CLIP-T {md_num(s['clip_t'])}  "
             f"(real images: DINO {md_num(rr['dino'])}, CLIP-I {md_num(rr['clip_i'])}; "
             f"{s['n_images']} images) -> {written['markdown']}")
        results.append(written)
    return results


def run_summary(run: dict) -> dict:
    subj = run.get("subject") or {}
    return {
        "method": run.get("method", "?"),
        "base": base_name(run),
        "subject": {k: subj.get(k) for k in ("name", "class_noun", "kind")},
    }
