"""A batch's summary: summary.json and summary.md over every job of the grid, rebuilt from what
is on disk (each run dir, each job's status file, each run's scores), and the table printed at
the end. Shards rebuild it in turn under the summary's lock, so the last one to write has read
everything, and rerunning the command rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.protocol import EVAL_DIR, SCORES_JSON
from ..fileio import write_atomic, write_json
from ..outputs import output_lock
from ..runs import FINISHED, final_loss, run_status
from .planning import Job

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SCORE_KEYS = ("dino", "clip_i", "clip_t")
SCORE_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def scores_file(run_dir: Path) -> Path:
    return run_dir / EVAL_DIR / SCORES_JSON


def job_status(job: Job, batch_dir: Path) -> dict:
    run_dir = job.run_dir(batch_dir)
    row = {"base": job.base, "method": job.method, "subject": job.subject, "status": "pending",
           "seconds": None, "final_loss": None, "error": None}
    rec = read_json(job.status_file(batch_dir)) or {}
    if rec.get("status") in ("finished", "failed"):
        row.update(status=rec["status"], seconds=rec.get("seconds"), error=rec.get("error"))
    run = run_status(run_dir)
    if run.state == FINISHED:
        row.update(status="finished", error=None, final_loss=final_loss(run.run))
    elif row["status"] == "finished":
        row["status"] = "pending"  # a status file without outputs means the outputs were removed
    scored = read_json(scores_file(run_dir))
    if row["status"] == "finished" and scored:
        row["scores"] = {k: v for k, v in (scored.get("scores") or {}).items() if k in SCORE_KEYS}
    elif rec.get("eval_error") and row["status"] == "finished":
        row["eval_error"] = rec["eval_error"]
    return row


def write_summary(batch_dir: Path, jobs: list[Job]) -> dict:
    """summary.json and summary.md of every job of the grid, from what is on disk."""
    batch_dir = Path(batch_dir)
    with output_lock(batch_dir / SUMMARY_JSON, wait=True):
        rows = [job_status(j, batch_dir) for j in jobs]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "pending")}
        summary = {"counts": counts, "eval_errors": sum(bool(r.get("eval_error")) for r in rows), "jobs": rows}
        write_json(batch_dir / SUMMARY_JSON, summary)
        write_atomic(batch_dir / SUMMARY_MD, summary_markdown(summary))
    return summary


def _columns(summary: dict) -> list[str]:
    scored = any(r.get("scores") for r in summary["jobs"])
    return ["base", "method", "subject", "status", "time (s)", "final loss",
            *([SCORE_LABELS[k] for k in SCORE_KEYS] if scored else []), "error"]


def _cells(r: dict, scored: bool) -> list[str]:
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else ""

    scores = [num((r.get("scores") or {}).get(k), ".3f") for k in SCORE_KEYS] if scored else []
    error = r["error"] or (f"eval: {r['eval_error']}" if r.get("eval_error") else "")
    return [r["base"], r["method"], r["subject"], r["status"], num(r["seconds"], ".1f"), num(r["final_loss"], ".4f"),
            *scores, error]


def _counts_line(summary: dict) -> str:
    c = summary["counts"]
    line = f"{c['finished']} finished, {c['failed']} failed, {c['pending']} pending"
    return line + (f"; {summary['eval_errors']} evaluation(s) failed" if summary.get("eval_errors") else "")


def summary_markdown(summary: dict) -> str:
    cols = _columns(summary)
    scored = len(cols) > 7
    lines = ["# personalize batch", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary["jobs"]:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r, scored)) + " |")
    return "\n".join([*lines, "", _counts_line(summary), ""])


def print_summary(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    cols = _columns(summary)
    t = Table(title="batch summary")
    for c in cols:
        t.add_column(c, overflow="fold")
    style = {"finished": "green", "failed": "red", "pending": "yellow"}
    for r in summary["jobs"]:
        cells = [escape(c) for c in _cells(r, len(cols) > 7)]
        cells[3] = f"[{style[r['status']]}]{cells[3]}"
        t.add_row(*cells)
    console.print(t)
    console.print(_counts_line(summary))


def exit_code(summary: dict) -> int:
    """1 when any subject failed or could not be scored, else 0."""
    return 1 if summary["counts"]["failed"] or summary.get("eval_errors") else 0
