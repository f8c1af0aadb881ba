"""One training loop (`fit`) shared by full finetuning, LoRA and knowledge distillation.

The only module that holds an `accelerate.Accelerator` (pipeline.py uses only accelerate's
meta-device loader): device placement, mixed precision, gradient accumulation, multi-GPU
(`accelerate launch`). Callers hand `fit` the trainable modules and a
`loss_fn(models, step, micro_step, generator) -> {"loss": total, other named parts...}`; `fit` owns
the optimizer, checkpoints, resume, logging and the progress bar.

Resume is exact: every random draw of a step comes from a generator seeded by (seed, step,
process), and a checkpoint holds the trainable weights and the optimizer state, so an interrupted
run continued with `resume=True` ends with the same weights as an uninterrupted one.
Checkpoints are safetensors + JSON (no pickles).

Periodic work (in-run samples, step saves, scores: `Hook`s) runs on the main process between
steps, in eval mode under `no_grad`, with the global RNG state forked away: it never touches the
weights, the optimizer or any generator the loop draws from, so a run with hooks ends with the same
weights as one without, and resume stays exact.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import checkpoints
from .clock import clock
from .defaults import LR_SCHEDULERS, OPTIMIZERS
from .errors import UserError
from .extras import require_extra
from .fileio import write_text
from .precision import resolve_mixed_precision

LossFn = Callable[[dict, int, int, torch.Generator], dict]


@dataclass
class FitConfig:
    steps: int
    lr: float
    gradient_accumulation_steps: int = 1  # BK-SDM DreamBooth recipe: 1 (KD recipe: 4, set by distill)
    max_grad_norm: float = 1.0  # diffusers DreamBooth scripts' default clip
    adam_beta1: float = 0.9  # torch/diffusers AdamW defaults, as in the BK-SDM scripts
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 0  # recipe: constant LR, no warm-up
    lr_scheduler: str = "constant"  # recipe: constant LR; any name diffusers' get_scheduler takes
    optimizer: str = "adamw"  # recipe: torch AdamW; adamw8bit (bitsandbytes, CUDA), prodigy (prodigyopt), loraplus
    loraplus_lr_ratio: float = 16.0  # LoRA+ (Hayou et al. 2024): B at 2^4 x the LR, the paper's recommendation
    use_8bit_adam: bool = False  # the older spelling of optimizer="adamw8bit"
    checkpoint_every: int = 0  # 0: only the final checkpoint
    checkpoints_kept: int = 1  # during training; older ones are deleted once a newer one is safely written
    log_every: int = 10  # host syncs only this often: the hot loop never calls .item()
    seed: int = 1234  # BK-SDM recipe seed
    profile_steps: bool = False  # record per-step wall time (syncs the device every step: benchmarks only)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "FitConfig":
        """The loop's settings taken from a trainer's config (TrainConfig, DistillConfig): every
        field of the same name, then `overrides` (values the trainer resolves, like the LR)."""
        names = {f.name for f in fields(cls)}
        values = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
        return cls(**(values | overrides))


@dataclass
class FitResult:
    step: int  # last completed optimizer step
    losses: dict[str, float]  # mean of each loss part over the last logging window
    seconds_per_step: float
    models: dict[str, nn.Module] = field(default_factory=dict)  # unwrapped, trained modules
    step_seconds: list[float] = field(default_factory=list)  # per step, with FitConfig.profile_steps
    hook_seconds: dict[str, list[float]] = field(default_factory=dict)  # per hook, one entry per run


def make_accelerator(mixed_precision: str = "auto", gradient_accumulation_steps: int = 1,
                     log_dir: Path | None = None, cpu: bool | None = None):
    """Build the Accelerator for a run. TF32 matmuls are enabled on Ampere+ (free speed, the
    loss is computed in fp32 anyway)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = resolve_mixed_precision(mixed_precision, cpu)
    _reset_single_process_state(precision, cpu)
    trackers = "tensorboard" if log_dir is not None and _tensorboard_available() else None
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=gradient_accumulation_steps, cpu=cpu,
                       log_with=trackers, project_config=ProjectConfiguration(
                           project_dir=str(log_dir), logging_dir=str(log_dir)) if log_dir else None)


def process_state():
    """accelerate's per-process state (process_index, num_processes, device, is_main_process,
    wait_for_everyone) for work outside the loop that `accelerate launch` shards (distill eval)."""
    from accelerate import PartialState

    # without cpu=True accelerate sees no multi-process launch on a machine without CUDA
    return PartialState(cpu=not torch.cuda.is_available())


