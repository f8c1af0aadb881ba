"""Training runs on disk: reading `run.json`, finding run directories and saying how far a run got.

A run directory is what `personalize lora` / `full` writes: `run.json` (the resolved config, the
base's resolved location, the subject) next to the weights, written last; while it trains, its
`checkpoints/` and `logs/`. Generation, export, evaluation, batch and the app all start from here.
No model imports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .defaults import METHODS
from .errors import UserError
from .fileio import write_json
from .subjects import DEFAULT_TOKEN

RUN_JSON = "run.json"
# px; past this the traced/sampled activations of an SD U-Net need hundreds of GiB (a typo, not a size)
MAX_RESOLUTION = 2048
TRAINING_DIRS = ("checkpoints", "logs")  # what a run writes before run.json, and resumes from
FINISHED, INTERRUPTED, FAILED, ABSENT = "finished", "interrupted", "failed", "absent"


def load_run_json(run_dir: Path) -> dict | None:
    """run.json as a dict, or None when it is absent or unreadable (status checks; use
    `read_run` where a bad file must be reported)."""
    try:
        run = json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def write_run(run_dir: Path, record: dict) -> Path:
    return write_json(Path(run_dir) / RUN_JSON, record)


def base_name(run: dict) -> str:
    """The name the run's base was given by (registry name, hub id or path)."""
    base = run.get("base")
    return str(base.get("name", "?")) if isinstance(base, dict) else str(base or "?")


def final_loss(run: dict) -> float | None:
    return ((run.get("stats") or {}).get("final_losses") or {}).get("loss")


@dataclass(frozen=True)
class RunStatus:
    """How far the run in a folder got.

    state: FINISHED (run.json says so); INTERRUPTED (not finished, a checkpoint to resume from);
    FAILED (started, not finished, no checkpoint: nothing to resume, a rerun starts over; a
    run still before its first checkpoint looks the same); ABSENT (no run there).
    run: its run.json as read (None when absent or unreadable); step: the last checkpoint's step."""

    state: str
    run: dict | None = None
    step: int | None = None


def run_status(run_dir: Path) -> RunStatus:
    run_dir = Path(run_dir)
    run = load_run_json(run_dir)
    if _finished(run):
        return RunStatus(FINISHED, run)
    if not _is_run(run_dir, unfinished=True):
        return RunStatus(ABSENT, run)
    from .checkpoints import list_checkpoints  # torch: loaded only for a run that did not finish

    ckpts = list_checkpoints(run_dir)
    return RunStatus(INTERRUPTED, run, ckpts[-1][0]) if ckpts else RunStatus(FAILED, run)


def is_finished(run_dir: Path) -> bool:
    """`run_status(run_dir).state == FINISHED`, without looking for checkpoints."""
    return _finished(load_run_json(run_dir))


def _finished(run: dict | None) -> bool:
    return (run or {}).get("status") == FINISHED


def read_run(run_dir: Path, finished: bool = False) -> dict:
    """run.json of `run_dir` as a dict; a one-line UserError when it is missing, unreadable or not
    ours (and, with `finished`, when the run has not finished)."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RUN_JSON}; is this a finished `personalize lora/full` output dir?")
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(run, dict) or not isinstance(run.get("subject"), dict) or "name" not in run["subject"]:
        raise UserError(f"{path}: no subject.name; not a personalize run.json")
    if run.get("method", "lora") not in METHODS:
        raise UserError(f"{path}: unknown method '{run.get('method')}' (this personalize knows {', '.join(METHODS)})")
    _check_fields(path, run)
    if finished and not _finished(run):
        raise UserError(f"{run_dir}: the run has not finished; continue it with `personalize "
                        f"{run.get('method', 'lora')} ... --resume` first")
    return run


def resolution_error(value) -> str | None:
    """Why `value` is not an image size this package draws or exports at, or None when it is one:
    an integer number of pixels, a multiple of 8 (the VAE's factor) in 8..MAX_RESOLUTION."""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"is {json.dumps(value)[:40]}, not a number of pixels"
    if not 8 <= value <= MAX_RESOLUTION:
        return f"{value} is out of range (8..{MAX_RESOLUTION} px)"
    if value % 8:
        return f"{value} is not a multiple of 8 (the VAE's factor)"
    return None


def _check_fields(path: Path, run: dict) -> None:
    """The fields of run.json that generate, export and eval read: a one-line UserError naming the
    file and the field when one is there but of the wrong kind (older runs may lack some)."""
    if "resolution" in run and (why := resolution_error(run["resolution"])):
        raise UserError(f"{path}: field resolution {why}")
    base, subject = run.get("base"), run["subject"]
    fields = {"base": base if not isinstance(base, dict) else None, "token": run.get("token"),
              "instance_prompt": run.get("instance_prompt"), "subject.class_noun": subject.get("class_noun"),
              "subject.kind": subject.get("kind")}
    if isinstance(base, dict):
        fields |= {f"base.{k}": base.get(k) for k in ("name", "path", "hub_id")}
    for field, value in fields.items():
        if value is not None and not isinstance(value, str):
            raise UserError(f"{path}: field {field} is {json.dumps(value)[:40]}, not a string")


def _is_run(d: Path, unfinished: bool) -> bool:
    return (d / RUN_JSON).is_file() or unfinished and any((d / n).exists() for n in TRAINING_DIRS)


def find_run_dirs(path: Path, *, unfinished: bool = False, steps: bool = False, below: bool = False,
                  missing_ok: bool = False) -> list[Path]:
    """`path` itself if it is a run dir, else every run dir below it (sorted). Hidden folders are
    skipped and symlinked folders are not followed.

    unfinished: also runs without run.json yet (training, interrupted or failed: checkpoints/ or logs/).
    steps: also the runs inside a run (its steps/step-N/ saves, --save-every), which otherwise
    belong to it and are not listed.
    below: only folders below `path` (a folder of runs, never a run itself).
    missing_ok: none found is [] rather than a one-line UserError."""
    path = Path(path)
    if not path.is_dir():
        if missing_ok:
            return []
        raise UserError(f"{path}: no such directory")
    found = []
    for dirpath, dirnames, _ in os.walk(path):
        d = Path(dirpath)
        if not (below and d == path) and _is_run(d, unfinished):
            found.append(d)
            if not steps:
                dirnames.clear()
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
    if not found and not missing_ok:
        raise UserError(f"{path}: no {RUN_JSON} in it or below it; pass a `personalize lora/full` output dir")
    return sorted(found)


def run_token(run: dict) -> str:
    return str(run.get("token") or (run.get("config") or {}).get("token") or DEFAULT_TOKEN)
