"""Typed configuration of a DreamBooth run. Defaults are the BK-SDM recipe (its DreamBooth
finetune scripts, `examples/dreambooth/` of the BK-SDM repository, which wrap the diffusers and
peft DreamBooth examples), each overridable by a CLI flag."""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from .argtypes import key_values
from .embeddings import new_tokens, prompt_token
from .defaults import (ADAPTER_METHOD_NAMES, BASE_QUANTIZATIONS, CLASS_IMAGE_RUNTIMES, DEFAULT_CLIP, DEFAULT_DINO,
                       LORA_FILE_METHODS, LR_SCHEDULERS, METHODS, MIXED_PRECISIONS, OPTIMIZERS, RANKED_METHODS)
from .errors import UserError
from .extras import require_extra
from .quantize import check_quantization

# fields that only some adapter methods read: a flag of those methods' commands (and of batch) only,
# and in a run's config.toml only for those methods
METHOD_FLAGS = {"lokr_factor": ("lokr",), "oft_block_size": ("oft",), "boft_block_num": ("boft",),
                "boft_butterfly_factor": ("boft",), "hra_rank": ("hra",), "rslora": LORA_FILE_METHODS,
                "loraplus_lr_ratio": LORA_FILE_METHODS, "rank_pattern": RANKED_METHODS,
                "alpha_pattern": RANKED_METHODS, "base_quantization": ADAPTER_METHOD_NAMES}
# --prior: DreamBooth's class images (the BK-SDM recipe), or the frozen base's own prediction (prior.py)
PRIORS = ("class-images", "base-prediction")


def other_methods_fields(method: str) -> set[str]:
    return {f for f, ms in METHOD_FLAGS.items() if method not in ms}


def for_method(cfg: "TrainConfig", method: str) -> "TrainConfig":
    """`cfg` as a run of `method` reads it (batch's --methods grid): the fields only other methods
    read back at their defaults."""
    skip = other_methods_fields(method)
    return replace(cfg, method=method, **{f.name: f.default if f.default is not MISSING else f.default_factory()
                                          for f in fields(cfg) if f.name in skip})


