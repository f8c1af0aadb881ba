"""`distill train`: BK-SDM distillation pretraining of a pruned student (Kim et al. 2023, Sec. 3.2).

Wires the pieces together and hands the loop to `personalize.fit.fit` (the project's one
training loop: accelerate, mixed precision, gradient accumulation, checkpoints, exact resume,
loss CSV + TensorBoard):

- student U-Net: trainable; VAE, text encoder and teacher U-Net: frozen, in the mixed-precision
  dtype, teacher in eval mode under no_grad (`kd.Distiller`);
- batch ``k = (step-1) * grad_accum + micro`` of this process comes from `data` by number, and
  every random draw of a step from fit's per-step generator, so resume replays the same run;
- optionally, VAE latent distributions and text embeddings are computed once up front
  (``precompute``) and the VAE/text encoder are dropped from memory; the latent is still
  *sampled* per step from the stored distribution, as without precomputation;
- at the end: the student as a pipeline directory ``OUT/student`` and ``OUT/distill.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from personalize.backbones import is_pipeline_dir
from personalize.errors import UserError, one_line
from personalize.fileio import write_text
from personalize.monitor import Sampler
from personalize.outputs import output_lock
from personalize.sources import load_diffusers_pipeline, load_unet, resolve_base

from .config import DistillConfig
from .kd import Distiller, feature_pairs
from .prune import PROVENANCE_FILE, check_output, save_pipeline_atomic
from .train_data.batches import Example, MapBatches, collate, make_batches

STUDENT_DIR = "student"
PRECOMPUTED_DIR = "precomputed"


def _normalised(config: dict) -> dict:
    """The same paths spelled differently (relative, ~) compare equal; the run dir is the one resumed."""
    def norm(v):
        p = Path(v).expanduser() if isinstance(v, str) and v else None
        return str(p.resolve()) if p is not None and p.exists() else v

    out = {k: norm(v) if k in ("teacher", "student") else v for k, v in config.items() if k != "output"}
    if isinstance(out.get("data"), dict):
        out["data"] = {**out["data"], "source": norm(out["data"].get("source"))}
    return out


def check_resume_config(cfg: DistillConfig, run_dir: Path) -> None:
    """Exact resume needs the same run: refuse a --resume whose settings differ from the ones
    recorded in ``run_dir/distill.json`` (more --steps is fine)."""
    f = run_dir / PROVENANCE_FILE
    if not f.is_file():
        return
    try:
        before = json.loads(f.read_text())["config"]
        if not isinstance(before, dict):
            raise TypeError("'config' is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{f}: unreadable ({one_line(e)}); cannot check that --resume continues the same run") from None
    now = _normalised(cfg.to_json())
    before = _normalised(before)
    diff = [k for k in now if k not in DistillConfig.RESUMABLE_CHANGES and before.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"--resume with other settings than the run in {run_dir}: {k} was {before.get(k)!r}, now "
                        f"{now[k]!r}; use the same flags (only --steps, --checkpoint-every, --log-every may change)")


# ---------------------------------------------------------------------------- precomputation
class Precomputed:
    """Latent distributions (mean ‖ logvar, per flip) and text embeddings of every row, stored as
    safetensors shards under ``OUT/precomputed`` and read lazily (memory-mapped)."""

    SHARD = 1024

    def __init__(self, root: Path):
        self.root = root
        self.meta = json.loads((root / "meta.json").read_text())
        self._open: dict[int, object] = {}

    @staticmethod
    def valid(root: Path, fingerprint: dict) -> bool:
        """The cache is for this data and model, and whole: every shard opens (safetensors checks
        its header covers the file) and holds its rows. Anything else is recomputed, never trusted."""
        from safetensors import SafetensorError

        f = root / "meta.json"
        try:
            meta = json.loads(f.read_text()) if f.is_file() else None
            if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
                return False
            return all(Precomputed._shard_rows(root, s) == min(Precomputed.SHARD, meta["n"] - s * Precomputed.SHARD)
                       for s in range(-(-meta["n"] // Precomputed.SHARD)))
        # JSONDecodeError and UnicodeDecodeError are ValueErrors; SafetensorError: a damaged shard
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return False

    @staticmethod
    def _shard_rows(root: Path, s: int) -> int | None:
        from safetensors import safe_open

        with safe_open(str(root / f"shard-{s:05d}.safetensors"), framework="pt") as f:
            rows = {f.get_slice(k).get_shape()[0] for k in f.keys()}
        return rows.pop() if len(rows) == 1 else None

    def _shard(self, i: int):
        from safetensors import safe_open

        if i not in self._open:
            self._open[i] = safe_open(str(self.root / f"shard-{i:05d}.safetensors"), framework="pt")
        return self._open[i]

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s, r = divmod(index, self.SHARD)
        f = self._shard(s)
        lat = f.get_slice("latent_flip" if flip else "latent")[r:r + 1]
        return lat[0], f.get_slice("text_emb")[r:r + 1][0]


def precompute(batches: MapBatches, encode, out: Path, fingerprint: dict, log=print) -> Precomputed:
    """Encode every row once (both flips when random flip is on) with `encode(pixels, captions)
    -> (latent_params, text_emb)`; idempotent for an unchanged fingerprint."""
    from safetensors.torch import save_file

    if Precomputed.valid(out, fingerprint):
        log(f"using precomputed latents in {out}")
        return Precomputed(out)
    out.mkdir(parents=True, exist_ok=True)
    ds, spec, n = batches.ds, batches.spec, batches.n
    chunk = max(1, min(batches.batch_size, 64))
    for s0 in range(0, n, Precomputed.SHARD):
        parts: dict[str, list] = {"latent": [], "latent_flip": [], "text_emb": []}
        for a in range(s0, min(n, s0 + Precomputed.SHARD), chunk):
            idx = list(range(a, min(n, s0 + Precomputed.SHARD, a + chunk)))
            rows = [ds[i] for i in idx]
            plan = [Example(i, False, 0, i) for i in idx]
            b = collate(rows, plan, batches.image_col, batches.caption_col, spec)
            lat, emb = encode(b["pixel_values"], b["captions"])
            parts["latent"].append(lat.cpu())
            parts["text_emb"].append(emb.cpu())
            if spec.random_flip:  # flipping pixels then encoding == what the on-the-fly path does
                parts["latent_flip"].append(encode(b["pixel_values"].flip(-1), None)[0].cpu())
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
        save_file(tensors, str(out / f"shard-{s0 // Precomputed.SHARD:05d}.safetensors"))
        log(f"precomputed {min(n, s0 + Precomputed.SHARD)}/{n}")
    # written last and atomically: its presence is what marks the shards as complete
    write_text(out / "meta.json", json.dumps({"fingerprint": fingerprint, "n": n}))
    return Precomputed(out)


# ---------------------------------------------------------------------------- the run
def _check_student_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not is_pipeline_dir(p):
        raise UserError(f"--student {path}: not a pipeline directory (run `distill prune` first)")
    return p.resolve()


def micro_batch_number(step: int, micro: int, gradient_accumulation_steps: int) -> int:
    """Which batch of the data a micro-step reads: consecutive and distinct over the whole run
    (step counts from 1), so every micro-step of an accumulated step sees new rows."""
    return (step - 1) * gradient_accumulation_steps + micro


def _weight_dtype(accelerator) -> torch.dtype:
    from personalize.precision import weight_dtype

    return weight_dtype(accelerator.mixed_precision)


def _hooks(cfg: DistillConfig, out: Path, device, vae, text_encoder, tokenizer, scheduler):
    """fit hooks of the run: the EMA (every step) and the validation grid (every --valid-steps)."""
    from personalize.fit import Hook

    hooks, ema = [], None
    if cfg.use_ema:
        from .ema import student_ema

        ema = student_ema(out, cfg.ema_decay)
        hooks.append(Hook("ema", 1, ema, on_checkpoint=ema.save))
    if cfg.valid_steps:
        def components(models: dict) -> dict:
            # with --precompute the encoders were parked on the CPU; the grid needs them back
            vae.to(device)
            text_encoder.to(device)
            return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": models["unet"],
                    "noise_scheduler": scheduler}

        sampler = Sampler(out, components, [cfg.valid_prompt] * cfg.num_valid_images, steps=25, guidance_scale=7.5,
                          resolution=cfg.data.resolution, meta={"what": "distill train validation"})
        hooks.append(Hook("valid", cfg.valid_steps, sampler, at_end=True))
    return hooks, ema


def _is_main_launch_process() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun group (they set RANK), or a plain process."""
    return os.environ.get("RANK", "0") == "0"


