"""The typed configuration of `distill train`: every field is a flag (personalize.flags), each
default the BK-SDM recipe (its kd_train.sh and model card). No torch: `distill train --help`
builds its parser from here."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from personalize.defaults import MIXED_PRECISIONS
from personalize.errors import UserError

from .train_data.sources import DataSpec


@dataclass
class KDWeights:
    """The weights of the three loss parts (`distill train` flags; ``metadata``: their help)."""

    # BK-SDM recipe (kd_train.sh): all three losses weighted 1.0
    lambda_sd: float = field(default=1.0, metadata={"help": "weight of the denoising loss (default 1)"})
    lambda_kd_out: float = field(default=1.0, metadata={"help": "weight of the output KD loss (default 1)"})
    lambda_kd_feat: float = field(default=1.0, metadata={"help": "weight of the feature KD loss (default 1)"})

    def validate(self) -> None:
        """The range checks of `distill train` (messages name the flags); raises UserError."""
        names = ("lambda_sd", "lambda_kd_out", "lambda_kd_feat")
        for name in names:
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 and finite (got {v})")
        if not any(getattr(self, name) for name in names):
            raise UserError("--lambda-sd, --lambda-kd-out, --lambda-kd-feat: all 0, so the loss is 0 and nothing "
                            "would train; give at least one a positive weight")


@dataclass
class DistillConfig:
    """A `distill train` run. Each field is a flag of the command (``metadata``: its help, and its
    spelling where that is not the field's; ``"flag": None``: no flag); `data` and `kd` hold the
    flags of their own dataclasses."""

    teacher: str = field(metadata={"help": "registry name or pipeline dir of the teacher"})
    # pipeline dir written by `distill prune` (or a previous `distill train`)
    student: str = field(metadata={"help": "pipeline dir written by `distill prune`"})
    output: str = field(metadata={"flag": ("-o", "--output"),
                                  "help": "run dir: checkpoints/, logs/, distill.json, student/"})
    data: DataSpec = field(default_factory=lambda: DataSpec(source=""))
    kd: KDWeights = field(default_factory=KDWeights)
    # model card: 50K-iteration pretraining
    steps: int = field(default=50_000, metadata={"help": "optimizer steps (default %(default)s, model card)"})
    # model card: constant learning rate 5e-5, AdamW, no warm-up
    lr: float = field(default=5e-5, metadata={
        "help": "constant AdamW learning rate (default %(default)s, model card)"})
    # kd_train.sh: 64 per device per micro-step
    batch_size: int = field(default=64, metadata={
        "help": "per device and micro-step (default %(default)s, kd_train.sh)"})
    # model card: batch 256 = 4 x 64
    gradient_accumulation_steps: int = field(default=4, metadata={
        "help": "micro-steps per optimizer step (default %(default)s: 64 x 4 = 256, model card)"})
    # kd_train.sh: fp16 on GPU (auto: fp16 on CUDA; on CPU bf16 where native, else fp32)
    mixed_precision: str = field(default="auto", metadata={
        "choices": MIXED_PRECISIONS,
        "help": "auto: fp16 on GPU (the recipe); on CPU bf16 where it runs natively (AVX512-BF16/AMX), else fp32"})
    # kd_train.sh enables it to fit batch 64 on one A100; opt-in here
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute student activations in the backward pass (less memory, slower)"})
    # kd_train.sh: --max_grad_norm 1 (the recipe's value, no flag)
    max_grad_norm: float = field(default=1.0, metadata={"flag": None, "help": "clip the gradient norm to this"})
    # kd_train.sh: --seed 1234
    seed: int = field(default=1234, metadata={"help": "seed of data order, noise and timesteps (default %(default)s)"})
    # kd_train.sh: --checkpointing_steps 5000
    checkpoint_every: int = field(default=5000, metadata={
        "help": "save a resumable checkpoint every N steps (default %(default)s; the last step always)"})
    # loss.csv resolution vs one host sync per window (fit's hot loop never syncs)
    log_every: int = field(default=10, metadata={
        "help": "write the mean of each loss part to logs/ every N steps (default %(default)s)"})
    # cache latents + text embeddings (map-style data, center crop only)
    precompute: bool = field(default=False, metadata={
        "group": "data", "help": "encode latents and captions once, up front, then free the VAE and text encoder"})
    # project rule: safetensors weights only unless the user says so
    allow_pickle: bool = field(default=False, metadata={
        "help": "load .bin/.ckpt weights too (pickles can run code: trusted sources only)"})
    # kd_train.sh passes --use_ema (diffusers EMAModel, decay 0.9999); opt-in here, as BK-SDM's own flag
    use_ema: bool = field(default=False, metadata={
        "help": "keep an EMA of the student (decay --ema-decay) and write it as the output weights (kd_train.sh)"})
    # diffusers EMAModel's default, which kd_train_text_to_image.py keeps
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay (default %(default)s, with EMAModel's warm-up)"})
    # kd_train.sh: --valid_steps 500; 0 (off) here so short runs draw nothing
    valid_steps: int = field(default=0, metadata={
        "help": "every N steps write samples/step-N.png: --num-valid-images of --valid-prompt at fixed seeds "
                "(kd_train.sh: 500; 0: off)"})
    # kd_train_text_to_image.py --valid_prompt default
    valid_prompt: str = field(default="a golden vase with different flowers", metadata={
        "help": "prompt of the validation grid (default: BK-SDM's)"})
    # kd_train_text_to_image.py --num_valid_images 2
    num_valid_images: int = field(default=2, metadata={"help": "images in the validation grid, seeds 0..N-1"})
    # an existing run dir is continued only when asked
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in -o"})

    # may change between an interrupted run and its resume without changing what is trained
    RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "resume", "allow_pickle", "valid_steps",
                         "valid_prompt", "num_valid_images")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("resume")
        return d

    def validate(self) -> None:
        """The range checks of `distill train` (messages name the flags); raises UserError."""
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "log_every", "num_valid_images"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.valid_steps < 0:
            raise UserError("--valid-steps must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise UserError(f"--ema-decay {self.ema_decay}: must be in [0, 1]")
        if self.checkpoint_every < 0:
            raise UserError("--checkpoint-every must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr {self.lr}: must be > 0 and finite")
        if not 0 <= self.seed < 2**63:  # numpy's and torch's generators take a non-negative 63-bit seed
            raise UserError(f"--seed {self.seed}: must be in 0..2**63-1")
        self.data.validate()
        self.kd.validate()