def _reset_single_process_state(mixed_precision: str, cpu: bool) -> None:
    """accelerate keeps one process-wide state; a later run in the same process (a test, a batch
    grid) with another precision needs it cleared. Never done under a distributed launch."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if not state or state.get("_mixed_precision") in (None, mixed_precision) and state.get("_cpu", cpu) == cpu:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def step_generator(seed: int, step: int, process_index: int, device) -> torch.Generator:
    """Per-(step, process) RNG: makes resume exact and keeps ranks from drawing the same noise."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + process_index * 104_729) % (2**63 - 1))
    return g


def trainable_parameters(models: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {f"{m}.{n}": p for m, mod in models.items() for n, p in mod.named_parameters() if p.requires_grad}


def optimizer_name(cfg) -> str:
    """`--use-8bit-adam` is kept as the older spelling of `--optimizer adamw8bit`."""
    return "adamw8bit" if getattr(cfg, "use_8bit_adam", False) and cfg.optimizer == "adamw" else cfg.optimizer


def scheduler_name(cfg) -> str:
    """`--lr-warmup-steps` warmed the LR up before `--lr-scheduler` existed: with the default
    `constant` it still does (diffusers' `constant` would silently ignore it)."""
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
        return "constant_with_warmup"
    return cfg.lr_scheduler


def make_optimizer(params: list[nn.Parameter], cfg: FitConfig, on_cuda: bool, log=print,
                   models: dict[str, nn.Module] | None = None) -> torch.optim.Optimizer:
    """THE optimizer of a run. `models` (the modules `params` belong to): loraplus's groups by name."""
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
              eps=cfg.adam_epsilon)
    name = optimizer_name(cfg)
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")
    if name == "loraplus":
        return _loraplus(cfg, on_cuda, kw, models)
    if name == "prodigy":
        # Prodigy (Mishchenko & Defazio 2023) estimates the step size itself: lr is a multiplier (1.0)
        require_extra("prodigy", "--optimizer prodigy")
        import prodigyopt

        return prodigyopt.Prodigy(params, **kw)
    if name == "adamw8bit":
        if on_cuda:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kw)
        log("8-bit AdamW needs CUDA (bitsandbytes); using plain AdamW on CPU")
    return torch.optim.AdamW(params, **_adamw_kernel(on_cuda), **kw)


def _adamw_kernel(on_cuda: bool) -> dict:  # CPU: fused, 3x the per-tensor loop; foreach held a model-sized temporary
    return {"foreach": True} if on_cuda else {"fused": True}  # (benchmarks/RESULTS.md, "Full finetuning")


def _loraplus(cfg: FitConfig, on_cuda: bool, kw: dict, models) -> torch.optim.Optimizer:
    """LoRA+ (Hayou et al. 2024) through peft's `create_loraplus_optimizer`: AdamW whose `lora_B`
    matrices (and 1-D adapter vectors, DoRA's magnitudes) learn at `loraplus_lr_ratio` x the LR, the
    recipe's weight decay kept on every group."""
    from peft.optimizers import create_loraplus_optimizer

    holder = nn.ModuleDict(models or {})
    if not any("lora_B" in n for n, p in holder.named_parameters() if p.requires_grad):
        raise UserError("--optimizer loraplus: no LoRA B matrices to train (LoRA+ is for lora and dora runs)")
    return create_loraplus_optimizer(holder, torch.optim.AdamW, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                     loraplus_weight_decay=kw.pop("weight_decay"), **_adamw_kernel(on_cuda), **kw)


