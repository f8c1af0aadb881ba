"""One training loop (`fit`) shared by full finetuning, LoRA and knowledge distillation.

This is the only module that talks to `accelerate`: device placement, mixed precision, gradient
accumulation, multi-GPU (`accelerate launch`). Callers hand `fit` the trainable modules and a
`loss_fn(models, step, micro_step, generator) -> {"loss": total, other named parts...}`; `fit`
owns the optimizer, checkpoints, resume, logging and the progress bar.

Resume is exact: every random draw of a step comes from a generator seeded by (seed, step,
process), and a checkpoint holds the trainable weights and the optimizer state, so an interrupted
run continued with `resume=True` ends with the same weights as an uninterrupted one.
Checkpoints are safetensors + JSON (no pickles).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

CHECKPOINTS_DIR = "checkpoints"
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
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit; CUDA only
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 1  # older ones are deleted once a newer one is safely written
    log_every: int = 10  # host syncs only this often: the hot loop never calls .item()
    seed: int = 1234  # BK-SDM recipe seed
    profile_steps: bool = False  # record per-step wall time (syncs the device every step: benchmarks only)


@dataclass
class FitResult:
    step: int  # last completed optimizer step
    losses: dict[str, float]  # mean of each loss part over the last logging window
    seconds_per_step: float
    models: dict[str, nn.Module] = field(default_factory=dict)  # unwrapped, trained modules
    step_seconds: list[float] = field(default_factory=list)  # per step, with FitConfig.profile_steps


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """`auto` = fp16 on CUDA (the BK-SDM recipe); on CPU, bf16 where oneDNN runs it natively
    (AVX512-BF16/AMX: a bk-sdm-small LoRA step 2.1x faster, 38% less peak memory than fp32, RESULTS.md)
    and fp32 elsewhere (emulated bf16 is far slower). Explicit values pass through; fp16 on CPU is
    not supported."""
    if requested == "auto":
        if not cpu:
            return "fp16"
        return "bf16" if cpu_bf16_is_native() else "no"
    if requested == "fp16" and cpu:
        from .errors import UserError

        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 or no on CPU")
    return requested


def cpu_bf16_is_native() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 or AMX). Without them bf16 is
    emulated: on an AVX2-only CPU a bf16 conv ran 95x slower than fp32 (benchmarks/RESULTS.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_cpu_note(mixed_precision: str, device) -> str | None:
    """A one-line note when bf16 was asked for on a CPU that would run it emulated."""
    if mixed_precision == "bf16" and torch.device(device).type == "cpu" and not cpu_bf16_is_native():
        return ("note: this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 runs emulated and much slower "
                "than fp32 here; drop --mixed-precision bf16 for speed")
    return None


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
    trackers = None
    if log_dir is not None and _tensorboard_available():
        trackers = "tensorboard"
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=cpu,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(log_dir), logging_dir=str(log_dir)) if log_dir else None,
    )


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


def make_optimizer(params: list[nn.Parameter], cfg: FitConfig, on_cuda: bool, log=print) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
              eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        if on_cuda:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kw)
        log("8-bit AdamW needs CUDA (bitsandbytes); using plain AdamW on CPU")
    # multi-tensor (foreach) kernels on CUDA only: on CPU they bought no speed and, for full
    # finetuning, held a model-sized temporary (+1.6 GB at bk-sdm-small; benchmarks/RESULTS.md)
    return torch.optim.AdamW(params, foreach=on_cuda, **kw)


# ---------------------------------------------------------------------------- checkpoints
def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    d = Path(run_dir) / CHECKPOINTS_DIR
    out = []
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith("step-") and (p / "state.json").is_file():
                out.append((int(p.name[5:]), p))
    return sorted(out)


def _flatten_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}/{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, params: dict[str, nn.Parameter], optimizer, extra: dict,
                    keep: int) -> Path:
    """Write checkpoints/step-N atomically (temp dir + rename), then drop the oldest beyond `keep`."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: p.detach().contiguous().cpu() for k, p in params.items()}, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **extra}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, params: dict[str, nn.Parameter], optimizer) -> dict:
    from safetensors.torch import load_file

    weights = load_file(ckpt / "trainable.safetensors")
    missing = set(params) ^ set(weights)
    if missing:
        from .errors import UserError

        raise UserError(f"checkpoint {ckpt} does not match this run's trainable weights "
                        f"({len(missing)} names differ, e.g. {sorted(missing)[0]}); was it made with other flags?")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k].to(p.device, p.dtype))
    state = json.loads((ckpt / "state.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer_state(load_file(ckpt / "optimizer.safetensors"), state["optimizer"]))
    return state


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
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
        tmp.replace(self.path)

    def log(self, step: int, values: dict[str, float]):
        if self.header is None:
            self.header = ["step", *values]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_all([self.header])
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, *(f"{values.get(k, float('nan')):.6g}" for k in self.header[1:])])


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} s/step"),
        TimeRemainingColumn(), disable=not enabled, transient=False,
    )


# ---------------------------------------------------------------------------- the loop
def fit(accelerator, models: dict[str, nn.Module], loss_fn: LossFn, cfg: FitConfig, run_dir: Path,
        resume: bool = False, description: str = "train", log=print) -> FitResult:
    """Optimise the trainable parameters of `models` for `cfg.steps` optimizer steps.

    `loss_fn` receives the accelerate-prepared modules (same keys), the step, the micro-step
    within gradient accumulation and that step's generator; it returns a dict of scalar tensors
    whose "loss" entry is backpropagated and every entry is logged.
    """
    run_dir = Path(run_dir)
    params = trainable_parameters(models)
    if not params:
        raise ValueError("fit: no trainable parameters")
    on_cuda = accelerator.device.type == "cuda"
    optimizer = make_optimizer(list(params.values()), cfg, on_cuda, log=log)
    for m in models.values():
        m.to(accelerator.device)

    start, carried, last_logged = 0, {}, {}
    if resume:
        ckpts = list_checkpoints(run_dir)
        if ckpts:
            state = load_checkpoint(ckpts[-1][1], params, optimizer)
            start, carried = state["step"], state.get("loss_window", {})
            # a run resumed at its last step still reports the losses it ended with
            last_logged = state.get("losses") or {}
            log(f"resuming from {ckpts[-1][1]} (step {start}/{cfg.steps})")
    warm = cfg.lr_warmup_steps
    # the schedule is a pure function of the global step, so resuming only offsets it
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + start + 1) / warm) if warm else 1.0)

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
    with _progress(is_main) as bar:
        task = bar.add_task(description, total=cfg.steps, completed=start, loss="-", sps="-")
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
                    from .errors import UserError

                    raise UserError(f"loss became {last['loss']} at step {step}; lower --lr or use --mixed-precision no")
                if is_main:
                    loss_log.log(step, last)
                    accelerator.log({f"train/{k}": v for k, v in last.items()}, step=step)
                bar.update(task, loss=f"{last['loss']:.4f}", sps=f"{sps:.2f}")
            bar.update(task, completed=step)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                accelerator.wait_for_everyone()
                if is_main:
                    pending = {"sums": {k: v.item() for k, v in sums.items()}, "window": window}
                    save_checkpoint(run_dir, step, params, optimizer, {"losses": last, "loss_window": pending},
                                    cfg.keep_checkpoints)
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
                     models=unwrapped, step_seconds=step_seconds)


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
