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
scoring and writing for one training run; `build_report` gathers every evaluated run below a
directory into `report.md` / `report.csv` / `report.png`.
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

from .errors import UserError
from .fileio import write_atomic
from .metrics import clip_t, mean_cosine_to_set, nanmean, real_vs_real, strip_identifier
from .runs import RUN_JSON, base_name, find_run_dirs, read_run, run_token

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


def _csv_text(rows: list[dict], columns: Sequence[str]) -> str:
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


def _md_num(v: float | None) -> str:
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
    run_info = _run_summary(run) if run else {}
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
        "images_csv": write_atomic(out_dir / SCORES_IMAGES_CSV, _csv_text(images, IMAGE_COLUMNS)),
        "prompts_csv": write_atomic(out_dir / SCORES_PROMPTS_CSV, _csv_text(scores.prompts, PROMPT_COLUMNS)),
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
        f"| generated | {_md_num(s['dino'])} | {_md_num(s['clip_i'])} | {_md_num(s['clip_t'])} |",
        f"| real images (reference, self pairs excluded) | {_md_num(rr['dino'])} | {_md_num(rr['clip_i'])} | – |",
        "", "## Per prompt", "",
        "| # | prompt (as scored by CLIP-T) | images | DINO | CLIP-I | CLIP-T |", "|---:|---|---:|---:|---:|---:|",
    ]
    for p in doc["prompts"]:
        lines.append(f"| {p['prompt_index']} | {p['clip_prompt']} | {p['n_images']} | {_md_num(p['dino'])} | "
                     f"{_md_num(p['clip_i'])} | {_md_num(p['clip_t'])} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# One run: generate (or reuse) the protocol images, score, write
# --------------------------------------------------------------------------------------------
def real_images_for_run(run: dict, data_dir: str | None = None) -> list[Path]:
    """The subject's real photos. Dataset subjects: `--data-dir`, else $PERSONALIZE_DATA, else the
    folder the run was trained on (run.json `subject.image_dir`), else ./data/dreambooth/dataset
    (the lookup of `personalize.subjects`). A folder of the user's own photos: `--data-dir`/<name>
    when that exists, else the folder the run was trained on."""
    from .subjects import find_subject, list_images, load_subjects

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
    from .subjects import fill_prompt, load_prompts

    if kind not in ("live", "object"):
        raise UserError(f"unknown subject kind '{kind}' (live or object)")
    return [fill_prompt(t, token, class_noun) for t in load_prompts(kind)]


GenerateFn = Callable[..., list[dict]]


def _default_generator() -> GenerateFn:
    from .generate import generate_protocol_images

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
    dino = DinoEmbedder.from_name_or_path(dino_name, device=device, batch_size=batch_size)
    clip = ClipEmbedder.from_name_or_path(clip_name, device=device, batch_size=batch_size)
    results = []
    for r in run_dirs:
        written = evaluate_run(r, dino=dino, clip=clip, data_dir=data_dir, images_per_prompt=images_per_prompt,
                               seed=seed, generation=generation)
        doc = json.loads(written["json"].read_text())
        s, rr = doc["scores"], doc["real_reference"]
        echo(f"{r}: DINO {_md_num(s['dino'])}  CLIP-I {_md_num(s['clip_i'])}  CLIP-T {_md_num(s['clip_t'])}  "
             f"(real images: DINO {_md_num(rr['dino'])}, CLIP-I {_md_num(rr['clip_i'])}; "
             f"{s['n_images']} images) -> {written['markdown']}")
        results.append(written)
    return results


def _run_summary(run: dict) -> dict:
    subj = run.get("subject") or {}
    return {
        "method": run.get("method", "?"),
        "base": base_name(run),
        "subject": {k: subj.get(k) for k in ("name", "class_noun", "kind")},
    }


# --------------------------------------------------------------------------------------------
# Report over many runs
# --------------------------------------------------------------------------------------------
REPORT_MD, REPORT_CSV, REPORT_PNG = "report.md", "report.csv", "report.png"
REPORT_COLUMNS = ["row", "base", "method", "subject", "kind", "n_subjects", "n_images", "dino", "clip_i", "clip_t",
                  "dino_model", "clip_model", "scores"]


def _find_run_json(scores_path: Path, root: Path) -> Path | None:
    d = scores_path.parent
    root = root.resolve()
    while True:
        if (d / RUN_JSON).is_file():
            return d / RUN_JSON
        if d.resolve() == root or d.parent == d:
            return None
        d = d.parent


def collect_scores(runs_dir: Path) -> list[dict]:
    """One row per evaluated run below `runs_dir` (every scores.json), described by its run.json."""
    runs_dir = Path(runs_dir)
    rows = []
    for sp in sorted(runs_dir.rglob(SCORES_JSON)):
        if any(part.startswith(".") for part in sp.relative_to(runs_dir).parts):
            continue
        try:
            doc = json.loads(sp.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a foreign or damaged file is not an evaluation; ours are written atomically
        if not isinstance(doc, dict) or "scores" not in doc:
            continue
        rj = _find_run_json(sp, runs_dir)
        info = _run_summary(json.loads(rj.read_text())) if rj else {
            "method": doc.get("run", {}).get("method", "?"), "base": doc.get("run", {}).get("base", "?"),
            "subject": doc.get("subject", {})}
        s, rr, ev = doc["scores"], doc.get("real_reference", {}), doc.get("evaluators", {})
        rows.append({
            "row": "run", "base": info["base"], "method": info["method"],
            "subject": info["subject"].get("name") or "?", "kind": info["subject"].get("kind") or "",
            "n_images": s.get("n_images"), **{m: _num(s.get(m)) for m in METRICS},
            "real_dino": _num(rr.get("dino")), "real_clip_i": _num(rr.get("clip_i")),
            "dino_model": ev.get("dino", {}).get("name", ""), "clip_model": ev.get("clip", {}).get("name", ""),
            "scores": str(sp.relative_to(runs_dir)),
        })
    return rows


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _group_order(rows: list[dict]) -> list[tuple[str, str]]:
    from .backbones import BACKBONES
    from .config import METHODS

    base_rank = {b: i for i, b in enumerate(BACKBONES)}
    method_rank = {m: i for i, m in enumerate(METHODS)}
    keys = {(r["base"], r["method"]) for r in rows}
    return sorted(keys, key=lambda k: (base_rank.get(k[0], len(base_rank)), k[0],
                                       method_rank.get(k[1], len(method_rank)), k[1]))


def summarize(rows: list[dict]) -> tuple[list[dict], dict]:
    """Means per base x method (over subjects; repeated runs of one subject are averaged first so
    every subject weighs the same, as in the paper's 30-subject means), and the real-images row
    (over distinct subjects)."""
    means = []
    for base, method in _group_order(rows):
        per_subject: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            if (r["base"], r["method"]) == (base, method):
                per_subject[r["subject"]].append(r)
        subj_means = [{m: nanmean([r[m] for r in rs]) for m in METRICS} for rs in per_subject.values()]
        means.append({"row": "mean", "base": base, "method": method, "subject": "", "kind": "",
                      "n_subjects": len(per_subject),
                      "n_images": sum(r["n_images"] or 0 for rs in per_subject.values() for r in rs),
                      **{m: nanmean([s[m] for s in subj_means]) for m in METRICS}})
    real_by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        real_by_subject[r["subject"]].append(r)
    real = {"row": "real", "base": "real images", "method": "", "subject": "", "kind": "",
            "n_subjects": len(real_by_subject), "n_images": "",
            "dino": nanmean([nanmean([r["real_dino"] for r in rs]) for rs in real_by_subject.values()]),
            "clip_i": nanmean([nanmean([r["real_clip_i"] for r in rs]) for rs in real_by_subject.values()]),
            "clip_t": math.nan}
    return means, real


def build_report(runs_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Gather every evaluated run below `runs_dir` into report.md, report.csv (subject x base x
    method rows, then the means per base/method and the real-images row, like the BK-SDM paper's
    DreamBooth table) and report.png (grouped bars). Written atomically into `out_dir`
    (default `runs_dir`)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no such directory")
    rows = collect_scores(runs_dir)
    if not rows:
        raise UserError(f"{runs_dir}: no {SCORES_JSON} below it; run `personalize eval RUN_DIR` first")
    order = {k: i for i, k in enumerate(_group_order(rows))}
    rows.sort(key=lambda r: (order[(r["base"], r["method"])], r["subject"], r["scores"]))
    means, real = summarize(rows)
    out_dir = Path(out_dir) if out_dir else runs_dir
    return {
        "csv": write_atomic(out_dir / REPORT_CSV, _csv_text(rows + means + [real], REPORT_COLUMNS)),
        "markdown": write_atomic(out_dir / REPORT_MD, _report_markdown(rows, means, real)),
        "png": write_atomic(out_dir / REPORT_PNG, _report_png(means, real)),
    }


def _report_markdown(rows: list[dict], means: list[dict], real: dict) -> str:
    evaluators = sorted({(r["dino_model"], r["clip_model"]) for r in rows})
    ev_text = "; ".join(f"DINO `{d}`, CLIP `{c}`" for d, c in evaluators)
    lines = [
        "# DreamBooth subject fidelity", "",
        f"{PROTOCOL}. Means are over subjects (each subject's mean over its generated images and real photos). "
        f"CLIP-T prompts have the identifier token removed. Evaluators: {ev_text}.", "",
    ]
    if len(evaluators) > 1:
        lines += ["**Warning:** runs were scored with different evaluators; their numbers are not comparable.", ""]
    lines += ["## Means per base × method", "",
              "| Base | Method | Subjects | Images | DINO | CLIP-I | CLIP-T |", "|---|---|---:|---:|---:|---:|---:|"]
    for m in means:
        lines.append(f"| {m['base']} | {m['method']} | {m['n_subjects']} | {m['n_images']} | {_md_num(m['dino'])} | "
                     f"{_md_num(m['clip_i'])} | {_md_num(m['clip_t'])} |")
    lines.append(f"| real images (reference) | | {real['n_subjects']} | | {_md_num(real['dino'])} | "
                 f"{_md_num(real['clip_i'])} | – |")
    lines += ["", "## Per subject", "",
              "| Subject | Kind | Base | Method | DINO | CLIP-I | CLIP-T | scores |", "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['kind']} | {r['base']} | {r['method']} | {_md_num(r['dino'])} | "
                     f"{_md_num(r['clip_i'])} | {_md_num(r['clip_t'])} | `{r['scores']}` |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The plot (PIL only: matplotlib is not a dependency)
# --------------------------------------------------------------------------------------------
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _report_png(means: list[dict], real: dict) -> bytes:
    """Three panels (DINO, CLIP-I, CLIP-T) with one bar per base x method, on a shared 0..1 axis;
    colour = base, hatching = full finetuning (solid = LoRA); dashed line = real-images reference."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int):
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
            return ImageFont.load_default()

    f_small, f_text, f_title = font(12), font(14), font(18)
    n = len(means)
    bar_w, gap, pad = 26, 8, 40
    panel_w = max(180, n * (bar_w + gap) + gap + 20)
    plot_h, top, left = 300, 60, 50
    bases = list(dict.fromkeys(m["base"] for m in means))
    color = {b: _PALETTE[i % len(_PALETTE)] for i, b in enumerate(bases)}
    legend_rows = n
    width = left + 3 * panel_w + 2 * pad + 30
    height = top + plot_h + 40 + 20 * legend_rows + 20
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    # the bundled font has no "§"
    d.text((left, 15), "Subject fidelity, DreamBooth protocol (Sec. 4.1): mean over subjects", fill="black", font=f_title)

    def y_of(v: float) -> float:
        return top + plot_h * (1.0 - max(0.0, min(1.0, v)))

    for pi, metric in enumerate(METRICS):
        x0 = left + pi * (panel_w + pad)
        x1 = x0 + panel_w
        for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
            y = y_of(t)
            d.line([(x0, y), (x1, y)], fill=(225, 225, 225))
            d.text((x0 - 30, y - 7), f"{t:.1f}", fill=(90, 90, 90), font=f_small)
        d.line([(x0, top), (x0, top + plot_h), (x1, top + plot_h)], fill="black")
        d.text((x0 + panel_w / 2 - 25, top + plot_h + 8), METRIC_LABELS[metric], fill="black", font=f_text)
        for bi, m in enumerate(means):
            v = m[metric]
            if v is None or math.isnan(v):
                continue
            bx = x0 + gap + 10 + bi * (bar_w + gap)
            y = y_of(v)
            c = color[m["base"]]
            d.rectangle([bx, y, bx + bar_w, top + plot_h], fill=c, outline=c)
            if m["method"] == "full":  # hatching keeps methods apart without a second colour scale
                img.paste(_hatch(bar_w - 3, int(top + plot_h - y) - 3, c), (int(bx) + 2, int(y) + 2))
            d.text((bx - 2, y - 15), f"{v:.2f}", fill="black", font=f_small)
        ref = real.get(metric)
        if ref is not None and not math.isnan(ref):
            y = y_of(ref)
            for xs in range(int(x0), int(x1), 10):
                d.line([(xs, y), (min(xs + 5, x1), y)], fill=(60, 60, 60), width=2)
            d.text((x1 - 70, y - 15), f"real {ref:.2f}", fill=(60, 60, 60), font=f_small)
    ly = top + plot_h + 40
    for i, m in enumerate(means):
        c = color[m["base"]]
        y = ly + 20 * i
        d.rectangle([left, y, left + 14, y + 14], fill=c, outline=c)
        if m["method"] == "full":
            img.paste(_hatch(11, 11, c), (left + 2, y + 2))
        d.text((left + 22, y), f"{m['base']} / {m['method']}  ({m['n_subjects']} subjects)", fill="black", font=f_text)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _hatch(w: int, h: int, color: tuple[int, int, int]):
    """A w x h tile of diagonal stripes in `color` on white."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (max(w, 1), max(h, 1)), "white")
    d = ImageDraw.Draw(tile)
    for k in range(-max(w, h), max(w, h) * 2, 6):
        d.line([(0, k + w), (w, k)], fill=color, width=2)
    return tile
