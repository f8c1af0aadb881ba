"""The `distill` command: build BK-SDM backbones (argument parsing only).

    distill prune --teacher sd-v1.4 --arch bk-small -o students/bk-small [--dry-run]
    distill train --teacher sd-v1.4 --student students/bk-small --data DATA -o runs/bk-small-kd

UserError -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personalize.errors import UserError

from .arch import ARCHS


def _add_prune(sub):
    p = sub.add_parser("prune", help="block removal: write a BK-SDM student pipeline initialised from the teacher",
                       description="BK-SDM block removal: a student pipeline dir (teacher's VAE, text encoder, "
                                   "tokenizer, scheduler + the student U-Net initialised from the teacher).")
    p.add_argument("--teacher", required=True, help="registry name (sd-v1.4, sd-v2.1-base, ...) or pipeline dir")
    p.add_argument("--arch", required=True, help=f"student architecture: {', '.join(ARCHS)}")
    p.add_argument("-o", "--output", help="pipeline directory to write (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print U-Net parameter counts and MACs per step of teacher and student; write nothing")
    p.add_argument("--resolution", type=int, default=512, help="image size for the MAC count (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .bin/.ckpt teacher weights too (pickles can run code: trusted sources only)")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    from .arch import get_arch
    from .prune import dry_run, prune

    get_arch(args.arch)  # unknown arch: fail before touching the teacher
    if args.resolution < 8 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution}: must be a positive multiple of 8 (the VAE's factor)")
    if args.dry_run:
        t, s = dry_run(args.teacher, args.arch, args.resolution)
        print(f"U-Net per denoising step at {args.resolution}px (MACs: measured; conv+linear is the paper's count)")
        print(t.line())
        print(s.line(t))
        return 0
    if not args.output:
        raise UserError("-o/--output is required (or pass --dry-run)")
    prune(args.teacher, args.arch, Path(args.output), overwrite=args.overwrite, allow_pickle=args.allow_pickle)
    return 0


def _add_train(sub):
    from .data import DataSpec
    from .kd import KDWeights
    from .train import DistillConfig

    d, c, k = DataSpec(source=""), DistillConfig(teacher="", student="", output=""), KDWeights()
    p = sub.add_parser("train", help="KD pretraining of a pruned student (BK-SDM recipe defaults)",
                       description="BK-SDM distillation: lambda_sd * denoising MSE + lambda_kd_out * output KD + "
                                   "lambda_kd_feat * stage-feature KD; writes OUT/student as a pipeline dir.")
    p.add_argument("--teacher", required=True, help="registry name or pipeline dir of the teacher")
    p.add_argument("--student", required=True, help="pipeline dir written by `distill prune`")
    p.add_argument("--data", required=True,
                   help="image folder with metadata.jsonl/.csv captions, or a `datasets` name / saved dataset dir")
    p.add_argument("-o", "--output", required=True, help="run dir: checkpoints/, logs/, distill.json, student/")
    g = p.add_argument_group("data")
    g.add_argument("--split", default=d.split, help="dataset split to read (default %(default)s)")
    g.add_argument("--image-column", default=None,
                   help="image column (default: the column typed Image, else image/img/jpg/png)")
    g.add_argument("--caption-column", default=None, help="caption column (default: text/caption/prompt/txt...)")
    g.add_argument("--streaming", action="store_true", help="stream the dataset, never materialised (LAION-scale)")
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer,
                   help="streaming only: examples held for shuffling (default %(default)s)")
    g.add_argument("--max-samples", type=int, default=None, help="use only the first N examples (smoke runs)")
    g.add_argument("--resolution", type=int, default=d.resolution,
                   help="training image size in pixels (default %(default)s, the BK-SDM recipe)")
    g.add_argument("--random-crop", action="store_true", help="random instead of center crop")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--precompute", action="store_true",
                   help="encode latents and captions once, up front, then free the VAE and text encoder")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=c.steps, help="optimizer steps (default %(default)s, model card)")
    g.add_argument("--lr", type=float, default=c.lr,
                   help="constant AdamW learning rate (default %(default)s, model card)")
    g.add_argument("--batch-size", type=int, default=c.batch_size,
                   help="per device and micro-step (default %(default)s, kd_train.sh)")
    g.add_argument("--gradient-accumulation-steps", type=int, default=c.gradient_accumulation_steps,
                   help="micro-steps per optimizer step (default %(default)s: 64 x 4 = 256, model card)")
    g.add_argument("--mixed-precision", default=c.mixed_precision, choices=["auto", "no", "fp16", "bf16"],
                   help="auto: fp16 on GPU (the recipe); on CPU bf16 where it runs natively (AVX512-BF16/AMX), "
                        "else fp32")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute student activations in the backward pass (less memory, slower)")
    g.add_argument("--lambda-sd", type=float, default=k.lambda_sd, help="weight of the denoising loss (default 1)")
    g.add_argument("--lambda-kd-out", type=float, default=k.lambda_kd_out,
                   help="weight of the output KD loss (default 1)")
    g.add_argument("--lambda-kd-feat", type=float, default=k.lambda_kd_feat,
                   help="weight of the feature KD loss (default 1)")
    g.add_argument("--seed", type=int, default=c.seed,
                   help="seed of data order, noise and timesteps (default %(default)s)")
    g.add_argument("--checkpoint-every", type=int, default=c.checkpoint_every,
                   help="save a resumable checkpoint every N steps (default %(default)s; the last step always)")
    g.add_argument("--log-every", type=int, default=c.log_every,
                   help="write the mean of each loss part to logs/ every N steps (default %(default)s)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="load .bin/.ckpt weights too (pickles can run code: trusted sources only)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in -o")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .data import DataSpec
    from .kd import KDWeights
    from .train import DistillConfig, train

    for name in ("steps", "batch_size", "gradient_accumulation_steps", "resolution", "log_every", "shuffle_buffer"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("checkpoint_every", "lambda_sd", "lambda_kd_out", "lambda_kd_feat"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution}: must be a multiple of 8 (the VAE's factor)")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr}: must be > 0")
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError("--max-samples must be >= 1")
    cfg = DistillConfig(
        teacher=args.teacher, student=args.student, output=args.output,
        data=DataSpec(
            source=args.data, split=args.split, image_column=args.image_column, caption_column=args.caption_column,
            streaming=args.streaming, shuffle_buffer=args.shuffle_buffer, max_samples=args.max_samples,
            resolution=args.resolution, center_crop=not args.random_crop, random_flip=not args.no_flip,
        ),
        kd=KDWeights(args.lambda_sd, args.lambda_kd_out, args.lambda_kd_feat),
        steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, precompute=args.precompute, allow_pickle=args.allow_pickle, resume=args.resume,
    )
    train(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Build BK-SDM backbones: block removal + KD.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prune(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from personalize.cli import run

    # same start-up check, library quieting and error handling as `personalize`
    return run(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
