"""What the app's buttons call (`page` wires them). Handlers are thin: they check the browser's
input (`workspace`), hand long work to `jobs`, and call the library exactly as the CLI does
(`TrainConfig` -> `dreambooth.train_subject` in the worker; `sources.resolve_source` /
`generate_to_dir`; `personalize export` / `personalize eval` through the CLI's own parser). A
user's error is the CLI's one line, shown as a Gradio error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import zipfile
from pathlib import Path

from ..backbones import BACKBONES, is_pipeline_dir, native_resolution
from ..cli import build_parser, quiet_libraries, user_facing
from ..clock import clock
from ..config import TrainConfig
from ..defaults import EXPORT_FORMATS
from ..environment import check as check_environment
from ..errors import UserError
from ..fileio import atomic_file
from ..runs import FINISHED, INTERRUPTED, base_name, final_loss, find_run_dirs, load_run_json, read_run, run_status
from .jobs import JobManager
from .workspace import Photo, Workspace, check_name, thumbnail

OWN, DATASET = "my photos", "DreamBooth subject"
RUN_COLUMNS = ["run", "status", "base", "method", "subject", "steps", "train time", "final loss", "DINO", "CLIP-I",
               "CLIP-T"]


def export_formats() -> list[str]:
    return list(EXPORT_FORMATS)


@functools.cache
def _quiet() -> None:
    """The CLI's start-up for commands that load models (version check, library chatter off), once."""
    check_environment()
    quiet_libraries()


def user_errors(fn):
    """UserError -> gr.Error (the one line, shown in the page; gradio_client raises it)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        import gradio as gr

        try:
            return fn(*a, **kw)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    @functools.wraps(fn)
    def gen_wrapper(*a, **kw):
        import gradio as gr

        try:
            yield from fn(*a, **kw)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return gen_wrapper if inspect.isgeneratorfunction(fn) else wrapper


def _photos(files) -> list[Photo]:
    out = []
    for f in [files] if isinstance(files, (str, Path)) else files or []:  # one file, not its characters
        path = Path(f)
        # gradio keeps the browser's file name as the temp file's own name
        out.append(Photo(path, path.name))
    return out


def _blank(v):
    """None for an empty page field (the flag's default), else the value as it is."""
    return None if v is None or (isinstance(v, str) and not v.strip()) else v


def _given(v):
    """A page number that means "the default" when 0 or empty (resolution, lr, eval steps): None."""
    if isinstance(v, str):
        try:
            v = float(v) if float(v) == 0 else v
        except ValueError:
            pass
    return None if _blank(v) is None or v == 0 else v


def _flag_text(v) -> str:
    """A page value as the text a user would type after its flag (an integral float without its .0)."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return str(v).strip()


def parse_as_cli(command: str, flags: dict[str, object], *positional: str) -> argparse.Namespace:
    """The page's values parsed as `personalize COMMAND`'s flags by the CLI's own parser (its types,
    ranges and choices: one owner, no copied range); a bad value is the CLI's one line (without
    its `error: `) as a UserError, nothing printed. A value of None is left out (the flag's default)."""
    parser = build_parser()

    def refuse(status=0, message=None):
        raise UserError((message or f"personalize {command}: bad arguments").strip().removeprefix("error: "))

    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in (parser, *subcommands.choices.values()):
        p.exit = refuse  # argparse reports through exit(2, message): the line, raised instead of printed
    argv = [command, *positional, *(f"{flag}={_flag_text(v)}" for flag, v in flags.items() if v is not None)]
    return parser.parse_args(argv)


# the Train tab's numbers: TrainConfig field -> its flag, checked as the CLI checks it
TRAIN_FIELDS = {"steps": "--steps", "resolution": "--resolution", "lr": "--lr", "rank": "--rank",
                "class_images": "--class-images", "sample_every": "--sample-every"}


def train_values(method, page: dict) -> dict:
    """The Train tab's numbers (field -> value; None: the default) as `personalize METHOD` takes
    them: the flag's type (parse_as_cli), then TrainConfig.validate's ranges. Returns the fields given."""
    TrainConfig(method=str(method), subject="-").validate()  # a method first: its name is the command parsed
    given = {k: v for k, v in page.items() if v is not None}
    args = parse_as_cli(str(method), {TRAIN_FIELDS[k]: v for k, v in given.items()}, "--subject=-")
    values = {k: getattr(args, k) for k in given}
    TrainConfig(method=str(method), subject="-", **values).validate()
    return values


def settings_fields(method: str, preset: str | None, config: Path | None) -> dict:
    """The TrainConfig fields a preset and a settings file set for a run of `method`, read exactly as
    `personalize METHOD --preset P --config F` reads them (a bad key or value is the CLI's one line);
    only what they change from the flags' defaults. `personalize app --train-preset/--train-config`:
    every option the page does not show (--ema, --pivotal, --prior base-prediction, captions, ...)."""
    if preset is None and config is None:
        return {}
    given = parse_as_cli(method, {"--preset": preset, "--config": config}, "--subject=-")
    plain = parse_as_cli(method, {}, "--subject=-")
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"subject", "method"}
    return {k: getattr(given, k) for k in sorted(names)
            if hasattr(given, k) and getattr(given, k) != getattr(plain, k, None)}


