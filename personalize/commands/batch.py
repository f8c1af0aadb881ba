"""`personalize batch`: flags -> batch.run_batch."""

from __future__ import annotations

import argparse

from ..evaluators import DEFAULT_CLIP, DEFAULT_DINO
from .train import add_flags, config_from_args


def run(args: argparse.Namespace) -> int:
    from ..batch import _split, default_batch_dir, parse_shard, print_summary, run_batch, select_subjects

    shard = parse_shard(args.shard)
    template = config_from_args(args, (args.methods or args.method).split(",")[0], subject="batch")
    bases = _split(args.bases or args.base)
    methods = _split(args.methods or args.method)
    subjects = select_subjects(args.subjects, args.data_dir)
    evaluate = None
    if args.eval:
        # evaluators load once, before any training, so a missing model fails in seconds
        from ..evaluators import ClipEmbedder, DinoEmbedder
        from ..scoring import evaluate_run

        dino, clip = DinoEmbedder.from_name_or_path(args.dino), ClipEmbedder.from_name_or_path(args.clip)

        def evaluate(run_dir):
            return evaluate_run(run_dir, dino=dino, clip=clip, data_dir=args.data_dir,
                                images_per_prompt=args.images_per_prompt)
    summary = run_batch(template, bases, methods, subjects, args.batch_dir or default_batch_dir(), shard, evaluate)
    print_summary(summary)
    return 1 if summary["counts"]["failed"] else 0


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="personalize many subjects (x bases x methods), resumable, failure-isolated",
                       description="Train every subject of the dataset (or --subjects) into its own run directory.")
    p.add_argument("--method", default="lora", choices=["lora", "full"], help="method (default: lora)")
    p.add_argument("--methods", default=None, help="comma list, e.g. lora,full (overrides --method)")
    p.add_argument("--bases", default=None, help="comma list of bases, e.g. bk-sdm-base,bk-sdm-small (overrides --base)")
    p.add_argument("--subjects", default=None, help="comma list of subject names and globs (default: all with photos)")
    p.add_argument("--batch-dir", default=None, help="where runs go: <batch-dir>/<base>/<method>/<subject> (default runs/batch)")
    p.add_argument("--shard", default=None, help="i/n: train only jobs k with k %% n == i (default: from accelerate launch)")
    p.add_argument("--eval", action="store_true", help="score each subject after training (personalize eval)")
    p.add_argument("--dino", default=DEFAULT_DINO, help="DINO evaluator (hub id or local dir) for --eval")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP evaluator for --eval")
    p.add_argument("--images-per-prompt", type=int, default=4, help="protocol images per prompt for --eval")
    add_flags(p, skip={"subject", "output_dir", "resume", "overwrite"})
    p.set_defaults(func=run)
