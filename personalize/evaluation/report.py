"""One table over many evaluated runs: every `scores.json` below a directory, described by its
run's run.json, with means per (base, method) and the real-images reference, as `report.md`,
`report.csv` and `report.png` (a bar chart drawn with PIL: matplotlib is not a dependency)."""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..backbones import BACKBONES
from ..defaults import METHODS
from ..errors import UserError
from ..fileio import write_atomic
from ..outputs import check_output, output_lock
from ..runs import RUN_JSON, find_run_dirs
from .protocol import METRIC_LABELS, METRICS, PROTOCOL, SCORES_JSON, csv_text, md_num, run_summary
from .metrics import nanmean

# --------------------------------------------------------------------------------------------
# Report over many runs
# --------------------------------------------------------------------------------------------
REPORT_MD, REPORT_CSV, REPORT_PNG = "report.md", "report.csv", "report.png"
REPORT_COLUMNS = ["row", "base", "method", "subject", "kind", "n_subjects", "n_images", "dino", "clip_i", "clip_t",
                  "dino_model", "clip_model", "scores"]


def _why_not_scores(doc: Any) -> str | None:
    """What makes a parsed scores.json not one `personalize eval` wrote, or None."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    s = doc.get("scores")
    if not isinstance(s, dict):
        return "no 'scores' object"
    for m in METRICS:
        v = s.get(m)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"scores.{m} is {type(v).__name__}, not a number"
    if not isinstance(s.get("n_images"), int) or s["n_images"] < 1:
        return "scores.n_images is not a positive integer"
    for key in ("real_reference", "evaluators", "run", "subject"):
        if key in doc and not isinstance(doc[key], dict):
            return f"'{key}' is not an object"
    return None


def collect_scores(runs_dir: Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """One row per evaluated run below `runs_dir` (every scores.json), described by its run.json;
    and the scores.json files skipped, each with the reason."""
    runs_dir = Path(runs_dir)
    rows, skipped = [], []
    run_dirs = set(find_run_dirs(runs_dir, steps=True, missing_ok=True))
    for sp in sorted(runs_dir.rglob(SCORES_JSON)):
        if any(part.startswith(".") for part in sp.relative_to(runs_dir).parts):
            continue
        try:
            doc = json.loads(sp.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            skipped.append((sp, f"unreadable ({type(e).__name__})"))
            continue
        why = _why_not_scores(doc)
        if why:
            skipped.append((sp, f"not a `personalize eval` scores file: {why}"))
            continue
        # the innermost run holding it: a step dir's own scores describe the step, not its run
        rj = next((d / RUN_JSON for d in sp.parents if d in run_dirs), None)
        try:
            run = json.loads(rj.read_text(encoding="utf-8")) if rj else None
        except (OSError, ValueError) as e:
            skipped.append((sp, f"its {rj} is unreadable ({type(e).__name__})"))
            continue
        info = run_summary(run) if isinstance(run, dict) else {
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
    return rows, skipped


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _group_order(rows: list[dict]) -> list[tuple[str, str]]:
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


def build_report(runs_dir: Path, out_dir: Path | None = None) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """Gather every evaluated run below `runs_dir` into report.md, report.csv (subject x base x
    method rows, then the means per base/method and the real-images row, like the BK-SDM paper's
    DreamBooth table) and report.png (grouped bars). Written atomically into `out_dir`
    (default `runs_dir`). Returns the files written and the scores files skipped (with why),
    which the report also lists: a mean over fewer subjects must never pass unnoticed."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no such directory")
    rows, skipped = collect_scores(runs_dir)
    if not rows:
        why = f" ({len(skipped)} skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise UserError(f"{runs_dir}: no usable {SCORES_JSON} below it{why}; run `personalize eval RUN_DIR` first")
    order = {k: i for i, k in enumerate(_group_order(rows))}
    rows.sort(key=lambda r: (order[(r["base"], r["method"])], r["subject"], r["scores"]))
    means, real = summarize(rows)
    # --out is checked as every output is; the default, RUNS_DIR itself, is an input the user named
    flag = "--out" if out_dir else "RUNS_DIR"
    out_dir = check_output(Path(out_dir), kind="dir", flag=flag, allow_existing_dir=True) if out_dir else runs_dir
    md = _report_markdown(rows, means, real)
    if skipped:
        md += "\n## Skipped\n\n" + "".join(f"- `{p}`: {why}\n" for p, why in skipped)
    # rendered before the first write, written under the writer's lock (a second report is refused)
    data = {"csv": csv_text(rows + means + [real], REPORT_COLUMNS), "markdown": md, "png": _report_png(means, real)}
    names = {"csv": REPORT_CSV, "markdown": REPORT_MD, "png": REPORT_PNG}
    with output_lock(out_dir, flag=flag):
        return {k: write_atomic(out_dir / names[k], data[k]) for k in names}, skipped


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
        lines.append(f"| {m['base']} | {m['method']} | {m['n_subjects']} | {m['n_images']} | {md_num(m['dino'])} | "
                     f"{md_num(m['clip_i'])} | {md_num(m['clip_t'])} |")
    lines.append(f"| real images (reference) | | {real['n_subjects']} | | {md_num(real['dino'])} | "
                 f"{md_num(real['clip_i'])} | – |")
    lines += ["", "## Per subject", "",
              "| Subject | Kind | Base | Method | DINO | CLIP-I | CLIP-T | scores |", "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['subject']} | {r['kind']} | {r['base']} | {r['method']} | {md_num(r['dino'])} | "
                     f"{md_num(r['clip_i'])} | {md_num(r['clip_t'])} | `{r['scores']}` |")
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
