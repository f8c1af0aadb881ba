"""DreamBooth (Ruiz et al., CVPR 2023) with prior preservation, full finetuning or LoRA (Hu et al.
2022), on a Stable Diffusion base such as the BK-SDM backbones (Kim et al. 2023).

Loss per step, with x the cached VAE latents (instance and, with prior preservation, class images):
    L = ||eps - eps_theta(x_t, t, c_inst)||^2 + prior_loss_weight * ||eps - eps_theta(x'_t, t, c_class)||^2
VAE latent distributions of every photo and its horizontal flip are computed once; each step
samples from them (as the reference scripts' `latent_dist.sample()`) without touching the VAE.
Text embeddings are cached whenever the text encoder is frozen (a step's caption variants,
`--caption-dropout` / `--shuffle-caption`, on first use: text_cache.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from .adapters import add_adapter, lora_inputs_uncast, save_adapter
from .attention_backward import fp32_attention_backward
from .backbones import ResolvedBase
from .checkpoints import CHECKPOINTS_DIR
from .class_images import class_image_dir, ensure_class_images
from .config import TrainConfig, other_methods_fields
from .data import make_grid
from .fileio import move_into, scratch_dir, write_text
from .ema import WeightsEMA
from .fit import FitConfig, Hook, fit, make_accelerator, trainable_parameters
from .gemm_convs import frozen_convs_as_gemm
from .half_storage import store_frozen_in_half
from .host_memory import return_freed_memory, reuse_freed_memory
from .orthogonal_inputs import orthogonal_on_inputs
from . import __version__, card, monitor, pivotal
from .embeddings import record as pivotal_record
from .objective import build_cache, dreambooth_loss
from .prepare import RAW_DIR, VALIDATION_PNG, Prepared, prepare
from .prior import base_models
from .quantize import check_backend, quantize_frozen
from .pipeline import build_pipeline, generate, save_pipeline, save_png
from .precision import bf16_cpu_note, weight_dtype
from .runs import write_run
from .settings import CONFIG_TOML, settings_of, write_settings
from .sources import load_components, load_vae
from .subjects import fill_prompt, load_prompts

SETTINGS_SKIP = {"resume", "overwrite"}  # how to treat an existing run dir, not the run's settings
VALIDATION_SEED = 0  # fixed, so validation grids of different runs are comparable


class LoadedBase:
    """A base loaded once and reused across subjects (`personalize batch`): between subjects,
    `reset()` strips LoRA layers and restores the U-Net and text-encoder weights from pristine CPU
    copies, so every subject starts from the same weights without reading the base from disk again."""

    TRAINED = ("unet", "text_encoder")

    def __init__(self, base: ResolvedBase, allow_pickle: bool = False):
        self.base = base
        self.comps = load_components(base.path, allow_pickle)
        self.pristine = {k: {n: t.detach().to("cpu", copy=True) for n, t in self.comps[k].state_dict().items()}
                         for k in self.TRAINED}

    def reset(self) -> dict:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        from .adapters import has_lora

        for k in self.TRAINED:
            m = self.comps[k]
            if has_lora(m):
                recurse_remove_peft_layers(m)
                del m.peft_config
                m._hf_peft_config_loaded = False
            if k == "unet":
                m.disable_gradient_checkpointing()
            else:
                getattr(m, "activation_checkpointing_disable", m.gradient_checkpointing_disable)()
            if k == "text_encoder":  # --pivotal's new tokens out again
                pivotal.restore_vocab(m, next(t.shape[0] for n, t in self.pristine[k].items()
                                              if n.endswith("token_embedding.weight")))
            m.to(dtype=torch.float32)
            m.load_state_dict(self.pristine[k])
            m.requires_grad_(False)
        return self.comps


def train_subject(cfg: TrainConfig, log=print, progress: bool = True, loaded: LoadedBase | None = None,
                  profile_steps: bool = False, hooks: tuple = ()) -> Path:
    """Run DreamBooth for one subject and write the run directory. Returns its path.
    `loaded`: a base already in memory (reset here); loaded from disk when None.
    `profile_steps`: record each step's time in run.json (benchmarks; syncs the device each step).
    `hooks`: extra `fit.Hook`s run between steps after the run's own (the app's progress and Cancel).
    The run dir is held by its writer's lock from before it is judged until the run ends, so a
    second `personalize lora` into the same --output-dir is refused, not interleaved."""
    with contextlib.ExitStack() as held:
        return _train(prepare(cfg, held), log, progress, loaded, profile_steps, hooks)


def _train(p: Prepared, log, progress: bool, loaded: LoadedBase | None, profile_steps: bool,
           extra_hooks: tuple = ()) -> Path:
    """The phases of a run: load the base, draw (or find) the class images, cache what does not
    change (latents, token ids, frozen text embeddings), attach what trains, fit, write outputs."""
    cfg = p.cfg
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, p.run_dir / "logs")
    if accelerator.is_main_process:  # the resolved settings: `--config RUN_DIR/config.toml` repeats the run
        settings = settings_of(cfg, skip=SETTINGS_SKIP | other_methods_fields(cfg.method))
        write_settings(p.run_dir / CONFIG_TOML, settings, f"personalize {cfg.method}")
    note = bf16_cpu_note(accelerator.mixed_precision, accelerator.device)
    if note and accelerator.is_main_process:
        log(note)
    # before the base loads: its transient copies are freed under the same policy as the step's
    if cfg.release_freed_memory and not return_freed_memory() and accelerator.is_main_process:
        log("note: --release-freed-memory: this platform's allocator takes no such setting (glibc only); ignored")
    t_start = time.perf_counter()
    comps, reuse = _load_base(p, accelerator, loaded, log)
    ti = pivotal.add_new_tokens(cfg, comps, p.subject.class_noun)  # before any prompt is tokenized
    # --score-every: eval's evaluators, loaded once, before anything slow (a missing one is one line)
    evaluators = monitor.load_evaluators(cfg, accelerator.device) if accelerator.is_main_process else None
    t_load = time.perf_counter() - t_start
    class_paths, class_info = _class_images(p, comps, accelerator, progress)
    t0 = time.perf_counter()
    cache = build_cache(p, comps, class_paths, accelerator.device, reuse)
    t_cache = time.perf_counter() - t0
    # --prior base-prediction: before the adapter is attached (a full run's copy: the base's weights)
    base = base_models(cfg, comps, accelerator.autocast)
    models = _trainables(cfg, comps, accelerator.device)
    lrs = pivotal.make_trainable(ti, comps["text_encoder"], models)
    # --ema: the average of exactly what trains, its states kept with the checkpoints
    ema = WeightsEMA(p.run_dir, p.run_dir / CHECKPOINTS_DIR / "ema", cfg.ema_decay,
                     lambda ms: trainable_parameters(ms).values()) if cfg.ema else None

    def components(ms: dict) -> dict:
        return comps | {"unet": ms["unet"], "text_encoder": ms.get("text_encoder", comps["text_encoder"])}

    def save_step(dest: Path, ms: dict, step: int) -> None:
        c = components(ms)
        checkpointing = c["unet"].is_gradient_checkpointing  # save_pipeline turns it off
        outputs = save_trained(p, c, ms, dest, ema, class_info, step)
        if checkpointing:
            c["unet"].enable_gradient_checkpointing()
        write_run_json(p, outputs, {"step": step, "steps": cfg.steps}, class_info, dest=dest, step=step)

    # every process gets the same hooks (their barriers must match); fit runs them on the main one only.
    # The EMA updates first; samples and scores then see the average (step saves choose for themselves)
    hooks = monitor.make_hooks(p, components, save_step, evaluators)
    if ema is not None:
        hooks = [Hook("ema", 1, ema, on_checkpoint=ema.save),
                 *(h if h.name == "save" else _with_average(h, ema) for h in hooks)]
    hooks = [*hooks, *extra_hooks]
    fit_cfg = FitConfig.from_config(cfg, lr=cfg.resolved_lr(), profile_steps=profile_steps)
    loss_fn = pivotal.stop_after(ti, dreambooth_loss(cfg, cache, comps["noise_scheduler"], accelerator.device, base))
    # every forward in fit (steps and hooks) runs under the accelerator's autocast
    with (lora_inputs_uncast(models.values(), autocast=accelerator.mixed_precision in ("bf16", "fp16")),
          fp32_attention_backward(accelerator.device.type == "cpu"), orthogonal_on_inputs(models.values()),
          frozen_convs_as_gemm(models["unet"]),
          reuse_freed_memory(accelerator.device.type == "cpu" and not cfg.release_freed_memory)):
        result = fit(accelerator, models, loss_fn, fit_cfg, p.run_dir, resume=cfg.resume,
                     description=f"{cfg.method} {p.subject.name}", log=log, hooks=hooks, lrs=lrs)
    if accelerator.is_main_process:
        timings = {"load_seconds": round(t_load, 2), "cache_seconds": round(t_cache, 2)}
        _finish(p, comps, result, accelerator, class_info, timings, profile_steps, log, ema)
    accelerator.wait_for_everyone()
    return p.run_dir


def _with_average(h: Hook, ema: WeightsEMA) -> Hook:
    def fn(step: int, models: dict):
        with ema.applied(models):
            return h.fn(step, models)

    return dataclasses.replace(h, fn=fn)


def _load_base(p: Prepared, accelerator, loaded: LoadedBase | None, log) -> tuple[dict, bool]:
    """The base's components on the device, frozen; (components, whether `loaded` was reused)."""
    cfg, device = p.cfg, accelerator.device
    compute_dtype = weight_dtype(accelerator.mixed_precision)
    # LoRA keeps the base frozen, so under mixed precision its weights live in half precision
    # (the diffusers recipe); full finetuning keeps fp32 master weights and relies on autocast
    frozen_dtype = compute_dtype if cfg.method != "full" else torch.float32
    quantized = cfg.base_quantization != "none"
    if quantized:
        check_backend(cfg.base_quantization, device)  # before any weight is read
    # a quantized base is loaded and quantized by its own run (batch passes none)
    reuse = loaded is not None and loaded.base.path == p.base.path and not quantized
    # a quantized base (a memory trade already) keeps the convs bitsandbytes cannot quantize in fp16 too
    half_store = ((cfg.cpu_half_weights or quantized) and cfg.method != "full" and device.type == "cpu"
                  and compute_dtype == torch.float32)
    if half_store and reuse:
        log("note: --cpu-half-weights applies to single runs; a batch keeps its in-memory base in fp32")
        half_store = False
    if reuse:
        comps = dict(loaded.reset())
        comps["unet"].to(dtype=frozen_dtype)
        comps["text_encoder"].to(dtype=frozen_dtype)
    else:
        # half storage or quantization: read straight into 16 bits (tensor by tensor), never holding the fp32 model
        comps = load_components(p.base.path, cfg.allow_pickle,
                                dtype=torch.float16 if half_store or quantized and frozen_dtype == torch.float32
                                else frozen_dtype)
    # frozen first: half storage converts only the weights that do not require grad
    for k in ("text_encoder", "vae", "unet"):
        comps[k].requires_grad_(False)
        comps[k].eval()
    for k in ("unet", "text_encoder") if quantized else ():
        quantize_frozen(comps[k], cfg.base_quantization, compute_dtype, device, None if half_store else frozen_dtype)
    if half_store:
        store_frozen_in_half(comps["unet"])
        store_frozen_in_half(comps["text_encoder"])
    comps["text_encoder"].to(device)
    comps["unet"].to(device)
    return comps, reuse


