"""A DreamBooth run before any model is loaded: the config checked, the base resolved, the photos,
captions and masks read (bucketed with --buckets), the targets and ranks held against the base's
shapes, and the run directory judged and locked. Bad input fails here, having written nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import monitor
from .adapters import ADAPTER_DIR, LORA_WEIGHTS, check_attach, method_of
from .backbones import ResolvedBase, native_resolution
from .buckets import Placement, load_bucketed, load_bucketed_masks
from .checkpoints import list_checkpoints
from .config import TrainConfig
from .data import load_masks, load_training_images, read_captions
from .embeddings import A1111_DIR, DIFFUSERS_FILE
from .errors import UserError
from .outputs import check_output, output_lock, slug
from .runs import is_finished
from .settings import CONFIG_TOML
from .sources import resolve_base
from .subjects import DatasetMissing, Subject, fill_prompt, find_subject, list_images

VALIDATION_PNG = "validation.png"
RAW_DIR = "raw"  # --ema --save-raw-weights: the trained (not averaged) weights, a loadable run of their own
# what write_outputs may leave in a run dir (LoRA file or pipeline folders, grid, card)
OUTPUT_NAMES = {LORA_WEIGHTS, ADAPTER_DIR, VALIDATION_PNG, "README.md", "model_index.json", "unet", "text_encoder", "vae",
                "tokenizer", "scheduler", "feature_extractor", "safety_checker", RAW_DIR,
                DIFFUSERS_FILE, A1111_DIR}


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
    ours = {"checkpoints", "logs", CONFIG_TOML} | monitor.OUTPUT_NAMES | (OUTPUT_NAMES if ckpts else set())
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
    images: torch.Tensor | list[torch.Tensor]  # (N, 3, R, R) instance photos in [-1, 1]; --buckets: (3, h, w) each
    instance_prompt: str
    class_prompt: str
    captions: list[str | None] = field(default_factory=list)  # per photo, filled in; None: the instance prompt
    masks: torch.Tensor | list[torch.Tensor] | None = None  # loss masks in [0, 1], as the images; None: no photo has one
    buckets: dict[str, Placement] | None = None  # --buckets: each photo's (by file name) bucket and crop


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
    # per-photo captions (photo.txt, metadata.jsonl) and loss masks (photo.mask.png, --alpha-mask)
    buckets = None
    if cfg.buckets:  # each photo at its aspect-ratio bucket, its mask cut alike
        images, placed = load_bucketed(photos, resolution, cfg.allow_upscale)
        masks = load_bucketed_masks(photos, placed, cfg.alpha_mask)
        buckets = {ph.name: at for ph, at in zip(photos, placed)}
    else:
        images = load_training_images(photos, resolution, cfg.allow_upscale)
        masks = load_masks(photos, resolution, cfg.alpha_mask)
    captions = [c and fill_prompt(c, cfg.prompt_token(), subject.class_noun) for c in read_captions(photos)]
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
        with warnings.catch_warnings():  # peft's note that it adjusts an OFT block size: check_attach refuses it
            warnings.filterwarnings("ignore", message=r"Invalid `oft_block_size`")
            check_attach(base.path, cfg)  # a target or block size this base cannot take: one line, nothing written
        check_sizes(base.path, cfg)
    prepare_run_dir(run_dir, cfg)
    return Prepared(cfg, subject, base, resolution, run_dir, images,
                    fill_prompt(cfg.instance_prompt, cfg.prompt_token(), subject.class_noun),
                    fill_prompt(cfg.class_prompt, cfg.prompt_token(), subject.class_noun), captions, masks, buckets)


def check_sizes(base_path: Path, cfg: TrainConfig) -> None:
    """What peft takes without a word but is not the run asked for, refused before any weight is
    read: a --rank (--text-encoder-rank) above the full rank of every layer it targets (parameters,
    not capacity: 10^8 is an out-of-memory kill mid-run), and a --lokr-factor that does not divide
    a targeted width (peft quietly uses another factor). On empty (meta-device) models."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import CLIPTextConfig, CLIPTextModel

    method = method_of(cfg.method)
    if method.name == "oft":  # sized by --oft-block-size, which check_attach holds
        return
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base_path / "unet"))}
        if cfg.train_text_encoder:
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(base_path / "text_encoder"))
    for comp, model in models.items():
        flag, rank = ("--rank", cfg.rank) if comp == "unet" else ("--text-encoder-rank", cfg.text_encoder_rank)
        targets, full_rank = method.build(cfg, comp), 0
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim < 2 or not check_target_module_exists(targets, name):
                continue
            full_rank = max(full_rank, min(w.shape[0], w[0].numel()))
            bad = [d for d in w.shape[:2] if method.name == "lokr" and cfg.lokr_factor > 0 and d % cfg.lokr_factor]
            if bad:
                raise UserError(f"--lokr-factor {cfg.lokr_factor} does not divide the width {bad[0]} of {comp}.{name} "
                                f"(peft would quietly use another factor); pick a divisor of every target's width")
        if full_rank and rank > full_rank:
            raise UserError(f"{flag} {rank}: above the full rank of every {comp} layer it targets (at most "
                            f"{full_rank} on this base); a rank above a layer's width adds parameters, not capacity")
