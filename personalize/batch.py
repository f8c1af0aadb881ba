"""`personalize batch`: DreamBooth over many subjects (x bases x methods) in one command.

- Each (base, method) loads the base once and reuses it for every subject (`LoadedBase.reset`).
- Resumable: a finished subject is skipped, an interrupted one resumes from its last checkpoint;
  since every run is deterministic in its seed, a killed-and-rerun batch ends with the same
  weights as an uninterrupted one.
- Failure-isolated: a subject that fails (bad photos, NaN loss, out of memory) is recorded with its
  error and the batch goes on; the exit code is non-zero at the end.
- Sharded: job k of the grid belongs to shard k % n (`--shard i/n`, or one shard per process under
  `accelerate launch`, each process training its own subjects on its own GPU). Shards never share
  work and need no coordination: the summary is rebuilt from what is on disk, so the shard that
  finishes last writes the complete one, and rerunning the command rebuilds it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from .config import TrainConfig
from .errors import UserError
from .pipeline import write_json, write_text
from .subjects import data_dir as resolve_data_dir
from .subjects import load_subjects, photos_present

STATUS_DIR = ".status"


@dataclass(frozen=True)
class Job:
    base: str
    method: str
    subject: str

    def run_dir(self, batch_dir: Path) -> Path:
        return batch_dir / _slug(self.base) / self.method / self.subject

    def status_file(self, batch_dir: Path) -> Path:
        return batch_dir / STATUS_DIR / f"{_slug(self.base)}--{self.method}--{self.subject}.json"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def select_subjects(spec: str | None, data_dir_flag: str | None) -> list[str]:
    """`None`/"all": every dataset subject whose photos are present; else a comma list of names
    and globs (`dog*,cat2`). Unknown names are an error (one line, nearest names suggested)."""
    known = load_subjects()
    root, _ = resolve_data_dir(data_dir_flag)
    if not spec or spec == "all":
        if not root.is_dir():
            raise UserError(f"data dir {root} does not exist; pass --data-dir (the DreamBooth dataset/ folder) "
                            f"or set PERSONALIZE_DATA")
        chosen = [n for n in known if photos_present(root, n)]
        if not chosen:
            raise UserError(f"no DreamBooth subject folders in {root}")
        return chosen
    chosen: list[str] = []
    for item in _split(spec):
        if any(c in item for c in "*?["):
            hits = [n for n in known if fnmatch.fnmatch(n, item)]
            if not hits:
                raise UserError(f"--subjects: '{item}' matches no subject")
        elif item in known:
            hits = [item]
        else:
            import difflib

            close = difflib.get_close_matches(item, list(known), n=3, cutoff=0.5)
            raise UserError(f"--subjects: unknown subject '{item}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
        chosen += [h for h in hits if h not in chosen]
    return chosen


def parse_shard(text: str | None) -> tuple[int, int]:
    """`i/n` -> (i, n); default: the process's place under `accelerate launch`, else (0, 1)."""
    if text:
        m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
            raise UserError(f"--shard must look like i/n with 0 <= i < n, got '{text}'")
        return int(m[1]), int(m[2])
    from .train import launcher_shard

    return launcher_shard()


def plan(bases: list[str], methods: list[str], subjects: list[str]) -> list[Job]:
    return [Job(b, m, s) for b in bases for m in methods for s in subjects]