def _class_images(p: Prepared, comps: dict, accelerator, progress: bool) -> tuple[list[Path], dict]:
    """Prior preservation's class images from the shared cache, generated on first use."""
    cfg = p.cfg
    prior = cfg.class_images > 0 and cfg.prior_loss_weight > 0 and cfg.prior == "class-images"
    class_info: dict = {"enabled": prior, "prior": cfg.prior}
    if not prior:
        return [], class_info
    t0 = time.perf_counter()
    comps["vae"].to(accelerator.device)
    on_torch = cfg.class_images_runtime == "torch"
    # the OpenVINO path converts and runs its own graphs: torch autocast would trace into them
    with accelerator.autocast() if on_torch else contextlib.nullcontext():
        class_paths, made = ensure_class_images(
            build_pipeline(comps) if on_torch else None, p.base, p.class_prompt,
            cfg.class_images, p.resolution, steps=cfg.class_image_steps, guidance_scale=cfg.guidance_scale,
            batch_size=cfg.class_image_batch_size, rank=accelerator.process_index,
            world=accelerator.num_processes, progress=progress and accelerator.is_main_process,
            runtime=cfg.class_images_runtime,
        )
    accelerator.wait_for_everyone()
    class_info.update(dir=str(class_image_dir(p.base, p.class_prompt, p.resolution, cfg.class_images_runtime)),
                      runtime=cfg.class_images_runtime, count=len(class_paths),
                      generated_now=made, seconds=round(time.perf_counter() - t0, 2))
    return class_paths, class_info