def train(cfg: DistillConfig, log=print) -> Path:
    """Run BK-SDM KD training; returns the written student pipeline directory. The main process
    holds the run dir's writer lock throughout: a second `distill train -o OUT` is refused."""
    out = Path(cfg.output).expanduser()
    with output_lock(out) if _is_main_launch_process() else contextlib.nullcontext():
        return _train(cfg, out, log)


def _train(cfg: DistillConfig, out: Path, log) -> Path:
    from diffusers import DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from personalize.checkpoints import list_checkpoints
    from personalize.fit import FitConfig, fit, make_accelerator

    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out}: exists and is not a directory")
    if not cfg.resume and list_checkpoints(out):
        raise UserError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it or choose another -o")
    if cfg.resume:
        check_resume_config(cfg, out)
    if (out / STUDENT_DIR).exists():
        check_output(out / STUDENT_DIR, overwrite=cfg.resume)  # a finished run's student is never overwritten silently
    if not cfg.data.source:
        raise UserError("--data is required")
    if cfg.precompute and (cfg.data.streaming or not cfg.data.center_crop):
        # a stream has no row indices to key the cache by; random crops differ every epoch
        raise UserError("--precompute needs map-style data (no --streaming) and center crop (no --random-crop)")
    student_dir = _check_student_dir(cfg.student)
    teacher_dir = resolve_base(cfg.teacher, flag="--teacher").path

    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, log_dir=out / "logs")
    device, wdtype = accelerator.device, _weight_dtype(accelerator)
    log = log if accelerator.is_main_process else (lambda *a, **k: None)

    batches = make_batches(cfg.data, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)

    student = load_unet(student_dir, cfg.allow_pickle)
    # frozen: loaded straight into the compute dtype, never an fp32 copy on the side
    teacher = load_unet(teacher_dir, cfg.allow_pickle, dtype=wdtype)
    try:
        pairs = feature_pairs(dict(teacher.config), dict(student.config))
    except ValueError as e:
        raise UserError(f"--student {cfg.student} does not fit teacher {cfg.teacher}: {e}") from None
    student.requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    teacher.to(device)
    scheduler = DDPMScheduler.from_pretrained(str(student_dir), subfolder="scheduler")
    distiller = Distiller(student, teacher, scheduler, pairs, cfg.kd)

    pipe = load_diffusers_pipeline(student_dir, cfg.allow_pickle, unet=student, safety_checker=None, feature_extractor=None,
                         requires_safety_checker=False)
    vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (vae, text_encoder):
        m.eval().requires_grad_(False).to(device, dtype=wdtype)
    scaling = vae.config.scaling_factor

    def encode(pixels: torch.Tensor, captions: list[str] | None):
        """-> (latent distribution parameters, text embeddings) for a batch."""
        with torch.no_grad():
            params = vae.encode(pixels.to(device, wdtype)).latent_dist.parameters
            emb = None
            if captions is not None:
                ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                                truncation=True, return_tensors="pt").input_ids
                emb = text_encoder(ids.to(device))[0]
        return params, emb

    store = None
    if cfg.precompute:
        fp = {"student_dir": str(student_dir), "data": asdict(cfg.data), "dtype": str(wdtype)}
        with accelerator.main_process_first():
            store = precompute(batches, encode, out / PRECOMPUTED_DIR, fp, log=log)
        # the encoders are not needed any more: give their memory to the student and teacher
        vae.to("cpu")
        text_encoder.to("cpu")

    def loss_fn(models: dict, step: int, micro: int, generator: torch.Generator) -> dict:
        k = micro_batch_number(step, micro, cfg.gradient_accumulation_steps)
        if store is not None:
            plan = batches.plan(k)
            got = [store.get(e.index, e.flip) for e in plan]
            params = torch.stack([g[0] for g in got]).to(device, wdtype)
            emb = torch.stack([g[1] for g in got]).to(device, wdtype)
        else:
            b = batches.batch(k)
            params, emb = encode(b["pixel_values"], b["captions"])
        latents = DiagonalGaussianDistribution(params).sample(generator=generator).float() * scaling
        return distiller(models["unet"], latents, emb.float(), generator)

    run_cfg = FitConfig.from_config(cfg, lr_warmup_steps=0)  # the recipe: constant LR
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"method": "BK-SDM knowledge distillation (Kim et al. 2023)", "config": cfg.to_json(),
                "teacher_path": str(teacher_dir), "student_path": str(student_dir),
                "feature_pairs": [asdict(p) for p in pairs], "fit": asdict(run_cfg),
                "mixed_precision": accelerator.mixed_precision, "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        write_text(out / PROVENANCE_FILE, json.dumps(resolved, indent=1))
    log(f"KD: {len(pairs)} feature pairs, batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation"
        f" x {accelerator.num_processes} process(es), {cfg.steps} steps, {accelerator.mixed_precision} precision")
    hooks, ema = _hooks(cfg, out, device, vae, text_encoder, tokenizer, scheduler)
    result = fit(accelerator, {"unet": student}, loss_fn, run_cfg, out, resume=cfg.resume,
                 description="distill", log=log, hooks=hooks)
    distiller.remove_hooks()

    final = out / STUDENT_DIR
    if accelerator.is_main_process:
        trained = result.models["unet"].to("cpu", torch.float32)
        if ema is not None:
            ema.copy_to({"unet": trained}, result.step)
            ema.prune()  # the checkpoint of the last step is written now: older EMA states can go
            resolved["weights"] = f"EMA of the student (decay {cfg.ema_decay})"
        final_pipe = load_diffusers_pipeline(student_dir, cfg.allow_pickle, unet=trained)
        resolved["final_losses"] = result.losses
        prov = student_dir / PROVENANCE_FILE
        if prov.is_file():
            resolved["pruned_from"] = json.loads(prov.read_text())
        text = json.dumps(resolved, indent=1)
        save_pipeline_atomic(final_pipe, final, {PROVENANCE_FILE: text}, overwrite=True)
        write_text(out / PROVENANCE_FILE, text)
        log(f"wrote {final} (use it as `personalize ... --base {final}`)")
    # no barrier here: fit keeps the process group (it finishes the trackers only, never calls
    # end_training()), but the other ranks have nothing left to do once fit returns; they exit and
    # the launcher waits for the main one to finish writing
    return final
