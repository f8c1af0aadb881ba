"""`personalize batch`: DreamBooth over many subjects (x bases x methods) in one command.

- Each base is loaded from disk once per process and reused for every subject and method
  (`LoadedBase.reset` restores its pristine weights between them).
- Resumable: a finished subject is skipped, an interrupted one resumes from its last checkpoint;
  since every run is deterministic in its seed, a killed-and-rerun batch ends with the same
  weights as an uninterrupted one. A rerun with flags that change the weights is refused.
- Failure-isolated: a subject that fails (bad photos, NaN loss, out of memory) is recorded with its
  error and the batch goes on; the exit code is non-zero at the end. A rerun retries it.
- Sharded (`--shard i/n`, or one shard per process under `accelerate launch`, each process
  training on its own GPU): shard i takes the i-th contiguous slice of the grid ordered by class,
  so subjects that share class images mostly train in one process, one after another, and each
  process loads few bases. Shards never share work and need no coordination: the summary is
  rebuilt from what is on disk (under a file lock), so the shard that finishes last writes the
  complete one, and rerunning the command rebuilds it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .defaults import METHODS
from .errors import UserError
from .fileio import write_atomic, write_json
from .outputs import slug
from .runs import final_loss, load_run_json
from .subjects import data_dir as resolve_data_dir
from .subjects import load_subjects, photos_present

STATUS_DIR = ".status"
BATCH_JSON = "batch.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SCORE_KEYS = ("dino", "clip_i", "clip_t")
SCORE_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
# TrainConfig fields a rerun may change: they change neither the trained weights nor the class
# images (per-run fields are set per job); any other difference would mix two setups in one table
RERUN_MAY_CHANGE = frozenset({
    "subject", "method", "base", "output_dir", "resume", "overwrite", "data_dir", "checkpoint_every",
    "keep_checkpoints", "log_every", "validation_images", "validation_steps", "class_image_batch_size",
    "allow_pickle", "sample_every", "sample_prompts", "save_every", "score_every", "score_prompts", "score_images",
    "min_clip_t", "dino", "clip",
})


@dataclass(frozen=True)
class Job:
    base: str
    method: str
    subject: str

    def run_dir(self, batch_dir: Path) -> Path:
        return Path(batch_dir) / slug(self.base) / self.method / self.subject

    def status_file(self, batch_dir: Path) -> Path:
        return Path(batch_dir) / STATUS_DIR / f"{slug(self.base)}--{self.method}--{self.subject}.json"

    def label(self) -> str:
        return f"{self.subject} ({self.method}, {self.base})"


def split_list(text: str | None, flag: str) -> list[str]:
    """A comma list, de-duplicated in order (a repeated entry would be a job trained twice)."""
    items = list(dict.fromkeys(s.strip() for s in (text or "").split(",") if s.strip()))
    if not items:
        raise UserError(f"{flag} is empty; give a comma list")
    return items


# ------------------------------------------------------------------------------------ input
def select_subjects(spec: str | None, data_dir_flag: str | None) -> list[str]:
    """`None`/"all": every dataset subject whose photos are present; else a comma list of names
    and globs (`dog*,cat2`), globs matching only subjects with photos. Unknown names, or named
    subjects without photos, are errors (one line) before anything is trained."""
    if spec is not None and not spec.strip(" ,"):
        raise UserError("--subjects is empty; name subjects (e.g. 'dog*,cat2') or drop the flag for all of them")
    known = load_subjects()
    root, is_default = resolve_data_dir(data_dir_flag)
    if not root.is_dir():
        if is_default:
            from .subjects import fetch_dataset

            fetch_dataset(root)  # as `personalize lora --subject dog` does; offline: a one-line error
        else:
            raise UserError(f"data dir {root} does not exist; pass --data-dir (the DreamBooth dataset/ folder) "
                            f"or set PERSONALIZE_DATA")
    present = [n for n in known if photos_present(root, n)]
    if not spec or spec.strip() == "all":
        if not present:
            raise UserError(f"no DreamBooth subject folders in {root}")
        return present
    chosen: list[str] = []
    for item in split_list(spec, "--subjects"):
        if any(c in item for c in "*?["):
            hits = [n for n in present if fnmatch.fnmatch(n, item)]
            if not hits:
                raise UserError(f"--subjects: '{item}' matches no subject with photos in {root}")
        elif item in known:
            if item not in present:
                raise UserError(f"--subjects: '{item}' has no photos in {root}")
            hits = [item]
        else:
            import difflib

            close = difflib.get_close_matches(item, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `personalize subjects` lists them"
            raise UserError(f"--subjects: unknown subject '{item}'{hint}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def parse_shard(text: str | None) -> tuple[int, int]:
    """`i/n` -> (i, n); default: the process's place under `accelerate launch`, else (0, 1).
    Called before anything touches CUDA: under a launcher it pins the process to its own GPU."""
    if text:
        m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
            raise UserError(f"--shard must look like i/n with 0 <= i < n (e.g. 0/4), got '{text}'")
        return int(m[1]), int(m[2])

    return launcher_shard()


def check_inputs(template: TrainConfig, bases: list[str], methods: list[str]) -> None:
    """What would fail every job the same way fails once, up front, writing nothing."""
    from .backbones import BACKBONES

    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method '{m}' ({', '.join(METHODS)})")
    for b in bases:
        # registry names and hub ids resolve (maybe download) when their turn comes
        if not (b in BACKBONES or b == "tiny" or b.startswith("tiny:") or "/" in b or Path(b).expanduser().exists()):
            raise UserError(f"--bases: unknown base '{b}'; known: {', '.join(BACKBONES)} "
                            f"(or a hub id / local pipeline dir)")
    for m in methods:
        replace(template, method=m).validate()


def plan(bases: list[str], methods: list[str], subjects: list[str]) -> list[Job]:
    return [Job(b, m, s) for b in bases for m in methods for s in subjects]


def shard_jobs(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """Shard `rank`'s jobs: its contiguous slice (sizes differ by at most one) of the grid ordered
    by (base, class, plan order). Class images are cached per (base, class): a slice holds whole
    classes except at its two ends, so concurrent shards rarely generate the same class images."""
    classes = {name: s.class_noun for name, s in load_subjects().items()}
    bases = list(dict.fromkeys(j.base for j in jobs))
    order = sorted(range(len(jobs)), key=lambda k: (bases.index(jobs[k].base),
                                                   classes.get(jobs[k].subject, jobs[k].subject), k))
    lo, hi = rank * len(jobs) // world, (rank + 1) * len(jobs) // world
    return [jobs[k] for k in order[lo:hi]]


def _check_same_setup(batch_dir: Path, template: TrainConfig) -> None:
    f = batch_dir / BATCH_JSON
    try:
        before = json.loads(f.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    now = template.to_json()
    for k, v in now.items():
        if k not in RERUN_MAY_CHANGE and k in before and before[k] != v:
            flag = "--" + k.replace("_", "-")
            raise UserError(f"{batch_dir} was started with {flag} {before[k]}, this command has {flag} {v}; "
                            f"use the same flags to resume it, or another --batch-dir")


# ------------------------------------------------------------------------------------ running
class _Bases:
    """The one base in memory (a batch is ordered by base, so each is loaded once), and the
    bases that failed to load (their remaining jobs fail at once instead of retrying the load)."""

    def __init__(self):
        self.name: str | None = None
        self.loaded = None
        self.errors: dict[str, Exception] = {}

    def get(self, name: str, allow_pickle: bool):
        from .sources import resolve_base
        from .dreambooth import LoadedBase

        if name in self.errors:
            raise self.errors[name].with_traceback(None)
        if self.name != name:
            self.name, self.loaded = None, None  # free the previous base before loading the next
            try:
                self.loaded = LoadedBase(resolve_base(name), allow_pickle)
            except Exception as e:
                self.errors[name] = e
                raise
            self.name = name
        return self.loaded


def run_batch(template: TrainConfig, bases: list[str], methods: list[str], subjects: list[str], batch_dir: Path,
              shard: tuple[int, int] = (0, 1), evaluator: Callable[[], Callable[[Path], object]] | None = None,
              log=print) -> dict:
    """Train (and, with `evaluator`, score) every job of this shard; returns the merged summary,
    also written to batch_dir. `evaluator()` returns `evaluate(run_dir)`; it is called once, after
    the inputs are checked and before any training, so a missing evaluator model fails in seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .runs import is_finished

    bases, methods, subjects = (list(dict.fromkeys(x)) for x in (bases, methods, subjects))
    check_inputs(template, bases, methods)
    jobs = plan(bases, methods, subjects)
    mine = shard_jobs(jobs, *shard)
    batch_dir = Path(batch_dir)
    _check_same_setup(batch_dir, template)
    todo = [j for j in mine if not is_finished(j.run_dir(batch_dir))
            or evaluator is not None and not _scores_file(j.run_dir(batch_dir)).is_file()]
    evaluate = evaluator() if evaluator is not None and todo else None
    (batch_dir / STATUS_DIR).mkdir(parents=True, exist_ok=True)
    write_json(batch_dir / BATCH_JSON, {"bases": bases, "methods": methods, "subjects": subjects,
                                        "config": template.to_json()})
    held = _Bases()
    # the overall bar; each subject's step bar (train.fit) nests below it
    with Progress(TextColumn("[bold]batch[/] {task.fields[current]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn()) as bar:
        task = bar.add_task("batch", total=len(mine), current="")
        try:
            for job in mine:
                bar.update(task, current=job.label())
                if job in todo:
                    _run_job(job, template, batch_dir, held, evaluate, log)
                    write_summary(batch_dir, jobs)  # on disk after every job: a killed batch still has one
                bar.advance(task)
        finally:
            summary = write_summary(batch_dir, jobs)
    return summary


def _run_job(job: Job, template: TrainConfig, batch_dir: Path, held: _Bases, evaluate, log) -> None:
    from .dreambooth import train_subject
    from .runs import is_finished

    run_dir, status_file = job.run_dir(batch_dir), job.status_file(batch_dir)
    if is_finished(run_dir):  # trained earlier, only its scores are missing
        status = _read_json(status_file) or {"status": "finished"}
    else:
        cfg = replace(template, method=job.method, base=job.base, subject=job.subject, output_dir=str(run_dir),
                      resume=True, overwrite=False)
        _drop_partial_outputs(run_dir)
        t0 = time.perf_counter()
        failure = None
        try:
            train_subject(cfg, log=log, loaded=held.get(job.base, cfg.allow_pickle))
            status = {"status": "finished"}
        except Exception as e:  # noqa: BLE001 - one subject's failure must not stop the batch
            failure = e
            status = {"status": "failed", "error": describe_error(e)}
            if not isinstance(e, UserError):
                status["traceback"] = traceback.format_exc(limit=-15)  # the innermost frames: where it broke
        status["seconds"] = round(time.perf_counter() - t0, 2)
        if failure is not None:
            where = f"; traceback in {status_file}" if "traceback" in status else ""
            log(f"failed: {job.label()}: {status['error']}{where}")
            del failure  # the traceback's frames hold the failed run's tensors
            _free_accelerator_memory()
    status.pop("eval_error", None)
    status["job"] = job.__dict__
    write_json(status_file, status)
    if status["status"] == "finished" and evaluate is not None:
        try:
            evaluate(run_dir)
        except Exception as e:  # noqa: BLE001 - scoring failures are reported, not fatal
            status["eval_error"] = describe_error(e)
            log(f"eval failed: {job.label()}: {status['eval_error']}")
            write_json(status_file, status)


def _drop_partial_outputs(run_dir: Path) -> None:
    """An unfinished run dir of a batch holds only what training resumes from (checkpoints/,
    logs/), plus, when the batch was killed while writing the final outputs, some of them. Those
    are rewritten from the last checkpoint; left in place they would make the run refuse to resume."""
    import shutil

    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name not in ("checkpoints", "logs"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def describe_error(e: BaseException) -> str:
    """One line for the summary: a UserError's own message, else the type and the first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"out of memory ({type(e).__name__}: {text[:200]})" if text else f"out of memory ({type(e).__name__})"
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text[:300]}"


def _free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ summary
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _scores_file(run_dir: Path) -> Path:
    from .evaluation.dreambooth import EVAL_DIR, SCORES_JSON

    return run_dir / EVAL_DIR / SCORES_JSON


@contextlib.contextmanager
def _summary_lock(batch_dir: Path):
    """Shards rebuild the summary from disk; serialised, the last one to write has read everything."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the next rebuild repairs a stale summary
        yield
        return
    with open(batch_dir / STATUS_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def job_status(job: Job, batch_dir: Path) -> dict:
    run_dir = job.run_dir(batch_dir)
    row = {"base": job.base, "method": job.method, "subject": job.subject, "status": "pending",
           "seconds": None, "final_loss": None, "error": None}
    rec = _read_json(job.status_file(batch_dir)) or {}
    if rec.get("status") in ("finished", "failed"):
        row.update(status=rec["status"], seconds=rec.get("seconds"), error=rec.get("error"))
    meta = load_run_json(run_dir) or {}
    if meta.get("status") == "finished":
        row.update(status="finished", error=None, final_loss=final_loss(meta))
    elif row["status"] == "finished":
        row["status"] = "pending"  # a status file without outputs means the outputs were removed
    scored = _read_json(_scores_file(run_dir))
    if row["status"] == "finished" and scored:
        row["scores"] = {k: v for k, v in (scored.get("scores") or {}).items() if k in SCORE_KEYS}
    elif rec.get("eval_error") and row["status"] == "finished":
        row["eval_error"] = rec["eval_error"]
    return row


def write_summary(batch_dir: Path, jobs: list[Job]) -> dict:
    """summary.json and summary.md of every job of the grid, from what is on disk."""
    batch_dir = Path(batch_dir)
    with _summary_lock(batch_dir):
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


def evaluator(dino_name: str, clip_name: str, data_dir: str | None, images_per_prompt: int):
    """`run_batch`'s evaluator for `--eval`: loads the DINO and CLIP models (once) and returns
    evaluate(run_dir), the `personalize eval` protocol for one run."""

    def load():
        from .evaluation.evaluators import ClipEmbedder, DinoEmbedder
        from .evaluation.dreambooth import evaluate_run

        dino, clip = DinoEmbedder.from_name_or_path(dino_name), ClipEmbedder.from_name_or_path(clip_name)

        def evaluate(run_dir: Path):
            return evaluate_run(run_dir, dino=dino, clip=clip, data_dir=data_dir, images_per_prompt=images_per_prompt)

        return evaluate

    return load


def default_batch_dir() -> Path:
    return Path(os.environ.get("PERSONALIZE_BATCH_DIR", "runs/batch"))


def launcher_shard() -> tuple[int, int]:
    """(rank, world) of this process under `accelerate launch` / torchrun, else (0, 1).

    For a batch of independent subjects, each launched process is made a single-process worker
    on its own GPU (one subject per GPU at a time, no gradient all-reduce between subjects that
    have nothing in common): the launcher's distributed variables are removed before any
    Accelerator exists, and CUDA_VISIBLE_DEVICES narrows to the process's local device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[local % len(devices)] if devices else str(local)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(k, None)
    return rank, world
