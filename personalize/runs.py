"""Finished training runs on disk: reading `run.json` and finding run directories.

A run directory is what `personalize lora` / `full` writes: `run.json` (the resolved config, the
base's resolved location, the subject) next to the weights. Generation, export, evaluation and
batch all start from here. No model imports.
"""

from __future__ import annotations

import json
from pathlib import Path

from .defaults import METHODS
from .errors import UserError
from .fileio import write_json

RUN_JSON = "run.json"


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


def is_finished(run_dir: Path) -> bool:
    return (load_run_json(run_dir) or {}).get("status") == "finished"


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
    if finished and run.get("status") != "finished":
        raise UserError(f"{run_dir}: the run has not finished; continue it with `personalize "
                        f"{run.get('method', 'lora')} ... --resume` first")
    return run


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run dir, else every run dir below it (sorted)."""
    path = Path(path)
    if (path / RUN_JSON).is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: no such directory")
    found = sorted(p.parent for p in path.rglob(RUN_JSON)
                   if not any(part.startswith(".") for part in p.relative_to(path).parts))
    # a run's own steps/step-N/ (--save-every) are runs too, but belong to it: listed only when asked for
    found = [d for d in found if not any(other in d.parents for other in found)]
    if not found:
        raise UserError(f"{path}: no {RUN_JSON} in it or below it; pass a `personalize lora/full` output dir")
    return found


def run_token(run: dict) -> str:
    from .subjects import DEFAULT_TOKEN

    return str(run.get("token") or (run.get("config") or {}).get("token") or DEFAULT_TOKEN)
