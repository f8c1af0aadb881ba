"""`personalize lora` / `personalize full`: flags -> TrainConfig -> dreambooth.train_subject."""

from __future__ import annotations

import argparse

from ..config import TrainConfig, other_methods_fields
from ..defaults import ADAPTER_METHOD_NAMES, METHOD_LABELS
from ..flags import add_flags as add_config_flags
from ..flags import from_args
from ..settings import add_settings_flags


def add_flags(p: argparse.ArgumentParser, method: str | None = None, skip: set[str] = frozenset()) -> None:
    """One flag per TrainConfig field (minus `skip`; personalize.flags), help and choices from the
    fields' metadata; `method` set: also the command's handler."""
    # TrainConfig.validate() refuses a bad choice, with the same line for the CLI, batch and the app
    add_config_flags(p, TrainConfig, skip=skip, check_choices=False)
    if method is not None:
        p.set_defaults(func=lambda a: run(a, method))


def config_from_args(args: argparse.Namespace, method: str, **overrides) -> TrainConfig:
    return from_args(TrainConfig, args, method=method, **overrides)


def run(args: argparse.Namespace, method: str) -> int:
    from ..dreambooth import train_subject

    train_subject(config_from_args(args, method))
    return 0


ADAPTER_HELP = {"lora": "DreamBooth-LoRA: train a small adapter for one subject",
                "dora": "DreamBooth with DoRA (weight-decomposed LoRA, Liu et al. 2024): LoRA plus a learned magnitude",
                "loha": "DreamBooth with LoHa (low-rank Hadamard product, LyCORIS)",
                "lokr": "DreamBooth with LoKr (low-rank Kronecker product, LyCORIS)",
                "oft": "DreamBooth with OFT (orthogonal finetuning, Qiu et al. 2023): block-diagonal rotations",
                "boft": "DreamBooth with BOFT (butterfly orthogonal finetuning, Liu et al. 2024)",
                "hra": "DreamBooth with HRA (Householder reflection adaptation, Yuan et al. 2024)"}


def add_parser(sub) -> None:
    commands = {m: ADAPTER_HELP.get(m, f"DreamBooth with {METHOD_LABELS[m]}") for m in ADAPTER_METHOD_NAMES}
    commands["full"] = "full DreamBooth finetuning of one subject (U-Net + text encoder)"
    for method, text in commands.items():
        skip = other_methods_fields(method)
        p = sub.add_parser(method, help=text, description=text)
        add_flags(p, method, skip=skip)
        add_settings_flags(p, presets=True)
