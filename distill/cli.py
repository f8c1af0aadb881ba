"""The `distill` command: build BK-SDM backbones (argument parsing only).

    distill prune --teacher sd-v1.4 --arch bk-small -o students/bk-small [--dry-run]
    distill train --teacher sd-v1.4 --student students/bk-small --data DATA -o runs/bk-small-kd

UserError -> one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from personalize.architectures import ARCHS, get_arch
from personalize.cli import one_line_parser, run
from personalize.errors import UserError, warn
from personalize.flags import add_flags, from_args

from .benchmark import EvalConfig, evaluate
from .benchmark_report import build_report
from .config import DistillConfig


def _add_prune(sub):
    p = sub.add_parser("prune", help="block removal: write a BK-SDM student pipeline initialised from the teacher",
                       description="BK-SDM block removal: a student pipeline dir (teacher's VAE, text encoder, "
                                   "tokenizer, scheduler + the student U-Net initialised from the teacher).")
    p.add_argument("--teacher", required=True, help="registry name (sd-v1.4, sd-v2.1-base, ...) or pipeline dir")
    p.add_argument("--arch", required=True, metavar="{" + ",".join(ARCHS) + "}",
                   help="student architecture: which teacher blocks it drops (full: none)")
    p.add_argument("-o", "--output", help="pipeline directory to write (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="print U-Net parameter counts and MACs per step of teacher and student; write nothing")
    p.add_argument("--resolution", type=int, default=512, help="image size for the MAC count (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load .bin/.ckpt teacher weights too (pickles can run code: trusted sources only)")
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
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


# -------------------------------------------------------------------- `distill train`: flags from the config
# Every leaf field of DistillConfig (and of its DataSpec and KDWeights) is one flag, made by
# personalize.flags from the field's type and metadata (help, spelling, choices, --help section).
# Fields without a flag keep their default: DistillConfig.max_grad_norm (the recipe's 1.0).
TRAIN_GROUPS = {"DataSpec": "data", "KDWeights": "optimisation", "DistillConfig": "optimisation"}


def _add_train(sub):
    p = sub.add_parser("train", help="KD pretraining of a pruned student (BK-SDM recipe defaults)",
                       description="BK-SDM distillation: lambda_sd * denoising MSE + lambda_kd_out * output KD + "
                                   "lambda_kd_feat * stage-feature KD; writes OUT/student as a pipeline dir.")
    add_flags(p, DistillConfig, groups=TRAIN_GROUPS)
    p.set_defaults(func=_run_train)


def train_config(args: argparse.Namespace, cls=None):
    """The `distill train` config (or `cls`, e.g. EvalConfig) from parsed flags; fields without a
    flag keep their default."""

    return from_args(cls or DistillConfig, args)


def _run_train(args) -> int:
    from .train import train

    cfg = train_config(args)
    cfg.validate()
    train(cfg)
    return 0


# -------------------------------------------------------------------- `distill eval` / `distill report`
EVAL_GROUPS = {"GenerationConfig": "generation (BK-SDM generate.py defaults)", "EvalConfig": "benchmark"}


def _add_eval(sub):
    p = sub.add_parser("eval", help="BK-SDM's zero-shot MS-COCO benchmark of a backbone: FID, IS, CLIP score, cost",
                       description="Generate one image per MS-COCO caption (resumable; `accelerate launch -m distill "
                                   "eval ...` shards the prompts over processes), then score them: FID against real "
                                   "statistics, IS, CLIP score, and the whole-pipeline cost. Writes images/, "
                                   "scores.json and scores.md into -o.")
    add_flags(p, EvalConfig, groups=EVAL_GROUPS)
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    evaluate(train_config(args, EvalConfig))
    return 0


def _add_report(sub):
    p = sub.add_parser("report", help="one table + plot of several `distill eval` outputs",
                       description="Gathers scores.json under each EVAL_DIR (searched recursively) into "
                                   "benchmark.md, benchmark.csv and benchmark.png.")
    p.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR", help="`distill eval` outputs or folders holding them")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for benchmark.md/.csv/.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in -o")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    paths, skipped = build_report([Path(d) for d in args.eval_dirs], Path(args.output), overwrite=args.overwrite)
    for p, why in skipped:
        warn(f"skipped {p}", why)
    for p in paths.values():
        print(f"wrote {p}")
    return 1 if skipped else 0


def build_parser() -> argparse.ArgumentParser:
    parser = one_line_parser("distill", "Build BK-SDM backbones: block removal + KD.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prune(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_report(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # same start-up check, library quieting and error handling as `personalize`
    return run(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
