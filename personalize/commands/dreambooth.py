"""`personalize lora` / `personalize full`: flags -> TrainConfig -> dreambooth.train_subject."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ..config import TrainConfig

HELP = {
    "subject": "dataset subject name (e.g. dog) or a folder of your own photos (with --class-noun)",
    "base": "backbone: a registry name (`personalize backbones`), hub id, or local pipeline dir",
    "class_noun": "class of the subject (dog, backpack, ...); required for your own photos",
    "data_dir": "DreamBooth dataset/ folder (default $PERSONALIZE_DATA, else ./data/dreambooth/dataset)",
    "output_dir": "run directory (default runs/<method>/<base>/<subject>)",
    "token": "identifier token for the subject",
    "steps": "optimizer steps",
    "resolution": "training resolution in px, multiple of 8 (default: the base's native size)",
    "lr": "learning rate (default 1e-4 LoRA, 1e-6 full)",
    "class_images": "class images for prior preservation (0 turns it off)",
    "class_images_runtime": "torch, or openvino: class images on CPU from a cached OpenVINO export of the base, bf16 "
                            "where native (0.32x torch's time at 512 px; pip install 'personalize[openvino]')",
    "rank": "LoRA rank of the U-Net",
    "lora_alpha": "LoRA alpha of the U-Net",
    "lokr_factor": "LoKr: the Kronecker factor's size (-1: the one nearest sqrt of the width)",
    "oft_block_size": "OFT: size of the orthogonal blocks; must divide every target's input width",
    "checkpoint_every": "save a resumable checkpoint every N steps (0: only at the end)",
    "resume": "continue an unfinished run from its last checkpoint",
    "overwrite": "replace a finished run in the output directory",
    "mixed_precision": "auto (fp16 on CUDA; bf16 on CPUs with native bf16, else fp32), no, fp16 or bf16",
    "use_8bit_adam": "bitsandbytes 8-bit AdamW (CUDA only); the same as --optimizer adamw8bit",
    "lr_scheduler": "constant, constant_with_warmup, cosine, linear or polynomial (diffusers' get_scheduler)",
    "lr_warmup_steps": "LR warm-up steps (with the constant schedule: constant_with_warmup)",
    "optimizer": "adamw, adamw8bit (bitsandbytes, CUDA) or prodigy (pip install 'personalize[prodigy]'; "
                 "lr defaults to 1.0)",
    "sample_every": "a grid of fixed-seed samples every N steps: samples/step-N.png + samples/index.html (0: off)",
    "sample_prompts": "file with one prompt per line for --sample-every ({token}/{class} filled; default: the "
                      "instance prompt, one recontextualisation, one property change)",
    "save_every": "a loadable adapter (full: pipeline) every N steps in steps/step-N/ (0: only the final one)",
    "score_every": "DINO, CLIP-I, CLIP-T every N steps into scores_by_step.csv/.png (0: off)",
    "score_prompts": "protocol prompts scored at each --score-every step",
    "score_images": "seeds per prompt scored at each --score-every step",
    "min_clip_t": "the best step (run.json, console) is the best DINO among steps with CLIP-T at least this",
    "dino": "DINO evaluator for --score-every: hub id or local dir",
    "clip": "CLIP evaluator for --score-every: hub id or local dir",
    "alpha_mask": "use a PNG's alpha channel as its loss mask (kohya's --alpha_mask; photo.mask.png files "
                  "are always used)",
    "allow_pickle": "allow loading .bin/.ckpt pickle weights (only for sources you trust)",
    "snr_gamma": "min-SNR loss weighting with this gamma (Hang et al. 2023; 5.0 is usual; default off)",
    "noise_offset": "offset noise strength (Guttenberg 2023; 0.05-0.1 is usual; default 0)",
    "gradient_checkpointing": "recompute activations in backward to save memory (default: on for GPUs under "
                              "40 GiB, off on CPU)",
    "cpu_half_weights": "LoRA on CPU: keep the frozen base weights in fp16, compute in fp32 (2 bytes a frozen "
                        "weight instead of 4, slower steps)",
}
SKIP = {"method", "lora_unet_targets", "lora_text_encoder_targets"}


def _scalar_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_flags(p: argparse.ArgumentParser, method: str | None = None, skip: set[str] = frozenset()) -> None:
    """One flag per TrainConfig field (minus `skip`); `method` set: also the command's handler."""
    hints = typing.get_type_hints(TrainConfig)
    if "subject" not in skip:
        p.add_argument("--subject", required=True, help=HELP["subject"])
    for f in dataclasses.fields(TrainConfig):
        if f.name in SKIP or f.name == "subject" or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        h = HELP.get(f.name, "")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=h or None)
        else:
            # a help text that names its default itself, or a None default (= decided at run time,
            # which the help says), gets no second "(default: ...)"
            tail = "" if default is None or "default" in h else f" (default: {default})"
            p.add_argument(flag, type=tp, default=default, help=(h + tail).strip() or None)
    p.add_argument("--lora-targets", dest="lora_unet_targets", default="to_q,to_v",
                   help="comma-separated U-Net module names that get LoRA (default: to_q,to_v)")
    p.add_argument("--lora-text-encoder-targets", dest="lora_text_encoder_targets", default="q_proj,v_proj",
                   help="comma-separated text-encoder module names that get LoRA (default: q_proj,v_proj)")
    if method is not None:
        p.set_defaults(func=lambda a: run(a, method))


def config_from_args(args: argparse.Namespace, method: str, **overrides) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.field_names() and k != "method"}
    values.update(overrides)
    for k in ("lora_unet_targets", "lora_text_encoder_targets"):
        values[k] = [s.strip() for s in values[k].split(",") if s.strip()]
    return TrainConfig(method=method, **values)


def run(args: argparse.Namespace, method: str) -> int:
    from ..dreambooth import train_subject

    train_subject(config_from_args(args, method))
    return 0


# flags that only one adapter method reads: shown on that method's command (and on batch)
METHOD_FLAGS = {"lokr_factor": "lokr", "oft_block_size": "oft"}
ADAPTER_HELP = {"lora": "DreamBooth-LoRA: train a small adapter for one subject",
                "dora": "DreamBooth with DoRA (weight-decomposed LoRA, Liu et al. 2024): LoRA plus a learned magnitude",
                "loha": "DreamBooth with LoHa (low-rank Hadamard product, LyCORIS)",
                "lokr": "DreamBooth with LoKr (low-rank Kronecker product, LyCORIS)",
                "oft": "DreamBooth with OFT (orthogonal finetuning, Qiu et al. 2023): block-diagonal rotations"}


def add_parser(sub) -> None:
    from ..adapters import ADAPTER_METHODS

    commands = {m: ADAPTER_HELP.get(m, f"DreamBooth with {ADAPTER_METHODS[m].algorithm}") for m in ADAPTER_METHODS}
    commands["full"] = "full DreamBooth finetuning of one subject (U-Net + text encoder)"
    for method, text in commands.items():
        skip = {f for f, m in METHOD_FLAGS.items() if m != method}
        add_flags(sub.add_parser(method, help=text, description=text), method, skip=skip)
