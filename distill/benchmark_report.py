"""`distill report`: several `distill eval` outputs in one table (markdown + CSV, the BK-SDM model
cards' columns) and one plot: FID against MACs per U-Net step, one point per backbone (the paper's
quality-vs-compute view; lower-left is better), drawn with PIL (matplotlib is not a dependency)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from personalize.errors import UserError
from personalize.fileio import write_atomic
from personalize.outputs import check_output, output_lock

from .benchmark import COLUMNS, SCORES_FILE, markdown_row, markdown_table

OUTPUTS = ("benchmark.md", "benchmark.csv", "benchmark.png")


MAX_SCORES_BYTES = 16 << 20  # a `distill eval` scores.json is a few kB; a bigger one is something else


def _number(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def why_not_scores(doc) -> str | None:
    """What makes a parsed scores.json not one `distill eval` wrote (a field of the wrong type
    would break the table or the plot), or None."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if "fid" not in doc or "cost" not in doc:
        return "not a `distill eval` scores.json (no fid/cost)"
    for k in ("fid", "is", "is_std", "clip_score"):
        if not _number(doc.get(k)):
            return f"{k} is {type(doc[k]).__name__}, not a number"
    if not isinstance(doc["cost"], dict):
        return f"cost is {type(doc['cost']).__name__}, not an object"
    for k in ("unet_params", "pipeline_params", "unet_macs"):
        if not _number(doc["cost"].get(k)):
            return f"cost.{k} is {type(doc['cost'][k]).__name__}, not a number"
    for k in ("name", "base"):
        if doc.get(k) is not None and not isinstance(doc[k], str):
            return f"{k} is {type(doc[k]).__name__}, not a string"
    n = doc.get("n_images")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        return f"n_images is {type(n).__name__}, not an integer"
    return None


def _read(f: Path) -> tuple[dict | None, str | None]:
    try:
        if f.stat().st_size > MAX_SCORES_BYTES:
            return None, f"{f.stat().st_size} bytes; a `distill eval` scores.json is a few kB"
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"unreadable ({type(e).__name__})"
    why = why_not_scores(doc)
    return (None, why) if why else (doc, None)


def collect(dirs: list[Path]) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Every scores.json under `dirs` (recursively), in a stable order; unreadable or wrong-kind
    ones are returned as (path, why) instead."""
    docs, skipped, seen = [], [], set()
    for d in dirs:
        d = Path(d).expanduser()
        if not d.exists():
            raise UserError(f"{d}: no such folder")
        files = [d] if d.is_file() else sorted(d.rglob(SCORES_FILE))
        for f in files:
            r = f.resolve()
            if r in seen:
                continue
            seen.add(r)
            doc, why = _read(f)
            if doc is None:
                skipped.append((f, why))
                continue
            doc["_path"] = str(f)
            docs.append(doc)
    return docs, skipped


def _csv(docs: list[dict]) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["model", "fid", "is", "is_std", "clip_score", "unet_params", "pipeline_params", "unet_macs",
                "n_images", "scores"])
    for d in docs:
        c = d.get("cost") or {}
        w.writerow([d.get("name"), d.get("fid"), d.get("is"), d.get("is_std"), d.get("clip_score"),
                    c.get("unet_params"), c.get("pipeline_params"), c.get("unet_macs"), d.get("n_images"), d["_path"]])
    return buf.getvalue()


def _png(docs: list[dict]) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    from personalize.evaluation.report import _PALETTE

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError):
            return ImageFont.load_default()

    pts = [(d["cost"]["unet_macs"] / 1e9, d["fid"], d.get("name") or "?") for d in docs
           if d.get("fid") is not None and math.isfinite(d["fid"]) and (d.get("cost") or {}).get("unet_macs")]
    W, H, L, T, R, B = 760, 520, 70, 50, 30, 60 + 18 * max(1, len(pts))
    img = Image.new("RGB", (W, H + B), "white")
    dr = ImageDraw.Draw(img)
    dr.text((L, 15), "FID (lower is better) vs MACs per U-Net step", fill="black", font=font(16))
    x0, x1, y0, y1 = L, W - R, T, H
    dr.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xmin, xmax = min(xs) * 0.9, max(xs) * 1.1 or 1.0
        ymin, ymax = 0.0, max(ys) * 1.15 or 1.0
        for k in range(6):  # axis ticks
            yv = ymin + (ymax - ymin) * k / 5
            yy = y1 - (y1 - y0) * k / 5
            dr.line([(x0 - 4, yy), (x0, yy)], fill="black")
            dr.text((5, yy - 7), f"{yv:.3g}", fill=(80, 80, 80), font=font(12))
            xv = xmin + (xmax - xmin) * k / 5
            xx = x0 + (x1 - x0) * k / 5
            dr.line([(xx, y1), (xx, y1 + 4)], fill="black")
            dr.text((xx - 15, y1 + 6), f"{xv:.3g}G", fill=(80, 80, 80), font=font(12))
        for i, (xv, yv, name) in enumerate(pts):
            c = _PALETTE[i % len(_PALETTE)]
            xx = x0 + (x1 - x0) * (xv - xmin) / ((xmax - xmin) or 1)
            yy = y1 - (y1 - y0) * (yv - ymin) / ((ymax - ymin) or 1)
            dr.ellipse([xx - 6, yy - 6, xx + 6, yy + 6], fill=c, outline="black")
            ly = H + 30 + 18 * i
            dr.rectangle([L, ly, L + 12, ly + 12], fill=c)
            dr.text((L + 20, ly - 1), f"{name}: FID {yv:.2f}, {xv:.4g}G MACs/step", fill="black", font=font(13))
    else:
        dr.text((L + 20, T + 20), "no finite FID with a MAC count to plot", fill="black", font=font(14))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_report(dirs: list[Path], out: Path, overwrite: bool = False):
    """Write benchmark.md/.csv/.png into `out`; returns ({kind: path}, skipped)."""
    docs, skipped = collect(dirs)
    if not docs:
        why = f" ({len(skipped)} skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise UserError(f"{', '.join(map(str, dirs))}: no `distill eval` scores.json to report{why}")
    out = check_output(Path(out), kind="dir", inputs=[], allow_existing_dir=True)
    with output_lock(out):  # a second `distill report -o OUT` is refused, naming this one
        if not overwrite and any((out / n).exists() for n in OUTPUTS):
            raise UserError(f"-o {out}: holds a report already; pass --overwrite to replace it")
        docs.sort(key=lambda d: ((d.get("cost") or {}).get("unet_macs") or 0, d.get("name") or ""))
        # everything rendered before the first write: a failure leaves no report half-replaced
        data = {"md": markdown_table(docs), "csv": _csv(docs), "png": _png(docs)}
        paths = {"md": out / OUTPUTS[0], "csv": out / OUTPUTS[1], "png": out / OUTPUTS[2]}
        for k, path in paths.items():
            write_atomic(path, data[k])
    return paths, skipped


__all__ = ["COLUMNS", "build_report", "collect", "markdown_row"]
