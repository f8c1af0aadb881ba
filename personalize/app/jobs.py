"""One long job at a time: a training in its worker process (`app/worker.py`), or a generation,
export or evaluation in this process. Gradio's queue already runs the app's long events one by
one; this module is what still holds when a browser tab closes while its training goes on (the
job lives here, not in the event) or when two events race.

A training's progress is read from what the run writes and what its worker reports: the step
from the worker's per-step events, the loss from `logs/loss.csv` (written every `log_every`
steps), s/step and ETA from the time between steps, sample grids from `samples/` as they appear.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from ..clock import clock
from ..errors import UserError


class TrainJob:
    """A training run in its worker process; `status` is running, done, cancelled or error."""

    def __init__(self, name: str, run_dir: Path, job_file: Path, total: int, cwd: Path):
        self.name, self.run_dir, self.total = name, Path(run_dir), total
        self.status, self.message = "running", ""
        self.step, self.started = 0, time.time()
        self.step_times: collections.deque = collections.deque(maxlen=50)  # (time, step)
        self.log: collections.deque = collections.deque(maxlen=200)
        self.log_path = job_file.with_suffix(".log")
        self._log_file = self.log_path.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "personalize.app.worker", str(job_file)], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=self._log_file, text=True)
        self.cancel_requested = False
        self._reader = threading.Thread(target=self._read, name=f"job-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "step":
                self.step = int(ev["step"])
                self.step_times.append((float(ev["time"]), self.step))
            elif kind == "log":
                self.log.append(ev["text"])
            elif kind == "done":
                self.status, self.message = "done", f"done: {self.run_dir.name}"
            elif kind == "cancelled":
                self.status = "cancelled"
                self.message = (f"cancelled at step {ev.get('step', self.step)}/{self.total}; the run is resumable "
                                f"(Resume on the Train tab)")
            elif kind == "error":
                self.status, self.message = "error", f"error: {ev['message']}"
        code = self.proc.wait()
        self._log_file.close()
        if self.status == "running":  # killed, or died without a word
            self.status = "error"
            self.message = f"error: the training process ended with code {code}; see {self.log_path}"

    @property
    def alive(self) -> bool:
        return self._reader.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._reader.join(timeout)

    def cancel(self) -> None:
        """Ask the worker to stop after the current step (it writes that step's checkpoint)."""
        if self.proc.poll() is None:
            self.cancel_requested = True
            self.proc.send_signal(signal.SIGTERM)

    def seconds_per_step(self) -> float:
        if len(self.step_times) < 2:
            return float("nan")
        (t0, s0), (t1, s1) = self.step_times[0], self.step_times[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else float("nan")

    def loss(self) -> float | None:
        try:
            with (self.run_dir / "logs" / "loss.csv").open() as f:
                rows = list(csv.DictReader(f))
            return float(rows[-1]["loss"]) if rows else None
        except (OSError, ValueError, KeyError):
            return None

    def samples(self) -> list[tuple[str, str]]:
        """Sample grids written so far (`--sample-every`), oldest first, with their step."""
        folder = self.run_dir / "samples"
        found = sorted(folder.glob("step-*.png")) if folder.is_dir() else []
        return [(str(p), f"step {int(p.stem.removeprefix('step-'))}") for p in found if p.stem[5:].isdigit()]

    def progress_line(self) -> str:
        sps = self.seconds_per_step()
        loss = self.loss()
        head = {"running": "training" + (" (cancelling...)" if self.cancel_requested else ""),
                "done": "finished", "cancelled": "cancelled", "error": "failed"}[self.status]
        parts = [f"**{head}** `{self.name}`", f"step {self.step}/{self.total}",
                 f"loss {loss:.4f}" if loss is not None else "loss -",
                 f"{sps:.2f} s/step" if math.isfinite(sps) else "- s/step",
                 f"ETA {clock((self.total - self.step) * sps)}" if self.status == "running" else
                 f"elapsed {clock(time.time() - self.started)}"]
        line = " · ".join(parts)
        return line + (f"\n\n{self.message}" if self.message else "")

    def log_tail(self, n: int = 12) -> str:
        lines = list(self.log)[-n:]
        if self.status == "error":
            try:
                lines += self.log_path.read_text().splitlines()[-n:]
            except OSError:
                pass
        return "\n".join(lines)


class JobManager:
    """Holds the one job that may run; a second is refused in one line naming the first."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy: str | None = None
        self.train: TrainJob | None = None  # the latest training (finished or not)

    def check_free(self) -> None:
        """A one-line UserError naming what runs, if anything does (checked again when a job starts)."""
        if self.train is not None and self.train.alive:
            raise UserError(f"training '{self.train.name}' is running (step {self.train.step}/{self.train.total}); "
                            f"wait for it or cancel it")
        if self._busy:
            raise UserError(f"{self._busy} is running; wait for it to finish")

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Run an in-process job (generate, export, evaluate) while nothing else runs."""
        with self._lock:
            self.check_free()
            self._busy = what
        try:
            yield
        finally:
            with self._lock:
                self._busy = None

    def start_train(self, name: str, run_dir: Path, job_file: Path, total: int, cwd: Path) -> TrainJob:
        with self._lock:
            self.check_free()
            self.train = TrainJob(name, run_dir, job_file, total, cwd)
            return self.train

    def cancel(self) -> str:
        job = self.train
        if job is None or not job.alive:
            return "nothing is training"
        job.cancel()
        return f"cancelling '{job.name}' after step {job.step}..."

    def shutdown(self, timeout: float = 30) -> None:
        """Stop a running training cleanly (its checkpoint is written), e.g. when the app exits."""
        job = self.train
        if job is not None and job.alive:
            job.cancel()
            job.wait(timeout)
            if job.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.proc.pid, signal.SIGKILL)