@dataclass
class TrainConfig:
    """A DreamBooth run. Each field is a flag of `personalize lora/full/...` and `batch`
    (personalize.flags): `metadata` holds its help, and its choices as the library's constants; the
    comment above or beside a field gives the reason for its default."""

    method: str = field(metadata={"flag": None, "choices": METHODS,  # the command's name, not a flag
                                  "help": "adapter method, or full finetuning (the command: personalize lora, ...)"})
    # a dataset subject name, or a folder of the user's own photos
    subject: str = field(metadata={
        "help": "dataset subject name (e.g. dog) or a folder of your own photos (with --class-noun)"})
    # the backbone the BK-SDM paper personalizes first
    base: str = field(default="bk-sdm-base", metadata={
        "help": "backbone: a registry name (`personalize backbones`), hub id, or local pipeline dir"})
    # from subjects/subjects.csv for dataset subjects
    class_noun: str | None = field(default=None, metadata={
        "help": "class of the subject (dog, backpack, ...); required for your own photos"})
    # else $PERSONALIZE_DATA, else ./data/dreambooth/dataset
    data_dir: str | None = field(default=None, metadata={
        "help": "DreamBooth dataset/ folder (default $PERSONALIZE_DATA, else ./data/dreambooth/dataset)"})
    # else runs/<method>/<base>/<subject>
    output_dir: str | None = field(default=None, metadata={
        "help": "run directory (default runs/<method>/<base>/<subject>)"})

    # DreamBooth's rare identifier token, also used by the BK-SDM scripts
    token: str = field(default="sks", metadata={"help": "identifier token for the subject"})
    # DreamBooth instance prompt
    instance_prompt: str = field(default="a {token} {class}", metadata={
        "help": "prompt of the subject's photos ({token} and {class} filled in)"})
    # DreamBooth class prompt (prior preservation)
    class_prompt: str = field(default="a {class}", metadata={
        "help": "prompt of the class images for prior preservation ({class} filled in)"})

    # BK-SDM DreamBooth: max_train_steps 800
    steps: int = field(default=800, metadata={"help": "optimizer steps"})
    # None: the base's native size (512 for every BK-SDM model)
    resolution: int | None = field(default=None, metadata={
        "help": "training resolution in px, multiple of 8 (default: the base's native size)"})
    # BK-SDM: train_batch_size 1 (+ 1 class image with prior preservation)
    train_batch_size: int = field(default=1, metadata={
        "help": "photos per micro-step (prior preservation adds as many class images)"})
    # BK-SDM: 1
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    # None: 1e-4 for LoRA, 1e-6 for full (BK-SDM scripts)
    lr: float | None = field(default=None, metadata={"help": "learning rate (default 1e-4 LoRA, 1e-6 full)"})
    # BK-SDM: constant LR, no warm-up
    lr_warmup_steps: int = field(default=0, metadata={
        "help": "LR warm-up steps (with the constant schedule: constant_with_warmup)"})
    # diffusers DreamBooth default
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    # option on CUDA; plain AdamW elsewhere (older spelling of --optimizer adamw8bit)
    use_8bit_adam: bool = field(default=False, metadata={
        "help": "bitsandbytes 8-bit AdamW (CUDA only); the same as --optimizer adamw8bit"})
    # BK-SDM: constant LR; the names of diffusers' get_scheduler, which the DreamBooth scripts call
    lr_scheduler: str = field(default="constant", metadata={
        "choices": LR_SCHEDULERS, "help": "learning-rate schedule (diffusers' get_scheduler)"})
    # BK-SDM: AdamW; adamw8bit (bitsandbytes, CUDA); prodigy (Mishchenko & Defazio 2023, lr 1.0 as its README);
    # loraplus: AdamW with LoRA's B matrices at --loraplus-lr-ratio x the LR (Hayou et al. 2024)
    optimizer: str = field(default="adamw", metadata={
        "choices": OPTIMIZERS, "help": "the optimizer (adamw8bit: bitsandbytes, CUDA only; prodigy: pip install "
                                       "'personalize[prodigy]', its lr defaults to 1.0; loraplus: LoRA+, lora/dora "
                                       "only)"})

    # BK-SDM: prior preservation weight 1.0
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the prior-preservation loss"})
    # min-SNR loss weighting (Hang et al. 2023; 5.0 is their recommended gamma): off in the BK-SDM recipe
    snr_gamma: float | None = field(default=None, metadata={
        "help": "min-SNR loss weighting with this gamma (Hang et al. 2023; 5.0 is usual; default off)"})
    # offset noise (Guttenberg 2023; 0.05-0.1 is usual): off in the BK-SDM recipe
    noise_offset: float = field(default=0.0, metadata={
        "help": "offset noise strength (Guttenberg 2023; 0.05-0.1 is usual; default 0)"})
    # BK-SDM: num_class_images 200; 0 turns prior preservation off
    class_images: int = field(default=200, metadata={
        "help": "class images for prior preservation (0 turns it off)"})
    # DPM-Solver++ steps, as the BK-SDM generation scripts
    class_image_steps: int = field(default=25, metadata={"help": "DPM-Solver++ steps per class image"})
    # images per pipeline call when generating class images
    class_image_batch_size: int = field(default=4, metadata={"help": "class images per pipeline call"})
    # torch, as the BK-SDM recipe; openvino: drawn on CPU from a cached OpenVINO export of the base, in bf16
    # where native: 0.32x the best torch CPU time per 512 px image (benchmarks/RESULTS.md, "Deploy runtimes")
    class_images_runtime: str = field(default="torch", metadata={
        "choices": CLASS_IMAGE_RUNTIMES,
        "help": "where class images are drawn (openvino: on CPU from a cached OpenVINO export of the base, bf16 "
                "where native, 0.32x torch's time at 512 px; pip install 'personalize[openvino]')"})
    # SD default, used for class and validation images
    guidance_scale: float = field(default=7.5, metadata={
        "help": "classifier-free guidance of the class and validation images"})

    # BK-SDM: --train_text_encoder
    train_text_encoder: bool = field(default=True, metadata={
        "help": "train the text encoder too (--no-train-text-encoder: the U-Net only)"})
    # BK-SDM LoRA: U-Net rank 16
    rank: int = field(default=16, metadata={"help": "LoRA rank of the U-Net"})
    # BK-SDM LoRA: U-Net alpha 27
    lora_alpha: float = field(default=27, metadata={"help": "LoRA alpha of the U-Net"})
    # BK-SDM LoRA: text-encoder rank 16
    text_encoder_rank: int = field(default=16, metadata={"help": "LoRA rank of the text encoder"})
    # BK-SDM LoRA: text-encoder alpha 17
    text_encoder_alpha: float = field(default=17, metadata={"help": "LoRA alpha of the text encoder"})
    # the peft DreamBooth example's targets, which the BK-SDM LoRA script inherits
    lora_unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_v"], metadata={
        "flag": "--lora-targets", "help": "comma-separated U-Net module names that get LoRA"})
    lora_text_encoder_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={
        "help": "comma-separated text-encoder module names that get LoRA"})
    # LoKr: -1 = the factor nearest sqrt(width), LyCORIS' and peft's default (decompose_factor)
    lokr_factor: int = field(default=-1, metadata={
        "help": "LoKr: the Kronecker factor's size (-1: the one nearest sqrt of the width)"})
    # OFT: 32-wide orthogonal blocks, peft's default (OFTConfig.oft_block_size); must divide each target's input width
    oft_block_size: int = field(default=32, metadata={
        "help": "OFT: size of the orthogonal blocks; must divide every target's input width"})
    # BOFT: 8 blocks per layer and 1 butterfly factor, as peft's BOFT DreamBooth example
    # (examples/boft_dreambooth/train_dreambooth.sh); more factors need peft's CUDA kernel (fbd_cuda)
    boft_block_num: int = field(default=8, metadata={
        "help": "BOFT: orthogonal blocks per layer; must divide every target's input width"})
    boft_butterfly_factor: int = field(default=1, metadata={
        "help": "BOFT: butterfly factors (1 is OFT's block structure; more need peft's CUDA extension)"})
    # HRA: 8 Householder reflections, peft's HRA DreamBooth example (examples/hra_dreambooth) and HRAConfig's default
    hra_rank: int = field(default=8, metadata={
        "help": "HRA: Householder reflections per layer (even: pairs start as the identity)"})
    # rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(rank) rather than alpha/rank: off, as in the recipe
    rslora: bool = field(default=False, metadata={
        "help": "LoRA/DoRA: rank-stabilized scaling alpha/sqrt(rank) (rsLoRA, Kalajdzievski 2023; peft's use_rslora)"})
    # none: every module at --rank/--lora-alpha, as in the recipe
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={
        "type": key_values(int), "metavar": "REGEX=RANK,...",
        "help": "LoRA/DoRA/LoHa/LoKr: per-module ranks, regex=rank matched against the end of U-Net and "
                "text-encoder module names, e.g. 'down_blocks.0.*=4,up_blocks.3.*=4' (peft's rank_pattern; "
                "default: none)"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={
        "type": key_values(float), "metavar": "REGEX=ALPHA,...",
        "help": "LoRA/DoRA/LoHa/LoKr: per-module alphas, as --rank-pattern (peft's alpha_pattern; default: none)"})
    # LoRA+ (Hayou et al. 2024): B matrices at 2^4 = 16 x the LR, the paper's recommended ratio
    loraplus_lr_ratio: float = field(default=16.0, metadata={
        "help": "--optimizer loraplus: the LR of LoRA's B matrices is this times --lr"})

    # None = auto: on for GPUs under 40 GiB (BK-SDM turns it on to fit a 24 GB card), off on CPU,
    # where RAM is rarely the limit and recomputation costs step time (benchmarks/RESULTS.md)
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "recompute activations in backward to save memory (default: on for GPUs under 40 GiB, off on CPU)"})
    # LoRA on CPU: frozen base weights stored in fp16, computed in fp32 (half_storage.py); saves 2
    # bytes a frozen weight for 4-30% more step time (measured), so off unless memory is short (RESULTS.md)
    cpu_half_weights: bool = field(default=False, metadata={
        "help": "LoRA on CPU: keep the frozen base weights in fp16, compute in fp32 (2 bytes a frozen weight "
                "instead of 4, slower steps)"})
    # off: glibc's heap reuse is faster; on, peak RSS of a 256 px fp32 LoRA step -0.5 GB (host_memory.py, RESULTS.md)
    release_freed_memory: bool = field(default=False, metadata={
        "help": "Linux: tensors of 1 MB and up get their own mapping and go back to the OS when freed (glibc "
                "keeps them in its heap otherwise): less peak RAM, slower CPU steps"})
    # none, as in the recipe; nf4 is QLoRA's (Dettmers et al. 2023: 4-bit NormalFloat, double quantization)
    base_quantization: str = field(default="none", metadata={
        "choices": BASE_QUANTIZATIONS,
        "help": "hold the frozen U-Net's and text encoder's Linear layers in bitsandbytes nf4 (QLoRA: 4-bit "
                "NormalFloat, double quantization) or int8 while the adapter trains (convs in 16 bits; fp16 "
                "storage, as --cpu-half-weights, on a CPU in fp32); "
                "nf4: lora, dora, oft, boft; int8: lora, loha, lokr, oft, boft; the adapter saved is one of the "
                "plain base"})
    # fp16 on CUDA (BK-SDM); on CPU bf16 where native, else fp32 (RESULTS.md)
    mixed_precision: str = field(default="auto", metadata={
        "choices": MIXED_PRECISIONS, "help": "auto (fp16 on CUDA; bf16 on CPUs with native bf16, else fp32), no, fp16 or bf16"})
    # BK-SDM: seed 1234
    seed: int = field(default=1234, metadata={"help": "random seed of the run"})

    # a quarter of a recipe run; only the newest is kept
    checkpoint_every: int = field(default=200, metadata={
        "help": "save a resumable checkpoint every N steps (0: only at the end)"})
    # delete checkpoints/ once the final outputs are safely written
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "keep checkpoints/ once the final outputs are written (they are deleted otherwise)"})
    # loss is synced to the host this often (no per-step host syncs)
    log_every: int = field(default=10, metadata={"help": "log the loss every N steps"})
    # images in validation.png (0: none)
    validation_images: int = field(default=4, metadata={"help": "images in validation.png (0: none)"})
    # DPM-Solver++ steps for validation images
    validation_steps: int = field(default=25, metadata={"help": "DPM-Solver++ steps of the validation images"})
    # in-run monitoring (personalize/monitor.py), all off as in the BK-SDM recipe, which keeps only the end
    # a grid of fixed-seed samples every N steps (samples/step-N.png)
    sample_every: int = field(default=0, metadata={
        "help": "a grid of fixed-seed samples every N steps: samples/step-N.png + samples/index.html (0: off)"})
    # one prompt per line ({token}/{class} filled); None: instance prompt + one recontextualisation +
    # one property change of the subject's DreamBooth protocol prompts (Ruiz et al. 2023, Fig. 4 kinds)
    sample_prompts: str | None = field(default=None, metadata={
        "help": "file with one prompt per line for --sample-every ({token}/{class} filled; default: the "
                "instance prompt, one recontextualisation, one property change)"})
    # a loadable adapter (full: pipeline) every N steps (steps/step-N/); 0: final only
    save_every: int = field(default=0, metadata={
        "help": "a loadable adapter (full: pipeline) every N steps in steps/step-N/ (0: only the final one)"})
    # DINO / CLIP-I / CLIP-T every N steps (scores_by_step.csv), eval's evaluators
    score_every: int = field(default=0, metadata={
        "help": "DINO, CLIP-I, CLIP-T every N steps into scores_by_step.csv/.png (0: off)"})
    # protocol prompts scored per step: a cheap, fixed subset of the 25
    score_prompts: int = field(default=4, metadata={"help": "protocol prompts scored at each --score-every step"})
    # seeds per scored prompt
    score_images: int = field(default=2, metadata={"help": "seeds per prompt scored at each --score-every step"})
    # a step counts as best only if its CLIP-T is at least this (DreamBooth reports ~0.3 for good runs)
    min_clip_t: float = field(default=0.0, metadata={
        "help": "the best step (run.json, console) is the best DINO among steps with CLIP-T at least this"})
    # the eval command's DINO ViT-S/16 (DreamBooth section 4.1)
    dino: str = field(default=DEFAULT_DINO, metadata={"help": "DINO evaluator for --score-every: hub id or local dir"})
    # the eval command's CLIP ViT-B/32 (DreamBooth section 4.1)
    clip: str = field(default=DEFAULT_CLIP, metadata={"help": "CLIP evaluator for --score-every: hub id or local dir"})
    # refuse photos smaller than the resolution unless asked
    allow_upscale: bool = field(default=False, metadata={
        "help": "train on photos smaller than the resolution, upscaled (refused otherwise)"})
    # kohya's --alpha_mask: off, a transparent product shot is not always a mask
    alpha_mask: bool = field(default=False, metadata={
        "help": "use a PNG's alpha channel as its loss mask (kohya's --alpha_mask; photo.mask.png files are "
                "always used)"})
    # BK-SDM recipe: square centre crops; on: kohya's --enable_bucket / NovelAI's aspect-ratio buckets (buckets.py)
    buckets: bool = field(default=False, metadata={
        "help": "aspect-ratio buckets: each photo trains at the size of about resolution x resolution px (sides "
                "multiples of 64, 1:2 to 2:1) nearest its aspect ratio, instead of a centre crop to a square"})
    # off as in the BK-SDM DreamBooth scripts (their KD script keeps one, --use_ema: distill --use-ema)
    ema: bool = field(default=False, metadata={
        "help": "keep an exponential moving average of the trained weights (diffusers' EMAModel) and save it "
                "as the run's weights, in step saves too; samples and scores use it"})
    # OneTrainer's ema_decay (0.999); diffusers' EMAModel 0.9999, SimpleTuner 0.995. All three cap the
    # warm-up (1+t)/(10+t), which stays below 0.999 for 8990 updates: an 800-step run averages alike
    ema_decay: float = field(default=0.999, metadata={
        "help": "EMA decay, capping the warm-up (1+t)/(10+t) of update t (default %(default)s)"})
    # the EMA is the output; the raw weights only when asked (kohya-style runs keep one file)
    save_raw_weights: bool = field(default=False, metadata={
        "help": "with --ema: also save the raw (not averaged) weights, in raw/ of the run and of each step save"})
    # kohya's --caption_dropout_rate (default 0): off in the BK-SDM recipe
    caption_dropout: float = field(default=0.0, metadata={
        "help": "probability that a photo's caption is replaced by the empty prompt in a step (kohya's "
                "--caption_dropout_rate; default 0)"})
    # kohya's --shuffle_caption (default off): off in the BK-SDM recipe
    shuffle_caption: bool = field(default=False, metadata={
        "help": "shuffle each caption's comma-separated parts every step; the first --keep-tokens and the "
                "part naming the subject stay in place (kohya's --shuffle_caption)"})
    # the BK-SDM recipe: DreamBooth's class images; base-prediction is OneTrainer's "prior prediction",
    # ai-toolkit's "differential output preservation" (no class images drawn)
    prior: str = field(default="class-images", metadata={
        "choices": PRIORS,
        "help": "what the prior loss compares with: class-images (DreamBooth's, drawn once by the base), or "
                "base-prediction (the frozen base's prediction for the class prompt on the step's own noisy "
                "latents; no class images; full runs need --allow-frozen-copy)"})
    # a second U-Net + text encoder in memory is never taken silently
    allow_frozen_copy: bool = field(default=False, metadata={
        "help": "full --prior base-prediction: keep a frozen copy of the U-Net and text encoder (their memory again)"})
    # kohya's --keep_tokens (default 0)
    keep_tokens: int = field(default=0, metadata={
        "help": "with --shuffle-caption: leading comma-separated parts kept in place (default 0)"})
    # off in the BK-SDM recipe; on: pivotal tuning as diffusers' advanced DreamBooth LoRA script
    # (--train_text_encoder_ti), new token embeddings trained beside the adapter (pivotal.py)
    pivotal: bool = field(default=False, metadata={
        "help": "pivotal tuning: new tokens <s0><s1>... replace the identifier token in every prompt and their "
                "embeddings train beside the adapter (every adapter method; not full)"})
    # the advanced script's --num_new_tokens_per_abstraction default: 2
    num_new_tokens: int = field(default=2, metadata={
        "help": "--pivotal: new tokens replacing the identifier, each initialized from the class noun's embedding"})
    # the advanced script's --text_encoder_lr default (5e-6), the LR of its textual-inversion parameter group
    ti_lr: float = field(default=5e-6, metadata={"help": "--pivotal: learning rate of the new token embeddings"})
    # the advanced script's --train_text_encoder_ti_frac default: the first half of the run
    ti_steps: float = field(default=0.5, metadata={
        "help": "--pivotal: the fraction of the run's steps (from the first) during which the new embeddings "
                "train; they are frozen after it (default 0.5: the first half)"})
    # only safetensors weights are loaded unless the user says so
    allow_pickle: bool = field(default=False, metadata={
        "help": "allow loading .bin/.ckpt pickle weights (only for sources you trust)"})
    # an unfinished run is continued only when asked
    resume: bool = field(default=False, metadata={"help": "continue an unfinished run from its last checkpoint"})
    # a finished run is replaced only when asked
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in the output directory"})

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
                     "class_image_steps", "class_image_batch_size", "validation_steps", "log_every",
                     "lora_alpha", "text_encoder_alpha", "oft_block_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("prior_loss_weight", "max_grad_norm", "lr_warmup_steps", "validation_images", "checkpoint_every",
                     "sample_every", "save_every", "score_every"):
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
        for name, flag, used in (("lora_unet_targets", "--lora-targets", True),
                                 ("lora_text_encoder_targets", "--lora-text-encoder-targets", self.train_text_encoder)):
            if self.method != "full" and used and not getattr(self, name):
                raise UserError(f"{flag}: no module names; give at least one, or leave the flag out for the default")
        if self.sample_prompts and not self.sample_every:
            raise UserError(f"--sample-prompts {self.sample_prompts}: only drawn with --sample-every N (neither "
                            f"--save-every nor --score-every uses it); add --sample-every or drop it")
        for name in ("score_prompts", "score_images"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not -1 <= self.min_clip_t <= 1:
            raise UserError(f"--min-clip-t must be in [-1, 1] (a cosine similarity), got {self.min_clip_t}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UserError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{self.lr_scheduler}'")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise UserError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, got '{self.mixed_precision}'")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got '{self.optimizer}'")
        if self.optimizer == "prodigy":
            require_extra("prodigy", "--optimizer prodigy")  # before any model is loaded: a missing extra is one line up front
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise UserError(f"--use-8bit-adam and --optimizer {self.optimizer} contradict each other; pick one")
        if self.base_quantization not in BASE_QUANTIZATIONS:
            raise UserError(f"--base-quantization must be one of {', '.join(BASE_QUANTIZATIONS)}, got '{self.base_quantization}'")
        check_quantization(self.method, self.base_quantization)
        if self.prior not in PRIORS:
            raise UserError(f"--prior must be one of {', '.join(PRIORS)}, got '{self.prior}'")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise UserError(f"--lokr-factor must be -1 (automatic) or positive, got {self.lokr_factor}")
        self._validate_method_options()
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.ema_decay <= 1:
            raise UserError(f"--ema-decay must be in [0, 1] (0.999 is usual), got {self.ema_decay}")
        if self.save_raw_weights and not self.ema:
            raise UserError("--save-raw-weights needs --ema (without it the saved weights are the raw ones)")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if self.keep_tokens < 0 or self.keep_tokens and not self.shuffle_caption:
            raise UserError(f"--keep-tokens must be >= 0 and goes with --shuffle-caption, got {self.keep_tokens}")
        self._validate_pivotal()
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")

    def _validate_pivotal(self) -> None:
        if self.pivotal and self.method == "full":
            raise UserError("--pivotal: full finetuning trains the whole text encoder already; pivotal tuning is "
                            "for the adapter methods")
        if self.pivotal and (not re.fullmatch(r"[A-Za-z0-9_.-]+", self.token) or self.token.startswith(".")):
            # it names the A1111/ComfyUI embedding file (embeddings/<token>.safetensors)
            raise UserError(f"--token '{self.token}': with --pivotal it names the embedding file; use letters, "
                            f"digits, '_', '.' or '-'")
        if self.num_new_tokens <= 0:
            raise UserError(f"--num-new-tokens must be positive, got {self.num_new_tokens}")
        if not self.ti_lr > 0:
            raise UserError(f"--ti-lr must be positive, got {self.ti_lr}")
        if not 0 < self.ti_steps <= 1 or self.pivotal and int(self.ti_steps * self.steps) < 1:
            raise UserError(f"--ti-steps must be a fraction of the run in (0, 1] covering at least one of its "
                            f"{self.steps} steps, got {self.ti_steps}")

    def prompt_token(self) -> str:
        """What stands for the subject in every prompt of the run: the identifier, or with --pivotal
        the new tokens that replace it (embeddings.prompt_token)."""
        return prompt_token(new_tokens(self.num_new_tokens)) if self.pivotal else self.token

    def ti_last_step(self) -> int:
        """The last step the new embeddings train (the advanced script's int(frac * epochs), in steps)."""
        return int(self.ti_steps * self.steps)

    def _validate_method_options(self) -> None:
        for name in ("boft_block_num", "boft_butterfly_factor", "hra_rank"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.method == "hra" and self.hra_rank % 2:
            raise UserError(f"--hra-rank must be even (HRA starts as the identity from pairs of equal reflections), "
                            f"got {self.hra_rank}")
        if not self.loraplus_lr_ratio > 0:
            raise UserError(f"--loraplus-lr-ratio must be positive (16 is the paper's), got {self.loraplus_lr_ratio}")
        if self.optimizer == "loraplus" and self.method not in LORA_FILE_METHODS:
            raise UserError(f"--optimizer loraplus: LoRA+ sets the LR of LoRA's B matrices; it is for "
                            f"{' and '.join(LORA_FILE_METHODS)}, not {self.method}")
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            for key, value in getattr(self, name).items():  # the flag's parser checks these; batch/app configs too
                if not isinstance(value, kind) or isinstance(value, bool) or not value > 0:
                    raise UserError(f"--{name.replace('_', '-')} {key}={value}: the value must be a positive "
                                    f"{'integer' if kind is int else 'number'}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
