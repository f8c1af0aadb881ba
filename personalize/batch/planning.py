"""What a batch will do, decided before anything is trained: the job grid (bases x methods x
subjects), each job's folders, the shards, and the checks that refuse bad --bases, --methods,
--subjects or --shard (one line, nothing written)."""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..backbones import BACKBONES
from ..config import TrainConfig, for_method
from ..defaults import METHODS
from ..errors import UserError
from ..outputs import slug
from ..subjects import data_dir as resolve_data_dir
from ..subjects import fetch_dataset, load_subjects, photos_present

STATUS_DIR = ".status"
BATCH_JSON = "batch.json"
# TrainConfig fields a rerun may change: they change neither the trained weights nor the class
# images (per-run fields are set per job); any other difference would mix two setups in one table
RERUN_MAY_CHANGE = frozenset({
    "subject", "method", "base", "output_dir", "resume", "overwrite", "data_dir", "checkpoint_every",
    "keep_checkpoints", "log_every", "validation_images", "validation_steps", "class_image_batch_size",
    "allow_pickle", "sample_every", "sample_prompts", "save_every", "score_every", "score_prompts", "score_images",
    "min_clip_t", "dino", "clip", "save_raw_weights",
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


def check_inputs(template: TrainConfig, bases: list[str], methods: list[str]) -> None:
    """What would fail every job the same way fails once, up front, writing nothing."""
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--methods: unknown method '{m}' ({', '.join(METHODS)})")
    for b in bases:
        # registry names and hub ids resolve (maybe download) when their turn comes
        if not (b in BACKBONES or b == "tiny" or b.startswith("tiny:") or "/" in b or Path(b).expanduser().exists()):
            raise UserError(f"--bases: unknown base '{b}'; known: {', '.join(BACKBONES)} "
                            f"(or a hub id / local pipeline dir)")
    for m in methods:
        for_method(template, m).validate()


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


def check_same_setup(batch_dir: Path, template: TrainConfig) -> None:
    """A rerun into `batch_dir` must train as the batch it continues (RERUN_MAY_CHANGE aside)."""
    f = Path(batch_dir) / BATCH_JSON
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


def default_batch_dir() -> Path:
    return Path(os.environ.get("PERSONALIZE_BATCH_DIR", "runs/batch"))