def _trainables(cfg: TrainConfig, comps: dict, device) -> dict:
    """Attach the adapter (or unfreeze the models, `full`): the modules `fit` trains, by name."""
    unet, text_encoder, train_te = comps["unet"], comps["text_encoder"], cfg.train_text_encoder
    if cfg.method != "full":
        add_adapter(unet, text_encoder, cfg)  # adapter weights are made fp32 below: the optimizer's master copy
        for m in (unet, text_encoder):
            for prm in m.parameters():
                if prm.requires_grad:
                    prm.data = prm.data.float()
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(train_te)
    if cfg.resolved_gradient_checkpointing(device):
        unet.enable_gradient_checkpointing()
        if train_te:
            # transformers 5 renamed it; older releases only have the first name
            getattr(text_encoder, "activation_checkpointing_enable", text_encoder.gradient_checkpointing_enable)()
    return {"unet": unet, **({"text_encoder": text_encoder} if train_te else {})}


def _finish(p: Prepared, comps: dict, result, accelerator, class_info: dict, timings: dict, profile_steps: bool,
            log, ema: WeightsEMA | None = None) -> None:
    """The run's outputs (weights, validation grid, model card: the EMA's with --ema, the raw
    weights in raw/ on request), run.json with its stats, and the checkpoints removed unless kept.
    Main process only."""
    cfg, device = p.cfg, accelerator.device
    unet, text_encoder = result.models["unet"], result.models.get("text_encoder", comps["text_encoder"])
    for m in (unet, text_encoder):
        m.eval()
    vae = comps["vae"] if comps["vae"] is not None else load_vae(p.base.path, cfg.allow_pickle)
    vae.to(device)
    final = comps | {"unet": unet, "text_encoder": text_encoder, "vae": vae}
    raw = []
    if ema is not None:
        if cfg.save_raw_weights:
            raw = [RAW_DIR]
            write_run_json(p, save_weights(p, final, p.run_dir / RAW_DIR), {"step": result.step}, class_info,
                           dest=p.run_dir / RAW_DIR, raw=True)
        ema.copy_to(result.models, result.step)
        ema.prune()
    outputs = write_outputs(p, final, accelerator, log) + raw
    stats = {**timings, "seconds_per_step": round(result.seconds_per_step, 4), "final_losses": result.losses,
             "device": str(device), "mixed_precision": accelerator.mixed_precision}
    if profile_steps:
        stats["step_seconds"] = [round(x, 5) for x in result.step_seconds]
    if result.hook_seconds:
        stats["monitor_seconds"] = {k: round(sum(v), 2) for k, v in result.hook_seconds.items()}
    watched = monitor.summary(p.run_dir, cfg.min_clip_t, result.step)
    if watched:
        stats["monitor"] = watched
        best = monitor.describe_best(watched, cfg.min_clip_t)
        if best:
            log(best)
    write_run_json(p, outputs, stats, class_info)
    if not cfg.keep_checkpoints:
        shutil.rmtree(p.run_dir / "checkpoints", ignore_errors=True)
    log(f"done: {p.run_dir}")


