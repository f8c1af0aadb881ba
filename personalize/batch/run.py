"""Running a batch: each job of this shard trained in turn on the base held in memory, a job's
failure recorded and the batch going on, finished jobs skipped on a rerun and an interrupted one
resumed from its checkpoint (`dreambooth.train_subject` with resume), and with --eval each
finished run scored."""

from __future__ import annotations

import gc
import shutil
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import dreambooth, sources  # their functions are looked up when called, so a patched one is used
from ..config import TrainConfig, for_method
from ..errors import UserError
from ..evaluation.protocol import evaluate_run
from ..evaluation.evaluators import ClipEmbedder, DinoEmbedder
from ..fileio import write_json
from ..runs import TRAINING_DIRS, is_finished
from .planning import BATCH_JSON, STATUS_DIR, Job, check_inputs, check_same_setup, plan, shard_jobs
from .summary import read_json, scores_file, write_summary


class _Bases:
    """The one base in memory (a batch is ordered by base, so each is loaded once), and the
    bases that failed to load (their remaining jobs fail at once instead of retrying the load)."""

    def __init__(self):
        self.name: str | None = None
        self.loaded = None
        self.errors: dict[str, Exception] = {}

    def get(self, name: str, allow_pickle: bool):
        if name in self.errors:
            raise self.errors[name].with_traceback(None)
        if self.name != name:
            self.name, self.loaded = None, None  # free the previous base before loading the next
            try:
                self.loaded = dreambooth.LoadedBase(sources.resolve_base(name), allow_pickle)
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
    bases, methods, subjects = (list(dict.fromkeys(x)) for x in (bases, methods, subjects))
    check_inputs(template, bases, methods)
    jobs = plan(bases, methods, subjects)
    mine = shard_jobs(jobs, *shard)
    batch_dir = Path(batch_dir)
    check_same_setup(batch_dir, template)
    todo = [j for j in mine if not is_finished(j.run_dir(batch_dir))
            or evaluator is not None and not scores_file(j.run_dir(batch_dir)).is_file()]
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
    run_dir, status_file = job.run_dir(batch_dir), job.status_file(batch_dir)
    if is_finished(run_dir):  # trained earlier, only its scores are missing
        status = read_json(status_file) or {"status": "finished"}
    else:
        cfg = replace(for_method(template, job.method), base=job.base, subject=job.subject, output_dir=str(run_dir),
                      resume=True, overwrite=False)
        _drop_partial_outputs(run_dir)
        t0 = time.perf_counter()
        failure = None
        try:
            # a quantized base is loaded (and quantized) by its run: the shared copy is the plain base
            loaded = held.get(job.base, cfg.allow_pickle) if cfg.base_quantization == "none" else None
            dreambooth.train_subject(cfg, log=log, loaded=loaded)
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
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name not in TRAINING_DIRS:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def describe_error(e: BaseException) -> str:
    """One line for the summary: a UserError's own message, else the type and the first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"out of memory ({type(e).__name__}: {text[:200]})" if text else f"out of memory ({type(e).__name__})"
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text[:300]}"


def _free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluator(dino_name: str, clip_name: str, data_dir: str | None, images_per_prompt: int):
    """`run_batch`'s evaluator for `--eval`: loads the DINO and CLIP models (once) and returns
    evaluate(run_dir), the `personalize eval` protocol for one run."""

    def load():
        dino, clip = DinoEmbedder.from_name_or_path(dino_name), ClipEmbedder.from_name_or_path(clip_name)

        def evaluate(run_dir: Path):
            return evaluate_run(run_dir, dino=dino, clip=clip, data_dir=data_dir, images_per_prompt=images_per_prompt)

        return evaluate

    return load
