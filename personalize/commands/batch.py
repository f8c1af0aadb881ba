"""`personalize batch`: flags -> batch.run_batch."""

from __future__ import annotations

import argparse

from ..argtypes import number
from ..defaults import DEFAULT_CLIP, DEFAULT_DINO, METHODS
from ..outputs import check_output
from ..settings import add_settings_flags
from .dreambooth import add_flags, config_from_args

DESCRIPTION = """\
Personalize every subject of the DreamBooth dataset (or --subjects), for every base in --bases and
method in --methods, each into its own run directory <batch-dir>/<base>/<method>/<subject>.
Each base is loaded once per process and reused across subjects.

Rerun the same command to continue: finished subjects are skipped, an interrupted one resumes from
its last checkpoint, failed ones are retried. A subject that fails (bad photo, NaN loss, out of
memory) is recorded in <batch-dir>/summary.md and summary.json and the batch goes on.
Several GPUs: `accelerate launch --num_processes N -m personalize batch ...` (or --shard i/n per
process) gives each process its own share of the subjects, one at a time on its own GPU.
Exit code: 0 when all finished, 1 when any subject (or its --eval) failed, 2 on bad input."""

EXAMPLES = """\
examples:
  personalize batch --method lora --base bk-sdm-base
  personalize batch --subjects 'dog*,cat2' --eval
  personalize batch --bases bk-sdm-base,bk-sdm-small,bk-sdm-tiny --methods lora,full"""


def run(args: argparse.Namespace) -> int:
    from ..batch import (default_batch_dir, evaluator, exit_code, parse_shard, print_summary, run_batch,
                         select_subjects, split_list)

    shard = parse_shard(args.shard)  # first: under accelerate launch it picks this process's GPU
    bases, methods = split_list(args.bases, "--bases"), split_list(args.methods, "--methods")
    template = config_from_args(args, methods[0], subject="batch")
    # every part is checked before any is started: a typo in the last base must not cost the first
    for m in methods:
        config_from_args(args, m, subject="batch").validate()
    from ..sources import resolve_base

    resolved = [resolve_base(b).path for b in bases]
    batch_dir = args.batch_dir or default_batch_dir()
    check_output(batch_dir, kind="dir", inputs=resolved, flag="--batch-dir", allow_existing_dir=True)
    subjects = select_subjects(args.subjects, args.data_dir)
    make_eval = evaluator(args.dino, args.clip, args.data_dir, args.images_per_prompt) if args.eval else None
    summary = run_batch(template, bases, methods, subjects, batch_dir, shard, make_eval)
    print_summary(summary)
    return exit_code(summary)


def add_parser(sub) -> None:
    p = sub.add_parser("batch", help="personalize many subjects (x bases x methods), resumable, failure-isolated",
                       usage="personalize batch [--methods M[,M]] [--bases B[,B]] [--subjects NAMES]\n"
                             "                         [--batch-dir DIR] [--shard I/N] [--eval] [training flags]",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("batch")
    g.add_argument("--methods", "--method", dest="methods", default="lora", metavar="M[,M]",
                   help=f"comma list of {', '.join(METHODS)} (default: lora)")
    g.add_argument("--bases", "--base", dest="bases", default="bk-sdm-base", metavar="BASE[,BASE]",
                   help="comma list of backbones: registry names (`personalize backbones`), hub ids or local "
                        "pipeline dirs (default: bk-sdm-base)")
    g.add_argument("--subjects", default=None, metavar="NAMES",
                   help="comma list of subject names and globs, e.g. 'dog*,cat2' (default: all with photos)")
    g.add_argument("--batch-dir", default=None, help="where the runs and the summary go (default: runs/batch, "
                                                     "or $PERSONALIZE_BATCH_DIR)")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="train only share I (counted from 0) of N equal shares of the jobs "
                        "(default: one share per process under accelerate launch, else all)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", action="store_true", help="score each subject after training, as `personalize eval`")
    e.add_argument("--dino", default=DEFAULT_DINO, help=f"DINO evaluator: hub id or local dir (default: {DEFAULT_DINO})")
    e.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP evaluator: hub id or local dir (default: {DEFAULT_CLIP})")
    e.add_argument("--images-per-prompt", type=number(int, 1, 1000), default=4, help="protocol images per prompt (default: 4)")
    add_flags(p.add_argument_group("training (every subject)"),
              # --dino/--clip: the evaluation group's flags, which also serve --score-every
              skip={"subject", "base", "class_noun", "output_dir", "resume", "overwrite", "dino", "clip"})
    add_settings_flags(p, presets=True)
    p.set_defaults(func=run)
