"""Typed configuration of a DreamBooth run. Defaults are the BK-SDM recipe (its DreamBooth
finetune scripts, `examples/dreambooth/` of the BK-SDM repository, which wrap the diffusers and
peft DreamBooth examples), each overridable by a CLI flag."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .defaults import CLASS_IMAGE_RUNTIMES, DEFAULT_CLIP, DEFAULT_DINO, LR_SCHEDULERS, METHODS, OPTIMIZERS
from .errors import UserError
from .extras import require_extra


@dataclass
class TrainConfig:
    method: str  # one of METHODS
    subject: str  # dataset subject name, or a folder of the user's own photos
    base: str = "bk-sdm-base"  # the backbone the BK-SDM paper personalizes first
    class_noun: str | None = None  # from subjects/subjects.csv for dataset subjects
    data_dir: str | None = None  # else $PERSONALIZE_DATA, else ./data/dreambooth/dataset
    output_dir: str | None = None  # else runs/<method>/<base>/<subject>

    token: str = "sks"  # DreamBooth's rare identifier token, also used by the BK-SDM scripts
    instance_prompt: str = "a {token} {class}"  # DreamBooth instance prompt
    class_prompt: str = "a {class}"  # DreamBooth class prompt (prior preservation)

    steps: int = 800  # BK-SDM DreamBooth: max_train_steps 800
    resolution: int | None = None  # None: the base's native size (512 for every BK-SDM model)
    train_batch_size: int = 1  # BK-SDM: train_batch_size 1 (+ 1 class image with prior preservation)
    gradient_accumulation_steps: int = 1  # BK-SDM: 1
    lr: float | None = None  # None: 1e-4 for LoRA, 1e-6 for full (BK-SDM scripts)
    lr_warmup_steps: int = 0  # BK-SDM: constant LR, no warm-up
    max_grad_norm: float = 1.0  # diffusers DreamBooth default
    use_8bit_adam: bool = False  # option on CUDA; plain AdamW elsewhere (older spelling of --optimizer adamw8bit)
    # BK-SDM: constant LR; the names of diffusers' get_scheduler, which the DreamBooth scripts call
    lr_scheduler: str = "constant"
    # BK-SDM: AdamW; adamw8bit (bitsandbytes, CUDA); prodigy (Mishchenko & Defazio 2023, lr 1.0 as its README)
    optimizer: str = "adamw"

    prior_loss_weight: float = 1.0  # BK-SDM: prior preservation weight 1.0
    # min-SNR loss weighting (Hang et al. 2023; 5.0 is their recommended gamma): off in the BK-SDM recipe
    snr_gamma: float | None = None
    noise_offset: float = 0.0  # offset noise (Guttenberg 2023; 0.05-0.1 is usual): off in the BK-SDM recipe
    class_images: int = 200  # BK-SDM: num_class_images 200; 0 turns prior preservation off
    class_image_steps: int = 25  # DPM-Solver++ steps, as the BK-SDM generation scripts
    class_image_batch_size: int = 4  # images per pipeline call when generating class images
    # torch, as the BK-SDM recipe; openvino: drawn on CPU from a cached OpenVINO export of the base, in bf16
    # where native: 0.32x the best torch CPU time per 512 px image (benchmarks/RESULTS.md, "Deploy runtimes")
    class_images_runtime: str = "torch"
    guidance_scale: float = 7.5  # SD default, used for class and validation images

    train_text_encoder: bool = True  # BK-SDM: --train_text_encoder
    rank: int = 16  # BK-SDM LoRA: U-Net rank 16
    lora_alpha: float = 27  # BK-SDM LoRA: U-Net alpha 27
    text_encoder_rank: int = 16  # BK-SDM LoRA: text-encoder rank 16
    text_encoder_alpha: float = 17  # BK-SDM LoRA: text-encoder alpha 17
    # the peft DreamBooth example's targets, which the BK-SDM LoRA script inherits
    lora_unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_v"])
    lora_text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # LoKr: -1 = the factor nearest sqrt(width), LyCORIS' and peft's default (decompose_factor)
    lokr_factor: int = -1
    # OFT: 32-wide orthogonal blocks, peft's default (OFTConfig.oft_block_size); must divide each target's input width
    oft_block_size: int = 32

    # None = auto: on for GPUs under 40 GiB (BK-SDM turns it on to fit a 24 GB card), off on CPU,
    # where RAM is rarely the limit and recomputation costs step time (benchmarks/RESULTS.md)
    gradient_checkpointing: bool | None = None
    # LoRA on CPU: frozen base weights stored in fp16, computed in fp32 (half_storage.py); saves 2
    # bytes a frozen weight for 4-30% more step time (measured), so off unless memory is short (RESULTS.md)
    cpu_half_weights: bool = False
    mixed_precision: str = "auto"  # fp16 on CUDA (BK-SDM); on CPU bf16 where native, else fp32 (RESULTS.md)
    seed: int = 1234  # BK-SDM: seed 1234

    checkpoint_every: int = 200  # a quarter of a recipe run; only the newest is kept
    keep_checkpoints: bool = False  # delete checkpoints/ once the final outputs are safely written
    log_every: int = 10  # loss is synced to the host this often (no per-step host syncs)
    validation_images: int = 4  # images in validation.png (0: none)
    validation_steps: int = 25  # DPM-Solver++ steps for validation images
    # in-run monitoring (personalize/monitor.py), all off as in the BK-SDM recipe, which keeps only the end
    sample_every: int = 0  # a grid of fixed-seed samples every N steps (samples/step-N.png)
    # one prompt per line ({token}/{class} filled); None: instance prompt + one recontextualisation +
    # one property change of the subject's DreamBooth protocol prompts (Ruiz et al. 2023, Fig. 4 kinds)
    sample_prompts: str | None = None
    save_every: int = 0  # a loadable adapter (full: pipeline) every N steps (steps/step-N/); 0: final only
    score_every: int = 0  # DINO / CLIP-I / CLIP-T every N steps (scores_by_step.csv), eval's evaluators
    score_prompts: int = 4  # protocol prompts scored per step: a cheap, fixed subset of the 25
    score_images: int = 2  # seeds per scored prompt
    # a step counts as best only if its CLIP-T is at least this (DreamBooth reports ~0.3 for good runs)
    min_clip_t: float = 0.0
    dino: str = DEFAULT_DINO  # the eval command's DINO ViT-S/16 (DreamBooth section 4.1)
    clip: str = DEFAULT_CLIP  # the eval command's CLIP ViT-B/32 (DreamBooth section 4.1)
    allow_upscale: bool = False  # refuse photos smaller than the resolution unless asked
    alpha_mask: bool = False  # kohya's --alpha_mask: off, a transparent product shot is not always a mask
    allow_pickle: bool = False  # only safetensors weights are loaded unless the user says so
    resume: bool = False
    overwrite: bool = False

    def resolved_gradient_checkpointing(self, device) -> bool:
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        import torch

        device = torch.device(device)
        if device.type != "cuda":
            return False
        return torch.cuda.get_device_properties(device).total_memory < 40 * 2**30

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "prodigy":
            return 1.0  # Prodigy estimates the step size; lr is its multiplier (its README: 1.0)
        # every adapter method at LoRA's recipe LR (one LR, so the method table compares like with like)
        return 1e-6 if self.method == "full" else 1e-4

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}' ({', '.join(METHODS)})")
        for f in fields(self):  # a NaN or inf anywhere trains garbage with exit 0
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        for name in ("steps", "rank", "text_encoder_rank", "train_batch_size", "gradient_accumulation_steps",
                     "class_image_steps", "class_image_batch_size", "validation_steps", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lora_alpha", "text_encoder_alpha"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("prior_loss_weight", "max_grad_norm", "lr_warmup_steps", "validation_images"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"--snr-gamma must be positive (5.0 is the paper's value), got {self.snr_gamma}")
        if not 0 <= self.noise_offset <= 1:
            raise UserError(f"--noise-offset must be in [0, 1] (0.05-0.1 is usual), got {self.noise_offset}")
        if not 0 <= self.guidance_scale <= 100:
            raise UserError(f"--guidance-scale must be in [0, 100], got {self.guidance_scale}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.class_images < 0:
            raise UserError(f"--class-images must be >= 0, got {self.class_images}")
        if self.class_images_runtime not in CLASS_IMAGE_RUNTIMES:
            raise UserError(f"--class-images-runtime must be one of {', '.join(CLASS_IMAGE_RUNTIMES)}, "
                            f"got '{self.class_images_runtime}'")
        if self.class_images_runtime == "openvino" and self.class_images > 0 and self.prior_loss_weight > 0:
            require_extra("openvino", "--class-images-runtime openvino")  # before any model is loaded: a missing extra is one line up front
        for name in ("sample_every", "save_every", "score_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (0: off), got {getattr(self, name)}")
        for name in ("score_prompts", "score_images"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not -1 <= self.min_clip_t <= 1:
            raise UserError(f"--min-clip-t must be in [-1, 1] (a cosine similarity), got {self.min_clip_t}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{self.lr_scheduler}'")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        if self.optimizer == "prodigy":
            require_extra("prodigy", "--optimizer prodigy")  # before any model is loaded: a missing extra is one line up front
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise UserError(f"--use-8bit-adam and --optimizer {self.optimizer} contradict each other; pick one")
        if self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.oft_block_size <= 0:
            raise UserError(f"--oft-block-size must be positive, got {self.oft_block_size}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise UserError(f"--lokr-factor must be -1 (automatic) or positive, got {self.lokr_factor}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