def write_outputs(p: Prepared, comps: dict, accelerator, log) -> list[str]:
    """Weights (LoRA file or full pipeline), validation grid and model card."""
    run_dir, cfg = p.run_dir, p.cfg
    outputs = save_weights(p, comps, run_dir)
    if cfg.validation_images > 0:
        write_validation(p, comps, accelerator)
        outputs.append(VALIDATION_PNG)

    write_text(run_dir / "README.md", card.model_card(p))
    outputs.append("README.md")
    return outputs


def save_trained(p: Prepared, comps: dict, models: dict, dest: Path, ema: WeightsEMA | None, class_info: dict,
                 step: int) -> list[str]:
    """A step save's weights: the EMA's with --ema (and the raw ones in raw/ on request)."""
    if ema is None:
        return save_weights(p, comps, dest)
    raw = []
    if p.cfg.save_raw_weights:
        raw = [RAW_DIR]
        write_run_json(p, save_weights(p, comps, dest / RAW_DIR), {"step": step}, class_info, dest=dest / RAW_DIR,
                       step=step, raw=True)
    with ema.applied(models):
        return save_weights(p, comps, dest) + raw


def save_weights(p: Prepared, comps: dict, dest: Path) -> list[str]:
    """The run's trained weights into `dest`: the LoRA file, or for `full` a complete pipeline.
    The final save and every `--save-every` step save go through here, so they load alike."""
    if p.cfg.method != "full":
        return (save_adapter(dest, p.cfg.method, comps["unet"], comps["text_encoder"])
                + pivotal.save(dest, comps["text_encoder"], p.cfg.token))
    with scratch_dir(Path(dest) / "pipeline") as tmp:
        save_pipeline(tmp, p.base.path, comps)
        return move_into(tmp, dest)