def run_batch(template: TrainConfig, bases: list[str], methods: list[str], subjects: list[str], batch_dir: Path,
              shard: tuple[int, int] = (0, 1), evaluate=None, log=print) -> dict:
    """Train every job of this shard; returns the merged summary (also written to batch_dir)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .backbones import resolve_base
    from .dreambooth import LoadedBase, is_finished, train

    for m in methods:
        if m not in ("lora", "full"):
            raise UserError(f"--methods: unknown method '{m}' (lora or full)")
    jobs = plan(bases, methods, subjects)
    rank, world = shard
    mine = [j for k, j in enumerate(jobs) if k % world == rank]
    batch_dir = Path(batch_dir)
    (batch_dir / STATUS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(batch_dir / "batch.json", {"bases": bases, "methods": methods, "subjects": subjects,
                                          "config": template.to_json()})
    loaded: LoadedBase | None = None
    with Progress(TextColumn("[bold]batch[/] {task.fields[current]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("batch", total=len(mine), current="")
        for job in mine:
            bar.update(task, current=f"{job.subject} ({job.method}, {job.base})")
            run_dir = job.run_dir(batch_dir)
            status_file = job.status_file(batch_dir)
            if is_finished(run_dir):
                bar.advance(task)
                continue
            cfg = replace(template, method=job.method, base=job.base, subject=job.subject, output_dir=str(run_dir),
                          resume=True, overwrite=False)
            t0 = time.perf_counter()
            try:
                if loaded is None or loaded.base.name != job.base:
                    loaded = None  # free the previous base before loading the next
                    loaded = LoadedBase(resolve_base(job.base), cfg.allow_pickle)
                train(cfg, log=log, loaded=loaded)
                status = {"status": "finished", "seconds": round(time.perf_counter() - t0, 2)}
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one subject's failure must not stop the batch
                status = {"status": "failed", "seconds": round(time.perf_counter() - t0, 2),
                          "error": _one_line(e)}
                if not isinstance(e, UserError):
                    status["traceback"] = traceback.format_exc(limit=8)
                log(f"[{job.subject}] failed: {status['error']}")
                _free_accelerator_memory()
            write_json(status_file, {**status, "job": job.__dict__})
            if status["status"] == "finished" and evaluate is not None:
                try:
                    evaluate(run_dir)
                except Exception as e:  # noqa: BLE001 - scoring failures are reported, not fatal
                    write_json(status_file, {**status, "job": job.__dict__, "eval_error": _one_line(e)})
            bar.advance(task)
    return write_summary(batch_dir, jobs)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "out of memory" in text.lower():
        return f"out of memory: {text[:200]}"
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text[:300]}"


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def job_status(job: Job, batch_dir: Path) -> dict:
    run_dir = job.run_dir(batch_dir)
    row = {"base": job.base, "method": job.method, "subject": job.subject, "status": "pending",
           "seconds": None, "final_loss": None, "error": None}
    rec = {}
    if job.status_file(batch_dir).is_file():
        rec = json.loads(job.status_file(batch_dir).read_text())
        row.update(status=rec["status"], seconds=rec.get("seconds"), error=rec.get("error"))
    if (run_dir / "run.json").is_file():
        meta = json.loads((run_dir / "run.json").read_text())
        if meta.get("status") == "finished":
            row.update(status="finished", error=None, final_loss=meta.get("stats", {}).get("final_losses", {}).get("loss"))
    elif row["status"] == "finished":
        row["status"] = "pending"  # a status file without outputs means the outputs were removed
    scores = run_dir / "eval" / "scores.json"
    if scores.is_file():
        try:
            summary = json.loads(scores.read_text())
            row["scores"] = {k: v for k, v in (summary.get("scores") or {}).items() if k in ("dino", "clip_i", "clip_t")}
        except json.JSONDecodeError:
            pass
    if rec.get("eval_error"):
        row["eval_error"] = rec["eval_error"]
    return row


def write_summary(batch_dir: Path, jobs: list[Job]) -> dict:
    rows = [job_status(j, batch_dir) for j in jobs]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "pending")}
    summary = {"counts": counts, "jobs": rows}
    write_json(batch_dir / "summary.json", summary)
    lines = ["| base | method | subject | status | time (s) | final loss | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['final_loss']:.4f}" if isinstance(r["final_loss"], (int, float)) else ""
        note = (r["error"] or r.get("eval_error") or "").replace("|", "/")
        if r.get("scores"):
            note = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items() if isinstance(v, (int, float)))
        lines.append(f"| {r['base']} | {r['method']} | {r['subject']} | {r['status']} | {r['seconds'] or ''} | {loss} | {note} |")
    lines.append("")
    lines.append(f"{counts['finished']} finished, {counts['failed']} failed, {counts['pending']} pending")
    write_text(batch_dir / "summary.md", "# personalize batch\n\n" + "\n".join(lines) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="batch summary")
    for c in ("base", "method", "subject", "status", "time (s)", "final loss", "note"):
        t.add_column(c, overflow="fold")
    style = {"finished": "green", "failed": "red", "pending": "yellow"}
    for r in summary["jobs"]:
        loss = f"{r['final_loss']:.4f}" if isinstance(r["final_loss"], (int, float)) else ""
        t.add_row(r["base"], r["method"], r["subject"], f"[{style[r['status']]}]{r['status']}",
                  str(r["seconds"] or ""), loss, r["error"] or "")
    Console().print(t)
    c = summary["counts"]
    Console().print(f"{c['finished']} finished, {c['failed']} failed, {c['pending']} pending")


def default_batch_dir() -> Path:
    return Path(os.environ.get("PERSONALIZE_BATCH_DIR", "runs/batch"))