# ---------------------------------------------------------------------------- logging
class _LossLog:
    """loss.csv (one row per logging window) + the accelerate trackers (TensorBoard)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.header: list[str] | None = None
        if path.exists() and resume_step >= 0:
            with path.open() as f:
                rows = list(csv.reader(f))
            if rows:
                self.header = rows[0]
                kept = [r for r in rows[1:] if r and int(r[0]) <= resume_step]
                self._write_all([self.header, *kept])

    def _write_all(self, rows):
        buf = io.StringIO(newline="")
        csv.writer(buf).writerows(rows)
        write_text(self.path, buf.getvalue())

    def log(self, step: int, values: dict[str, float]):
        if self.header is None:
            self.header = ["step", *values]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_all([self.header])
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, *(f"{values.get(k, float('nan')):.6g}" for k in self.header[1:])])


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} s/step"),
        TextColumn("eta {task.fields[eta]}"), disable=not enabled, transient=False,
    )


# ---------------------------------------------------------------------------- periodic work
@dataclass
class Hook:
    """Work done every `every` optimizer steps on the main process: `fn(step, models)` gets the
    unwrapped modules (eval mode, no grad, autocast as in training). `at_end`: also after the
    last step when that is not a multiple of `every`."""

    name: str
    every: int
    fn: Callable[[int, dict], None]
    at_end: bool = False
    skip_last: bool = False  # not after the last step (a step save: the final outputs are that step)
    # state of the hook's own to keep with each checkpoint (the EMA): `on_checkpoint(step)` runs on the
    # main process just before fit writes the checkpoint of `step`, so the two always go together
    on_checkpoint: Callable[[int], None] | None = None

    def due(self, step: int, total: int) -> bool:
        if self.every <= 0 or self.skip_last and step == total:
            return False
        return step % self.every == 0 or (self.at_end and step == total)

    def remaining(self, step: int, total: int) -> int:
        """Times it will still run after `step`."""
        return sum(self.due(s, total) for s in range(step + 1, total + 1)) if self.every > 0 else 0


class StopRun(Exception):
    """Raised by a hook to end the run after this step (the app's Cancel): `fit` first writes the
    step's checkpoint, so the run continues with `resume=True` as if never stopped. Single-process
    runs only (a hook runs on the main process alone)."""


def _run_hooks(due: list[Hook], step: int, accelerator, prepared: dict, seconds: dict) -> None:
    models = {k: accelerator.unwrap_model(m) for k, m in prepared.items()}
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    # fork_rng: anything a hook draws from the global RNGs (a pipeline's latents, dropout) is
    # undone afterwards; the loop's own generators are per step and never seen by a hook
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for m in models.values():
            m.eval()
        try:
            for h in due:
                t = time.perf_counter()
                with accelerator.autocast():
                    h.fn(step, models)
                seconds.setdefault(h.name, []).append(time.perf_counter() - t)
        finally:
            for m in models.values():
                m.train()


def _eta(step: int, total: int, sps: float, hooks: Sequence[Hook], seconds: dict) -> float:
    """Training steps left at the measured s/step, plus every hook still due at its mean cost."""
    left = (total - step) * sps
    for h in hooks:
        spent = seconds.get(h.name)
        if spent:
            left += h.remaining(step, total) * sum(spent) / len(spent)
    return left


# ---------------------------------------------------------------------------- the loop
def fit(accelerator, models: dict[str, nn.Module], loss_fn: LossFn, cfg: FitConfig, run_dir: Path,
        resume: bool = False, description: str = "train", log=print, hooks: Sequence[Hook] = (),
        lrs: dict[str, float] | None = None) -> FitResult:
    """Optimise the trainable parameters of `models` for `cfg.steps` optimizer steps.

    `loss_fn` receives the accelerate-prepared modules (same keys), the step, the micro-step
    within gradient accumulation and that step's generator; it returns a dict of scalar tensors
    whose "loss" entry is backpropagated and every entry is logged. `hooks` run between steps
    (see `Hook`); the s/step shown excludes them, the ETA includes them. `lrs`: {name: LR}, own groups.
    """
    run_dir = Path(run_dir)
    params = trainable_parameters(models)
    if not params:
        raise ValueError("fit: no trainable parameters")
    on_cuda = accelerator.device.type == "cuda"
    optimizer = make_optimizer(list(params.values()), cfg, on_cuda, log=log, models=models)
    for name, lr in (lrs or {}).items():  # before the schedule is made: it scales each group's own LR
        group = next(g for g in optimizer.param_groups if any(p is params[name] for p in g["params"]))
        group["params"] = [p for p in group["params"] if p is not params[name]]
        optimizer.add_param_group({**group, "params": [params[name]], "lr": lr})
    for m in models.values():
        m.to(accelerator.device)
    # made before a checkpoint is loaded: it records the base LR (initial_lr) the schedule scales
    scheduler = make_lr_scheduler(optimizer, cfg)

    start, carried, last_logged = 0, {}, {}
    if resume:
        found = checkpoints.resume_latest(run_dir, params, optimizer, log=log)
        if found:
            state, ckpt = found
            start, carried = state["step"], state.get("loss_window", {})
            # a run resumed at its last step still reports the losses it ended with
            last_logged = state.get("losses") or {}
            log(f"resuming from {ckpt} (step {start}/{cfg.steps})")
    _fast_forward(scheduler, start)

    names = list(models)
    prepared = accelerator.prepare(*models.values(), optimizer)
    prepared_models = dict(zip(names, prepared[:-1]))
    optimizer = prepared[-1]
    for m in prepared_models.values():
        m.train()

    is_main = accelerator.is_main_process
    if accelerator.trackers == [] and accelerator.log_with and is_main:
        accelerator.init_trackers(description.replace(" ", "_"))
    loss_log = _LossLog(run_dir / "logs" / "loss.csv", start if resume else -1) if is_main else None
    # a logging window cut by a checkpoint carries on after resume, so loss.csv matches an
    # uninterrupted run row for row
    sums = {k: torch.tensor(v, device=accelerator.device) for k, v in carried.get("sums", {}).items()}
    window, last, timed = carried.get("window", 0), last_logged, 0
    t0, t_window, sps = time.perf_counter(), time.perf_counter(), float("nan")
    step = start
    step_seconds: list[float] = []
    hook_seconds: dict[str, list[float]] = {}
    stopped: StopRun | None = None
    with _progress(is_main) as bar:
        task = bar.add_task(description, total=cfg.steps, completed=start, loss="-", sps="-", eta="-")
        for step in range(start + 1, cfg.steps + 1):
            t_step = time.perf_counter()
            g = step_generator(cfg.seed, step, accelerator.process_index, accelerator.device)
            for micro in range(cfg.gradient_accumulation_steps):
                with accelerator.accumulate(*prepared_models.values()):
                    losses = loss_fn(prepared_models, step, micro, g)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    v = v.detach().float()
                    sums[k] = sums[k] + v if k in sums else v
                window += 1
            scheduler.step()
            timed += 1
            if cfg.profile_steps:
                if on_cuda:
                    torch.cuda.synchronize()
                step_seconds.append(time.perf_counter() - t_step)
            if step % cfg.log_every == 0 or step == cfg.steps:
                # the one host sync of a logging window
                last = {k: (accelerator.reduce(v, reduction="mean") / window).item() for k, v in sums.items()}
                now = time.perf_counter()
                sps = (now - t_window) / timed
                t_window, sums, window, timed = now, {}, 0, 0
                if not all(math.isfinite(v) for v in last.values()):
                    raise UserError(f"loss became {last['loss']} at step {step}; lower --lr or use --mixed-precision no")
                if is_main:
                    loss_log.log(step, last)
                    accelerator.log({f"train/{k}": v for k, v in last.items()}, step=step)
                bar.update(task, loss=f"{last['loss']:.4f}", sps=f"{sps:.2f}",
                           eta=clock(_eta(step, cfg.steps, sps, hooks, hook_seconds)))
            bar.update(task, completed=step)
            due = [h for h in hooks if h.due(step, cfg.steps)]
            if due:
                # before the checkpoint: a run killed in between redoes this step's hooks on resume
                t_hooks = time.perf_counter()
                accelerator.wait_for_everyone()
                if is_main:
                    try:
                        _run_hooks(due, step, accelerator, prepared_models, hook_seconds)
                    except StopRun as e:
                        stopped = e
                accelerator.wait_for_everyone()
                t_window += time.perf_counter() - t_hooks  # s/step stays the training's own
                bar.update(task, eta=clock(_eta(step, cfg.steps, sps, hooks, hook_seconds)))
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps or stopped:
                accelerator.wait_for_everyone()
                if is_main:
                    for h in hooks:
                        if h.on_checkpoint is not None:
                            h.on_checkpoint(step)
                    pending = {"sums": {k: v.item() for k, v in sums.items()}, "window": window}
                    checkpoints.save_checkpoint(run_dir, step, params, optimizer, {"losses": last, "loss_window": pending},
                                    cfg.checkpoints_kept)
            if stopped:
                raise stopped
    accelerator.wait_for_everyone()
    # trackers only: `end_training()` would also destroy the process group, and the caller still
    # needs it under `accelerate launch` (rank 0 writes the outputs while the others wait)
    for tracker in accelerator.trackers:
        tracker.finish()
    unwrapped = {k: accelerator.unwrap_model(m) for k, m in prepared_models.items()}
    accelerator.free_memory()  # drop the accelerator's references: a batch reuses the modules
    total = time.perf_counter() - t0
    done = max(step - start, 1)
    return FitResult(step=step, losses=last, seconds_per_step=total / done,
                     models=unwrapped, step_seconds=step_seconds, hook_seconds=hook_seconds)


def make_lr_scheduler(optimizer, cfg: FitConfig):
    """diffusers' `get_scheduler` (the one the DreamBooth scripts use), stepped once per optimizer
    step: LR factor at step k (counted from 1) is the schedule's value at k - 1, so a warm-up
    starts from 0 as in diffusers."""
    from diffusers.optimization import get_scheduler

    name = scheduler_name(cfg)
    if name not in LR_SCHEDULERS:
        raise UserError(f"unknown lr scheduler '{name}' (choose from {', '.join(LR_SCHEDULERS)})")
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)


def _fast_forward(scheduler, steps: int) -> None:
    """The schedule is a pure function of the step: a resumed run replays it to where it stopped."""
    import warnings

    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()