def validation_prompts(p: Prepared) -> list[str]:
    protocol = [fill_prompt(t, p.cfg.prompt_token(), p.subject.class_noun) for t in load_prompts(p.subject.kind)]
    return ([p.instance_prompt] + protocol)[: p.cfg.validation_images]


def write_validation(p: Prepared, comps: dict, accelerator) -> None:
    cfg = p.cfg
    prompts = validation_prompts(p)
    prompts = (prompts * cfg.validation_images)[: cfg.validation_images]
    seeds = [VALIDATION_SEED + i for i in range(len(prompts))]
    pipe = build_pipeline(comps)
    with accelerator.autocast():
        images = generate(pipe, prompts, seeds, steps=cfg.validation_steps, guidance_scale=cfg.guidance_scale,
                          resolution=p.resolution)
    save_png(make_grid(images), p.run_dir / VALIDATION_PNG,
             {"prompts": prompts, "seeds": seeds, "steps": cfg.validation_steps, "scheduler": "dpm++",
              "guidance_scale": cfg.guidance_scale, "base": p.base.name, "method": cfg.method})


def write_run_json(p: Prepared, outputs: list[str], stats: dict, class_info: dict, dest: Path | None = None,
                   step: int | None = None, raw: bool = False) -> None:
    """run.json of the run (or, with `dest`/`step`, of a `--save-every` step dir; with `raw`, of
    the raw weights beside an EMA: each a finished run of its own, so every command that reads
    runs reads it)."""
    import diffusers
    import peft
    import transformers

    write_run(dest or p.run_dir, {
        "status": "finished",
        **({"step": step, "of_run": "../.."} if step is not None else {}),  # steps/step-N/ of that run
        **({"of_run": "..", "weights": "raw"} if raw else {"weights": f"ema (decay {p.cfg.ema_decay})"} if p.cfg.ema
           else {}),
        **({"buckets": {name: at.to_json() for name, at in p.buckets.items()}} if p.buckets else {}),
        "method": p.cfg.method,
        "subject": p.subject.to_json(),
        "base": p.base.to_json() | {"resolution": p.resolution},
        "token": p.cfg.prompt_token(),  # what fills {token} in generate and eval
        **({"pivotal": pivotal_record(pivotal.new_tokens(p.cfg.num_new_tokens), p.cfg.token, p.cfg.token)}
           if p.cfg.pivotal else {}),
        "instance_prompt": p.instance_prompt,
        "class_prompt": p.class_prompt,
        "resolution": p.resolution,
        "lr": p.cfg.resolved_lr(),
        "config": p.cfg.to_json(),
        "class_images": class_info,
        "outputs": outputs,
        "stats": stats,
        "versions": {"personalize": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
