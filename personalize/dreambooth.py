"""DreamBooth (Ruiz et al., CVPR 2023) with prior preservation, full finetuning or LoRA (Hu et al.
2022), on a Stable Diffusion base such as the BK-SDM backbones (Kim et al. 2023).

Loss per step, with x the cached VAE latents (instance and, with prior preservation, class images):
    L = ||eps - eps_theta(x_t, t, c_inst)||^2 + prior_loss_weight * ||eps - eps_theta(x'_t, t, c_class)||^2
VAE latent distributions of every photo and its horizontal flip are computed once; each step
samples from them (as the reference scripts' `latent_dist.sample()`) without touching the VAE.
Text embeddings are cached whenever the text encoder is frozen.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import ADAPTER_DIR, LORA_WEIGHTS, add_adapter, check_attach, save_adapter
from .backbones import ResolvedBase, native_resolution
from .checkpoints import list_checkpoints
from .class_images import class_image_dir, ensure_class_images
from .config import TrainConfig
from .data import latent_masks, load_masks, load_training_images, make_grid, read_captions, with_flips
from .diffusion import check_prediction_type, diffusion_loss, noise_latents
from .errors import UserError
from .fileio import move_into, scratch_dir, write_text
from .fit import FitConfig, fit, make_accelerator
from . import monitor
from .outputs import check_output, output_lock, slug
from .pipeline import build_pipeline, generate, save_pipeline, save_png
from .precision import bf16_cpu_note, weight_dtype
from .runs import is_finished, write_run
from .sources import load_components, load_vae, resolve_base
from .subjects import DatasetMissing, Subject, fill_prompt, find_subject, list_images, load_prompts

VALIDATION_PNG = "validation.png"
# what write_outputs may leave in a run dir (LoRA file or pipeline folders, grid, card)
OUTPUT_NAMES = {LORA_WEIGHTS, ADAPTER_DIR, VALIDATION_PNG, "README.md", "model_index.json", "unet", "text_encoder", "vae",
                "tokenizer", "scheduler", "feature_extractor", "safety_checker"}
VALIDATION_SEED = 0  # fixed, so validation grids of different runs are comparable


def prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse to clobber: finished run -> needs --overwrite; unfinished -> --resume or --overwrite."""
    if not run_dir.exists():
        return
    ckpts = list_checkpoints(run_dir)
    if cfg.overwrite:
        shutil.rmtree(run_dir)
        return
    if is_finished(run_dir):
        raise UserError(f"{run_dir} already holds a finished run; pass --overwrite to train it again "
                        f"(or choose another --output-dir)")
    if ckpts and not cfg.resume:
        raise UserError(f"{run_dir} holds an unfinished run (checkpoint at step {ckpts[-1][0]}); pass --resume "
                        f"to continue it or --overwrite to start over")
    # a run killed while writing its final outputs has some of them beside its checkpoints
    ours = {"checkpoints", "logs"} | monitor.OUTPUT_NAMES | (OUTPUT_NAMES if ckpts else set())
    foreign = [p.name for p in run_dir.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if foreign:
        raise UserError(f"{run_dir} exists and is not a personalize run (holds {foreign[0]}); pass --overwrite "
                        f"or choose another --output-dir")


@dataclass
class Prepared:
    """Everything resolved before any model is loaded (so bad input fails fast, writing nothing)."""

    cfg: TrainConfig
    subject: Subject
    base: ResolvedBase
    resolution: int
    run_dir: Path
    images: torch.Tensor  # (N, 3, R, R) instance photos in [-1, 1]
    instance_prompt: str
    class_prompt: str
    captions: list[str | None] = field(default_factory=list)  # per photo, filled in; None: the instance prompt
    masks: torch.Tensor | None = None  # (N, 1, R, R) loss masks in [0, 1]; None when no photo has one


def prepare(cfg: TrainConfig, held: contextlib.ExitStack | None = None) -> Prepared:
    cfg.validate()
    # the subject's name is checked first, the base next, and only then is the dataset fetched:
    # a base that cannot be had (offline) must not cost a download, nor leave one behind
    try:
        subject = find_subject(cfg.subject, cfg.data_dir, cfg.class_noun, fetch=False)
    except DatasetMissing:
        subject = None
    base = resolve_base(cfg.base)
    subject = subject or find_subject(cfg.subject, cfg.data_dir, cfg.class_noun)
    resolution = cfg.resolution or native_resolution(base.path)
    photos = list_images(subject.image_dir)
    images = load_training_images(photos, resolution, cfg.allow_upscale)
    # per-photo captions (photo.txt, metadata.jsonl) and loss masks (photo.mask.png, --alpha-mask)
    captions = [c and fill_prompt(c, cfg.token, subject.class_noun) for c in read_captions(photos)]
    masks = load_masks(photos, resolution, cfg.alpha_mask)
    if cfg.sample_prompts:  # read now: a bad file must fail before any model is loaded
        monitor.read_prompts_file(cfg.sample_prompts, cfg.token, subject.class_noun)
    monitor.check_evaluators(cfg)
    run_dir = Path(cfg.output_dir) if cfg.output_dir else Path("runs") / cfg.method / slug(base.name) / subject.name
    check_output(run_dir, kind="dir", inputs=[subject.image_dir, base.path], flag="--output-dir",
                 allow_existing_dir=True)  # an existing run dir is prepare_run_dir's to judge
    # one lock per run, taken by the launch's first process (the others write nothing of their own)
    if held is not None and int(os.environ.get("RANK", "0")) == 0:
        held.enter_context(output_lock(run_dir, flag="--output-dir"))
    if cfg.method != "full":
        check_attach(base.path, cfg)  # a target or block size this base cannot take: one line, nothing written
    prepare_run_dir(run_dir, cfg)
    return Prepared(cfg, subject, base, resolution, run_dir, images,
                    fill_prompt(cfg.instance_prompt, cfg.token, subject.class_noun),
                    fill_prompt(cfg.class_prompt, cfg.token, subject.class_noun), captions, masks)


@torch.no_grad()
def cache_latent_dists(vae, images: torch.Tensor, device, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of each image, in fp32 on `device`. One image per call on
    CPU: batching buys no speed there, and 8 images of VAE activations cost GBs of peak memory."""
    batch = batch or (8 if torch.device(device).type == "cuda" else 1)
    vae.to(device)
    means, stds = [], []
    for chunk in images.split(batch):
        dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, prompt: str, device) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


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
    cfg = p.cfg
    run_dir = p.run_dir
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps, run_dir / "logs")
    device = accelerator.device
    note = bf16_cpu_note(accelerator.mixed_precision, device)
    if note and accelerator.is_main_process:
        log(note)
    compute_dtype = weight_dtype(accelerator.mixed_precision)
    t_start = time.perf_counter()
    # LoRA keeps the base frozen, so under mixed precision its weights live in half precision
    # (the diffusers recipe); full finetuning keeps fp32 master weights and relies on autocast
    frozen_dtype = compute_dtype if cfg.method != "full" else torch.float32
    reuse = loaded is not None and loaded.base.path == p.base.path
    half_store = (cfg.cpu_half_weights and cfg.method != "full" and device.type == "cpu"
                  and compute_dtype == torch.float32)
    if half_store and reuse:
        log("note: --cpu-half-weights applies to single runs; a batch keeps its in-memory base in fp32")
        half_store = False
    if reuse:
        comps = dict(loaded.reset())
        comps["unet"].to(dtype=frozen_dtype)
        comps["text_encoder"].to(dtype=frozen_dtype)
    else:
        # half storage: read straight into fp16 (tensor by tensor), never holding the fp32 model
        comps = load_components(p.base.path, cfg.allow_pickle, dtype=torch.float16 if half_store else frozen_dtype)
    if half_store:
        from .half_storage import store_frozen_in_half

        store_frozen_in_half(comps["unet"])
        store_frozen_in_half(comps["text_encoder"])
    tokenizer, text_encoder, vae, unet = comps["tokenizer"], comps["text_encoder"], comps["vae"], comps["unet"]
    noise_scheduler = comps["noise_scheduler"]
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False)
        m.eval()
    text_encoder.to(device)
    unet.to(device)
    # --score-every: eval's evaluators, loaded once, before anything slow (a missing one is one line)
    evaluators = monitor.load_evaluators(cfg, device) if accelerator.is_main_process else None
    t_load = time.perf_counter() - t_start

    # -- prior preservation: class images from the shared cache, generated on first use
    prior = cfg.class_images > 0 and cfg.prior_loss_weight > 0
    class_info: dict = {"enabled": prior}
    class_paths: list[Path] = []
    if prior:
        t0 = time.perf_counter()
        vae.to(device)
        # the OpenVINO path converts and runs its own graphs: torch autocast would trace into them
        with accelerator.autocast() if cfg.class_images_runtime == "torch" else contextlib.nullcontext():
            class_paths, made = ensure_class_images(
                build_pipeline(comps) if cfg.class_images_runtime == "torch" else None, p.base, p.class_prompt,
                cfg.class_images, p.resolution, steps=cfg.class_image_steps, guidance_scale=cfg.guidance_scale,
                batch_size=cfg.class_image_batch_size, rank=accelerator.process_index,
                world=accelerator.num_processes, progress=progress and accelerator.is_main_process,
                runtime=cfg.class_images_runtime,
            )
        accelerator.wait_for_everyone()
        class_info.update(dir=str(class_image_dir(p.base, p.class_prompt, p.resolution, cfg.class_images_runtime)),
                          runtime=cfg.class_images_runtime, count=len(class_paths),
                          generated_now=made, seconds=round(time.perf_counter() - t0, 2))

    # -- one-off caches: latent distributions (with flips) and, if frozen, text embeddings
    t0 = time.perf_counter()
    inst_mean, inst_std = cache_latent_dists(vae, with_flips(p.images), device)
    if prior:
        class_imgs = load_training_images(class_paths, p.resolution, allow_upscale=True)
        cls_mean, cls_std = cache_latent_dists(vae, with_flips(class_imgs), device)
        del class_imgs
    sf = vae.config.scaling_factor
    # in-run samples, scores and full step saves decode or save with the VAE: it stays
    keep_vae = bool(cfg.sample_every or cfg.score_every or (cfg.save_every and cfg.method == "full"))
    if reuse:
        vae.to(device if keep_vae else "cpu")  # a batch keeps it for the next subject
    elif not keep_vae:
        # not needed again until the outputs are written (reloaded then): its memory is the training's
        comps["vae"] = vae = None
    # one token row per distinct caption (a photo's own, else the instance prompt), shared by the
    # photo's flip; the frozen text encoder's embedding cache is keyed by caption the same way
    captions = [c or p.instance_prompt for c in (p.captions or [None] * len(p.images))] * 2
    distinct = list(dict.fromkeys(captions))
    caption_of = torch.tensor([distinct.index(c) for c in captions], device=device)
    inst_ids = torch.cat([tokenize(tokenizer, c, device) for c in distinct])
    class_ids = tokenize(tokenizer, p.class_prompt, device)
    # loss masks at the latent resolution (kohya's masked loss), flipped with their photos
    inst_mask = None if p.masks is None else latent_masks(with_flips(p.masks), inst_mean.shape[-2:]).to(device)
    train_te = cfg.train_text_encoder
    with torch.no_grad():
        inst_emb = None if train_te else text_encoder(inst_ids)[0]
        class_emb = None if train_te else text_encoder(class_ids)[0]
    t_cache = time.perf_counter() - t0

    # -- what is trained
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
    models = {"unet": unet, **({"text_encoder": text_encoder} if train_te else {})}

    b = cfg.train_batch_size
    n_inst = inst_mean.shape[0]
    n_cls = cls_mean.shape[0] if prior else 0
    check_prediction_type(noise_scheduler)
    class_te = [class_ids.expand(b, -1)] if prior else []
    class_cached = [class_emb.expand(b, -1, -1)] if prior and not train_te else []

    def loss_fn(ms, step, micro, g):
        ii = torch.randint(0, n_inst, (b,), generator=g, device=device)
        mean, std = inst_mean[ii], inst_std[ii]
        if prior:
            jj = torch.randint(0, n_cls, (b,), generator=g, device=device)
            mean, std = torch.cat([mean, cls_mean[jj]]), torch.cat([std, cls_std[jj]])
        latents = (mean + std * torch.randn(mean.shape, generator=g, device=device)) * sf
        x = noise_latents(noise_scheduler, latents, g, noise_offset=cfg.noise_offset)
        ci = caption_of[ii]
        emb = ms["text_encoder"](torch.cat([inst_ids[ci], *class_te]))[0] if train_te else torch.cat([inst_emb[ci], *class_cached])
        pred = ms["unet"](x.noisy, x.timesteps, emb).sample.float()
        target = x.target
        loss_inst = diffusion_loss(pred[:b], target[:b], x.timesteps[:b], noise_scheduler, cfg.snr_gamma,
                                   mask=None if inst_mask is None else inst_mask[ii])
        if not prior:
            return {"loss": loss_inst, "loss_instance": loss_inst}
        loss_prior = diffusion_loss(pred[b:], target[b:], x.timesteps[b:], noise_scheduler, cfg.snr_gamma)
        return {"loss": loss_inst + cfg.prior_loss_weight * loss_prior, "loss_instance": loss_inst,
                "loss_prior": loss_prior}

    def components(ms: dict) -> dict:
        return comps | {"unet": ms["unet"], "text_encoder": ms.get("text_encoder", text_encoder), "vae": vae}

    def save_step(dest: Path, ms: dict, step: int) -> None:
        c = components(ms)
        checkpointing = c["unet"].is_gradient_checkpointing  # save_pipeline turns it off
        outputs = save_weights(p, c, dest)
        if checkpointing:
            c["unet"].enable_gradient_checkpointing()
        write_run_json(p, outputs, {"step": step, "steps": cfg.steps}, class_info, dest=dest, step=step)

    # every process gets the same hooks (their barriers must match); fit runs them on the main one only
    hooks = [*monitor.make_hooks(p, components, save_step, evaluators), *extra_hooks]
    fit_cfg = FitConfig.from_config(cfg, lr=cfg.resolved_lr(), profile_steps=profile_steps)
    result = fit(accelerator, models, loss_fn, fit_cfg, run_dir, resume=cfg.resume,
                 description=f"{cfg.method} {p.subject.name}", log=log, hooks=hooks)

    if accelerator.is_main_process:
        unet, text_encoder = result.models["unet"], result.models.get("text_encoder", text_encoder)
        for m in (unet, text_encoder):
            m.eval()
        if vae is None:
            vae = load_vae(p.base.path, cfg.allow_pickle)
        vae.to(device)
        outputs = write_outputs(p, comps | {"unet": unet, "text_encoder": text_encoder, "vae": vae}, accelerator, log)
        stats = {"load_seconds": round(t_load, 2), "cache_seconds": round(t_cache, 2),
                 "seconds_per_step": round(result.seconds_per_step, 4), "final_losses": result.losses,
                 "device": str(device), "mixed_precision": accelerator.mixed_precision}
        if profile_steps:
            stats["step_seconds"] = [round(x, 5) for x in result.step_seconds]
        if result.hook_seconds:
            stats["monitor_seconds"] = {k: round(sum(v), 2) for k, v in result.hook_seconds.items()}
        watched = monitor.summary(run_dir, cfg.min_clip_t, result.step)
        if watched:
            stats["monitor"] = watched
            best = monitor.describe_best(watched, cfg.min_clip_t)
            if best:
                log(best)
        write_run_json(p, outputs, stats, class_info)
        if not cfg.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        log(f"done: {run_dir}")
    accelerator.wait_for_everyone()
    return run_dir


def write_outputs(p: Prepared, comps: dict, accelerator, log) -> list[str]:
    """Weights (LoRA file or full pipeline), validation grid and model card."""
    run_dir, cfg = p.run_dir, p.cfg
    outputs = save_weights(p, comps, run_dir)
    if cfg.validation_images > 0:
        write_validation(p, comps, accelerator)
        outputs.append(VALIDATION_PNG)
    from .card import model_card

    write_text(run_dir / "README.md", model_card(p))
    outputs.append("README.md")
    return outputs


def save_weights(p: Prepared, comps: dict, dest: Path) -> list[str]:
    """The run's trained weights into `dest`: the LoRA file, or for `full` a complete pipeline.
    The final save and every `--save-every` step save go through here, so they load alike."""
    if p.cfg.method != "full":
        return save_adapter(dest, p.cfg.method, comps["unet"], comps["text_encoder"])
    with scratch_dir(Path(dest) / "pipeline") as tmp:
        save_pipeline(tmp, p.base.path, comps)
        return move_into(tmp, dest)


def validation_prompts(p: Prepared) -> list[str]:
    protocol = [fill_prompt(t, p.cfg.token, p.subject.class_noun) for t in load_prompts(p.subject.kind)]
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
                   step: int | None = None) -> None:
    """run.json of the run (or, with `dest`/`step`, of a `--save-every` step dir: a finished run of
    its own, so every command that reads runs reads it)."""
    import diffusers
    import peft
    import transformers

    from . import __version__

    write_run(dest or p.run_dir, {
        "status": "finished",
        **({"step": step, "of_run": "../.."} if step is not None else {}),  # steps/step-N/ of that run
        "method": p.cfg.method,
        "subject": p.subject.to_json(),
        "base": p.base.to_json() | {"resolution": p.resolution},
        "token": p.cfg.token,
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