def check_settings(methods, preset: str | None, config: Path | None) -> None:
    """At start-up: the preset and file read for at least one training command (a method-only key
    reads for its own method only, checked again when a run of another method starts)."""
    errors = []
    for m in methods:
        try:
            settings_fields(m, preset, config)
            return
        except UserError as e:
            errors.append(e)
    if errors:
        raise errors[0]


class App:
    def __init__(self, workspace: Path, train_defaults: dict | None = None, max_photo_mb: float | None = None,
                 preset: str | None = None, config: Path | None = None):
        self.ws = Workspace(workspace) if max_photo_mb is None else Workspace(workspace, max_photo_mb)
        self.jobs = JobManager()
        self.train_defaults = dict(train_defaults or {})  # TrainConfig fields the page does not show
        self.preset, self.config = preset, config  # settings of every run started here (settings_fields)

    # ------------------------------------------------------------------ Train
    def resolution_for(self, base: str, resolution) -> int:
        """The page's resolution (0: the base's native one), checked as `--resolution`."""
        if _given(resolution) is not None:
            return train_values("lora", {"resolution": resolution})["resolution"]
        if base in BACKBONES:
            return BACKBONES[base].resolution
        p = Path(base or "")
        return native_resolution(p) if is_pipeline_dir(p) else 512

    @user_errors
    def check_photos(self, files, base, resolution):
        if not files:
            return [], ""
        good, bad = self.ws.check_photos(_photos(files), self.resolution_for(base, resolution))
        thumbs = [(thumbnail(p.source), p.name) for p in good]
        lines = [f"{len(good)} photo(s) accepted" + (f", {len(bad)} refused:" if bad else "")]
        lines += [f"- error: {m}" for m in bad]
        return thumbs, "\n".join(lines)

    def make_config(self, name, base, source, subject, files, class_noun, method, steps, resolution, lr, rank,
                    prior, class_images, sample_every, overwrite, pivotal=False):
        """The TrainConfig of the Train tab, every value checked (as the CLI's flags) before the
        photos are stored: a refused value writes nothing."""
        name = check_name(name)
        run_dir = self.ws.new_run_dir(name)
        if not overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
            # the worker's prepare refuses it too, but only after this run's photos would be replaced
            state = run_status(run_dir).state
            raise UserError(f"run '{name}' already exists in the workspace ({'not a run' if state == 'absent' else state}); "
                            f"tick 'overwrite' to train it again, Resume it if interrupted, or pick another name")
        own = source == OWN
        if not own and not subject:
            raise UserError("pick a DreamBooth subject or switch to your own photos")
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in self.train_defaults.items() if k in fields}
        values.update(settings_fields(str(method), self.preset, self.config))
        values.update(train_values(method, dict(
            steps="" if steps is None else steps, resolution=_given(resolution), lr=_given(lr), rank=_blank(rank),
            class_images=_blank(class_images) if prior else 0, sample_every=_blank(sample_every))))
        values.update(method=method, subject=str(subject), base=base, output_dir=str(run_dir),
                      class_noun=(class_noun or "").strip() or None, overwrite=bool(overwrite))
        if pivotal:  # --pivotal (else train_defaults' value, default off)
            values["pivotal"] = True
        if own:  # phone photos are rarely square: train each at its aspect ratio rather than cut to a square
            values.setdefault("buckets", True)
        steps = values["steps"]
        if method != "full" and "checkpoint_every" not in self.train_defaults:
            # a page's runs get interrupted (app closed, machine restarted): an adapter's checkpoint is
            # small, so keep at most a tenth of the run to redo (the recipe's 200 for full finetuning)
            values["checkpoint_every"] = min(200, max(10, steps // 10))
        # the loss on the page is as fresh as loss.csv: log often enough for ~50 points a run
        values["log_every"] = min(values.get("log_every", 10), max(1, steps // 50))
        cfg = TrainConfig(**values)
        cfg.validate()
        if own:
            good, bad = self.ws.check_photos(_photos(files), self.resolution_for(base, resolution))
            if bad:
                raise UserError(bad[0] + (f" (and {len(bad) - 1} more refused)" if len(bad) > 1 else ""))
            if not cfg.class_noun:
                raise UserError("your own photos: say what the subject is in 'class noun' (e.g. dog)")
            cfg.subject = str(self.ws.store_photos(name, good))
        return name, run_dir, cfg

    @user_errors
    def train(self, *inputs):
        self.jobs.check_free()  # before anything is stored: a running job's photos and record stay its own
        name, run_dir, cfg = self.make_config(*inputs)
        yield from self._start(name, run_dir, cfg)

    @user_errors
    def resume(self, name):
        name = check_name(name or "", "interrupted run")
        config = self.ws.load_job(name)
        if config is None:
            raise UserError(f"run '{name}': not started by this app (no job record); resume it with "
                            f"`personalize <method> ... --resume`")
        cfg = TrainConfig(**(config | {"resume": True, "overwrite": False}))
        yield from self._start(name, Path(cfg.output_dir), cfg)

    def _start(self, name, run_dir, cfg):
        self.ws.contained(run_dir, "run")
        job_file = self.ws.save_job(name, cfg.to_json())
        job = self.jobs.start_train(name, run_dir, job_file, cfg.steps, cwd=self.ws.root)
        yield from self._follow(job)

    def _follow(self, job):
        while job.alive:
            yield job.progress_line(), job.samples(), job.log_tail()
            job.wait(0.5)
        yield job.progress_line(), job.samples(), job.log_tail()
        if job.status == "error":
            raise UserError(job.message.removeprefix("error: "))

    def watch(self):
        """The current (or last) training's progress: a reopened page re-attaches to a run."""
        job = self.jobs.train
        if job is None:
            yield "no training yet", [], ""
            return
        while job.alive:
            yield job.progress_line(), job.samples(), job.log_tail()
            job.wait(0.5)
        yield job.progress_line(), job.samples(), job.log_tail()

    def cancel(self):
        return self.jobs.cancel()

    # ------------------------------------------------------------------ Runs
    def list_runs(self) -> list[dict]:
        """Every run below runs/: finished (run.json), running, interrupted (checkpoints, no final
        run.json) or empty; step saves (`steps/step-N/`) belong to their run and are not listed."""
        out = []
        live = self.jobs.train.run_dir if self.jobs.train and self.jobs.train.alive else None
        for d in find_run_dirs(self.ws.runs, unfinished=True, below=True, missing_ok=True):
            status = run_status(d)
            run = status.run
            row = {"run": self.ws.rel(d), "path": d, "run_json": run}
            if live is not None and d == live:
                row["status"] = "running"
            elif status.state == FINISHED:
                row["status"] = "finished"
            else:
                row["status"] = (f"interrupted at step {status.step}" if status.state == INTERRUPTED
                                 else "interrupted (no checkpoint)")
            cfg = (run or {}).get("config") or self.ws.load_job(d.name) or {}
            stats = (run or {}).get("stats") or {}
            row.update(base=base_name(run) if run else cfg.get("base", "?"), method=(run or cfg).get("method", "?"),
                       subject=((run or {}).get("subject") or {}).get("name") or Path(str(cfg.get("subject", "?"))).name,
                       steps=cfg.get("steps", ""),
                       time=clock(stats["seconds_per_step"] * cfg.get("steps", 0)) if stats.get("seconds_per_step") else "",
                       loss=final_loss(run) if run else None)
            row["scores"] = self._scores(d)
            out.append(row)
        return out

    @staticmethod
    def _scores(run_dir: Path) -> dict:
        try:
            return json.loads((run_dir / "eval" / "scores.json").read_text()).get("scores") or {}
        except (OSError, ValueError):
            return {}

    def runs_table(self):
        import gradio as gr

        rows = self.list_runs()
        fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
        table = [[r["run"], r["status"], r["base"], r["method"], r["subject"], r["steps"], r["time"], fmt(r["loss"]),
                  fmt(r["scores"].get("dino")), fmt(r["scores"].get("clip_i")), fmt(r["scores"].get("clip_t"))]
                 for r in rows]
        finished = [r["run"] for r in rows if r["status"] == "finished"]
        resumable = [r["run"] for r in rows if r["status"].startswith("interrupted") and "/" not in r["run"]
                     and self.ws.load_job(r["run"]) is not None]
        return (table, gr.update(choices=finished), gr.update(choices=[r["run"] for r in rows]),
                gr.update(choices=resumable, value=resumable[0] if resumable else None))

    @user_errors
    def run_details(self, rel):
        run_dir = self.ws.run_dir(rel)
        run = load_run_json(run_dir) or {"status": "not finished", "job": self.ws.load_job(run_dir.name)}
        grid = run_dir / "validation.png"
        summary = {k: run.get(k) for k in ("status", "method", "base", "subject", "instance_prompt", "resolution", "lr",
                                           "stats", "finished_at", "job") if run.get(k) is not None}
        if self._scores(run_dir):
            summary["scores"] = self._scores(run_dir)
        # as text: Gradio takes any dict with a "path" key (run.json's base) for a file to serve
        return (str(grid) if grid.is_file() else None), json.dumps(summary, indent=2, default=str)

    def _cli(self, command: str, flags: dict, *positional: str):
        """Run `personalize COMMAND` in-process through the CLI's own parser (parse_as_cli) and handler."""
        _quiet()
        args = parse_as_cli(command, flags, *positional)
        try:
            return args.func(args)
        except Exception as e:  # noqa: BLE001 - the CLI's boundary: a user's error is one line
            line = user_facing(e)
            if line is None:
                raise
            raise UserError(line) from None

    @user_errors
    def export(self, rel, fmt, overwrite):
        run_dir = self.ws.run_dir(rel)
        if fmt not in export_formats():
            raise UserError(f"unknown export format '{fmt}' ({', '.join(export_formats())})")
        suffix = ".safetensors" if fmt in ("kohya", "single-file") else ""
        out = self.ws.exports / f"{rel.replace('/', '-')}-{fmt}{suffix}"
        with self.jobs.exclusive(f"export {rel}"):
            self._cli("export", {"--format": fmt, "--out": out}, str(run_dir), *(["--overwrite"] if overwrite else []))
        if out.is_file():
            return str(out), f"exported `{rel}` as {fmt}: `{out}`"
        return None, f"exported `{rel}` as {fmt}: folder `{out}` (in the workspace)"

    @user_errors
    def evaluate(self, rel, dino, clip, images_per_prompt, steps):
        run_dir = self.ws.run_dir(rel)
        flags = {"--images-per-prompt": _blank(images_per_prompt), "--steps": _given(steps),
                 "--dino": _blank(dino), "--clip": _blank(clip)}
        with self.jobs.exclusive(f"eval {rel}"):
            self._cli("eval", flags, str(run_dir))
        s = self._scores(run_dir)
        return (f"`{rel}`: DINO {s.get('dino', float('nan')):.3f} · CLIP-I {s.get('clip_i', float('nan')):.3f} · "
                f"CLIP-T {s.get('clip_t', float('nan')):.3f}  (eval/scores.md in the run)")

    # ------------------------------------------------------------------ Generate
    @user_errors
    def generate(self, runs, weights, prompt, negative, seed, n, steps, guidance, resolution):
        from ..generate import default_out_dir, generate_to_dir
        from ..sources import resolve_source

        runs = [runs] if isinstance(runs, str) else list(runs or [])
        if not runs:
            raise UserError("pick one or more finished runs to generate with")
        dirs = [self.ws.run_dir(r) for r in runs]
        # the page's values are `personalize generate`'s flags, parsed and ranged by its parser
        args = parse_as_cli("generate", {"--adapter-weights": _blank(weights), "--seed": _blank(seed),
                                         "--images-per-prompt": _blank(n), "--steps": _blank(steps),
                                         "--guidance-scale": _blank(guidance), "--resolution": _given(resolution)})
        w = args.adapter_weights
        # a full run is the pipeline the adapters go on, so it comes first (as RUN_DIR on the CLI)
        methods_ = [read_run(d, finished=True).get("method") for d in dirs]
        order = sorted(range(len(dirs)), key=lambda i: methods_[i] != "full")
        dirs = [dirs[i] for i in order]
        w = [w[i] for i in order] if w is not None and len(w) == len(dirs) else w
        _quiet()
        src = resolve_source(dirs[0], dirs[1:], w)
        out = default_out_dir(src)
        while out.exists():  # two calls in one second: a folder each
            out = out.with_name(out.name + "-1")
        self.ws.contained(out, "output")
        with self.jobs.exclusive("generate"):
            out, jobs, _ = generate_to_dir(src, [prompt or "a {token} {class}"], out,
                                           images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
                                           guidance_scale=args.guidance_scale, negative_prompt=(negative or None),
                                           resolution=args.resolution, progress=False)
        archive = out / "images.zip"
        with atomic_file(archive) as tmp, zipfile.ZipFile(tmp, "w") as z:
            for p in sorted(out.iterdir()):
                if p.suffix in (".png", ".json") and not p.name.startswith("."):
                    z.write(p, p.name)
        gallery = [(str(j.path), f"{j.prompt} · seed {j.seed}") for j in jobs]
        return gallery, str(archive), f"{len(jobs)} image(s) in `{out}`; each PNG carries its settings (as `personalize generate`)"
