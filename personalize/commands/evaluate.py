"""`personalize eval` and `personalize report`: subject-fidelity scores by the DreamBooth §4.1
protocol (DINO, CLIP-I, CLIP-T). Argument parsing only; the work is in `personalize.evaluation`."""

from __future__ import annotations

from pathlib import Path

from ..argtypes import number
from ..defaults import DEFAULT_CLIP, DEFAULT_DINO, DTYPES, EVAL_RUNTIMES
from ..errors import warn

EVAL_HELP = (
    "generate the DreamBooth protocol images of a run (25 prompts x N images, reused when already generated "
    "with the same settings) and score them: DINO, CLIP-I, CLIP-T, plus the real-images reference"
)


def _eval(args) -> int:
    from ..evaluation.protocol import evaluate_paths

    generation = {"steps": args.steps, "guidance_scale": args.guidance_scale, "runtime": args.runtime,
                  "dtype": args.dtype}
    evaluate_paths(args.run_dirs, dino_name=args.dino, clip_name=args.clip, batch_size=args.batch_size,
                   device=args.device, data_dir=args.data_dir, images_per_prompt=args.images_per_prompt,
                   seed=args.seed, generation=generation)
    return 0


def _report(args) -> int:
    from ..evaluation.report import build_report

    written, skipped = build_report(args.runs_dir, args.out)
    for path in written.values():
        print(path)
    for path, why in skipped:
        warn(f"skipped {path}", why)
    # exit 1 (not 2: the report is written) so a script notices means over fewer runs than it has
    return 1 if skipped else 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a `personalize lora/full` run dir, or a dir with several below it")
    p.add_argument("--dino", default=DEFAULT_DINO, metavar="PATH",
                   help=f"DINO ViT evaluator: hub id or local dir with safetensors weights (default {DEFAULT_DINO})")
    p.add_argument("--clip", default=DEFAULT_CLIP, metavar="PATH",
                   help=f"CLIP evaluator: hub id or local dir with safetensors weights (default {DEFAULT_CLIP})")
    p.add_argument("--images-per-prompt", type=number(int, 1, 1000), default=4,
                   help="images per prompt (DreamBooth protocol: 4, i.e. 100 per subject)")
    p.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=None, help="base seed of the protocol images (default: generation's)")
    p.add_argument("--steps", type=number(int, 1, 1000), default=None, help="denoising steps (default: generation's)")
    p.add_argument("--guidance-scale", type=number(float, 0, 100), default=None, help="classifier-free guidance (default: generation's)")
    p.add_argument("--runtime", choices=EVAL_RUNTIMES, default="torch",
                   help="what draws the protocol images: torch, or openvino (CPU: an OpenVINO export of the run, made "
                        "once per run in the personalize cache; bf16 where the CPU has it natively; pip install "
                        "'personalize[openvino]')")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="--runtime torch: the dtype the protocol images are drawn in (default auto: fp16 on CUDA, fp32 "
                        "on CPU; bf16 is ~2.3x faster on a CPU with AMX, and its images are kept apart from fp32's)")
    p.add_argument("--batch-size", type=number(int, 1, 4096), default=32, help="images per evaluator forward pass")
    p.add_argument("--device", default=None, help="evaluator device (default: cuda when available, else cpu)")
    p.add_argument("--data-dir", default=None,
                   help="DreamBooth dataset/ folder with the real photos (else $PERSONALIZE_DATA, else the folder "
                        "the run was trained on, else ./data/dreambooth/dataset)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="gather every evaluated run below RUNS_DIR into one table and plot")
    p.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    p.add_argument("--out", type=Path, default=None, help="where report.md/.csv/.png go (default RUNS_DIR)")
    p.set_defaults(func=_report)
