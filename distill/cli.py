"""The `distill` command: build BK-SDM backbones (argument parsing only).

    distill prune --teacher sd-v1.4 --arch bk-small -o students/bk-small [--dry-run]
    distill train --teacher sd-v1.4 --student students/bk-small --data DATA -o runs/bk-small-kd

UserError -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from personalize.errors import UserError

from .arch import ARCHS


def _add_prune(sub):
    p = sub.add_parser("prune", help="block removal: write a BK-SDM student pipeline initialised from the teacher")
    p.add_argument("--teacher", required=True, help="registry name (sd-v1.4, sd-v2.1-base, ...) or pipeline dir")
    p.add_argument("--arch", required=True, help=f"student architecture: {', '.join(ARCHS)}")
    p.add_argument("-o", "--output", help="pipeline directory to write (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print U-Net parameter counts and MACs per step of teacher and student; write nothing")
    p.add_argument("--resolution", type=int, default=512, help="image size for the MAC count (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    from .arch import get_arch
    from .prune import dry_run, prune

    get_arch(args.arch)  # unknown arch: fail before touching the teacher
    if args.dry_run:
        t, s = dry_run(args.teacher, args.arch, args.resolution)
        print(f"U-Net per denoising step at {args.resolution}px (MACs: measured; conv+linear is the paper's count)")
        print(t.line())
        print(s.line(t))
        return 0
    if not args.output:
        raise UserError("-o/--output is required (or pass --dry-run)")
    prune(args.teacher, args.arch, Path(args.output), overwrite=args.overwrite)
    return 0


def _add_train(sub):
    from .data import DataSpec
    from .train import DistillConfig

    d, c = DataSpec(source=""), DistillConfig(teacher="", student="", output="")
    p = sub.add_parser("train", help="KD pretraining of a pruned student (BK-SDM recipe defaults)")
    p.add_argument("--teacher", required=True, help="registry name or pipeline dir of the teacher")
    p.add_argument("--student", required=True, help="pipeline dir written by `distill prune`")
    p.add_argument("--data", required=True,
                   help="image folder with metadata.jsonl/.csv captions, or a `datasets` name / saved dataset dir")
    p.add_argument("-o", "--output", required=True, help="run dir: checkpoints/, logs/, distill.json, student/")
    g = p.add_argument_group("data")
    g.add_argument("--split", default=d.split)
    g.add_argument("--image-column", default=None)
    g.add_argument("--caption-column", default=None)
    g.add_argument("--streaming", action="store_true", help="stream the dataset (LAION-scale)")
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="streaming shuffle buffer")
    g.add_argument("--max-samples", type=int, default=None)
    g.add_argument("--resolution", type=int, default=d.resolution)
    g.add_argument("--random-crop", action="store_true", help="random instead of center crop")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--precompute", action="store_true", help="encode latents and captions once, up front")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=c.steps)
    g.add_argument("--lr", type=float, default=c.lr)
    g.add_argument("--batch-size", type=int, default=c.batch_size, help="per device and micro-step")
    g.add_argument("--gradient-accumulation-steps", type=int, default=c.gradient_accumulation_steps)
    g.add_argument("--mixed-precision", default=c.mixed_precision, choices=["auto", "no", "fp16", "bf16"])
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--lambda-sd", type=float, default=1.0, help="weight of the denoising loss")
    g.add_argument("--lambda-kd-out", type=float, default=1.0, help="weight of the output KD loss")
    g.add_argument("--lambda-kd-feat", type=float, default=1.0, help="weight of the feature KD loss")
    g.add_argument("--seed", type=int, default=c.seed)
    g.add_argument("--checkpoint-every", type=int, default=c.checkpoint_every)
    g.add_argument("--log-every", type=int, default=c.log_every)
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in -o")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .data import DataSpec
    from .kd import KDWeights
    from .train import DistillConfig, train

    for name in ("steps", "batch_size", "gradient_accumulation_steps", "resolution"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
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
        log_every=args.log_every, precompute=args.precompute, resume=args.resume,
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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
